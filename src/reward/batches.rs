//! Training batches for the LRM: preference pairs (images from a manifest / parquet shard, or
//! latents already in memory) -> the tensors `LatentRewardModel::pair_loss` takes.
//!
//! Images are decoded, resized (bilinear) and centre-cropped to the resolution, mapped to
//! [-1, 1], VAE-encoded (a seeded posterior sample × scaling factor) when a VAE is given
//! (pixel-space models use the images as they are), then both images of a pair are noised to
//! the same random timestep from the pool (default 1, 51, ..., 951), or each to its own with
//! `per_image_t`. A pair whose image fails to decode is skipped and counted (once, however
//! many times it is asked for), never a panic and never a silent drop.

use std::collections::HashSet;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::batch_settings::{default_timesteps, BatchSettings};
use super::data::{ImageSource, PreferencePair, PreferenceSet, Skipped};
use super::pair_loss::validate_labels;
use crate::diffusion::DdimScheduler;
use crate::models::vae::AutoencoderKL;
use crate::tensor::SeededRng;

/// The plain part of a latent pair set as scripts write it (`latent_pairs(#{prompts, ...})`);
/// the tensors (`latents_0`, `latents_1`, `label_0`, `label_1`, `num_examples`) come beside it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct LatentPairsSpec {
    /// One prompt per pair (required).
    pub prompts: Option<Vec<String>>,
}

/// Pairs whose two "images" are latents already (tests, synthetic data, cached encodings).
#[derive(Debug, Clone)]
pub struct LatentPairs {
    pub prompts: Vec<String>,
    /// [N, C, H, W] clean latents of image 0 and image 1.
    pub latents_0: Tensor,
    pub latents_1: Tensor,
    pub label_0: Vec<f32>,
    pub label_1: Vec<f32>,
    pub num_examples: Vec<f32>,
}

impl LatentPairs {
    /// Check shapes and labels (each pair's labels in [0, 1], summing to 1). A missing
    /// `num_examples` (empty) is filled with the number of pairs of each prompt.
    pub fn new(
        prompts: Vec<String>,
        latents_0: Tensor,
        latents_1: Tensor,
        label_0: Vec<f32>,
        label_1: Vec<f32>,
        num_examples: Vec<f32>,
    ) -> Result<Self> {
        let n = prompts.len();
        if latents_0.dims() != latents_1.dims() {
            bail!(
                "latent pairs: latents_0 {:?} and latents_1 {:?} differ in shape",
                latents_0.dims(),
                latents_1.dims()
            );
        }
        if latents_0.rank() < 2 || latents_0.dim(0)? != n {
            bail!(
                "latent pairs: {n} prompts but latents of shape {:?} (expected [{n}, C, H, W])",
                latents_0.dims()
            );
        }
        if label_0.len() != n || label_1.len() != n {
            bail!(
                "latent pairs: {n} prompts but {} label_0 and {} label_1 values",
                label_0.len(),
                label_1.len()
            );
        }
        validate_labels(&label_0, &label_1).map_err(|e| anyhow::anyhow!("latent pairs: {e}"))?;
        let num_examples = if num_examples.is_empty() {
            prompts
                .iter()
                .map(|p| prompts.iter().filter(|q| *q == p).count() as f32)
                .collect()
        } else {
            if num_examples.len() != n {
                bail!(
                    "latent pairs: {n} prompts but {} num_examples values",
                    num_examples.len()
                );
            }
            if let Some(bad) = num_examples.iter().find(|v| v.is_nan() || **v <= 0.0) {
                bail!("latent pairs: num_examples must be > 0, got {bad}");
            }
            num_examples
        };
        Ok(Self {
            prompts,
            latents_0,
            latents_1,
            label_0,
            label_1,
            num_examples,
        })
    }
}

#[derive(Debug, Clone)]
pub enum PairSource {
    Images(Vec<PreferencePair>),
    Latents(LatentPairs),
}

/// A preference data set the recipes batch from.
#[derive(Debug)]
pub struct PreferenceData {
    pub source: PairSource,
    /// What the reader skipped, then pairs whose images failed to decode.
    skipped: Mutex<Vec<Skipped>>,
    /// Pairs known to fail (so a second epoch does not count them again).
    failed: Mutex<HashSet<usize>>,
    /// Where the data came from (for messages).
    pub origin: String,
}

/// The labels of one pair (each in [0, 1], summing to 1) and its prompt's pair count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairLabels {
    pub label_0: f32,
    pub label_1: f32,
    pub num_examples: f32,
}

/// How to make one batch: the settings and the models that encode and noise.
pub struct BatchOptions<'a> {
    pub settings: BatchSettings,
    pub vae: Option<&'a AutoencoderKL>,
    pub scheduler: &'a DdimScheduler,
    pub device: Device,
}

