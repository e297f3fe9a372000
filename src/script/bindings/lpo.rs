//! LPO in scripts: the policy, the multi-candidate sampler and the training step.
//!
//! ```text
//! import "compare" as cmp;
//! let policy = lpo_policy(load_unet(dir), #{lora: #{rank: 4, alpha: 4.0, seed: 0}});
//! let opt = adamw(policy.params, #{lr: 6e-5});
//! let out = lpo_sample(policy, te, tok, sched, lrm, prompts, Fn("cmp::preference_compare"),
//!                      #{k: 4, steps: 20, guidance_scale: 5.0, rng: r,
//!                        compare_opts: #{mode: "sigma", min: 0.35, max: 0.5, scheduler: sched}});
//! for batch in out.records.shuffled(r).batches(10) {
//!     let m = lpo_train_step(policy, sched, batch, opt, #{beta: 500, eps: 0.1});
//! }
//! ```

use std::sync::Arc;

use rhai::plugin::*;

use crate::lpo::{Policy, Record};

/// A shared handle on one policy.
pub type ScriptPolicy = Arc<Policy>;

/// Preference records of the sampler (cheap to clone; tensors are shared).
#[derive(Clone, Default)]
pub struct Records(pub Arc<Vec<Record>>);

/// Options of the functions below that take a declared option map.
pub fn declared_options() -> Vec<(&'static str, Vec<crate::script::declared::OptionDoc>)> {
    use crate::script::declared::option_docs;
    vec![
        ("lpo_train_step", option_docs::<crate::lpo::TrainConfig>()),
        ("lpo_log_probs", option_docs::<crate::lpo::TrainConfig>()),
    ]
}

mod helpers {
    use std::sync::Arc;

    use candle_core::{DType, Tensor};
    use rhai::{Array, Dynamic, FnPtr, Map, NativeCallContext};

    use super::Records;
    use crate::lpo::sampler::{bucket, Comparison, StepLog, BUCKETS};
    use crate::lpo::{Record, TrainMetrics};
    use crate::models::clip_text::ClipTextModel;
    use crate::models::tokenizer::ClipTokenizer;
    use crate::script::bindings::text::{TextEncoder, Tokenizer};
    use crate::script::error::{OrScriptError, ScriptResult};

