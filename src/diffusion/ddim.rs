//! DDIM scheduler with per-row timesteps, seeded stochastic steps, K-candidate draws and the
//! Gaussian log-prob of a step, as diffusers' `DDIMScheduler.step` and LPO's
//! `ddim_step_with_logprob` define them.
//!
//! Every per-timestep quantity is a table of `num_train_timesteps` entries on the device,
//! gathered with `index_select` at each row's `t`: nothing comes back to the host.
//!
//! Previous timestep: one rule everywhere (step, candidates, log_prob, variance, std_dev and
//! the thresholds built on them), LPO's: `prev_t = clamp(t - num_train_timesteps / n, 0,
//! num_train_timesteps - 1)` and `alpha_prev = alphas_cumprod[prev_t]`. LPO's sampler
//! (`ddim_step_fetch_x0` / `ddim_step_fetch_x_t_1`) and its `ddim_step_with_logprob` both clamp
//! before their `torch.where(prev_t >= 0, ..., final_alpha_cumprod)`, so diffusers'
//! `final_alpha_cumprod` is never reached. diffusers' own `DDIMScheduler.step` uses it at the
//! last step; the two agree whenever `set_alpha_to_one` is false (SD1.5, SD2.1, SDXL: then
//! `final_alpha_cumprod = alphas_cumprod[0]`) and differ only at the last step otherwise.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::noise_schedule::{DdimConfig, PredictionType};
use crate::tensor::SeededRng;

/// The state `set_timesteps(n)` creates.
#[derive(Clone)]
struct Steps {
    n: usize,
    step_ratio: i64,
    timesteps: Vec<i64>,
    timesteps_t: Tensor,
    /// alpha_cumprod of the step's target, indexed by t.
    alpha_prev_by_t: Tensor,
    /// DDIM variance of the step from t, indexed by t.
    variance_by_t: Tensor,
}

/// The Gaussian a DDIM step samples x_{t-1} from: `mean` [B, ...] and per-row `std` [B].
#[derive(Clone, Debug)]
pub struct StepDist {
    pub mean: Tensor,
    pub std: Tensor,
}

/// `v` [B] reshaped to [B, 1, ..., 1] matching `like`'s rank.
fn rows(v: &Tensor, like: &Tensor) -> Result<Tensor> {
    let mut dims = vec![1usize; like.rank().max(1)];
    dims[0] = v.elem_count();
    Ok(v.reshape(dims)?)
}

fn rows_mul(v: &Tensor, x: &Tensor) -> Result<Tensor> {
    Ok(rows(v, x)?.broadcast_mul(x)?)
}

/// The dtype DDIM arithmetic runs in: f64 stays f64 (exact finite differences), everything
/// else computes in f32.
fn compute_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

const HALF_LN_2PI: f64 = 0.918_938_533_204_672_7;

impl StepDist {
    /// Log-density of `prev_sample` (detached), averaged over every non-batch dim: [B].
    /// `mean_{C,H,W}[-(prev - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)]`.
    pub fn log_prob(&self, prev_sample: &Tensor) -> Result<Tensor> {
        if prev_sample.dims() != self.mean.dims() {
            bail!(
                "log_prob: prev_sample shape {:?} differs from the sample shape {:?}",
                prev_sample.dims(),
                self.mean.dims()
            );
        }
        let prev = prev_sample.detach().to_dtype(self.mean.dtype())?;
        let b = self.mean.dim(0)?;
        let sq = (prev - &self.mean)?.sqr()?.reshape((b, ()))?.mean(1)?;
        let var2 = (self.std.sqr()? * 2.0)?;
        let lp = ((sq.neg()? / var2)? - self.std.log()?)?;
        Ok((lp - HALF_LN_2PI)?)
    }

