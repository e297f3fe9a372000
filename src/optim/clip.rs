//! Gradient clipping policy of a training run.
//!
//! Note on reproducing the paper: the official LPO code calls `clip_grad_norm_` on a parameter
//! generator the optimizer already consumed, so its clipping is a no-op; `Off` reproduces it.

use anyhow::Result;
use candle_core::Tensor;

use crate::tensor::grad::{clip_by_global_norm, global_norm};

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum GradClip {
    /// No clipping (the official LPO code's effective behaviour).
    #[default]
    Off,
    /// Scale every gradient by min(1, max / (global_norm + 1e-6)), as torch does.
    GlobalNorm(f64),
}

impl GradClip {
    pub fn from_option(max_grad_norm: Option<f64>) -> Result<Self> {
        match max_grad_norm {
            None => Ok(GradClip::Off),
            Some(m) if m > 0.0 && m.is_finite() => Ok(GradClip::GlobalNorm(m)),
            Some(m) => {
                anyhow::bail!("max_grad_norm must be a positive number or () for off, got {m}")
            }
        }
    }

    pub fn max_norm(&self) -> Option<f64> {
        match self {
            GradClip::Off => None,
            GradClip::GlobalNorm(m) => Some(*m),
        }
    }

    /// Clip `grads` in place; returns the global norm before clipping (for logging).
    pub fn apply(&self, grads: &mut [Tensor]) -> Result<f64> {
        match self {
            GradClip::Off => global_norm(grads.iter()),
            GradClip::GlobalNorm(m) => clip_by_global_norm(grads, *m),
        }
    }
}