    /// One text encoder / tokenizer, or an array of two (SDXL).
    pub(super) fn list<T: Clone + 'static>(
        ctx: &NativeCallContext,
        v: &Dynamic,
        what: &str,
    ) -> ScriptResult<Vec<T>> {
        if let Some(x) = v.clone().try_cast::<T>() {
            return Ok(vec![x]);
        }
        if v.is_array() {
            let arr = v.clone().cast::<Array>();
            return arr
                .into_iter()
                .enumerate()
                .map(|(i, x)| {
                    let tn = x.type_name();
                    x.try_cast::<T>()
                        .ok_or_else(|| format!("lpo_sample: {what} {i} is a {tn}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .or_script(ctx);
        }
        Err(format!(
            "lpo_sample: expected a {what} (or an array of two for SDXL), got {}",
            v.type_name()
        ))
        .or_script(ctx)
    }

    pub(super) fn encoders<'a>(
        ctx: &NativeCallContext,
        tes: &'a [TextEncoder],
        toks: &'a [Tokenizer],
    ) -> ScriptResult<Vec<(&'a ClipTextModel, &'a ClipTokenizer)>> {
        if tes.len() != toks.len() {
            return Err(format!(
                "lpo_sample: {} text encoder(s) but {} tokenizer(s)",
                tes.len(),
                toks.len()
            ))
            .or_script(ctx);
        }
        for (i, (te, tok)) in tes.iter().zip(toks).enumerate() {
            let v = te.config().vocab_size;
            if tok.vocab_size() > v {
                return Err(format!(
                    "lpo_sample: tokenizer {} ({}) has {} tokens but text encoder {i} has a vocabulary of {v}: they do not belong together",
                    i,
                    tok.dir().display(),
                    tok.vocab_size()
                ))
                .or_script(ctx);
            }
        }
        Ok(tes
            .iter()
            .map(|t| t.as_ref())
            .zip(toks.iter().map(|t| t.as_ref()))
            .collect())
    }

    pub(super) fn prompt_strings(
        ctx: &NativeCallContext,
        v: &Dynamic,
    ) -> ScriptResult<Vec<String>> {
        if let Ok(s) = v.clone().into_string() {
            return Ok(vec![s]);
        }
        let arr = v
            .clone()
            .try_cast::<Array>()
            .ok_or_else(|| {
                format!(
                    "lpo_sample: prompts must be an array of strings, got {}",
                    v.type_name()
                )
            })
            .or_script(ctx)?;
        let out = arr
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                p.into_string()
                    .map_err(|t| format!("lpo_sample: prompt {i} is a {t}, not a string"))
            })
            .collect::<Result<Vec<_>, _>>()
            .or_script(ctx)?;
        if out.is_empty() {
            return Err("lpo_sample: the prompt list is empty (no prompts to sample)")
                .or_script(ctx);
        }
        Ok(out)
    }

    fn fn_label(f: &FnPtr) -> String {
        format!("compare function `{}`", f.fn_name())
    }

    /// Call the compare function and validate its result: `#{indices: [2, B] ints, valid: [B]}`.
    pub(super) fn call_compare(
        ctx: &NativeCallContext,
        f: &FnPtr,
        scores: &Tensor,
        t: &Tensor,
        opts: &Map,
    ) -> ScriptResult<Comparison> {
        let (k, b) = scores.dims2().or_script(ctx)?;
        let label = fn_label(f);
        let out: Dynamic = f.call_within_context(
            ctx,
            (
                Dynamic::from(scores.clone()),
                Dynamic::from(t.clone()),
                Dynamic::from_map(opts.clone()),
            ),
        )?;
        let tn = out.type_name();
        let map = out
            .try_cast::<Map>()
            .ok_or_else(|| format!("lpo_sample: {label} returned a {tn}; expected #{{indices: [2, {b}] ints, valid: [{b}]}}"))
            .or_script(ctx)?;
        let get = |key: &str| -> ScriptResult<Tensor> {
            let v = map
                .get(key)
                .ok_or_else(|| format!("lpo_sample: {label} returned no `{key}` (keys: {:?}); expected #{{indices: [2, {b}] ints, valid: [{b}]}}", map.keys().collect::<Vec<_>>()))
                .or_script(ctx)?;
            crate::script::convert::tensor_from_dynamic(v, &candle_core::Device::Cpu)
                .map_err(|e| format!("lpo_sample: {label}: `{key}`: {e}"))
                .or_script(ctx)
        };
        let indices = get("indices")?;
        if indices.dims() != [2, b] || indices.dtype().is_float() {
            return Err(format!(
                "lpo_sample: {label} returned indices of shape {:?} ({}); expected [2, {b}] ints (row 0 best, row 1 worst candidate of K = {k})",
                indices.dims(),
                indices.dtype().as_str()
            ))
            .or_script(ctx);
        }
        let valid = get("valid")?;
        if valid.dims() != [b] {
            return Err(format!(
                "lpo_sample: {label} returned valid of shape {:?}; expected [{b}] (one flag per prompt)",
                valid.dims()
            ))
            .or_script(ctx);
        }
        let idx: Vec<Vec<i64>> = indices
            .to_dtype(DType::I64)
            .and_then(|t| t.to_vec2())
            .or_script(ctx)?;
        if let Some(bad) = idx.iter().flatten().find(|&&i| i < 0 || i >= k as i64) {
            return Err(format!(
                "lpo_sample: {label} returned candidate index {bad}, outside 0..{k}"
            ))
            .or_script(ctx);
        }
        let valid: Vec<f64> = valid
            .to_dtype(DType::F64)
            .and_then(|t| t.to_vec1())
            .or_script(ctx)?;
        Ok(Comparison {
            best: idx[0].iter().map(|&i| i as usize).collect(),
            worst: idx[1].iter().map(|&i| i as usize).collect(),
            valid: valid.into_iter().map(|v| v != 0.0).collect(),
        })
    }

    pub(super) fn bucket_counts(records: &[Record]) -> [i64; 4] {
        let mut c = [0i64; 4];
        for r in records {
            c[bucket(r.t)] += 1;
        }
        c
    }

    pub(super) fn buckets_map(records: &[Record]) -> Map {
        let c = bucket_counts(records);
        BUCKETS
            .iter()
            .zip(c)
            .map(|(k, v)| ((*k).into(), Dynamic::from(v)))
            .collect()
    }

    pub(super) fn log_entry(l: &StepLog) -> ScriptResult<Map> {
        let mut m = Map::new();
        m.insert("step".into(), Dynamic::from(l.step as i64));
        m.insert("t".into(), Dynamic::from(l.t));
        m.insert("score_mean".into(), Dynamic::from(l.score_mean));
        m.insert("score_std".into(), Dynamic::from(l.score_std));
        m.insert("valid".into(), Dynamic::from(l.valid as i64));
        let scores =
            Tensor::new(l.scores.clone(), &candle_core::Device::Cpu).map_err(|e| e.to_string())?;
        m.insert("scores".into(), Dynamic::from(scores));
        m.insert(
            "chosen".into(),
            Dynamic::from_array(l.chosen.iter().map(|&c| Dynamic::from(c as i64)).collect()),
        );
        Ok(m)
    }

    /// Sampling statistics over the whole call, ready for `log_metrics`.
    pub(super) fn stats(records: &[Record], log: &[StepLog], b: usize) -> Map {
        let mut m = buckets_map(records);
        let all: Vec<f64> = log
            .iter()
            .flat_map(|l| l.scores.iter().flatten().map(|&s| s as f64))
            .collect();
        let n = all.len().max(1) as f64;
        let mean = all.iter().sum::<f64>() / n;
        let std = (all.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
        m.insert("valid_pairs".into(), Dynamic::from(records.len() as i64));
        m.insert("comparisons".into(), Dynamic::from((log.len() * b) as i64));
        m.insert("score_mean".into(), Dynamic::from(mean));
        m.insert("score_std".into(), Dynamic::from(std));
        m
    }

    pub(super) fn metrics_map(m: &TrainMetrics) -> Map {
        let f = |v: f64| Dynamic::from(v);
        [
            ("loss", f(m.loss)),
            ("ratio_win", f(m.ratio_win)),
            ("ratio_lose", f(m.ratio_lose)),
            ("lp_win", f(m.lp_win)),
            ("lp_lose", f(m.lp_lose)),
            ("lp_win_ref", f(m.lp_win_ref)),
            ("lp_lose_ref", f(m.lp_lose_ref)),
            ("implicit_acc", f(m.implicit_acc)),
            ("margin", f(m.margin)),
            ("grad_norm", f(m.grad_norm)),
            ("lr", f(m.lr)),
            ("step", Dynamic::from(m.step as i64)),
            ("pairs", Dynamic::from(m.pairs as i64)),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v))
        .collect()
    }

    pub(super) fn record_map(r: &Record) -> Map {
        let mut m = Map::new();
        m.insert("t".into(), Dynamic::from(r.t));
        m.insert("x_t".into(), Dynamic::from(r.x_t.clone()));
        m.insert("x_win".into(), Dynamic::from(r.x_win.clone()));
        m.insert("x_lose".into(), Dynamic::from(r.x_lose.clone()));
        m.insert("prompt".into(), Dynamic::from(r.prompt.clone()));
        m.insert("prompt_index".into(), Dynamic::from(r.prompt_index as i64));
        m.insert("hidden".into(), Dynamic::from(r.cond.hidden.clone()));
        m.insert("score_win".into(), Dynamic::from(r.score_win as f64));
        m.insert("score_lose".into(), Dynamic::from(r.score_lose as f64));
        m
    }

    pub(super) fn train_config(
        ctx: &NativeCallContext,
        opts: &Map,
        func: &str,
    ) -> ScriptResult<crate::lpo::TrainConfig> {
        crate::script::declared::from_map(opts, func).or_script(ctx)
    }

    pub(super) fn records(v: Vec<Record>) -> Records {
        Records(Arc::new(v))
    }
}

