//! The LRM's preference loss over image pairs (LPO's `step_clip_criterion`).
//!
//! For N prompts with two images each: logits = exp(logit_scale) · [⟨t, i0⟩, ⟨t, i1⟩] on
//! L2-normalised features; per-pair cross entropy against the labels, offset by log 0.5 for a
//! tie so a perfect tie costs 0 ("pair"). "batch" replaces it by the in-batch term: the mean of
//! an image-to-text cross entropy (each image over the N prompts) and a text-to-image one (each
//! prompt over the 2N images, with the same tie offset); "both" is pair + batch_coeff · batch.
//! Each pair's total is scaled by its weight (1/num_examples_per_prompt normalised over the
//! batch) and, when its two images were noised to different timesteps, by `aux_loss_coeff`,
//! then summed.

use candle_core::{DType, Result, Tensor, D};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tensor::ops::log_softmax;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    /// Cross entropy within each pair.
    Pair,
    /// In-batch (CLIP-style): the mean of image→prompts and prompt→images cross entropies.
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

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct PairLossOptions {
    /// "pair": cross entropy within each pair; "batch": the in-batch (CLIP-style) mean of
    /// image→prompts and prompt→images cross entropies; "both": pair + batch_coeff · batch.
    pub loss_type: LossType,
    /// Weight of the batch term in "both".
    pub batch_coeff: f64,
    /// Factor of the pairs whose two images were noised to different timesteps.
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
    /// [N] per-pair loss of the loss type (pair, batch, or pair + batch_coeff · batch) before
    /// the weight and aux factor.
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

/// Entry (i, offset + i) of each row i of `m`: every prompt's logit at its own image.
fn own_entries(m: &Tensor, offset: usize) -> Result<Tensor> {
    let n = m.dim(0)?;
    let idx = Tensor::arange(offset as u32, (offset + n) as u32, m.device())?.unsqueeze(1)?;
    m.contiguous()?.gather(&idx, 1)?.squeeze(1)
}

/// The pair loss from (unnormalised) text features [N, D] and image features [N, D] of
/// image 0 and image 1. `timesteps` is [N, 2] (one timestep per image). Computes in f64 for
/// f64 features (exact finite differences), in f32 otherwise.
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
    for (name, t) in [("image_0", image_0), ("image_1", image_1)] {
        if t.dims() != text_features.dims() {
            candle_core::bail!(
                "pair_loss: `{name}` features have shape {:?}, expected the text features' {:?}",
                t.dims(),
                text_features.dims()
            );
        }
    }
    if timesteps.dims() != [n, 2] {
        candle_core::bail!(
            "pair_loss: timesteps have shape {:?}, expected [{n}, 2]",
            timesteps.dims()
        );
    }
    let cd = if text_features.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let t = l2_normalize(&text_features.to_dtype(cd)?)?;
    let i0 = l2_normalize(&image_0.to_dtype(cd)?)?;
    let i1 = l2_normalize(&image_1.to_dtype(cd)?)?;
    let scale = logit_scale.to_dtype(cd)?.exp()?;
    let s0 = (&t * &i0)?.sum(1)?;
    let s1 = (&t * &i1)?.sum(1)?;
    let logits = Tensor::stack(&[s0, s1], 1)?.broadcast_mul(&scale)?;
    let label_0 = label_0.to_dtype(cd)?;
    let label_1 = label_1.to_dtype(cd)?;
    // a perfect tie would cost -log 0.5; the offset makes it 0
    let tie = (label_0.eq(&label_1)?.to_dtype(cd)? * 0.5f64.ln())?;
    let labelled = |lp_0: &Tensor, lp_1: &Tensor| -> Result<Tensor> {
        ((&label_0 * lp_0)? + (&label_1 * lp_1)?)?.neg()
    };
    let lsm = log_softmax(&logits, 1)?;
    let column = |j: usize| lsm.narrow(1, j, 1)?.squeeze(1);
    let pair = (labelled(&column(0)?, &column(1)?)? + &tie)?;
    let per_pair = match opts.loss_type {
        LossType::Pair => pair,
        LossType::Batch => batch_term(&t, &i0, &i1, &scale, &labelled, &tie)?,
        LossType::Both => {
            (pair + (batch_term(&t, &i0, &i1, &scale, &labelled, &tie)? * opts.batch_coeff)?)?
        }
    };
    let inv = num_examples.to_dtype(cd)?.recip()?;
    let weight = inv.broadcast_div(&inv.sum_all()?)?;
    let t0 = timesteps.narrow(1, 0, 1)?.squeeze(1)?;
    let t1 = timesteps.narrow(1, 1, 1)?.squeeze(1)?;
    let differ = t0.ne(&t1)?.to_dtype(cd)?;
    let aux = ((differ * (opts.aux_loss_coeff - 1.0))? + 1.0)?;
    let loss = (&per_pair * &weight)?.mul(&aux)?.sum_all()?;
    Ok(PairLoss {
        loss,
        logits,
        per_pair,
        weight,
    })
}

/// The in-batch (CLIP-style) term of each pair [N], as LPO's criterion defines it: the mean of
/// an image-to-text cross entropy (each image over all N prompts, its own prompt the target,
/// weighted by the image's label) and a text-to-image one (each prompt over all 2N images, its
/// own two images the targets by label, plus the tie offset).
fn batch_term(
    t: &Tensor,
    i0: &Tensor,
    i1: &Tensor,
    scale: &Tensor,
    labelled: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    tie: &Tensor,
) -> Result<Tensor> {
    let n = t.dim(0)?;
    let images = Tensor::cat(&[i0, i1], 0)?;
    let text_logits = t.matmul(&images.t()?)?.broadcast_mul(scale)?; // [N, 2N]
    let text_lsm = log_softmax(&text_logits, 1)?;
    let text_loss = (labelled(&own_entries(&text_lsm, 0)?, &own_entries(&text_lsm, n)?)? + tie)?;
    let image_lsm = log_softmax(&text_logits.t()?.contiguous()?, 1)?; // [2N, N]
    let image_loss = labelled(
        &own_entries(&image_lsm.narrow(0, 0, n)?, 0)?,
        &own_entries(&image_lsm.narrow(0, n, n)?, 0)?,
    )?;
    (image_loss + text_loss)? / 2.0
}
