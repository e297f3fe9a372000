//! Preference records in a checkpoint: their tensors stacked (one map of tensors) and their
//! prompts and scores as plain JSON, so a run stopped mid-epoch keeps the pairs it sampled.
//!
//! Tensors: `t` [N], `x_t`, `x_win`, `x_lose` [N, C, H, W], `hidden` [N, L, H], `uncond`
//! [1, L, H] (the empty prompt, shared by every record) and for SDXL `text_embeds`, `time_ids`,
//! `uncond_text_embeds`, `uncond_time_ids`. JSON: `#{count, prompt, prompt_index, score_win,
//! score_lose}` (arrays of N).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::policy::PromptCond;
use super::train::RecordBatch;
use super::Record;
use crate::models::unet::AddedCond;

#[derive(Serialize, Deserialize)]
struct RecordsMeta {
    count: usize,
    prompt: Vec<String>,
    prompt_index: Vec<usize>,
    score_win: Vec<f32>,
    score_lose: Vec<f32>,
}

/// `records` as checkpoint tensors and JSON (no tensors when there are no records).
pub fn records_to_checkpoint(
    records: &[Record],
) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let meta = RecordsMeta {
        count: records.len(),
        prompt: records.iter().map(|r| r.prompt.clone()).collect(),
        prompt_index: records.iter().map(|r| r.prompt_index).collect(),
        score_win: records.iter().map(|r| r.score_win).collect(),
        score_lose: records.iter().map(|r| r.score_lose).collect(),
    };
    let mut tensors = HashMap::new();
    if !records.is_empty() {
        let refs: Vec<&Record> = records.iter().collect();
        let b = RecordBatch::stack(&refs)?;
        tensors.insert("t".into(), b.t);
        tensors.insert("x_t".into(), b.x_t);
        tensors.insert("x_win".into(), b.x_win);
        tensors.insert("x_lose".into(), b.x_lose);
        tensors.insert("hidden".into(), b.cond.hidden);
        tensors.insert("uncond".into(), b.cond.uncond);
        for (prefix, added) in [("", b.cond.added), ("uncond_", b.cond.uncond_added)] {
            if let Some(a) = added {
                tensors.insert(format!("{prefix}text_embeds"), a.text_embeds);
                tensors.insert(format!("{prefix}time_ids"), a.time_ids);
            }
        }
    }
    Ok((tensors, serde_json::to_value(meta)?))
}

