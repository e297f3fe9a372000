//! LPO's multi-candidate sampler in scripts, with the script's compare (and reward) function
//! called back at every diverting step; and SDXL's size conditioning.
//!
//! ```text
//! import "compare" as cmp;
//! let out = lpo_sample(policy, te, tok, sched, lrm, prompts, Fn("cmp::preference_compare"),
//!                      #{k: 4, steps: 20, guidance_scale: 5.0, rng: r,
//!                        compare_opts: #{mode: "sigma", min: 0.35, max: 0.5, scheduler: sched}});
//! ```

use rhai::plugin::*;

use crate::lpo::SamplerConfig;
use crate::script::declared::{option_docs, OptionDoc};

/// `lpo_sample`'s options that carry script values, set aside from [`SamplerConfig`].
const HOST_KEYS: [&str; 4] = ["rng", "compare_opts", "time_ids", "reward_fn"];

/// The declared options of this module's functions, for the docs.
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    vec![("lpo_sample", option_docs::<SamplerConfig>())]
}

mod helpers {
    use std::cell::RefCell;

    use candle_core::{Device, Tensor};
    use rhai::{Array, Dynamic, EvalAltResult, FnPtr, Map, NativeCallContext};

    use crate::lpo::policy::text_side;
    use crate::lpo::sampler::{CompareFn, RewardFn};
    use crate::lpo::{Comparison, Policy, PromptCond, SampleOutput, SampleStats, StepLog};
    use crate::script::bindings::records::Records;
    use crate::script::bindings::rng::ScriptRng;
    use crate::script::bindings::text::{TextEncoder, Tokenizer};
    use crate::script::convert::tensor_from_dynamic;
    use crate::script::declared::to_map;
    use crate::script::error::{host_error, OrScriptError, ScriptResult};
    use crate::tensor::SeededRng;