/// The tensors `pair_loss` takes, for the pairs that made it. Serializes its plain fields
/// (prompts, indices, skipped) for scripts; the tensors travel beside them.
#[derive(Debug, Clone, Serialize)]
pub struct PairBatch {
    pub prompts: Vec<String>,
    /// Noisy latents x_t [N, C, h, w] of image 0 and image 1.
    #[serde(skip)]
    pub latents_0: Tensor,
    #[serde(skip)]
    pub latents_1: Tensor,
    /// [N, 2] i64.
    #[serde(skip)]
    pub t: Tensor,
    #[serde(skip)]
    pub label_0: Tensor,
    #[serde(skip)]
    pub label_1: Tensor,
    #[serde(skip)]
    pub num_examples: Tensor,
    /// Data-set indices of the rows, in order.
    pub indices: Vec<usize>,
    /// Pairs of this request that were skipped (undecodable images).
    pub skipped: usize,
}

impl PairBatch {
    /// The tensors by name.
    pub fn tensors(&self) -> [(&'static str, &Tensor); 6] {
        [
            ("latents_0", &self.latents_0),
            ("latents_1", &self.latents_1),
            ("t", &self.t),
            ("label_0", &self.label_0),
            ("label_1", &self.label_1),
            ("num_examples", &self.num_examples),
        ]
    }
}

fn decode(source: &ImageSource, resolution: usize, device: &Device) -> Result<Tensor> {
    let img = match source {
        ImageSource::Path(p) => crate::image_io::read_rgb(p)?,
        ImageSource::Bytes(b) => image::load_from_memory(b)
            .map_err(|e| anyhow::anyhow!("cannot decode image bytes ({} bytes): {e}", b.len()))?
            .to_rgb8(),
    };
    crate::image_io::rgb_to_tensor(
        &crate::image_io::resize_center_crop(&img, resolution as u32),
        device,
    )
}

fn describe(source: &ImageSource) -> String {
    match source {
        ImageSource::Path(p) => p.display().to_string(),
        ImageSource::Bytes(b) => format!("<{} bytes>", b.len()),
    }
}

impl PreferenceData {
    pub fn from_set(set: PreferenceSet, origin: &str) -> Self {
        Self {
            source: PairSource::Images(set.pairs),
            skipped: Mutex::new(set.skipped),
            failed: Mutex::new(HashSet::new()),
            origin: origin.to_string(),
        }
    }

    pub fn from_latents(pairs: LatentPairs) -> Self {
        Self {
            source: PairSource::Latents(pairs),
            skipped: Mutex::new(Vec::new()),
            failed: Mutex::new(HashSet::new()),
            origin: "latent pairs".into(),
        }
    }

    /// Read a manifest (.jsonl), a parquet shard, or a folder of them.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let set = super::data::read_preferences(path)?;
        Ok(Self::from_set(set, &path.display().to_string()))
    }

