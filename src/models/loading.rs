//! Weights from the diffusers folder layout: `<stem>.safetensors`, the `<stem>.fp16.safetensors`
//! variant, or shards listed in `<stem>.safetensors.index.json`. Stored f16/bf16 weights are
//! converted to the compute dtype. Models build from them **frozen** (plain tensors: no graph,
//! inference memory stays at weight size) or **trainable** (candle `Var`s), through a builder that
//! names the file and key of a missing or mis-shaped tensor (`checked_vb`, the UNet's source).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tensor::{NamedDType, NamedDevice};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    Frozen,
    Trainable,
}

impl WeightMode {
    pub fn trainable_if(trainable: bool) -> Self {
        if trainable {
            WeightMode::Trainable
        } else {
            WeightMode::Frozen
        }
    }
}

/// Where and how a model's weights load (text encoders, the VAE, scorers).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct LoadOptions {
    /// Weight dtype, a float type: "f32", "f16", "bf16" or "f64" (unset: the device's compute
    /// dtype, f32).
    #[schemars(with = "Option<String>")]
    pub dtype: Option<NamedDType>,
    /// Load every weight as a trainable optimizer parameter (else frozen).
    pub trainable: bool,
    /// "cpu" or "cuda:N" (unset: the run's device).
    #[schemars(with = "Option<String>")]
    pub device: Option<NamedDevice>,
}

impl LoadOptions {
    /// The dtype, device and weight mode, the device being `default_device` when unset.
    pub fn resolve(&self, default_device: &Device) -> Result<(DType, Device, WeightMode)> {
        let device = match &self.device {
            Some(d) => d.0.clone(),
            None => default_device.clone(),
        };
        let dtype = match self.dtype {
            Some(NamedDType(d)) if !d.is_float() => {
                bail!("dtype `{}` is not a float type", d.as_str())
            }
            Some(NamedDType(d)) => d,
            None => crate::tensor::device::default_float_dtype(&device),
        };
        Ok((dtype, device, WeightMode::trainable_if(self.trainable)))
    }
}

/// The loaded tensors of one model folder.
pub struct Weights {
    pub files: Vec<PathBuf>,
    pub tensors: HashMap<String, Tensor>,
    pub dtype: DType,
    pub device: Device,
}

/// The files holding a model's weights, in the order diffusers prefers.
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let fp16 = dir.join(format!("{stem}.fp16.safetensors"));
    if fp16.is_file() {
        return Ok(vec![fp16]);
    }
    for index_name in [
        format!("{stem}.safetensors.index.json"),
        format!("{stem}.safetensors.index.fp16.json"),
    ] {
        let index = dir.join(&index_name);
        if !index.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.is_file()) {
            bail!(
                "{}: shard {} is missing",
                index.display(),
                missing.display()
            );
        }
        return Ok(files);
    }
    bail!(
        "no weights in {}: expected {stem}.safetensors, {stem}.fp16.safetensors or {stem}.safetensors.index.json",
        dir.display()
    )
}

impl Weights {
    /// Load every tensor of the model in `dir`, converted to `dtype` on `device`.
    /// Integer buffers (e.g. `position_ids`) are kept as they are.
    pub fn load(dir: &Path, stem: &str, dtype: DType, device: &Device) -> Result<Self> {
        let files = weight_files(dir, stem)?;
        let mut tensors = HashMap::new();
        for file in &files {
            let loaded = candle_core::safetensors::load(file, &Device::Cpu).with_context(|| {
                format!(
                    "cannot read weights {} (truncated or not safetensors?)",
                    file.display()
                )
            })?;
            for (name, t) in loaded {
                let t = if t.dtype().is_float() {
                    t.to_dtype(dtype)?
                } else {
                    t
                };
                tensors.insert(name, t.to_device(device)?);
            }
        }
        Ok(Self {
            files,
            tensors,
            dtype,
            device: device.clone(),
        })
    }

    pub fn describe(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Strip `prefix` from every key that has it (e.g. transformers' `text_model.`).
    pub fn strip_prefix(mut self, prefix: &str) -> Self {
        self.tensors = self
            .tensors
            .into_iter()
            .map(|(k, v)| match k.strip_prefix(prefix) {
                Some(rest) => (rest.to_string(), v),
                None => (k, v),
            })
            .collect();
        self
    }
}