    /// One draw x_{t-1} = mean + std * noise (noise from `rng`), shape [B, ...].
    pub fn sample(&self, rng: &mut SeededRng) -> Result<Tensor> {
        let noise = rng
            .randn(self.mean.shape().clone(), self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        Ok((&self.mean + rows_mul(&self.std, &noise)?)?)
    }

    /// `k` independent draws from the same mean: [K, B, ...] (one noise tensor of that shape).
    pub fn sample_k(&self, k: usize, rng: &mut SeededRng) -> Result<Tensor> {
        if k == 0 {
            bail!("candidates: k must be >= 1");
        }
        let mut dims = vec![k];
        dims.extend_from_slice(self.mean.dims());
        let noise = rng
            .randn(dims, self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        let std = rows(&self.std, &self.mean)?.unsqueeze(0)?;
        Ok(self
            .mean
            .unsqueeze(0)?
            .broadcast_add(&std.broadcast_mul(&noise)?)?)
    }
}

/// DDIM. Cheap to clone; clones share the timesteps `set_timesteps` chose.
#[derive(Clone)]
pub struct DdimScheduler {
    cfg: Arc<DdimConfig>,
    device: Device,
    betas: Tensor,
    alphas_cumprod_host: Arc<Vec<f32>>,
    alphas_cumprod: Tensor,
    final_alpha_cumprod: f32,
    steps: Arc<RwLock<Option<Steps>>>,
}

impl std::fmt::Debug for DdimScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DdimScheduler({}, {} train steps, {} inference steps)",
            self.cfg.prediction_type.as_str(),
            self.cfg.num_train_timesteps,
            self.num_inference_steps()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "no".into())
        )
    }
}

