//! How an LRM loads (`load_lrm(dir, #{...})`) and how a fresh one starts (`init_lrm(base,
//! #{...})`), declared once: names, defaults and docs.

use candle_core::DType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::models::loading::WeightMode;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct LrmOptions {
    /// Pool every down stage and the mid block (true), or the mid block alone.
    pub multi_scale: bool,
    /// Visual feature enhancement: > 1 also runs the empty prompt and mixes u + g·(c − u).
    pub guidance_scale: f64,
    /// Apply the guidance to the stage features too, not only the mid one.
    pub multi_scale_cfg: bool,
    /// Weights' dtype: f32, f16, bf16, f64.
    #[serde(with = "dtype_name")]
    #[schemars(with = "String")]
    pub dtype: DType,
    /// Load the UNet and the projections as trainable Vars.
    pub trainable: bool,
    /// Also train the text encoder(s) (frozen by default, as LPO's LRM training does).
    pub train_text: bool,
    /// Recompute each UNet block and text encoder layer in backward instead of keeping its
    /// activations (diffusers' `enable_gradient_checkpointing`).
    pub gradient_checkpointing: bool,
}

impl LrmOptions {
    /// How the UNet (with the projections) and the text encoder(s) load.
    pub fn weight_modes(&self) -> (WeightMode, WeightMode) {
        let mode = |trainable: bool| {
            if trainable {
                WeightMode::Trainable
            } else {
                WeightMode::Frozen
            }
        };
        (mode(self.trainable), mode(self.train_text))
    }
}

impl Default for LrmOptions {
    fn default() -> Self {
        Self {
            multi_scale: true,
            guidance_scale: 7.5,
            multi_scale_cfg: false,
            dtype: DType::F32,
            trainable: false,
            train_text: false,
            gradient_checkpointing: false,
        }
    }
}

/// A fresh LRM's options: how it loads, and how its projections start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct LrmInitOptions {
    #[serde(flatten)]
    pub model: LrmOptions,
    /// Width of the projected features; () = the text encoder's hidden size.
    pub projection_dim: Option<usize>,
    /// A safetensors file holding a CLIP `text_projection.weight` to start the text projection
    /// from; () = N(0, 0.02) like the visual one.
    pub clip_projection: Option<String>,
    /// Seed of the random projections; () = the run's seed.
    pub seed: Option<i64>,
    /// Initial raw logit_scale; () = CLIP's initial 2.6592 (4.6052 = ln 100 is CLIP's trained
    /// one).
    pub logit_scale: Option<f64>,
}

/// A dtype as its name (`"f32"`, `"bf16"`, ...; the aliases `parse_dtype` knows are accepted).
mod dtype_name {
    use candle_core::DType;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(dtype: &DType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(dtype.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
        let name = String::deserialize(d)?;
        crate::tensor::parse_dtype(&name).map_err(serde::de::Error::custom)
    }
}