#[export_module]
pub mod lpo_api {
    use std::sync::Arc;

    use candle_core::Tensor;
    use rhai::{Array, Dynamic, FnPtr, Map};

    use super::helpers::*;
    use super::{Records, ScriptPolicy};
    use crate::lpo::sampler::{sample_with_reward, SamplerConfig, SamplerInputs};
    use crate::lpo::train::{batch_log_probs, train_step, RecordBatch};
    use crate::lpo::{Policy, PromptCond};
    use crate::models::loading::WeightMode;
    use crate::models::unet::UNet2DConditionModel;
    use crate::optim::Params;
    use crate::script::bindings::diffusion::Scheduler;
    use crate::script::bindings::lrm::ScriptLrm;
    use crate::script::bindings::rng::ScriptRng;
    use crate::script::bindings::text::{TextEncoder, Tokenizer};
    use crate::script::bindings::train::ScriptOptimizer;
    use crate::script::bindings::unet::ScriptUNet;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::options::Options;
    use crate::script::Host;
    use crate::tensor::SeededRng;

    // ---- policy ----

    /// The LPO policy over a UNet. `#{lora: #{rank: 4, alpha: 4.0, targets: [..], seed}}`:
    /// LoRA adapters (added unless the UNet already has some, e.g. from `load_lora`; `targets`
    /// as in `add_lora`: module-name suffixes of any linear or conv, `"all-linear"`, `"all-conv"`); the
    /// reference is the same UNet with adapters off. `#{full: true, reference: dir | unet}`:
    /// full fine-tuning of a UNet loaded `trainable: true` against a frozen reference UNet.
    /// `gradient_checkpointing: true` recomputes the UNet's blocks in backward (less memory).
    #[rhai_fn(return_raw, volatile)]
    pub fn lpo_policy(
        ctx: NativeCallContext,
        unet: ScriptUNet,
        opts: Map,
    ) -> ScriptResult<ScriptPolicy> {
        let o = Options::new(
            &opts,
            "lpo_policy",
            &["lora", "full", "reference", "gradient_checkpointing"],
        )
        .or_script(&ctx)?;
        let checkpointing = o
            .bool("gradient_checkpointing", unet.gradient_checkpointing())
            .or_script(&ctx)?;
        unet.set_gradient_checkpointing(checkpointing);
        let host = Host::of(&ctx);
        if o.bool("full", false).or_script(&ctx)? {
            let reference = match o.opt_dynamic("reference") {
                Some(r) if r.is::<ScriptUNet>() => r.cast::<ScriptUNet>(),
                Some(r) if r.is_string() => {
                    let dir = r.into_string().unwrap_or_default();
                    let p = host.readable(&dir).or_script(&ctx)?;
                    let p = if p.join("unet/config.json").is_file() {
                        p.join("unet")
                    } else {
                        p
                    };
                    Arc::new(
                        UNet2DConditionModel::load(&p, unet.dtype(), &host.device, WeightMode::Frozen)
                            .or_script(&ctx)?,
                    )
                }
                _ => {
                    return Err("lpo_policy: full fine-tuning needs `reference`: the base model folder or a frozen UNet")
                        .or_script(&ctx)
                }
            };
            return Policy::full(unet, reference).map(Arc::new).or_script(&ctx);
        }
        let cfg = match o
            .opt_typed::<Map>("lora", "a map #{rank, alpha, targets, seed}")
            .or_script(&ctx)?
        {
            None => None,
            Some(m) => Some(crate::script::bindings::unet::lora_config_from_map(
                &ctx,
                &m,
                "lpo_policy lora",
            )?),
        };
        Policy::lora(unet, cfg.as_ref())
            .map(Arc::new)
            .or_script(&ctx)
    }