impl DdimScheduler {
    /// From a diffusers folder: `dir/scheduler/scheduler_config.json` or `dir/scheduler_config.json`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::new(DdimConfig::from_dir(dir)?, device)
    }

    pub fn new(cfg: DdimConfig, device: &Device) -> Result<Self> {
        let betas = cfg.betas();
        let ac = cfg.alphas_cumprod();
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { ac[0] };
        let n = ac.len();
        Ok(Self {
            betas: Tensor::from_vec(betas, n, device)?,
            alphas_cumprod: Tensor::from_vec(ac.clone(), n, device)?,
            alphas_cumprod_host: Arc::new(ac),
            final_alpha_cumprod,
            device: device.clone(),
            cfg: Arc::new(cfg),
            steps: Arc::new(RwLock::new(None)),
        })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.cfg.prediction_type
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.cfg.num_train_timesteps
    }

    pub fn betas(&self) -> &Tensor {
        &self.betas
    }

    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// diffusers' alpha_cumprod after the last step (1 with set_alpha_to_one, else
    /// alphas_cumprod[0]). Reported for reference only: the sampler follows LPO and never uses
    /// it (module docs).
    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    pub fn num_inference_steps(&self) -> Option<usize> {
        self.read().as_ref().map(|s| s.n)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<Steps>> {
        self.steps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Result<Steps> {
        self.read()
            .clone()
            .context("the scheduler has no timesteps yet: call set_timesteps(n) first")
    }

    /// Choose `n` inference steps; returns the timesteps first to last (i64 [n]).
    pub fn set_timesteps(&self, n: usize) -> Result<Tensor> {
        let timesteps = self.cfg.timesteps(n)?;
        let big = self.cfg.num_train_timesteps;
        let step_ratio = (big / n) as i64;
        let ac = &self.alphas_cumprod_host;
        let mut alpha_prev = Vec::with_capacity(big);
        let mut variance = Vec::with_capacity(big);
        for t in 0..big {
            let a_t = ac[t];
            // LPO's rule (module docs): the clamped previous timestep, never final_alpha_cumprod
            let a_prev = ac[t.saturating_sub(step_ratio as usize)];
            // diffusers' _get_variance, in f32 and in its order of operations
            let beta_t = 1.0f32 - a_t;
            let beta_prev = 1.0f32 - a_prev;
            variance.push((beta_prev / beta_t) * (1.0f32 - a_t / a_prev));
            alpha_prev.push(a_prev);
        }
        let steps = Steps {
            n,
            step_ratio,
            timesteps_t: Tensor::from_vec(timesteps.clone(), n, &self.device)?,
            timesteps,
            alpha_prev_by_t: Tensor::from_vec(alpha_prev, big, &self.device)?,
            variance_by_t: Tensor::from_vec(variance, big, &self.device)?,
        };
        let out = steps.timesteps_t.clone();
        *self.steps.write().unwrap_or_else(|e| e.into_inner()) = Some(steps);
        Ok(out)
    }

    /// The current timesteps first to last (i64 [n]).
    pub fn timesteps(&self) -> Result<Tensor> {
        Ok(self.current()?.timesteps_t)
    }

    pub fn timesteps_vec(&self) -> Result<Vec<i64>> {
        Ok(self.current()?.timesteps)
    }

    pub fn step_ratio(&self) -> Result<i64> {
        Ok(self.current()?.step_ratio)
    }

    /// Check and normalize per-row timesteps: an int tensor [B] (or one value for every row)
    /// on `device`. Values are range-checked where the tensor lives on the CPU (for free) and
    /// clamped into range elsewhere (no device round trip).
    pub fn rows_t(&self, t: &Tensor, batch: Option<usize>, device: &Device) -> Result<Tensor> {
        if !matches!(t.dtype(), DType::I64 | DType::U32 | DType::U8) {
            bail!(
                "timesteps must be an int tensor, got {}",
                t.dtype().as_str()
            );
        }
        if t.rank() > 1 {
            bail!(
                "timesteps must be a 1-D tensor (one per row), got shape {:?}",
                t.dims()
            );
        }
        let mut t = t.flatten_all()?.to_dtype(DType::I64)?;
        let len = t.elem_count();
        if let Some(b) = batch {
            if len == 1 && b != 1 {
                t = t.repeat(b)?;
            } else if len != b {
                bail!("timesteps has {len} entries but the batch has {b} rows");
            }
        }
        let big = self.cfg.num_train_timesteps as i64;
        if t.device().is_cpu() {
            if let Some(bad) = t.to_vec1::<i64>()?.into_iter().find(|&v| v < 0 || v >= big) {
                bail!("timestep {bad} is out of range 0..{big}");
            }
            Ok(t.to_device(device)?)
        } else {
            Ok(t.to_device(device)?.clamp(0i64, big - 1)?)
        }
    }

    fn gather(table: &Tensor, t: &Tensor) -> Result<Tensor> {
        Ok(table.to_device(t.device())?.index_select(t, 0)?)
    }

    /// alphas_cumprod[t] per row (f32 [B]).
    pub fn alpha_t(&self, t: &Tensor) -> Result<Tensor> {
        let t = self.rows_t(t, None, t.device())?;
        Self::gather(&self.alphas_cumprod, &t)
    }

    /// The alpha_cumprod the step from t lands on: alphas_cumprod at [`Self::prev_timestep`]
    /// (f32 [B]).
    pub fn alpha_prev(&self, t: &Tensor) -> Result<Tensor> {
        let s = self.current()?;
        let t = self.rows_t(t, None, t.device())?;
        Self::gather(&s.alpha_prev_by_t, &t)
    }

    /// `clamp(t - num_train_timesteps / n, 0, num_train_timesteps - 1)` per row (i64 [B]).
    pub fn prev_timestep(&self, t: &Tensor) -> Result<Tensor> {
        let s = self.current()?;
        let t = self.rows_t(t, None, t.device())?;
        Ok((t - s.step_ratio as f64)?.clamp(0i64, self.cfg.num_train_timesteps as i64 - 1)?)
    }

    /// DDIM variance of the step from t: (1-a_prev)/(1-a_t) * (1 - a_t/a_prev) with a_prev at
    /// [`Self::prev_timestep`], defined for every t in 0..num_train_timesteps (f32 [B]).
    pub fn variance(&self, t: &Tensor) -> Result<Tensor> {
        let s = self.current()?;
        let t = self.rows_t(t, None, t.device())?;
        Self::gather(&s.variance_by_t, &t)
    }

    /// sigma_t = eta * sqrt(variance) per row (f32 [B]).
    pub fn std_dev(&self, t: &Tensor, eta: f64) -> Result<Tensor> {
        Ok((self.variance(t)?.sqrt()? * eta)?)
    }

    /// sigma over the current timesteps in ascending t order (f32 [n]).
    pub fn std_dev_table(&self, eta: f64) -> Result<Tensor> {
        let s = self.current()?;
        let mut asc = s.timesteps.clone();
        asc.sort_unstable();
        let t = Tensor::from_vec(asc, s.n, &self.device)?;
        self.std_dev(&t, eta)
    }

    /// Rank of each row's t among the current timesteps in ascending order (0 = smallest t),
    /// i.e. the index into [`Self::std_dev_table`]; an error for a t not among them.
    pub fn timestep_rank(&self, t: &Tensor) -> Result<Tensor> {
        let s = self.current()?;
        let big = self.cfg.num_train_timesteps;
        let mut asc = s.timesteps.clone();
        asc.sort_unstable();
        let mut lut = vec![-1i64; big];
        for (i, &v) in asc.iter().enumerate() {
            lut[v as usize] = i as i64;
        }
        let t = self.rows_t(t, None, t.device())?;
        let lut = Tensor::from_vec(lut, big, t.device())?;
        let idx = lut.index_select(&t, 0)?;
        // a small check on [B] ints: one scalar comes back
        let min = idx.min(0)?.to_scalar::<i64>()?;
        if min < 0 {
            let ts = t.to_vec1::<i64>()?;
            let bad: Vec<i64> = ts
                .into_iter()
                .filter(|v| !s.timesteps.contains(v))
                .collect();
            bail!(
                "timestep(s) {bad:?} are not among the scheduler's {} timesteps {:?}",
                s.n,
                s.timesteps
            );
        }
        Ok(idx)
    }

    fn check_pair(&self, model_output: &Tensor, sample: &Tensor) -> Result<()> {
        if model_output.dims() != sample.dims() {
            bail!(
                "model_output shape {:?} differs from sample shape {:?}",
                model_output.dims(),
                sample.dims()
            );
        }
        if sample.rank() < 1 || sample.dim(0)? == 0 {
            bail!(
                "sample must have a batch dim, got shape {:?}",
                sample.dims()
            );
        }
        if !sample.dtype().is_float() || !model_output.dtype().is_float() {
            bail!("model_output and sample must be float tensors");
        }
        Ok(())
    }

    /// (x0, eps) from the model output, in the compute dtype, with per-row a_t.
    fn x0_eps(
        &self,
        model_output: &Tensor,
        t: &Tensor,
        sample: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.check_pair(model_output, sample)?;
        let cd = compute_dtype(sample);
        let t = self.rows_t(t, Some(sample.dim(0)?), sample.device())?;
        let a_t = Self::gather(&self.alphas_cumprod, &t)?.to_dtype(cd)?;
        let sqrt_a = a_t.sqrt()?;
        let sqrt_b = (1.0 - &a_t)?.sqrt()?;
        let m = model_output.to_dtype(cd)?;
        let x = sample.to_dtype(cd)?;
        let (mut x0, eps) = match self.cfg.prediction_type {
            PredictionType::Epsilon => {
                // (x - sqrt(1-a) m) / sqrt(a)
                let x0 = (&x - rows_mul(&sqrt_b, &m)?)?.broadcast_div(&rows(&sqrt_a, &x)?)?;
                (x0, m)
            }
            PredictionType::VPrediction => {
                let x0 = (rows_mul(&sqrt_a, &x)? - rows_mul(&sqrt_b, &m)?)?;
                let eps = (rows_mul(&sqrt_a, &m)? + rows_mul(&sqrt_b, &x)?)?;
                (x0, eps)
            }
            PredictionType::Sample => {
                let eps = (&x - rows_mul(&sqrt_a, &m)?)?.broadcast_div(&rows(&sqrt_b, &x)?)?;
                (m, eps)
            }
        };
        if self.cfg.clip_sample {
            let r = self.cfg.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        Ok((x0, eps))
    }

    /// The model's estimate of x0 (clipped when the config says `clip_sample`).
    pub fn pred_original_sample(
        &self,
        model_output: &Tensor,
        t: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .x0_eps(model_output, t, sample)?
            .0
            .to_dtype(sample.dtype())?)
    }

    /// The model's estimate of the noise.
    pub fn pred_epsilon(
        &self,
        model_output: &Tensor,
        t: &Tensor,
        sample: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .x0_eps(model_output, t, sample)?
            .1
            .to_dtype(sample.dtype())?)
    }

    /// The step's Gaussian: mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps, std = eta
    /// sqrt(variance). Computed in f32 (f64 for f64 input); differentiable w.r.t. model_output.
    pub fn step_dist(
        &self,
        model_output: &Tensor,
        t: &Tensor,
        sample: &Tensor,
        eta: f64,
    ) -> Result<StepDist> {
        if !eta.is_finite() || eta < 0.0 {
            bail!("eta must be a finite number >= 0, got {eta}");
        }
        let s = self.current()?;
        let (x0, eps) = self.x0_eps(model_output, t, sample)?;
        let cd = x0.dtype();
        let t = self.rows_t(t, Some(sample.dim(0)?), sample.device())?;
        let a_prev = Self::gather(&s.alpha_prev_by_t, &t)?.to_dtype(cd)?;
        let var = Self::gather(&s.variance_by_t, &t)?.to_dtype(cd)?;
        let std = (var.sqrt()? * eta)?;
        let dir = ((1.0 - &a_prev)? - std.sqr()?)?.relu()?.sqrt()?;
        let mean = (rows_mul(&a_prev.sqrt()?, &x0)? + rows_mul(&dir, &eps)?)?;
        Ok(StepDist { mean, std })
    }

    /// The noise-free part of the step (diffusers' prev_sample with variance_noise = 0).
    pub fn prev_sample_mean(
        &self,
        model_output: &Tensor,
        t: &Tensor,
        sample: &Tensor,
        eta: f64,
    ) -> Result<Tensor> {
        Ok(self
            .step_dist(model_output, t, sample, eta)?
            .mean
            .to_dtype(sample.dtype())?)
    }

    /// x_{t-1}: one seeded DDIM step (no noise is drawn when eta is 0).
    pub fn step(
        &self,
        model_output: &Tensor,
        t: &Tensor,
        sample: &Tensor,
        eta: f64,
        rng: &mut SeededRng,
    ) -> Result<Tensor> {
        let d = self.step_dist(model_output, t, sample, eta)?;
        let out = if eta == 0.0 { d.mean } else { d.sample(rng)? };
        Ok(out.to_dtype(sample.dtype())?)
    }

    /// `k` independent x_{t-1} from the same x_t: [K, B, ...] (one mean, K noises).
    pub fn candidates(
        &self,
        model_output: &Tensor,
        t: &Tensor,
        sample: &Tensor,
        k: usize,
        eta: f64,
        rng: &mut SeededRng,
    ) -> Result<Tensor> {
        let d = self.step_dist(model_output, t, sample, eta)?;
        Ok(d.sample_k(k, rng)?.to_dtype(sample.dtype())?)
    }

    /// Log-prob [B] of `prev_sample` under the step from (model_output, t, sample), mean over
    /// non-batch dims (LPO's definition). Differentiable w.r.t. model_output; prev_sample is
    /// detached.
    pub fn log_prob(
        &self,
        model_output: &Tensor,
        t: &Tensor,
        sample: &Tensor,
        prev_sample: &Tensor,
        eta: f64,
    ) -> Result<Tensor> {
        if prev_sample.dims() != sample.dims() {
            bail!(
                "log_prob: prev_sample shape {:?} differs from sample shape {:?}",
                prev_sample.dims(),
                sample.dims()
            );
        }
        if eta <= 0.0 {
            bail!("log_prob needs eta > 0 (the step is deterministic at eta 0), got {eta}");
        }
        self.step_dist(model_output, t, sample, eta)?
            .log_prob(prev_sample)
    }

    /// Log-probs [B] of several candidates for x_{t-1} (e.g. winner and loser) from one
    /// computation of the step's mean.
    pub fn log_probs(
        &self,
        model_output: &Tensor,
        t: &Tensor,
        sample: &Tensor,
        prev_samples: &[Tensor],
        eta: f64,
    ) -> Result<Vec<Tensor>> {
        if eta <= 0.0 {
            bail!("log_prob needs eta > 0 (the step is deterministic at eta 0), got {eta}");
        }
        let d = self.step_dist(model_output, t, sample, eta)?;
        prev_samples.iter().map(|p| d.log_prob(p)).collect()
    }

    /// Forward diffusion: sqrt(a_t) x0 + sqrt(1 - a_t) noise.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.check_pair(noise, x0).context("add_noise")?;
        let cd = compute_dtype(x0);
        let t = self.rows_t(t, Some(x0.dim(0)?), x0.device())?;
        let a = Self::gather(&self.alphas_cumprod, &t)?.to_dtype(cd)?;
        let out = (rows_mul(&a.sqrt()?, &x0.to_dtype(cd)?)?
            + rows_mul(&(1.0 - &a)?.sqrt()?, &noise.to_dtype(cd)?)?)?;
        Ok(out.to_dtype(x0.dtype())?)
    }

    /// The v-prediction target: sqrt(a_t) noise - sqrt(1 - a_t) x0.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.check_pair(noise, x0).context("velocity")?;
        let cd = compute_dtype(x0);
        let t = self.rows_t(t, Some(x0.dim(0)?), x0.device())?;
        let a = Self::gather(&self.alphas_cumprod, &t)?.to_dtype(cd)?;
        let out = (rows_mul(&a.sqrt()?, &noise.to_dtype(cd)?)?
            - rows_mul(&(1.0 - &a)?.sqrt()?, &x0.to_dtype(cd)?)?)?;
        Ok(out.to_dtype(x0.dtype())?)
    }
}
