//! Timestep embeddings: diffusers' `Timesteps` (sinusoidal) and `TimestepEmbedding` (MLP).

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::lora::{LoraHub, LoraLayer};

/// Sinusoidal projection of scalar timesteps, computed in f32 exactly as diffusers'
/// `get_timestep_embedding` (exponent = -ln(10000) * i / (half - freq_shift)); the output is
/// `[sin, cos]`, or `[cos, sin]` with `flip_sin_to_cos`, cast to the compute dtype.
#[derive(Debug, Clone)]
pub struct Timesteps {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl Timesteps {
    pub fn new(dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Self {
        Self {
            dim,
            flip_sin_to_cos,
            freq_shift,
        }
    }

    /// `t`: any-dtype 1-D tensor of timesteps -> `[len, dim]` in `dtype`. Computed on `t`'s
    /// device (f32), so a GPU forward never copies its timesteps back to the host.
    pub fn forward(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let half = self.dim / 2;
        let ln = -(10000f64.ln() as f32);
        let denom = (half as f64 - self.freq_shift) as f32;
        let freqs: Vec<f32> = (0..half).map(|i| ((ln * i as f32) / denom).exp()).collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let ts = t.flatten_all()?.to_dtype(DType::F32)?.unsqueeze(1)?;
        let args = ts.broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let mut parts = if self.flip_sin_to_cos {
            vec![cos, sin]
        } else {
            vec![sin, cos]
        };
        if self.dim % 2 == 1 {
            parts.push(Tensor::zeros((ts.dim(0)?, 1), DType::F32, t.device())?);
        }
        Tensor::cat(&parts, 1)?.to_dtype(dtype)
    }
}

/// `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Arc<LoraLayer>,
    linear_2: Arc<LoraLayer>,
}

impl TimestepEmbedding {
    pub fn new(
        vb: VarBuilder,
        hub: &LoraHub,
        in_dim: usize,
        time_embed_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: hub.linear(in_dim, time_embed_dim, true, vb.pp("linear_1"))?,
            linear_2: hub.linear(time_embed_dim, time_embed_dim, true, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}