    /// One text encoder / tokenizer, or an array of two (SDXL).
    pub(super) fn list<T: Clone + 'static>(
        ctx: &NativeCallContext,
        v: &Dynamic,
        what: &str,
    ) -> ScriptResult<Vec<T>> {
        if let Some(x) = v.clone().try_cast::<T>() {
            return Ok(vec![x]);
        }
        if !v.is_array() {
            return Err(format!(
                "lpo_sample: expected a {what} (or an array of two for SDXL), got {}",
                v.type_name()
            ))
            .or_script(ctx);
        }
        v.clone()
            .cast::<Array>()
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                let tn = x.type_name();
                x.try_cast::<T>()
                    .ok_or_else(|| format!("lpo_sample: {what} {i} is a {tn}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .or_script(ctx)
    }

    /// The prompts: a string or a non-empty array of strings.
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

    /// Option `key` set aside as a script value of type `T`; `()` or absent = not given.
    pub(super) fn host_opt<T: Clone + 'static>(
        ctx: &NativeCallContext,
        opts: &Map,
        key: &str,
        expected: &str,
    ) -> ScriptResult<Option<T>> {
        let Some(v) = opts.get(key).filter(|v| !v.is_unit()) else {
            return Ok(None);
        };
        v.clone()
            .try_cast::<T>()
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "lpo_sample: option `{key}` must be {expected}, got {} ({v})",
                    v.type_name()
                )
            })
            .or_script(ctx)
    }

    /// The policy's conditioning of `prompts` with the text encoder(s) and tokenizer(s) in
    /// `text` and the `time_ids` option (SDXL).
    pub(super) fn prompt_conditioning(
        ctx: &NativeCallContext,
        policy: &Policy,
        text: &(Dynamic, Dynamic),
        prompts: &[String],
        host_opts: &Map,
    ) -> ScriptResult<PromptCond> {
        let tes = list::<TextEncoder>(ctx, &text.0, "text encoder")?;
        let toks = list::<Tokenizer>(ctx, &text.1, "tokenizer")?;
        let encoders = text_side(&tes, &toks).or_script(ctx)?;
        let time_ids = host_opt::<Tensor>(ctx, host_opts, "time_ids", "a tensor [6]")?;
        policy
            .condition(&encoders, prompts, time_ids.as_ref())
            .or_script(ctx)
    }

    /// Run `f` with the shared generator `shared` (its stream advances) or a fresh one seeded
    /// with `seed`.
    pub(super) fn with_rng<R>(
        shared: Option<&ScriptRng>,
        seed: u64,
        f: impl FnOnce(&mut SeededRng) -> R,
    ) -> R {
        match shared {
            Some(r) => f(&mut r.lock().unwrap_or_else(|e| e.into_inner())),
            None => f(&mut SeededRng::new(seed)),
        }
    }

    /// The script functions the sampler calls: the compare function with its options, and the
    /// reward function that replaces the LRM when given.
    pub(super) struct Callbacks {
        compare: FnPtr,
        compare_opts: Map,
        reward: Option<FnPtr>,
    }

    /// Keep a script error to return it unchanged; the sampler sees its message.
    fn keep(slot: &RefCell<Option<Box<EvalAltResult>>>, e: Box<EvalAltResult>) -> anyhow::Error {
        let msg = e.to_string();
        *slot.borrow_mut() = Some(e);
        anyhow::anyhow!("{msg}")
    }

    impl Callbacks {
        pub(super) fn new(
            ctx: &NativeCallContext,
            compare_fn: &Dynamic,
            host_opts: &Map,
        ) -> ScriptResult<Self> {
            let compare = if let Some(f) = compare_fn.clone().try_cast::<FnPtr>() {
                f
            } else if let Ok(name) = compare_fn.clone().into_string() {
                FnPtr::new(name).or_script(ctx)?
            } else {
                return Err(format!(
                    "lpo_sample: compare_fn must be a function pointer (Fn(\"cmp::preference_compare\") or a closure), got {}",
                    compare_fn.type_name()
                ))
                .or_script(ctx);
            };
            let reward_doc = "a function pointer or closure |candidates, t| -> scores [K, B]";
            Ok(Self {
                compare,
                compare_opts: host_opt::<Map>(ctx, host_opts, "compare_opts", "a map")?
                    .unwrap_or_default(),
                reward: host_opt::<FnPtr>(ctx, host_opts, "reward_fn", reward_doc)?,
            })
        }

        /// Call the compare function on scores [K, B] and t [B]; its `#{indices, valid}` as a
        /// checked [`Comparison`].
        fn compare(
            &self,
            ctx: &NativeCallContext,
            scores: &Tensor,
            t: &Tensor,
        ) -> ScriptResult<Comparison> {
            let (k, b) = scores.dims2().or_script(ctx)?;
            let label = format!("compare function `{}`", self.compare.fn_name());
            let expected = format!("expected #{{indices: [2, {b}] ints, valid: [{b}]}}");
            let args = (
                Dynamic::from(scores.clone()),
                Dynamic::from(t.clone()),
                Dynamic::from_map(self.compare_opts.clone()),
            );
            let out: Dynamic = self.compare.call_within_context(ctx, args)?;
            let tn = out.type_name();
            let map = out
                .try_cast::<Map>()
                .ok_or_else(|| format!("lpo_sample: {label} returned a {tn}; {expected}"))
                .or_script(ctx)?;
            let get = |key: &str| -> ScriptResult<Tensor> {
                let v = map
                    .get(key)
                    .ok_or_else(|| {
                        format!(
                            "lpo_sample: {label} returned no `{key}` (keys: {:?}); {expected}",
                            map.keys().collect::<Vec<_>>()
                        )
                    })
                    .or_script(ctx)?;
                tensor_from_dynamic(v, &Device::Cpu)
                    .map_err(|e| format!("lpo_sample: {label}: `{key}`: {e}"))
                    .or_script(ctx)
            };
            Comparison::from_tensors(&get("indices")?, &get("valid")?, k, b)
                .map_err(|e| format!("lpo_sample: {label} returned {e}"))
                .or_script(ctx)
        }

        /// Call the reward function on candidates [K, B, C, H, W] and t [B].
        fn reward(
            &self,
            ctx: &NativeCallContext,
            candidates: &Tensor,
            t: &Tensor,
        ) -> ScriptResult<Tensor> {
            let Some(f) = self.reward.as_ref() else {
                return Err("lpo_sample: no reward_fn to call").or_script(ctx);
            };
            let args = (Dynamic::from(candidates.clone()), Dynamic::from(t.clone()));
            let out: Dynamic = f.call_within_context(ctx, args)?;
            let tn = out.type_name();
            out.try_cast::<Tensor>()
                .ok_or_else(|| {
                    format!("lpo_sample: reward_fn returned a {tn}; expected a Tensor [K, B]")
                })
                .or_script(ctx)
        }

        /// Run `sample` with these callbacks. An error the script raised in them is returned
        /// as raised (a compare function that could not be called is named).
        pub(super) fn run(
            &self,
            ctx: &NativeCallContext,
            sample: impl FnOnce(&mut CompareFn, Option<&mut RewardFn>) -> anyhow::Result<SampleOutput>,
        ) -> ScriptResult<SampleOutput> {
            let compare_err = RefCell::new(None);
            let reward_err = RefCell::new(None);
            let mut compare =
                |s: &Tensor, t: &Tensor| self.compare(ctx, s, t).map_err(|e| keep(&compare_err, e));
            let mut reward =
                |c: &Tensor, t: &Tensor| self.reward(ctx, c, t).map_err(|e| keep(&reward_err, e));
            let reward: Option<&mut RewardFn> = match self.reward {
                Some(_) => Some(&mut reward),
                None => None,
            };
            let result = sample(&mut compare, reward);
            let (compare_err, reward_err) = (compare_err.take(), reward_err.take());
            result.or_else(|e| match (reward_err, compare_err) {
                (Some(raised), _) => Err(raised),
                (None, Some(raised)) => Err(self.compare_failure(ctx, raised)),
                (None, None) => Err(e).or_script(ctx),
            })
        }

        fn compare_failure(
            &self,
            ctx: &NativeCallContext,
            raised: Box<EvalAltResult>,
        ) -> Box<EvalAltResult> {
            match *raised {
                EvalAltResult::ErrorRuntime(..) | EvalAltResult::ErrorTerminated(..) => raised,
                other => host_error(
                    ctx,
                    format!(
                        "lpo_sample: compare function `{}` failed: {other}",
                        self.compare.fn_name()
                    ),
                ),
            }
        }
    }

    /// One diverting step as `#{step, t, score_mean, score_std, valid, scores [K, B], chosen}`.
    fn step_log_map(l: &StepLog) -> Result<Map, String> {
        let mut m = to_map(l)?;
        let scores = Tensor::new(l.scores.clone(), &Device::Cpu).map_err(|e| e.to_string())?;
        m.insert("scores".into(), Dynamic::from(scores));
        Ok(m)
    }

    /// A sampling call as scripts see it: `#{records, log, latents, stats}`.
    pub(super) fn sample_result(out: SampleOutput, prompts: usize) -> Result<Map, String> {
        let stats = to_map(&SampleStats::of(&out.records, &out.log, prompts))?;
        let log = out
            .log
            .iter()
            .map(|l| step_log_map(l).map(Dynamic::from_map))
            .collect::<Result<Array, _>>()?;
        let mut m = Map::new();
        m.insert("stats".into(), Dynamic::from_map(stats));
        m.insert("records".into(), Dynamic::from(Records::new(out.records)));
        m.insert("log".into(), Dynamic::from_array(log));
        m.insert("latents".into(), Dynamic::from(out.latents));
        Ok(m)
    }
}