    pub fn len(&self) -> usize {
        match &self.source {
            PairSource::Images(p) => p.len(),
            PairSource::Latents(l) => l.prompts.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn prompt(&self, i: usize) -> &str {
        match &self.source {
            PairSource::Images(p) => &p[i].prompt,
            PairSource::Latents(l) => &l.prompts[i],
        }
    }

    /// (label_0, label_1, num_examples) of pair i.
    pub fn labels(&self, i: usize) -> PairLabels {
        let (label_0, label_1, num_examples) = match &self.source {
            PairSource::Images(p) => (p[i].label_0, p[i].label_1, p[i].num_examples_per_prompt),
            PairSource::Latents(l) => (l.label_0[i], l.label_1[i], l.num_examples[i]),
        };
        PairLabels {
            label_0,
            label_1,
            num_examples,
        }
    }

    pub fn skipped(&self) -> Vec<Skipped> {
        self.skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One line per reason with its count (empty when nothing was skipped).
    pub fn skip_summary(&self) -> String {
        PreferenceSet {
            pairs: Vec::new(),
            skipped: self.skipped(),
        }
        .skip_summary()
    }

    /// The pairs at `indices` as a new data set (skips so far are carried over).
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        self.check_indices(indices)?;
        let source = match &self.source {
            PairSource::Images(p) => {
                PairSource::Images(indices.iter().map(|&i| p[i].clone()).collect())
            }
            PairSource::Latents(l) => {
                let idx = index_tensor(indices, l.latents_0.device())?;
                PairSource::Latents(LatentPairs {
                    prompts: indices.iter().map(|&i| l.prompts[i].clone()).collect(),
                    latents_0: l.latents_0.index_select(&idx, 0)?,
                    latents_1: l.latents_1.index_select(&idx, 0)?,
                    label_0: indices.iter().map(|&i| l.label_0[i]).collect(),
                    label_1: indices.iter().map(|&i| l.label_1[i]).collect(),
                    num_examples: indices.iter().map(|&i| l.num_examples[i]).collect(),
                })
            }
        };
        Ok(Self {
            source,
            skipped: Mutex::new(self.skipped()),
            failed: Mutex::new(HashSet::new()),
            origin: format!("{} (subset of {})", self.origin, indices.len()),
        })
    }

    fn check_indices(&self, indices: &[usize]) -> Result<()> {
        let n = self.len();
        if let Some(bad) = indices.iter().find(|&&i| i >= n) {
            bail!(
                "{}: pair index {bad} is out of range (the set has {n} pairs)",
                self.origin
            );
        }
        Ok(())
    }

    /// Clean latents of image 0 and image 1 of the pairs at `indices` that decode, with the
    /// kept indices.
    fn clean_latents(
        &self,
        indices: &[usize],
        opts: &BatchOptions,
        rng: &mut SeededRng,
    ) -> Result<(Tensor, Tensor, Vec<usize>, usize)> {
        match &self.source {
            PairSource::Latents(l) => {
                let idx = index_tensor(indices, l.latents_0.device())?;
                Ok((
                    l.latents_0.index_select(&idx, 0)?.to_device(&opts.device)?,
                    l.latents_1.index_select(&idx, 0)?.to_device(&opts.device)?,
                    indices.to_vec(),
                    0,
                ))
            }
            PairSource::Images(pairs) => {
                if opts.settings.resolution == 0 || opts.settings.resolution > 4096 {
                    bail!(
                        "batch: resolution must be in 1..=4096, got {}",
                        opts.settings.resolution
                    );
                }
                let mut imgs_0 = Vec::new();
                let mut imgs_1 = Vec::new();
                let mut kept = Vec::new();
                let mut skipped = 0;
                for &i in indices {
                    if self
                        .failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&i)
                    {
                        skipped += 1;
                        continue;
                    }
                    let p = &pairs[i];
                    let a = decode(&p.image_0, opts.settings.resolution, &opts.device);
                    let b = decode(&p.image_1, opts.settings.resolution, &opts.device);
                    match (a, b) {
                        (Ok(a), Ok(b)) => {
                            imgs_0.push(a);
                            imgs_1.push(b);
                            kept.push(i);
                        }
                        (a, b) => {
                            let (which, src, err) = match a {
                                Err(e) => ("image_0", &p.image_0, e),
                                Ok(_) => ("image_1", &p.image_1, b.unwrap_err()),
                            };
                            tracing::warn!(
                                "{}: pair {i} ({which} {}) skipped: {err:#}",
                                self.origin,
                                describe(src)
                            );
                            self.failed
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(i);
                            self.skipped
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Skipped {
                                    location: format!(
                                        "{} pair {i} {which} {}: {err:#}",
                                        self.origin,
                                        describe(src)
                                    ),
                                    reason: "an image failed to decode".into(),
                                });
                            skipped += 1;
                        }
                    }
                }
                if kept.is_empty() {
                    return Ok((
                        Tensor::zeros(0, DType::F32, &opts.device)?,
                        Tensor::zeros(0, DType::F32, &opts.device)?,
                        kept,
                        skipped,
                    ));
                }
                let x0 = Tensor::stack(&imgs_0, 0)?;
                let x1 = Tensor::stack(&imgs_1, 0)?;
                let (x0, x1) = match opts.vae {
                    None => (x0, x1),
                    Some(vae) => {
                        let n = kept.len();
                        let both = Tensor::cat(&[&x0, &x1], 0)?
                            .to_device(vae.device())?
                            .to_dtype(vae.dtype())?;
                        let z = vae
                            .encode(&both)
                            .context("batch: VAE encode")?
                            .sample(rng)?;
                        let z = match vae.shift_factor() {
                            Some(s) => (z - s)?,
                            None => z,
                        };
                        let z = (z * vae.scaling_factor())?
                            .to_dtype(DType::F32)?
                            .to_device(&opts.device)?;
                        (z.narrow(0, 0, n)?, z.narrow(0, n, n)?)
                    }
                };
                Ok((x0, x1, kept, skipped))
            }
        }
    }

