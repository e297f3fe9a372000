//! How a UNet loads (dtype, trainable base weights, gradient checkpointing, the seed of random
//! weights) and saves (dtype).

use anyhow::{bail, Result};
use candle_core::DType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::models::loading::WeightMode;
use crate::tensor::NamedDType;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct UNetLoadOptions {
    /// Weight dtype: "f32", "f64", "f16" or "bf16".
    #[schemars(with = "String")]
    pub dtype: NamedDType,
    /// Every base weight becomes a trainable variable (full fine-tuning); else frozen.
    pub trainable: bool,
    /// Blocks recompute their activations in backward instead of keeping them (same
    /// gradients, less memory, one more forward per block).
    pub gradient_checkpointing: bool,
}

impl Default for UNetLoadOptions {
    fn default() -> Self {
        Self {
            dtype: NamedDType(DType::F32),
            trainable: false,
            gradient_checkpointing: false,
        }
    }
}

impl UNetLoadOptions {
    pub fn mode(&self) -> WeightMode {
        WeightMode::trainable_if(self.trainable)
    }
}

/// A UNet with seeded random weights: the load options and the seed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct RandomUNetOptions {
    #[serde(flatten)]
    pub load: UNetLoadOptions,
    /// Seed of the weights (unset: the run's seed).
    pub seed: Option<i64>,
}

/// How a UNet folder is written.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct UNetSaveOptions {
    /// Stored weight dtype: "f32", "f16" or "bf16" (loading converts).
    #[schemars(with = "String")]
    pub dtype: NamedDType,
}

impl Default for UNetSaveOptions {
    fn default() -> Self {
        Self {
            dtype: NamedDType(DType::F32),
        }
    }
}

impl UNetSaveOptions {
    /// The stored dtype; the types diffusers checkpoints use only.
    pub fn dtype(&self) -> Result<DType> {
        match self.dtype.0 {
            d @ (DType::F32 | DType::F16 | DType::BF16) => Ok(d),
            d => bail!("dtype must be f32, f16 or bf16, got {d:?}"),
        }
    }
}