/// The records saved by [`records_to_checkpoint`]; errors name the missing key or bad shape.
pub fn records_from_checkpoint(
    tensors: &HashMap<String, Tensor>,
    meta: &serde_json::Value,
) -> Result<Vec<Record>> {
    let meta: RecordsMeta = serde_json::from_value(meta.clone()).context(
        "records: the saved state is not `#{count, prompt, prompt_index, score_win, score_lose}`",
    )?;
    let n = meta.count;
    if [
        meta.prompt.len(),
        meta.prompt_index.len(),
        meta.score_win.len(),
        meta.score_lose.len(),
    ]
    .iter()
    .any(|&len| len != n)
    {
        bail!("records: the saved state lists a different number of prompts or scores than count = {n}");
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let get = |key: &str| -> Result<&Tensor> {
        let t = tensors
            .get(key)
            .with_context(|| format!("records: no tensor `{key}` in the checkpoint"))?;
        if key.starts_with("uncond") {
            return Ok(t);
        }
        if t.dims().first() != Some(&n) {
            bail!(
                "records: tensor `{key}` has shape {:?}, expected {n} rows",
                t.dims()
            );
        }
        Ok(t)
    };
    let (t, x_t, x_win, x_lose) = (get("t")?, get("x_t")?, get("x_win")?, get("x_lose")?);
    let (hidden, uncond) = (get("hidden")?, get("uncond")?);
    let added = |prefix: &str| -> Result<Option<AddedCond>> {
        if !tensors.contains_key(&format!("{prefix}text_embeds")) {
            return Ok(None);
        }
        Ok(Some(AddedCond {
            text_embeds: get(&format!("{prefix}text_embeds"))?.clone(),
            time_ids: get(&format!("{prefix}time_ids"))?.clone(),
        }))
    };
    let (added, uncond_added) = (added("")?, added("uncond_")?);
    let ts = t.to_dtype(candle_core::DType::I64)?.to_vec1::<i64>()?;
    let row = |a: &AddedCond, i: usize| -> Result<AddedCond> {
        Ok(AddedCond {
            text_embeds: a.text_embeds.narrow(0, i, 1)?,
            time_ids: a.time_ids.narrow(0, i, 1)?,
        })
    };
    (0..n)
        .map(|i| {
            Ok(Record {
                t: ts[i],
                x_t: x_t.get(i)?,
                x_win: x_win.get(i)?,
                x_lose: x_lose.get(i)?,
                prompt_index: meta.prompt_index[i],
                prompt: meta.prompt[i].clone(),
                cond: PromptCond {
                    hidden: hidden.narrow(0, i, 1)?,
                    uncond: uncond.clone(),
                    added: added.as_ref().map(|a| row(a, i)).transpose()?,
                    uncond_added: uncond_added.clone(),
                },
                score_win: meta.score_win[i],
                score_lose: meta.score_lose[i],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn record(i: usize, sdxl: bool) -> Record {
        let dev = Device::Cpu;
        let v = |shape: &[usize], base: f32| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|j| base + j as f32 * 0.5).collect();
            Tensor::from_vec(data, shape, &dev).unwrap()
        };
        let added = |base: f32| AddedCond {
            text_embeds: v(&[1, 3], base),
            time_ids: v(&[1, 6], base + 1.0),
        };
        Record {
            t: 100 * i as i64 + 1,
            x_t: v(&[2, 2, 2], i as f32),
            x_win: v(&[2, 2, 2], i as f32 + 10.0),
            x_lose: v(&[2, 2, 2], i as f32 + 20.0),
            prompt_index: i % 2,
            prompt: format!("prompt {i}"),
            cond: PromptCond {
                hidden: v(&[1, 3, 4], i as f32 + 30.0),
                uncond: v(&[1, 3, 4], -1.0),
                added: sdxl.then(|| added(i as f32)),
                uncond_added: sdxl.then(|| added(-5.0)),
            },
            score_win: 0.25 + i as f32,
            score_lose: -0.5 - i as f32,
        }
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn records_round_trip_through_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        for sdxl in [false, true] {
            let records: Vec<Record> = (0..3).map(|i| record(i, sdxl)).collect();
            let (tensors, meta) = records_to_checkpoint(&records).unwrap();
            // Through the files a checkpoint is made of.
            let path = dir.path().join("r.safetensors");
            crate::tensor::io::save_safetensors(&tensors, &path).unwrap();
            let tensors = crate::tensor::io::load_safetensors(&path, &Device::Cpu).unwrap();
            let meta: serde_json::Value = serde_json::from_str(&meta.to_string()).unwrap();
            let back = records_from_checkpoint(&tensors, &meta).unwrap();
            assert_eq!(back.len(), 3);
            for (a, b) in records.iter().zip(&back) {
                assert_eq!((a.t, a.prompt_index), (b.t, b.prompt_index));
                assert_eq!(a.prompt, b.prompt);
                assert_eq!((a.score_win, a.score_lose), (b.score_win, b.score_lose));
                for (x, y) in [
                    (&a.x_t, &b.x_t),
                    (&a.x_win, &b.x_win),
                    (&a.x_lose, &b.x_lose),
                    (&a.cond.hidden, &b.cond.hidden),
                    (&a.cond.uncond, &b.cond.uncond),
                ] {
                    assert_eq!(x.dims(), y.dims());
                    assert_eq!(flat(x), flat(y));
                }
                assert_eq!(a.cond.added.is_some(), b.cond.added.is_some());
                if let (Some(x), Some(y)) = (&a.cond.added, &b.cond.added) {
                    assert_eq!(flat(&x.text_embeds), flat(&y.text_embeds));
                    assert_eq!(flat(&x.time_ids), flat(&y.time_ids));
                }
            }
        }
        let (tensors, meta) = records_to_checkpoint(&[]).unwrap();
        assert!(tensors.is_empty());
        assert!(records_from_checkpoint(&tensors, &meta).unwrap().is_empty());
    }

    #[test]
    fn a_missing_tensor_or_count_mismatch_is_named() {
        let records: Vec<Record> = (0..2).map(|i| record(i, false)).collect();
        let (mut tensors, meta) = records_to_checkpoint(&records).unwrap();
        let mut short = meta.clone();
        short["count"] = 3.into();
        let err = records_from_checkpoint(&tensors, &short).unwrap_err();
        assert!(err.to_string().contains("count = 3"), "{err}");
        tensors.remove("x_win");
        let err = records_from_checkpoint(&tensors, &meta).unwrap_err();
        assert!(err.to_string().contains("`x_win`"), "{err}");
    }
}