    /// A batch of the pairs at `indices`: noised latents, timesteps [N, 2], labels, weights.
    /// `rng` draws the timesteps, the VAE samples and the noise.
    pub fn batch(
        &self,
        indices: &[usize],
        opts: &BatchOptions,
        rng: &mut SeededRng,
    ) -> Result<PairBatch> {
        self.check_indices(indices)?;
        if opts.settings.timesteps.is_empty() {
            bail!("batch: the timestep pool is empty");
        }
        let n_train = opts.scheduler.num_train_timesteps() as i64;
        if let Some(bad) = opts
            .settings
            .timesteps
            .iter()
            .find(|&&t| t < 0 || t >= n_train)
        {
            bail!("batch: timestep {bad} is outside 0..{n_train}");
        }
        let (x0, x1, kept, skipped) = self.clean_latents(indices, opts, rng)?;
        let n = kept.len();
        let dev = &opts.device;
        let mut draw = || {
            opts.settings.timesteps[rng.int_in(0, opts.settings.timesteps.len() as i64) as usize]
        };
        let mut ts = Vec::with_capacity(2 * n);
        for _ in 0..n {
            let a = draw();
            let b = if opts.settings.per_image_t { draw() } else { a };
            ts.push(a);
            ts.push(b);
        }
        let t = Tensor::from_vec(ts, (n, 2), dev)?;
        let (l0, l1, ne): (Vec<f32>, Vec<f32>, Vec<f32>) = {
            let mut a = Vec::with_capacity(n);
            let mut b = Vec::with_capacity(n);
            let mut c = Vec::with_capacity(n);
            for &i in &kept {
                let l = self.labels(i);
                a.push(l.label_0);
                b.push(l.label_1);
                c.push(if l.num_examples > 0.0 {
                    l.num_examples
                } else {
                    1.0
                });
            }
            (a, b, c)
        };
        let prompts: Vec<String> = kept.iter().map(|&i| self.prompt(i).to_string()).collect();
        let (x0, x1) = if n == 0 || opts.settings.clean {
            (x0, x1)
        } else {
            let t0 = t.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
            let t1 = t.narrow(1, 1, 1)?.squeeze(1)?.contiguous()?;
            let e0 = rng.randn(x0.dims(), dev)?.to_dtype(x0.dtype())?;
            let e1 = rng.randn(x1.dims(), dev)?.to_dtype(x1.dtype())?;
            (
                opts.scheduler.add_noise(&x0, &e0, &t0)?,
                opts.scheduler.add_noise(&x1, &e1, &t1)?,
            )
        };
        Ok(PairBatch {
            prompts,
            latents_0: x0,
            latents_1: x1,
            t,
            label_0: Tensor::from_vec(l0, n, dev)?,
            label_1: Tensor::from_vec(l1, n, dev)?,
            num_examples: Tensor::from_vec(ne, n, dev)?,
            indices: kept,
            skipped,
        })
    }
}

/// A CSV file as rows of (column, value) in header order; values that parse as numbers are
/// numbers. Quoted fields ("a, b", "" for a quote) are understood.
pub fn read_csv(path: &std::path::Path) -> Result<(Vec<String>, Vec<Vec<CsvValue>>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read CSV {}", path.display()))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        bail!("{}: empty CSV (no header line)", path.display());
    };
    let columns: Vec<String> = split_csv_line(header)
        .with_context(|| format!("{}:1: bad header", path.display()))?
        .into_iter()
        .map(|c| c.trim().to_string())
        .collect();
    let mut rows = Vec::new();
    for (i, line) in lines {
        let fields =
            split_csv_line(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
        if fields.len() != columns.len() {
            bail!(
                "{}:{}: {} fields but the header has {} columns",
                path.display(),
                i + 1,
                fields.len(),
                columns.len()
            );
        }
        rows.push(
            fields
                .into_iter()
                .map(|f| {
                    let t = f.trim();
                    if let Ok(v) = t.parse::<i64>() {
                        CsvValue::Int(v)
                    } else if let Ok(v) = t.parse::<f64>() {
                        CsvValue::Float(v)
                    } else {
                        match t.to_ascii_lowercase().as_str() {
                            "true" => CsvValue::Bool(true),
                            "false" => CsvValue::Bool(false),
                            _ => CsvValue::Str(f),
                        }
                    }
                })
                .collect(),
        );
    }
    Ok((columns, rows))
}

#[derive(Debug, Clone, PartialEq)]
pub enum CsvValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

fn split_csv_line(line: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.trim().is_empty() => {
                cur.clear();
                quoted = true;
            }
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    if quoted {
        bail!("unterminated quoted field");
    }
    out.push(cur.trim_end_matches('\r').to_string());
    Ok(out)
}

/// `indices` as a u32 tensor on `device`, for `index_select`.
fn index_tensor(indices: &[usize], device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(idx, indices.len(), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_lines_split_with_quotes() {
        assert_eq!(
            split_csv_line(r#"a,"b, c",1.5,"say ""hi""""#).unwrap(),
            vec!["a", "b, c", "1.5", r#"say "hi""#]
        );
        assert!(split_csv_line(r#"a,"b"#).is_err());
    }

    #[test]
    fn default_timesteps_are_the_lrm_pool() {
        let t = default_timesteps();
        assert_eq!((t[0], t[1], t[19], t.len()), (1, 51, 951, 20));
    }
}
