//! LPO's step loss (train_lpo.py), computed stably.
//!
//! r = clamp(exp(lp - lp_ref), 1 - eps, 1 + eps) for the winner and the loser;
//! loss = mean(-log sigmoid(beta log r_w - beta log r_l)) = mean(softplus(-x)).
//! The official f32 formula overflows to +inf where x < ~-88.7 (its sigmoid underflows to 0);
//! here the softplus keeps it finite (= the f64 value). The clamp is applied in log space
//! (log r = clamp(lp - lp_ref, ln(1-eps), ln(1+eps))), which equals log of the clamped ratio,
//! never produces inf * 0 gradients, and passes gradient only where the ratio is unclamped.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Hyper-parameters: the paper's beta 500 and eps 0.1 by default.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct LpoLossConfig {
    /// Inverse temperature of the DPO-style loss (the paper's 500).
    pub beta: f64,
    /// Clamp of the policy/reference log-ratio per step, ±eps (the paper's 0.1).
    pub eps: f64,
}

impl Default for LpoLossConfig {
    fn default() -> Self {
        Self {
            beta: 500.0,
            eps: 0.1,
        }
    }
}

/// Everything the step loss reports. `loss` carries the graph back to `lp_w` and `lp_l`;
/// the rest are detached statistics (tensors: nothing is copied to the host).
#[derive(Debug, Clone)]
pub struct LpoLossOutput {
    /// Scalar (0-d) mean loss.
    pub loss: Tensor,
    /// [B] softplus(-x) per pair.
    pub loss_per_pair: Tensor,
    /// 0-d: fraction of pairs with r_w > r_l.
    pub implicit_acc: Tensor,
    /// 0-d: mean(r_w - r_l).
    pub margin: Tensor,
    /// [B] clamped ratios.
    pub ratio_w: Tensor,
    pub ratio_l: Tensor,
    /// [B] x = beta (log r_w - log r_l).
    pub logits: Tensor,
}

/// `softplus(z) = relu(z) + log(1 + exp(-|z|))` with the sign masks held constant, so the
/// gradient is sigmoid(z) everywhere, 1/2 at z = 0 included.
pub fn stable_softplus(z: &Tensor) -> Result<Tensor> {
    let pos = z.ge(&z.zeros_like()?)?.to_dtype(z.dtype())?.detach();
    let sign = ((&pos * 2.0)? - 1.0)?;
    let abs = (z * &sign)?;
    let relu = (z * &pos)?;
    Ok((relu + (abs.neg()?.exp()? + 1.0)?.log()?)?)
}

/// log of clamp(exp(d), 1 - eps, 1 + eps), with gradient 1 inside the bounds and 0 outside.
fn clamped_log_ratio(d: &Tensor, eps: f64) -> Result<Tensor> {
    let (lo, hi) = ((1.0 - eps).ln(), (1.0 + eps).ln());
    let inside =
        (d.ge(&d.ones_like()?.affine(lo, 0.0)?)? * d.le(&d.ones_like()?.affine(hi, 0.0)?)?)?;
    let bounded = d.clamp(lo, hi)?.detach();
    Ok(inside.where_cond(d, &bounded)?)
}

fn check_inputs(names: [&str; 4], ts: [&Tensor; 4]) -> Result<()> {
    for (n, t) in names.iter().zip(ts.iter()) {
        if t.rank() != 1 {
            bail!(
                "lpo_loss: {n} must be a 1-D tensor [B], got shape {:?}",
                t.dims()
            );
        }
        if !t.dtype().is_float() {
            bail!(
                "lpo_loss: {n} must be a float tensor, got {}",
                t.dtype().as_str()
            );
        }
    }
    for (n, t) in names.iter().zip(ts.iter()).skip(1) {
        if t.dims() != ts[0].dims() {
            bail!(
                "lpo_loss: {n} has shape {:?} but {} has shape {:?}",
                t.dims(),
                names[0],
                ts[0].dims()
            );
        }
    }
    if ts[0].dim(0)? == 0 {
        bail!("lpo_loss: empty batch");
    }
    Ok(())
}

/// The LPO step loss for B (winner, loser) pairs. `lp_*_ref` are detached.
pub fn lpo_loss(
    lp_w: &Tensor,
    lp_w_ref: &Tensor,
    lp_l: &Tensor,
    lp_l_ref: &Tensor,
    cfg: LpoLossConfig,
) -> Result<LpoLossOutput> {
    check_inputs(
        ["lp_w", "lp_w_ref", "lp_l", "lp_l_ref"],
        [lp_w, lp_w_ref, lp_l, lp_l_ref],
    )?;
    if !(cfg.eps > 0.0 && cfg.eps < 1.0) {
        bail!("lpo_loss: eps must be in (0, 1), got {}", cfg.eps);
    }
    if !cfg.beta.is_finite() {
        bail!("lpo_loss: beta must be finite, got {}", cfg.beta);
    }
    let cd = if lp_w.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let d_w = (lp_w.to_dtype(cd)? - lp_w_ref.detach().to_dtype(cd)?)?;
    let d_l = (lp_l.to_dtype(cd)? - lp_l_ref.detach().to_dtype(cd)?)?;
    let log_r_w = clamped_log_ratio(&d_w, cfg.eps)?;
    let log_r_l = clamped_log_ratio(&d_l, cfg.eps)?;
    let logits = ((log_r_w - log_r_l)? * cfg.beta)?;
    let loss_per_pair = stable_softplus(&logits.neg()?)?;
    let loss = loss_per_pair.mean_all()?;
    let (lo, hi) = (1.0 - cfg.eps, 1.0 + cfg.eps);
    let ratio_w = d_w.detach().exp()?.clamp(lo, hi)?;
    let ratio_l = d_l.detach().exp()?.clamp(lo, hi)?;
    let diff = (&ratio_w - &ratio_l)?;
    let implicit_acc = diff.gt(&diff.zeros_like()?)?.to_dtype(cd)?.mean_all()?;
    let margin = diff.mean_all()?;
    Ok(LpoLossOutput {
        loss,
        loss_per_pair,
        implicit_acc,
        margin,
        ratio_w,
        ratio_l,
        logits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softplus_gradient_is_sigmoid_including_zero() {
        let z = Var::new(&[-3.0f64, 0.0, 2.0, -200.0], &Device::Cpu).unwrap();
        let sp = stable_softplus(z.as_tensor()).unwrap();
        let v = sp.to_vec1::<f64>().unwrap();
        assert!((v[1] - 2f64.ln()).abs() < 1e-12 && (v[3] - 0.0).abs() < 1e-12);
        let g = sp.sum_all().unwrap().backward().unwrap();
        let g = g.get(z.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for (gz, z) in g.iter().zip([-3.0f64, 0.0, 2.0, -200.0]) {
            let s = 1.0 / (1.0 + (-z).exp());
            assert!((gz - s).abs() < 1e-12, "{gz} vs {s}");
        }
    }
}