    /// The trainable tensors (LoRA adapters or every UNet weight): `adamw(policy.params, ..)`,
    /// `policy.params.to_map()` for checkpoints, `.load_map(m)` to restore.
    #[rhai_fn(get = "params", pure, return_raw)]
    pub fn policy_params(ctx: NativeCallContext, p: &mut ScriptPolicy) -> ScriptResult<Params> {
        p.params().or_script(&ctx)
    }

    /// The policy's UNet (for `save_lora`, `merge_lora`, sampling by hand).
    #[rhai_fn(get = "unet", pure)]
    pub fn policy_unet(p: &mut ScriptPolicy) -> ScriptUNet {
        p.unet.clone()
    }

    /// The UNet to sample the policy with: a frozen view of the trained weights for full
    /// fine-tuning (no backward graph), the adapted UNet itself with LoRA.
    #[rhai_fn(get = "sampling_unet", pure, return_raw)]
    pub fn policy_sampling_unet(
        ctx: NativeCallContext,
        p: &mut ScriptPolicy,
    ) -> ScriptResult<ScriptUNet> {
        p.sampling_unet().or_script(&ctx)
    }

    /// True for a LoRA policy, false for full fine-tuning.
    #[rhai_fn(get = "is_lora", pure)]
    pub fn policy_is_lora(p: &mut ScriptPolicy) -> bool {
        p.is_lora()
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn policy_to_string(p: &mut ScriptPolicy) -> String {
        format!(
            "LpoPolicy({}, {} trainable elements)",
            if p.is_lora() { "LoRA" } else { "full" },
            p.unet
                .trainable_vars()
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum::<usize>()
        )
    }

    // ---- sampler ----

    /// LPO's multi-candidate sampler over `prompts` (an array of strings). The policy's
    /// prompts are encoded once with `text_encoder`/`tokenizer` (arrays of two for SDXL),
    /// the LRM's with its own. Options (defaults): `k` 4, `steps` 20, `eta` 1.0,
    /// `guidance_scale` 5.0, `divert_start` 0, `divert_end` 0 (= to the end; step indices,
    /// 0-based), `seed` (the run's seed) or `rng` (a shared Rng: its stream advances),
    /// `compare_opts` (passed to the compare function as its third argument), `latent_shape`
    /// [C, H, W] (default: the UNet's in_channels and sample_size), `time_ids` (SDXL, [6]),
    /// `reward_fn` (a closure `|candidates [K, B, C, H, W], t [B]| -> scores [K, B]` used instead
    /// of the LRM: a random or pixel-judge control, or any other step-level reward).
    /// `compare_fn` (e.g. `Fn("cmp::preference_compare")` or a closure) is called at every
    /// diverting step with (scores [K, B], t [B], compare_opts) and must return
    /// `#{indices: [2, B] ints (best; worst), valid: [B]}`.
    /// Returns `#{records, log, latents, stats}`: the Records of valid pairs, one log map per
    /// diverting step `#{step, t, score_mean, score_std, valid, scores [K, B], chosen}`, the
    /// final x_0 latents [B, C, H, W], and `stats` `#{valid_pairs, comparisons, score_mean,
    /// score_std, pairs_t751_1000, pairs_t501_751, pairs_t251_501, pairs_t0_251}`.
    #[rhai_fn(return_raw, volatile)]
    #[allow(clippy::too_many_arguments)]
    pub fn lpo_sample(
        ctx: NativeCallContext,
        policy: ScriptPolicy,
        text_encoder: Dynamic,
        tokenizer: Dynamic,
        scheduler: Scheduler,
        lrm: ScriptLrm,
        prompts: Dynamic,
        compare_fn: Dynamic,
        opts: Map,
    ) -> ScriptResult<Map> {
        let o = Options::new(
            &opts,
            "lpo_sample",
            &[
                "k",
                "steps",
                "eta",
                "guidance_scale",
                "divert_start",
                "divert_end",
                "seed",
                "rng",
                "compare_opts",
                "latent_shape",
                "time_ids",
                "reward_fn",
            ],
        )
        .or_script(&ctx)?;
        let host = Host::of(&ctx);
        host.check().or_script(&ctx)?;
        let d = SamplerConfig::default();
        let latent_shape = match o
            .opt_typed::<Array>("latent_shape", "an array [C, H, W]")
            .or_script(&ctx)?
        {
            None => None,
            Some(a) => {
                let v: Vec<i64> = a.iter().filter_map(|x| x.as_int().ok()).collect();
                if v.len() != 3 || a.len() != 3 || v.iter().any(|&x| x < 1) {
                    return Err(format!(
                        "lpo_sample: latent_shape must be [C, H, W] positive ints, got {a:?}"
                    ))
                    .or_script(&ctx);
                }
                Some([v[0] as usize, v[1] as usize, v[2] as usize])
            }
        };
        let cfg = SamplerConfig {
            k: o.usize("k", d.k).or_script(&ctx)?,
            num_steps: o.usize("steps", d.num_steps).or_script(&ctx)?,
            eta: o.f64("eta", d.eta).or_script(&ctx)?,
            guidance_scale: o.f64("guidance_scale", d.guidance_scale).or_script(&ctx)?,
            divert_start: o.usize("divert_start", d.divert_start).or_script(&ctx)?,
            divert_end: o.usize("divert_end", d.divert_end).or_script(&ctx)?,
            latent_shape,
        };
        cfg.validate().or_script(&ctx)?;
        let compare_opts = o
            .opt_typed::<Map>("compare_opts", "a map")
            .or_script(&ctx)?
            .unwrap_or_default();
        let f: FnPtr = if let Some(f) = compare_fn.clone().try_cast::<FnPtr>() {
            f
        } else if let Ok(name) = compare_fn.clone().into_string() {
            FnPtr::new(name).or_script(&ctx)?
        } else {
            return Err(format!(
                "lpo_sample: compare_fn must be a function pointer (Fn(\"cmp::preference_compare\") or a closure), got {}",
                compare_fn.type_name()
            ))
            .or_script(&ctx);
        };
        let prompts = prompt_strings(&ctx, &prompts)?;
        let tes = list::<TextEncoder>(&ctx, &text_encoder, "text encoder")?;
        let toks = list::<Tokenizer>(&ctx, &tokenizer, "tokenizer")?;
        let enc = encoders(&ctx, &tes, &toks)?;
        let hidden: usize = if enc.len() == 2 {
            enc.iter().map(|(e, _)| e.hidden_size()).sum()
        } else {
            enc.first().map(|(e, _)| e.hidden_size()).unwrap_or(0)
        };
        policy.check_hidden(hidden).or_script(&ctx)?;
        crate::lpo::sampler::check_lrm(&policy, &lrm).or_script(&ctx)?;
        let time_ids = match o
            .opt_typed::<Tensor>("time_ids", "a tensor [6]")
            .or_script(&ctx)?
        {
            Some(t) => Some(t),
            None if enc.len() == 2 => {
                let s = policy
                    .unet
                    .config
                    .sample_size
                    .as_ref()
                    .and_then(|s| s.as_u64())
                    .unwrap_or(128) as f32
                    * 8.0;
                Some(Tensor::new(&[s, s, 0.0, 0.0, s, s], &host.device).or_script(&ctx)?)
            }
            None => None,
        };
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let cond = PromptCond::encode(&enc, &refs, time_ids.as_ref()).or_script(&ctx)?;
        let cond = PromptCond {
            hidden: cond.hidden.to_dtype(policy.unet.dtype()).or_script(&ctx)?,
            uncond: cond.uncond.to_dtype(policy.unet.dtype()).or_script(&ctx)?,
            ..cond
        };
        let shared_rng = o.opt_typed::<ScriptRng>("rng", "an Rng").or_script(&ctx)?;
        let mut own_rng = SeededRng::new(o.i64("seed", host.seed as i64).or_script(&ctx)? as u64);
        let mut guard = shared_rng
            .as_ref()
            .map(|r| r.lock().unwrap_or_else(|e| e.into_inner()));
        let rng: &mut SeededRng = match guard.as_deref_mut() {
            Some(r) => r,
            None => &mut own_rng,
        };
        let inputs = SamplerInputs {
            policy: &policy,
            scheduler: &scheduler,
            lrm: &lrm,
            prompts: &prompts,
            cond: &cond,
            control: Some(&host.control),
        };
        let mut script_err: Option<Box<rhai::EvalAltResult>> = None;
        let mut compare = |scores: &Tensor, t: &Tensor| -> anyhow::Result<crate::lpo::Comparison> {
            match call_compare(&ctx, &f, scores, t, &compare_opts) {
                Ok(c) => Ok(c),
                Err(e) => {
                    let msg = e.to_string();
                    script_err = Some(e);
                    Err(anyhow::anyhow!("{msg}"))
                }
            }
        };
        let reward_fn = o
            .opt_typed::<FnPtr>(
                "reward_fn",
                "a function pointer or closure |candidates, t| -> scores [K, B]",
            )
            .or_script(&ctx)?;
        let mut reward_err: Option<Box<rhai::EvalAltResult>> = None;
        let mut reward = |cands: &Tensor, t: &Tensor| -> anyhow::Result<Tensor> {
            let Some(f) = reward_fn.as_ref() else {
                anyhow::bail!("lpo_sample: no reward_fn to call");
            };
            let out: ScriptResult<Dynamic> = f.call_within_context(
                &ctx,
                (Dynamic::from(cands.clone()), Dynamic::from(t.clone())),
            );
            let tensor = out.and_then(|v| {
                let tn = v.type_name();
                v.try_cast::<Tensor>()
                    .ok_or_else(|| {
                        format!("lpo_sample: reward_fn returned a {tn}; expected a Tensor [K, B]")
                    })
                    .or_script(&ctx)
            });
            tensor.map_err(|e| {
                let msg = e.to_string();
                reward_err = Some(e);
                anyhow::anyhow!("{msg}")
            })
        };
        let reward_ref: Option<&mut crate::lpo::sampler::RewardFn> = match reward_fn {
            Some(_) => Some(&mut reward),
            None => None,
        };
        let result = sample_with_reward(&inputs, &cfg, rng, &mut compare, reward_ref);
        drop(guard);
        if let (Err(_), Some(se)) = (&result, reward_err) {
            return Err(se);
        }
        let out = match result {
            Ok(o) => o,
            Err(e) => {
                if let Some(se) = script_err {
                    return Err(match *se {
                        rhai::EvalAltResult::ErrorRuntime(..)
                        | rhai::EvalAltResult::ErrorTerminated(..) => se,
                        other => crate::script::error::host_error(
                            &ctx,
                            format!(
                                "lpo_sample: compare function `{}` failed: {other}",
                                f.fn_name()
                            ),
                        ),
                    });
                }
                return Err(e).or_script(&ctx);
            }
        };
        let mut log = Array::new();
        for l in &out.log {
            log.push(Dynamic::from_map(log_entry(l)?));
        }
        let mut m = Map::new();
        m.insert(
            "stats".into(),
            Dynamic::from_map(stats(&out.records, &out.log, prompts.len())),
        );
        m.insert("records".into(), Dynamic::from(records(out.records)));
        m.insert("log".into(), Dynamic::from_array(log));
        m.insert("latents".into(), Dynamic::from(out.latents));
        Ok(m)
    }

    // ---- training ----

    /// One LPO optimizer step on `records` (a Records batch). Options (defaults): `beta` 500,
    /// `eps` 0.1, `eta` 1.0 (the sampling eta), `train_cfg` true (guide the log-prob
    /// predictions with `guidance_scale` 5.0, as sampling; false = cond only), `accumulate` 1
    /// (micro-batches the batch is split into; one optimizer step per call; gradients the
    /// optimizer held before are dropped). Policy and reference predict once per micro-batch
    /// for both winner and loser. Returns `#{loss, ratio_win, ratio_lose, lp_win, lp_lose,
    /// lp_win_ref, lp_lose_ref, implicit_acc, margin, grad_norm, lr, step, pairs}`.
    #[rhai_fn(return_raw)]
    pub fn lpo_train_step(
        ctx: NativeCallContext,
        policy: ScriptPolicy,
        scheduler: Scheduler,
        records: Records,
        optimizer: ScriptOptimizer,
        opts: Map,
    ) -> ScriptResult<Map> {
        let cfg = train_config(&ctx, &opts, "lpo_train_step")?;
        let host = Host::of(&ctx);
        host.check().or_script(&ctx)?;
        if scheduler.num_inference_steps().is_none() {
            return Err("lpo_train_step: the scheduler has no timesteps: use the scheduler the sampler ran with (or call set_timesteps)").or_script(&ctx);
        }
        let refs: Vec<&crate::lpo::Record> = records.0.iter().collect();
        let mut opt = optimizer.lock().unwrap_or_else(|e| e.into_inner());
        let m = train_step(
            &policy,
            &scheduler,
            &refs,
            &mut opt,
            &cfg,
            Some(&host.control),
        )
        .or_script(&ctx)?;
        Ok(metrics_map(&m))
    }

    /// Log-probs of the records' winners and losers under the policy and the reference
    /// (detached): `#{lp_win, lp_lose, lp_win_ref, lp_lose_ref}` tensors [N]. Options as
    /// `lpo_train_step` (beta, eps, accumulate unused).
    #[rhai_fn(return_raw)]
    pub fn lpo_log_probs(
        ctx: NativeCallContext,
        policy: ScriptPolicy,
        scheduler: Scheduler,
        records: Records,
        opts: Map,
    ) -> ScriptResult<Map> {
        let cfg = train_config(&ctx, &opts, "lpo_log_probs")?;
        let refs: Vec<&crate::lpo::Record> = records.0.iter().collect();
        let batch = RecordBatch::stack(&refs).or_script(&ctx)?;
        let lps = batch_log_probs(&policy, &scheduler, &batch, &cfg).or_script(&ctx)?;
        let names = ["lp_win", "lp_win_ref", "lp_lose", "lp_lose_ref"];
        Ok(names
            .iter()
            .zip(lps)
            .map(|(n, t)| ((*n).into(), Dynamic::from(t.detach())))
            .collect())
    }

    // ---- records ----

    /// Number of records.
    #[rhai_fn(get = "len", pure)]
    pub fn records_len(r: &mut Records) -> i64 {
        r.0.len() as i64
    }

    /// Number of records.
    #[rhai_fn(get = "count", pure)]
    pub fn records_count(r: &mut Records) -> i64 {
        r.0.len() as i64
    }

    /// Records per noise bucket: `#{pairs_t751_1000, pairs_t501_751, pairs_t251_501,
    /// pairs_t0_251}` (t > 751, 501 < t <= 751, 251 < t <= 501, t <= 251).
    #[rhai_fn(get = "buckets", pure)]
    pub fn records_buckets(r: &mut Records) -> Map {
        buckets_map(&r.0)
    }

    /// Timesteps of the records (i64 [N]).
    #[rhai_fn(get = "t", pure, return_raw)]
    pub fn records_t(ctx: NativeCallContext, r: &mut Records) -> ScriptResult<Tensor> {
        let v: Vec<i64> = r.0.iter().map(|x| x.t).collect();
        let n = v.len();
        Tensor::from_vec(v, n, &candle_core::Device::Cpu).or_script(&ctx)
    }

    /// The records in a random order drawn from `rng` (seeded: the same state, the same order).
    #[rhai_fn(pure, volatile)]
    pub fn shuffled(r: &mut Records, rng: ScriptRng) -> Records {
        let order = rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .permutation(r.0.len());
        records(order.into_iter().map(|i| r.0[i].clone()).collect())
    }

    /// Consecutive batches of `size` records (the last may be smaller).
    #[rhai_fn(pure, return_raw)]
    pub fn batches(ctx: NativeCallContext, r: &mut Records, size: i64) -> ScriptResult<Array> {
        if size < 1 {
            return Err(format!("batches: size must be >= 1, got {size}")).or_script(&ctx);
        }
        Ok(r.0
            .chunks(size as usize)
            .map(|c| Dynamic::from(records(c.to_vec())))
            .collect())
    }

    /// `len` records from `start` (clamped to the end).
    #[rhai_fn(pure, name = "batch")]
    pub fn records_batch(r: &mut Records, start: i64, len: i64) -> Records {
        let n = r.0.len();
        let s = (start.max(0) as usize).min(n);
        let e = (s + len.max(0) as usize).min(n);
        records(r.0[s..e].to_vec())
    }

    /// Record `i` as `#{t, x_t, x_win, x_lose, prompt, prompt_index, hidden, score_win, score_lose}`.
    #[rhai_fn(index_get, pure, return_raw)]
    pub fn records_get(ctx: NativeCallContext, r: &mut Records, i: i64) -> ScriptResult<Map> {
        let n = r.0.len() as i64;
        let j = if i < 0 { n + i } else { i };
        if j < 0 || j >= n {
            return Err(format!("records: index {i} out of range for {n} records")).or_script(&ctx);
        }
        Ok(record_map(&r.0[j as usize]))
    }

    /// Both record lists, `a` first.
    #[rhai_fn(name = "+", name = "concat")]
    pub fn records_concat(a: Records, b: Records) -> Records {
        let mut v: Vec<_> = a.0.iter().cloned().collect();
        v.extend(b.0.iter().cloned());
        records(v)
    }

    /// No records (to collect several sampling batches with `+`).
    pub fn empty_records() -> Records {
        Records::default()
    }

    /// The records as a map of stacked tensors `#{t [N], x_t, x_win, x_lose [N, C, H, W],
    /// hidden [N, L, H]}`.
    #[rhai_fn(pure, return_raw)]
    pub fn to_tensors(ctx: NativeCallContext, r: &mut Records) -> ScriptResult<Map> {
        let refs: Vec<&crate::lpo::Record> = r.0.iter().collect();
        let b = RecordBatch::stack(&refs).or_script(&ctx)?;
        let mut m = Map::new();
        m.insert("t".into(), Dynamic::from(b.t));
        m.insert("x_t".into(), Dynamic::from(b.x_t));
        m.insert("x_win".into(), Dynamic::from(b.x_win));
        m.insert("x_lose".into(), Dynamic::from(b.x_lose));
        m.insert("hidden".into(), Dynamic::from(b.cond.hidden));
        Ok(m)
    }

    /// The records as checkpoint parts `#{tensors, state}`: save `tensors` (under a key prefix
    /// of your choice) with `checkpoint_save` and `state` among its plain data, and get the
    /// records back with `records_from_checkpoint(tensors, state)` (a run stopped mid-epoch
    /// keeps the pairs it sampled).
    #[rhai_fn(pure, return_raw)]
    pub fn to_checkpoint(ctx: NativeCallContext, r: &mut Records) -> ScriptResult<Map> {
        let (tensors, state) =
            crate::lpo::records_io::records_to_checkpoint(&r.0).or_script(&ctx)?;
        let mut m = Map::new();
        m.insert(
            "tensors".into(),
            Dynamic::from_map(
                tensors
                    .into_iter()
                    .map(|(k, t)| (k.into(), Dynamic::from(t)))
                    .collect(),
            ),
        );
        m.insert(
            "state".into(),
            rhai::serde::to_dynamic(state).or_script(&ctx)?,
        );
        Ok(m)
    }

    /// Records saved with `records.to_checkpoint()`: its `tensors` (as loaded from a checkpoint,
    /// the key prefix removed) and its `state`. Errors name a missing tensor or bad shape.
    #[rhai_fn(return_raw)]
    pub fn records_from_checkpoint(
        ctx: NativeCallContext,
        tensors: Map,
        state: Map,
    ) -> ScriptResult<Records> {
        let tensors =
            crate::script::bindings::run::helpers::tensor_map(tensors, "records_from_checkpoint")
                .or_script(&ctx)?;
        let state: serde_json::Value = rhai::serde::from_dynamic(&Dynamic::from_map(state))
            .map_err(|e| format!("records_from_checkpoint: state is not plain data: {e}"))
            .or_script(&ctx)?;
        let v =
            crate::lpo::records_io::records_from_checkpoint(&tensors, &state).or_script(&ctx)?;
        Ok(records(v))
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn records_to_string(r: &mut Records) -> String {
        let c = super::helpers::bucket_counts(&r.0);
        format!(
            "Records({} pairs; by noise t>751/501-751/251-501/<=251: {:?})",
            r.0.len(),
            c
        )
    }
}
