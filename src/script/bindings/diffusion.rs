//! The DDIM noise scheduler in scripts (the type scripts call `Scheduler`):
//! `let s = load_scheduler(dir); s.set_timesteps(20);`
//! `s.step(eps, t, x, 1.0, r)`, `s.candidates(eps, t, x, 4, 1.0, r)`, `s.log_prob(...)`.
//! Timestep arguments are int tensors [B] (one per row) or a single int for every row; eta
//! accepts ints.

use rhai::plugin::*;

/// The DDIM noise scheduler by the name scripts see (signatures here use it, so the docs show
/// it).
pub type Scheduler = crate::diffusion::DdimScheduler;

mod helpers {
    use candle_core::{Device, Tensor};
    use rhai::{Dynamic, NativeCallContext};

    use crate::script::convert::{dynamic_f64, tensor_from_dynamic};
    use crate::script::error::{OrScriptError, ScriptResult};

    /// A timestep argument: an int tensor, an int, or an array of ints.
    pub(super) fn timesteps_arg(
        ctx: &NativeCallContext,
        t: &Dynamic,
        device: &Device,
    ) -> ScriptResult<Tensor> {
        if let Ok(i) = t.as_int() {
            return Tensor::new(&[i], device).or_script(ctx);
        }
        tensor_from_dynamic(t, device)
            .map_err(|e| format!("timesteps: {e}"))
            .or_script(ctx)
    }

    /// A number argument (int or float), `what` naming it in the error.
    pub(super) fn number_arg(
        ctx: &NativeCallContext,
        v: &Dynamic,
        what: &str,
    ) -> ScriptResult<f64> {
        dynamic_f64(v)
            .ok_or_else(|| format!("{what} must be a number, got {}", v.type_name()))
            .or_script(ctx)
    }

    /// A count argument (an int >= 0).
    pub(super) fn count_arg(ctx: &NativeCallContext, v: i64, what: &str) -> ScriptResult<usize> {
        usize::try_from(v)
            .map_err(|_| format!("{what} must be >= 0, got {v}"))
            .or_script(ctx)
    }
}

#[export_module]
pub mod diffusion_api {
    use super::helpers::*;
    use candle_core::Tensor;
    use rhai::Dynamic;

    use super::Scheduler;
    use crate::script::bindings::rng::ScriptRng;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// The DDIM noise scheduler from a diffusers folder: `dir/scheduler/scheduler_config.json`, or a
    /// folder (or file) holding `scheduler_config.json`.
    #[rhai_fn(return_raw, volatile)]
    pub fn load_scheduler(ctx: NativeCallContext, dir: &str) -> ScriptResult<Scheduler> {
        Scheduler::load(
            &Host::of(&ctx).readable(dir).or_script(&ctx)?,
            &Host::of(&ctx).device,
        )
        .or_script(&ctx)
    }

    /// Choose `n` inference steps; returns the i64 timesteps first to last (the scheduler
    /// keeps them: `s.timesteps`).
    #[rhai_fn(return_raw)]
    pub fn set_timesteps(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        n: i64,
    ) -> ScriptResult<Tensor> {
        let n = count_arg(&ctx, n, "set_timesteps: n")?;
        s.set_timesteps(n).or_script(&ctx)
    }

    /// The current timesteps first to last (i64 [n]); an error before `set_timesteps`.
    #[rhai_fn(get = "timesteps", pure, return_raw)]
    pub fn timesteps(ctx: NativeCallContext, s: &mut Scheduler) -> ScriptResult<Tensor> {
        s.timesteps().or_script(&ctx)
    }

    /// Number of inference steps (0 before `set_timesteps`).
    #[rhai_fn(get = "num_inference_steps", pure)]
    pub fn num_inference_steps(s: &mut Scheduler) -> i64 {
        s.num_inference_steps().unwrap_or(0) as i64
    }

    /// num_train_timesteps of the config.
    #[rhai_fn(get = "num_train_timesteps", pure)]
    pub fn num_train_timesteps(s: &mut Scheduler) -> i64 {
        s.num_train_timesteps() as i64
    }