#[export_module]
pub mod sampling_api {
    use rhai::{Array, Dynamic, Map};

    use super::helpers::*;
    use super::HOST_KEYS;
    use crate::lpo::sampler::{check_lrm, sample_with_reward};
    use crate::lpo::{SamplerConfig, SamplerInputs};
    use crate::models::sdxl_conditioning::{default_image_size, default_time_ids};
    use crate::script::bindings::diffusion::Scheduler;
    use crate::script::bindings::lrm::ScriptLrm;
    use crate::script::bindings::policy::ScriptPolicy;
    use crate::script::bindings::rng::ScriptRng;
    use crate::script::bindings::unet::ScriptUNet;
    use crate::script::declared::from_map_with;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// LPO's multi-candidate sampler over `prompts` (an array of strings). The policy's
    /// prompts are encoded once with `text_encoder`/`tokenizer` (arrays of two for SDXL),
    /// the LRM's with its own. Besides the options listed below, `opts` may hold `rng` (a
    /// shared Rng, instead of `seed`: its stream advances), `compare_opts` (passed to the
    /// compare function as its third argument), `time_ids` (SDXL, [6]; default
    /// `sdxl_time_ids(policy.unet)`) and `reward_fn` (a closure `|candidates [K, B, C, H, W],
    /// t [B]| -> scores [K, B]` used instead of the LRM: a random or pixel-judge control, or any
    /// other step-level reward).
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
        let (cfg, host_opts): (SamplerConfig, Map) =
            from_map_with(&opts, "lpo_sample", &HOST_KEYS).or_script(&ctx)?;
        let host = Host::of(&ctx);
        host.check().or_script(&ctx)?;
        cfg.validate().or_script(&ctx)?;
        let callbacks = Callbacks::new(&ctx, &compare_fn, &host_opts)?;
        let prompts = prompt_strings(&ctx, &prompts)?;
        check_lrm(&policy, &lrm).or_script(&ctx)?;
        let text = (text_encoder, tokenizer);
        let cond = prompt_conditioning(&ctx, &policy, &text, &prompts, &host_opts)?;
        let shared_rng = host_opt::<ScriptRng>(&ctx, &host_opts, "rng", "an Rng")?;
        let seed = cfg.seed.unwrap_or(host.seed as i64) as u64;
        let inputs = SamplerInputs {
            policy: &policy,
            scheduler: &scheduler,
            lrm: &lrm,
            prompts: &prompts,
            cond: &cond,
            control: Some(&host.control),
        };
        let out = callbacks.run(&ctx, |compare, reward| {
            with_rng(shared_rng.as_ref(), seed, |rng| {
                sample_with_reward(&inputs, &cfg, rng, compare, reward)
            })
        })?;
        sample_result(out, prompts.len()).or_script(&ctx)
    }

    /// SDXL's size conditioning ("time ids") of an uncropped `height` × `width` image, in
    /// diffusers' order: original size, crop top-left, target size = `[height, width, 0.0,
    /// 0.0, height, width]`. `tensor(sdxl_time_ids(1024, 1024))` for `unet.forward`'s
    /// `time_ids`.
    #[rhai_fn(return_raw)]
    pub fn sdxl_time_ids(ctx: NativeCallContext, height: i64, width: i64) -> ScriptResult<Array> {
        if height < 1 || width < 1 {
            return Err(format!(
                "sdxl_time_ids: height and width must be >= 1, got {height} x {width}"
            ))
            .or_script(&ctx);
        }
        let ids = default_time_ids(height as usize, width as usize);
        Ok(ids.iter().map(|&v| Dynamic::from(v)).collect())
    }

    /// The time ids `lpo_sample` gives an SDXL `unet` by default: its square default image
    /// size (latent `sample_size` × 8, else 1024), uncropped.
    #[rhai_fn(name = "sdxl_time_ids")]
    pub fn sdxl_time_ids_of(unet: ScriptUNet) -> Array {
        let size = default_image_size(&unet.config);
        default_time_ids(size, size)
            .iter()
            .map(|&v| Dynamic::from(v))
            .collect()
    }
}
