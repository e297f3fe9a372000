//! AdamW with decoupled weight decay, written here (candle_nn's hides its moments, and a
//! resumed run must continue exactly): gradient accumulation over micro-batches, global-norm
//! clipping, warmup + constant/cosine/linear schedules, f32 moments (and f32 master weights
//! for f16/bf16 parameters), and a state that checkpoints as a flat map of tensors.
//!
//! The update follows `torch.optim.AdamW` (per parameter, `t` its own step count):
//! ```text
//! p <- p * (1 - lr * weight_decay)
//! m <- beta1 * m + (1 - beta1) * g
//! v <- beta2 * v + (1 - beta2) * g^2
//! p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//! A parameter that received no gradient since the last step is skipped entirely (no decay,
//! no moment update), as torch skips parameters whose `.grad` is None.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use super::clip::GradClip;
use super::params::Params;
use crate::tensor::grad::global_norm;

/// Learning-rate schedule after warmup. Step `k` (0-based count of optimizer steps already
/// taken) uses `lr * factor(k)`; during warmup factor(k) = k / warmup_steps, exactly as
/// diffusers' `get_constant_schedule_with_warmup` / `get_cosine_schedule_with_warmup` (so the
/// first step of a warmup has lr 0, as in the reference training scripts).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// factor 1 after warmup.
    Constant,
    /// Half a cosine from 1 to 0 over `total_steps - warmup_steps` steps, then 0.
    Cosine { total_steps: u64 },
    /// Straight line from 1 to 0 over `total_steps - warmup_steps` steps, then 0.
    Linear { total_steps: u64 },
}

/// AdamW settings. Defaults (documented, explicit): lr 1e-5 (the LRM's; LPO recipes set
/// their own), betas (0.9, 0.999), eps 1e-8, weight_decay 1e-4 (LPO's), no clipping (the
/// official code's effective behaviour), no warmup, constant schedule. Scripts write it as
/// [`super::AdamWOptions`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip: GradClip,
    pub warmup_steps: u64,
    pub schedule: Schedule,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
            clip: GradClip::Off,
            warmup_steps: 0,
            schedule: Schedule::Constant,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            bail!("adamw: lr must be >= 0, got {}", self.lr);
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("adamw: {name} must be in [0, 1), got {b}");
            }
        }
        if self.eps.is_nan() || self.eps <= 0.0 {
            bail!("adamw: eps must be > 0, got {}", self.eps);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!(
                "adamw: weight_decay must be >= 0, got {}",
                self.weight_decay
            );
        }
        match self.schedule {
            Schedule::Constant => {}
            Schedule::Cosine { total_steps } | Schedule::Linear { total_steps } => {
                if total_steps <= self.warmup_steps {
                    bail!(
                        "adamw: total_steps ({total_steps}) must exceed warmup_steps ({})",
                        self.warmup_steps
                    );
                }
            }
        }
        Ok(())
    }

    /// The factor applied to `lr` at 0-based step `k`.
    pub fn lr_factor(&self, k: u64) -> f64 {
        let w = self.warmup_steps;
        if k < w {
            return k as f64 / w.max(1) as f64;
        }
        match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Cosine { total_steps } => {
                let progress = ((k - w) as f64 / (total_steps - w).max(1) as f64).min(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
            Schedule::Linear { total_steps } => {
                ((total_steps.saturating_sub(k)) as f64 / (total_steps - w).max(1) as f64).max(0.0)
            }
        }
    }
}

/// What one optimizer step did (for logging; scripts see it as `#{grad_norm, lr, step}`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepInfo {
    /// Global L2 norm of the accumulated gradients before clipping.
    pub grad_norm: f64,
    /// The learning rate this step used.
    pub lr: f64,
    /// Optimizer steps taken so far, this one included.
    pub step: u64,
}

struct Slot {
    /// Moments in the compute dtype (f32, or f64 for f64 parameters).
    m: Tensor,
    v: Tensor,
    /// f32 master weights of an f16/bf16 parameter.
    master: Option<Tensor>,
    /// Steps this parameter was updated (torch keeps one per parameter).
    steps: u64,
    /// Accumulated gradient since the last step, in the compute dtype.
    grad: Option<Tensor>,
}

pub struct AdamW {
    params: Params,
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
    micro_batches: u64,
}

fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

