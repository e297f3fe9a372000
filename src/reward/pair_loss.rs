//! The LRM's preference loss over image pairs (LPO's `step_clip_criterion`).
//!
//! For N prompts with two images each: logits = exp(logit_scale) · [⟨t, i0⟩, ⟨t, i1⟩] on
//! L2-normalised features; per-pair cross entropy against the labels, offset by log 0.5 for a
//! tie so a perfect tie costs 0; weights 1/num_examples_per_prompt normalised over the batch;
//! pairs whose two images were noised to different timesteps scaled by `aux_loss_coeff`.

use candle_core::{DType, Result, Tensor, D};

use crate::tensor::ops::log_softmax;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    /// Cross entropy within each pair.
    Pair,
    /// Each prompt against every image of the batch (CLIP-style), the preferred image as target.
    Batch,
    /// Pair + batch_coeff · batch.
    Both,
}

impl LossType {
    pub fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "pair" => Ok(Self::Pair),
            "batch" => Ok(Self::Batch),
            "both" => Ok(Self::Both),
            other => Err(format!(
                "unknown loss_type `{other}`: expected pair, batch or both"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PairLossOptions {
    pub loss_type: LossType,
    pub batch_coeff: f64,
    pub aux_loss_coeff: f64,
}

impl Default for PairLossOptions {
    fn default() -> Self {
        Self {
            loss_type: LossType::Pair,
            batch_coeff: 1.0,
            aux_loss_coeff: 1.0,
        }
    }
}

pub struct PairLoss {
    /// Scalar loss (differentiable).
    pub loss: Tensor,
    /// [N, 2] logits of image 0 and image 1 for each prompt.
    pub logits: Tensor,
    /// [N] per-pair loss before weighting.
    pub per_pair: Tensor,
    /// [N] normalised per-prompt weights.
    pub weight: Tensor,
}

/// Check the labels: each in [0, 1] and label_0 + label_1 = 1.
pub fn validate_labels(label_0: &[f32], label_1: &[f32]) -> std::result::Result<(), String> {
    if label_0.len() != label_1.len() {
        return Err(format!(
            "labels: label_0 has {} entries, label_1 has {}",
            label_0.len(),
            label_1.len()
        ));
    }
    for (i, (a, b)) in label_0.iter().zip(label_1).enumerate() {
        if !(0.0..=1.0).contains(a) || !(0.0..=1.0).contains(b) || ((a + b) - 1.0).abs() > 1e-4 {
            return Err(format!(
                "labels of pair {i}: label_0 = {a}, label_1 = {b}; each must be in [0, 1] and they must sum to 1"
            ));
        }
    }
    Ok(())
}

fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// The pair loss from (unnormalised) text features [N, D] and image features [N, D] of
/// image 0 and image 1. `timesteps` is [N, 2] (one timestep per image).
#[allow(clippy::too_many_arguments)]
pub fn pair_loss(
    text_features: &Tensor,
    image_0: &Tensor,
    image_1: &Tensor,
    logit_scale: &Tensor,
    label_0: &Tensor,
    label_1: &Tensor,
    num_examples: &Tensor,
    timesteps: &Tensor,
    opts: PairLossOptions,
) -> Result<PairLoss> {
    let n = text_features.dim(0)?;
    for (name, t) in [
        ("label_0", label_0),
        ("label_1", label_1),
        ("num_examples", num_examples),
    ] {
        if t.dims() != [n] {
            candle_core::bail!(
                "pair_loss: `{name}` has shape {:?}, expected [{n}]",
                t.dims()
            );
        }
    }
    if timesteps.dims() != [n, 2] {
        candle_core::bail!(
            "pair_loss: timesteps have shape {:?}, expected [{n}, 2]",
            timesteps.dims()
        );
    }
    let t = l2_normalize(text_features)?;
    let i0 = l2_normalize(image_0)?;
    let i1 = l2_normalize(image_1)?;
    let scale = logit_scale.to_dtype(DType::F32)?.exp()?;
    let s0 = (&t * &i0)?.sum(1)?;
    let s1 = (&t * &i1)?.sum(1)?;
    let logits = Tensor::stack(&[s0, s1], 1)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&scale)?;
    let label_0 = label_0.to_dtype(DType::F32)?;
    let label_1 = label_1.to_dtype(DType::F32)?;
    let lsm = log_softmax(&logits, 1)?;
    let per = ((&label_0 * lsm.narrow(1, 0, 1)?.squeeze(1)?)?
        + (&label_1 * lsm.narrow(1, 1, 1)?.squeeze(1)?)?)?
    .neg()?;
    let tie = label_0.eq(&label_1)?.to_dtype(DType::F32)?;
    let per_pair = (per + (tie * 0.5f64.ln())?)?;
    let inv = num_examples.to_dtype(DType::F32)?.recip()?;
    let weight = inv.broadcast_div(&inv.sum_all()?)?;
    let t0 = timesteps.narrow(1, 0, 1)?.squeeze(1)?;
    let t1 = timesteps.narrow(1, 1, 1)?.squeeze(1)?;
    let differ = t0.ne(&t1)?.to_dtype(DType::F32)?;
    let aux = ((differ * (opts.aux_loss_coeff - 1.0))? + 1.0)?;
    let pair_term = (&per_pair * &weight)?.mul(&aux)?.sum_all()?;
    let loss = match opts.loss_type {
        LossType::Pair => pair_term,
        LossType::Batch => batch_loss(&t, &i0, &i1, &scale, &label_0, &weight)?,
        LossType::Both => {
            (pair_term
                + (batch_loss(&t, &i0, &i1, &scale, &label_0, &weight)? * opts.batch_coeff)?)?
        }
    };
    Ok(PairLoss {
        loss,
        logits,
        per_pair,
        weight,
    })
}

/// Each prompt against all 2N images: cross entropy towards its own pair, split by the labels.
fn batch_loss(
    t: &Tensor,
    i0: &Tensor,
    i1: &Tensor,
    scale: &Tensor,
    label_0: &Tensor,
    weight: &Tensor,
) -> Result<Tensor> {
    let n = t.dim(0)?;
    let images = Tensor::cat(&[i0, i1], 0)?;
    let logits = t
        .matmul(&images.t()?)?
        .to_dtype(DType::F32)?
        .broadcast_mul(scale)?;
    let lsm = log_softmax(&logits, 1)?;
    let idx0 = Tensor::arange(0u32, n as u32, t.device())?.unsqueeze(1)?;
    let idx1 = Tensor::arange(n as u32, 2 * n as u32, t.device())?.unsqueeze(1)?;
    let lp0 = lsm.gather(&idx0, 1)?.squeeze(1)?;
    let lp1 = lsm.gather(&idx1, 1)?.squeeze(1)?;
    let label_1 = (label_0.neg()? + 1.0)?;
    let per = ((label_0 * lp0)? + (label_1 * lp1)?)?.neg()?;
    (per * weight)?.sum_all()
}