    /// f32 [num_train_timesteps] cumulative products of (1 - beta).
    #[rhai_fn(get = "alphas_cumprod", pure)]
    pub fn alphas_cumprod(s: &mut Scheduler) -> Tensor {
        s.alphas_cumprod().clone()
    }

    /// f32 [num_train_timesteps] betas.
    #[rhai_fn(get = "betas", pure)]
    pub fn betas(s: &mut Scheduler) -> Tensor {
        s.betas().clone()
    }

    /// diffusers' alpha_cumprod after the last step (1 with set_alpha_to_one, else
    /// alphas_cumprod[0]), for reference: like LPO, every step here lands on
    /// alphas_cumprod[prev_timestep(t)] instead.
    #[rhai_fn(get = "final_alpha_cumprod", pure)]
    pub fn final_alpha_cumprod(s: &mut Scheduler) -> f64 {
        s.final_alpha_cumprod() as f64
    }

    /// "epsilon", "v_prediction" or "sample".
    #[rhai_fn(get = "prediction_type", pure)]
    pub fn prediction_type(s: &mut Scheduler) -> String {
        s.prediction_type().as_str().to_string()
    }

    /// Per-row previous timestep clamp(t - T/n, 0, T-1) (i64 [B]).
    #[rhai_fn(return_raw, pure)]
    pub fn prev_timestep(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        t: Dynamic,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, s.device())?;
        s.prev_timestep(&t).or_script(&ctx)
    }

    /// Per-row DDIM variance of the step from t: (1-a_prev)/(1-a_t) * (1 - a_t/a_prev), a_prev
    /// at prev_timestep(t), for any t in [0, num_train_timesteps) (f32 [B]).
    #[rhai_fn(return_raw, pure)]
    pub fn variance(ctx: NativeCallContext, s: &mut Scheduler, t: Dynamic) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, s.device())?;
        s.variance(&t).or_script(&ctx)
    }

    /// Per-row sigma_t = eta * sqrt(variance) of the DDIM step from t (f32 [B]).
    #[rhai_fn(return_raw, pure)]
    pub fn std_dev(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        t: Dynamic,
        eta: Dynamic,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, s.device())?;
        let eta = number_arg(&ctx, &eta, "std_dev: eta")?;
        s.std_dev(&t, eta).or_script(&ctx)
    }

    /// sigma (with `eta`) over the current timesteps sorted ascending in t (f32 [n]): the
    /// table the sigma/variance threshold schedules normalize.
    #[rhai_fn(return_raw, pure)]
    pub fn std_dev_table(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        eta: Dynamic,
    ) -> ScriptResult<Tensor> {
        let eta = number_arg(&ctx, &eta, "std_dev_table: eta")?;
        s.std_dev_table(eta).or_script(&ctx)
    }

    /// Rank of each row's t among the current timesteps in ascending order (0 = smallest t,
    /// the index into `std_dev_table`), i64 [B]; an error for a t not among them.
    #[rhai_fn(return_raw, pure)]
    pub fn timestep_rank(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        t: Dynamic,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, s.device())?;
        s.timestep_rank(&t).or_script(&ctx)
    }

    /// The model's x0 estimate from (model_output, t, sample), per the prediction type.
    #[rhai_fn(return_raw, pure)]
    pub fn pred_original_sample(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        model_output: Tensor,
        t: Dynamic,
        sample: Tensor,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, sample.device())?;
        s.pred_original_sample(&model_output, &t, &sample)
            .or_script(&ctx)
    }

    /// The model's noise estimate from (model_output, t, sample), per the prediction type.
    #[rhai_fn(return_raw, pure)]
    pub fn pred_epsilon(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        model_output: Tensor,
        t: Dynamic,
        sample: Tensor,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, sample.device())?;
        s.pred_epsilon(&model_output, &t, &sample).or_script(&ctx)
    }

    /// Mean of the DDIM step's Gaussian (x_{t-1} without noise).
    #[rhai_fn(return_raw, pure)]
    pub fn prev_sample_mean(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        model_output: Tensor,
        t: Dynamic,
        sample: Tensor,
        eta: Dynamic,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, sample.device())?;
        let eta = number_arg(&ctx, &eta, "prev_sample_mean: eta")?;
        s.prev_sample_mean(&model_output, &t, &sample, eta)
            .or_script(&ctx)
    }

    /// [B] log-prob of prev_sample under the DDIM step from (model_output, t, sample), mean
    /// over non-batch dims (LPO's definition); differentiable w.r.t. model_output.
    #[rhai_fn(return_raw, pure)]
    pub fn log_prob(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        model_output: Tensor,
        t: Dynamic,
        sample: Tensor,
        prev_sample: Tensor,
        eta: Dynamic,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, sample.device())?;
        let eta = number_arg(&ctx, &eta, "log_prob: eta")?;
        s.log_prob(&model_output, &t, &sample, &prev_sample, eta)
            .or_script(&ctx)
    }

    /// Log-probs of several x_{t-1} (an array of tensors, e.g. `[x_win, x_lose]`) under the
    /// same step, computing the step's mean once: an array of [B] tensors.
    #[rhai_fn(name = "log_prob", return_raw, pure)]
    pub fn log_prob_many(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        model_output: Tensor,
        t: Dynamic,
        sample: Tensor,
        prev_samples: rhai::Array,
        eta: Dynamic,
    ) -> ScriptResult<rhai::Array> {
        let t = timesteps_arg(&ctx, &t, sample.device())?;
        let eta = number_arg(&ctx, &eta, "log_prob: eta")?;
        let prevs = prev_samples
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                v.try_cast::<Tensor>()
                    .ok_or_else(|| format!("log_prob: prev_samples[{i}] is not a tensor"))
            })
            .collect::<Result<Vec<_>, _>>()
            .or_script(&ctx)?;
        let lps = s
            .log_probs(&model_output, &t, &sample, &prevs, eta)
            .or_script(&ctx)?;
        Ok(lps.into_iter().map(Dynamic::from).collect())
    }

    /// x_{t-1} [B, ...]: one DDIM step with noise from `rng` (none drawn when eta is 0).
    #[rhai_fn(return_raw, pure, volatile)]
    pub fn step(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        model_output: Tensor,
        t: Dynamic,
        sample: Tensor,
        eta: Dynamic,
        rng: ScriptRng,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, sample.device())?;
        let eta = number_arg(&ctx, &eta, "step: eta")?;
        let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
        s.step(&model_output, &t, &sample, eta, &mut r)
            .or_script(&ctx)
    }

    /// K independent x_{t-1} from the same x_t: [K, B, ...] (one mean, K noises from `rng`).
    #[allow(clippy::too_many_arguments)]
    #[rhai_fn(return_raw, pure, volatile)]
    pub fn candidates(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        model_output: Tensor,
        t: Dynamic,
        sample: Tensor,
        k: i64,
        eta: Dynamic,
        rng: ScriptRng,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, sample.device())?;
        let k = count_arg(&ctx, k, "candidates: k")?;
        let dims: Vec<usize> = std::iter::once(k)
            .chain(sample.dims().iter().copied())
            .collect();
        Host::of(&ctx)
            .check_tensor_size("candidates", &dims, sample.dtype())
            .or_script(&ctx)?;
        let eta = number_arg(&ctx, &eta, "candidates: eta")?;
        let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
        s.candidates(&model_output, &t, &sample, k, eta, &mut r)
            .or_script(&ctx)
    }

    /// Forward diffusion: sqrt(a_t) x0 + sqrt(1 - a_t) noise, per-row t.
    #[rhai_fn(return_raw, pure)]
    pub fn add_noise(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        x0: Tensor,
        noise: Tensor,
        t: Dynamic,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, x0.device())?;
        s.add_noise(&x0, &noise, &t).or_script(&ctx)
    }

    /// The v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0, per-row t.
    #[rhai_fn(return_raw, pure)]
    pub fn velocity(
        ctx: NativeCallContext,
        s: &mut Scheduler,
        x0: Tensor,
        noise: Tensor,
        t: Dynamic,
    ) -> ScriptResult<Tensor> {
        let t = timesteps_arg(&ctx, &t, x0.device())?;
        s.velocity(&x0, &noise, &t).or_script(&ctx)
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn to_string(s: &mut Scheduler) -> String {
        format!("{s:?}")
    }
}