impl AdamW {
    pub fn new(params: Params, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let slots = params
            .vars()
            .iter()
            .map(|(_, var)| {
                let cd = compute_dtype(var.dtype());
                let zeros = Tensor::zeros(var.shape(), cd, var.device())?;
                let master = if var.dtype() == cd {
                    None
                } else {
                    Some(var.as_tensor().detach().to_dtype(cd)?.copy()?)
                };
                Ok(Slot {
                    m: zeros.clone(),
                    v: zeros.copy()?,
                    master,
                    steps: 0,
                    grad: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            cfg,
            slots,
            step: 0,
            micro_batches: 0,
        })
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Micro-batches accumulated since the last step.
    pub fn pending_micro_batches(&self) -> u64 {
        self.micro_batches
    }

    /// The base learning rate (before warmup and schedule).
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        if !(lr >= 0.0 && lr.is_finite()) {
            bail!("adamw: lr must be >= 0, got {lr}");
        }
        self.cfg.lr = lr;
        Ok(())
    }

    /// The learning rate the next step will use.
    pub fn current_lr(&self) -> f64 {
        self.cfg.lr * self.cfg.lr_factor(self.step)
    }

    /// Backpropagate a scalar loss and add `scale` times its gradients to the accumulators.
    /// Non-finite gradients are an error and nothing is accumulated.
    pub fn backward(&mut self, loss: &Tensor, scale: f64) -> Result<()> {
        if loss.elem_count() != 1 {
            bail!(
                "backward: the loss must be a scalar (one element), got shape {:?}; reduce it with .mean() or .sum()",
                loss.dims()
            );
        }
        let grads = crate::tensor::recompute::backward(loss).context("backward")?;
        self.accumulate(&grads, scale)
    }

    /// Add `scale` times the gradients in `grads` to the accumulators (for callers that ran
    /// `backward` themselves). At least one parameter must have a gradient.
    pub fn accumulate(&mut self, grads: &GradStore, scale: f64) -> Result<()> {
        if !scale.is_finite() {
            bail!("backward: scale must be finite, got {scale}");
        }
        let mut incoming: Vec<Option<Tensor>> = Vec::with_capacity(self.slots.len());
        for (name, var) in self.params.vars() {
            match grads.get(var.as_tensor()) {
                Some(g) => {
                    let mut g = g.detach().to_dtype(compute_dtype(var.dtype()))?;
                    if scale != 1.0 {
                        g = g.affine(scale, 0.0)?;
                    }
                    if g.dims() != var.dims() {
                        bail!(
                            "backward: gradient of `{name}` has shape {:?}, expected {:?}",
                            g.dims(),
                            var.dims()
                        );
                    }
                    incoming.push(Some(g));
                }
                None => incoming.push(None),
            }
        }
        if incoming.iter().all(Option::is_none) && !self.slots.is_empty() {
            bail!(
                "backward: the loss has no gradient path to any of the {} parameters (computed from detached tensors?)",
                self.slots.len()
            );
        }
        let norm = global_norm(incoming.iter().flatten())?;
        if !norm.is_finite() {
            let bad: Vec<&str> = self
                .params
                .vars()
                .iter()
                .zip(&incoming)
                .filter_map(|((n, _), g)| {
                    let g = g.as_ref()?;
                    let s = global_norm([g]).ok()?;
                    (!s.is_finite()).then_some(n.as_str())
                })
                .collect();
            bail!(
                "backward: non-finite gradient (norm {norm}) in {}; nothing was accumulated and the parameters are unchanged",
                bad.join(", ")
            );
        }
        for (slot, g) in self.slots.iter_mut().zip(incoming) {
            if let Some(g) = g {
                slot.grad = Some(match slot.grad.take() {
                    None => g,
                    Some(acc) => (acc + g)?,
                });
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Names of the parameters with no accumulated gradient (a model whose trainable tensor
    /// is cut from the graph shows up here).
    pub fn missing_grads(&self) -> Vec<String> {
        self.params
            .vars()
            .iter()
            .zip(&self.slots)
            .filter(|(_, s)| s.grad.is_none())
            .map(|((n, _), _)| n.clone())
            .collect()
    }

    /// The accumulated gradients, in parameter order (None where there is none).
    pub fn grads(&self) -> Vec<Option<Tensor>> {
        self.slots.iter().map(|s| s.grad.clone()).collect()
    }

    /// Drop the accumulated gradients.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.grad = None;
        }
        self.micro_batches = 0;
    }

    /// Apply the accumulated gradients (clipped as configured), then zero them. An error
    /// (nothing accumulated, non-finite values) leaves parameters, moments and step count as
    /// they were; the accumulators are dropped when they hold non-finite values.
    pub fn step(&mut self) -> Result<StepInfo> {
        if self.micro_batches == 0 {
            bail!("step: no gradients accumulated since the last step (call backward first)");
        }
        let idx: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].grad.is_some())
            .collect();
        let mut grads: Vec<Tensor> = idx
            .iter()
            .map(|&i| self.slots[i].grad.clone().unwrap())
            .collect();
        let grad_norm = match self.cfg.clip.apply(&mut grads) {
            Ok(n) if n.is_finite() => n,
            Ok(n) => {
                self.zero_grad();
                bail!(
                    "step: non-finite gradient norm {n}; gradients dropped, parameters unchanged"
                );
            }
            Err(e) => {
                self.zero_grad();
                return Err(e.context("step: gradients dropped, parameters unchanged"));
            }
        };
        let lr = self.current_lr();
        let AdamWConfig {
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            ..
        } = self.cfg;
        // Compute every update first, then write them all: an error leaves everything as it was.
        let mut staged = Vec::with_capacity(idx.len());
        for (&i, g) in idx.iter().zip(&grads) {
            let (_, var) = &self.params.vars()[i];
            let slot = &self.slots[i];
            let t = (slot.steps + 1) as i32;
            let p = match &slot.master {
                Some(m) => m.clone(),
                None => var.as_tensor().detach(),
            };
            let m = (slot.m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            let v = (slot.v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let bc1 = 1.0 - b1.powi(t);
            let bc2 = 1.0 - b2.powi(t);
            let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), eps)?;
            let decayed = p.affine(1.0 - lr * wd, 0.0)?;
            let p_new = (decayed - (m.div(&denom)?.affine(lr / bc1, 0.0))?)?;
            staged.push((i, m, v, p_new));
        }
        for (i, m, v, p_new) in staged {
            let (_, var) = &self.params.vars()[i];
            let slot = &mut self.slots[i];
            if slot.master.is_some() {
                var.set(&p_new.to_dtype(var.dtype())?)?;
                slot.master = Some(p_new);
            } else {
                var.set(&p_new)?;
            }
            slot.m = m;
            slot.v = v;
            slot.steps += 1;
        }
        self.step += 1;
        self.zero_grad();
        Ok(StepInfo {
            grad_norm,
            lr,
            step: self.step,
        })
    }

    /// The optimizer state as a flat map of tensors (saveable as safetensors): `step` (i64,
    /// 0-d), `lr` (f64, 0-d, the base lr), and per parameter `exp_avg.NAME`,
    /// `exp_avg_sq.NAME`, `steps.NAME` (i64, 0-d) and, for f16/bf16 parameters, `master.NAME`.
    /// Accumulated gradients are not part of the state: checkpoint between steps.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let dev = self
            .params
            .vars()
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut out = vec![
            ("step".to_string(), Tensor::new(self.step as i64, &dev)?),
            ("lr".to_string(), Tensor::new(self.cfg.lr, &dev)?),
        ];
        for ((name, _), slot) in self.params.vars().iter().zip(&self.slots) {
            out.push((format!("exp_avg.{name}"), slot.m.copy()?));
            out.push((format!("exp_avg_sq.{name}"), slot.v.copy()?));
            out.push((
                format!("steps.{name}"),
                Tensor::new(slot.steps as i64, &dev)?,
            ));
            if let Some(m) = &slot.master {
                out.push((format!("master.{name}"), m.copy()?));
            }
        }
        Ok(out)
    }

    /// Restore a state saved by [`AdamW::state`] for the same parameters (names and shapes
    /// checked; nothing changes unless everything checks out). Accumulated gradients are
    /// dropped. Extra keys are an error (a state of another model is a mistake).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| -> Result<&Tensor> {
            state.get(key).with_context(|| {
                format!("load_state: missing key `{key}` (a state saved by opt.state() for the same params?)")
            })
        };
        let scalar_i = |key: &str| -> Result<u64> {
            let t = get(key)?;
            if t.elem_count() != 1 {
                bail!(
                    "load_state: `{key}` must be a single value, got shape {:?}",
                    t.dims()
                );
            }
            let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
            if v < 0.0 || v.fract() != 0.0 {
                bail!("load_state: `{key}` must be a non-negative integer, got {v}");
            }
            Ok(v as u64)
        };
        let step = scalar_i("step")?;
        let lr_t = get("lr")?;
        if lr_t.elem_count() != 1 {
            bail!(
                "load_state: `lr` must be a single value, got shape {:?}",
                lr_t.dims()
            );
        }
        let lr = lr_t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        let mut expected = vec!["step".to_string(), "lr".to_string()];
        let mut staged = Vec::with_capacity(self.slots.len());
        for ((name, var), slot) in self.params.vars().iter().zip(&self.slots) {
            let cd = compute_dtype(var.dtype());
            let tensor = |key: String| -> Result<Tensor> {
                let t = get(&key)?;
                if t.dims() != var.dims() {
                    bail!(
                        "load_state: `{key}` has shape {:?} but parameter `{name}` has shape {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                Ok(t.to_dtype(cd)?.to_device(var.device())?.copy()?)
            };
            let m = tensor(format!("exp_avg.{name}"))?;
            let v = tensor(format!("exp_avg_sq.{name}"))?;
            let steps = scalar_i(&format!("steps.{name}"))?;
            expected.extend([
                format!("exp_avg.{name}"),
                format!("exp_avg_sq.{name}"),
                format!("steps.{name}"),
            ]);
            let master = if slot.master.is_some() {
                expected.push(format!("master.{name}"));
                Some(tensor(format!("master.{name}"))?)
            } else {
                None
            };
            staged.push((m, v, steps, master));
        }
        let mut extra: Vec<&str> = state
            .keys()
            .filter(|k| !expected.contains(k))
            .map(String::as_str)
            .collect();
        if !extra.is_empty() {
            extra.sort();
            bail!(
                "load_state: unexpected key(s) {} (a state of other parameters?)",
                extra.join(", ")
            );
        }
        for (slot, (m, v, steps, master)) in self.slots.iter_mut().zip(staged) {
            slot.m = m;
            slot.v = v;
            slot.steps = steps;
            slot.master = master;
            slot.grad = None;
        }
        self.step = step;
        self.cfg.lr = lr;
        self.micro_batches = 0;
        Ok(())
    }
}
