//! LoRA safetensors files: [`load`] reads every UNet key convention diffusers'
//! `load_lora_weights` reads ([`keys`]), with alpha as diffusers / PEFT / kohya store it
//! ([`alpha`]); [`save`] writes PEFT keys `unet.<module>.lora_A.weight` / `lora_B.weight` (B as
//! trained, not scaled) with alpha in diffusers' `lora_adapter_metadata` header, so both diffusers
//! and [`load`] apply the adapters at scale `alpha / rank`.
//!
//! Text-encoder tensors in a file (a diffusers UNet + text-encoder LoRA, kohya `lora_te*_`) are not
//! applied: the UNet part loads and the skipped prefixes are reported as warnings (also logged).

pub mod alpha;
pub mod keys;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::lora::{LoraAdapter, LoraHub, LoraLayer};
use alpha::{AlphaSource, FileAlphas};
use keys::{Factor, KeyFormat, LoraKey};

/// Which key conventions [`load`] accepts; in configs by name (see [`Accept::parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Accept {
    /// Whatever the file holds.
    Any,
    /// PEFT, diffusers and attention-processor keys (no kohya).
    Diffusers,
    /// kohya / webui keys only.
    Kohya,
}

impl Accept {
    /// `"auto"`, `"peft"` / `"diffusers"`, `"kohya"` / `"webui"`.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "auto" => Accept::Any,
            "peft" | "diffusers" => Accept::Diffusers,
            "kohya" | "webui" => Accept::Kohya,
            other => bail!(
                "unknown LoRA format `{other}` (expected \"auto\", \"peft\", \"diffusers\" or \"kohya\")"
            ),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Accept::Any => "auto",
            Accept::Diffusers => "peft/diffusers",
            Accept::Kohya => "kohya",
        }
    }

    fn allows(self, f: KeyFormat) -> bool {
        match self {
            Accept::Any => true,
            Accept::Diffusers => f != KeyFormat::Kohya,
            Accept::Kohya => f == KeyFormat::Kohya,
        }
    }
}

impl TryFrom<String> for Accept {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        Accept::parse(&name).map_err(|e| e.to_string())
    }
}

impl From<Accept> for String {
    fn from(a: Accept) -> String {
        match a {
            Accept::Diffusers => "peft".into(),
            other => other.name().into(),
        }
    }
}

/// How `load_lora` reads a file.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct LoadLoraOptions {
    /// Key convention: "auto" (whatever the file holds), "peft" / "diffusers" or "kohya" /
    /// "webui" (a format other than "auto" refuses keys of the others).
    #[schemars(with = "String")]
    pub format: Accept,
}

impl Default for LoadLoraOptions {
    fn default() -> Self {
        Self {
            format: Accept::Any,
        }
    }
}

/// What [`load`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadedLora {
    /// Adapted layers.
    pub layers: usize,
    /// The key conventions found, e.g. `"diffusers"`, `"diffusers+peft"`, `"kohya"`.
    pub format: String,
    /// Where alpha came from, e.g. `"lora_adapter_metadata"`, `"none (alpha = rank)"`.
    pub alpha_from: String,
    /// Parts of the file that were not applied (text-encoder LoRA).
    pub warnings: Vec<String>,
}

#[derive(Default)]
struct Pending {
    down: Option<Tensor>,
    up: Option<Tensor>,
}

fn scalar(t: &Tensor, key: &str) -> Result<f64> {
    let v = t
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
        .with_context(|| format!("`{key}` is not a number"))?;
    match v.as_slice() {
        [a] => Ok(*a),
        _ => bail!("`{key}` must hold one value, has shape {:?}", t.dims()),
    }
}

/// PEFT's `adapter_config.json` beside `file` when `file` is a `PeftModel.save_pretrained`
/// `adapter_model.safetensors` (its alpha lives in the config).
pub fn peft_config_beside(file: &Path) -> Option<PathBuf> {
    if file.file_name()? != "adapter_model.safetensors" {
        return None;
    }
    let config = file.with_file_name("adapter_config.json");
    config.is_file().then_some(config)
}

/// Load the adapters of `path` into `hub`'s layers (see the module docs); `peft_config` is a PEFT
/// `adapter_config.json` to take alpha from ([`peft_config_beside`]). Layers that already carry
/// an adapter of the same rank keep their `Var`s (updated in place); others get new ones.
pub fn load(
    hub: &LoraHub,
    path: &Path,
    accept: Accept,
    peft_config: Option<&Path>,
) -> Result<LoadedLora> {
    let what = format!("load_lora: {}", path.display());
    let bytes = std::fs::read(path).with_context(|| format!("{what}: cannot read the file"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{what}: not a safetensors file (truncated?): {e}"))?;
    let header = header.metadata().clone().unwrap_or_default();
    let mut alphas = FileAlphas::from_header(&header).with_context(|| what.clone())?;
    if let Some(config) = peft_config {
        let json = std::fs::read_to_string(config)
            .with_context(|| format!("{what}: cannot read {}", config.display()))?;
        alphas = alphas
            .with_peft_config(&json)
            .with_context(|| format!("{what}: bad {}", config.display()))?;
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{what}: cannot read the tensors"))?;

    let layers: HashMap<String, Arc<LoraLayer>> = hub
        .layers()
        .into_iter()
        .map(|l| (l.path.clone(), l))
        .collect();
    let kohya_modules: HashMap<String, String> = layers
        .keys()
        .map(|p| (keys::kohya_name(p), p.clone()))
        .collect();
    let mut pending: BTreeMap<String, Pending> = BTreeMap::new();
    let mut formats = BTreeSet::new();
    let mut skipped: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for key in names {
        let t = &tensors[key];
        let (module, factor, format) =
            match keys::parse(key, &kohya_modules).with_context(|| what.clone())? {
                LoraKey::TextEncoder { prefix } => {
                    *skipped.entry(prefix).or_default() += 1;
                    continue;
                }
                LoraKey::Unet {
                    module,
                    factor,
                    format,
                } => (module, factor, format),
            };
        if !accept.allows(format) {
            bail!(
                "{what}: `{key}` is a {} key, but format \"{}\" was asked for (leave `format` out to auto-detect)",
                format.name(),
                accept.name()
            );
        }
        if !layers.contains_key(&module) {
            bail!("{what}: `{key}` names no LoRA-capable layer of this model (`{module}`)");
        }
        let e = pending.entry(module.clone()).or_default();
        match factor {
            Factor::Down => e.down = Some(t.clone()),
            Factor::Up => e.up = Some(t.clone()),
            Factor::Alpha => {
                alphas
                    .tensors
                    .insert(module, scalar(t, key).with_context(|| what.clone())?);
                continue;
            }
        }
        formats.insert(format);
    }
    let warnings: Vec<String> = skipped
        .iter()
        .map(|(prefix, n)| {
            format!(
                "{}: {n} text-encoder LoRA tensors (`{prefix}*`) were not applied: load_lora \
                 loads the UNet part only",
                path.display()
            )
        })
        .collect();
    if pending.is_empty() {
        if skipped.is_empty() {
            bail!("{what}: the file holds no LoRA tensors");
        }
        bail!(
            "{what}: the file holds only text-encoder LoRA ({}), nothing for the UNet",
            skipped.keys().copied().collect::<Vec<_>>().join(", ")
        );
    }
    // check every module before changing any, so a bad file leaves the model as it was
    let mut sources = BTreeSet::new();
    let mut ready = Vec::with_capacity(pending.len());
    for (module, p) in &pending {
        let (Some(a), Some(b)) = (&p.down, &p.up) else {
            bail!("{what}: `{module}` lacks its down (lora_A) or up (lora_B) weight");
        };
        let layer = &layers[module];
        let adapter = layer
            .adapter_from(a, b, None)
            .with_context(|| what.clone())?;
        let (alpha, source) = alphas
            .alpha(module, adapter.rank)
            .with_context(|| what.clone())?;
        sources.insert(source);
        ready.push((layer, LoraAdapter { alpha, ..adapter }));
    }
    for (layer, adapter) in ready {
        install(layer, adapter)?;
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(LoadedLora {
        layers: pending.len(),
        format: formats
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join("+"),
        alpha_from: sources
            .iter()
            .map(|s: &AlphaSource| s.describe())
            .collect::<Vec<_>>()
            .join("+"),
        warnings,
    })
}

/// Give `layer` the checked adapter `new`. An adapter of the same shapes is updated in place, so
/// its `Var`s (which an optimizer may hold) stay the same objects.
fn install(layer: &LoraLayer, new: LoraAdapter) -> Result<()> {
    match layer.adapter() {
        Some(ad) if ad.a.shape() == new.a.shape() && ad.b.shape() == new.b.shape() => {
            ad.a.set(new.a.as_tensor())?;
            ad.b.set(new.b.as_tensor())?;
            layer.set_adapter(Some(LoraAdapter {
                alpha: new.alpha,
                ..ad
            }))
        }
        _ => layer.set_adapter(Some(new)),
    }
}

/// Write `hub`'s adapters (see the module docs) atomically as f32 safetensors.
pub fn save(hub: &LoraHub, path: &Path) -> Result<()> {
    let adapted: Vec<(String, LoraAdapter)> = hub
        .layers()
        .into_iter()
        .filter_map(|l| l.adapter().map(|a| (l.path.clone(), a)))
        .collect();
    if adapted.is_empty() {
        bail!("save_lora: the model has no LoRA adapters");
    }
    let f32_cpu = |v: &Var| -> Result<Tensor> {
        Ok(v.as_tensor()
            .detach()
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .contiguous()?)
    };
    let mut tensors = HashMap::new();
    for (module, ad) in &adapted {
        tensors.insert(format!("unet.{module}.lora_A.weight"), f32_cpu(&ad.a)?);
        tensors.insert(format!("unet.{module}.lora_B.weight"), f32_cpu(&ad.b)?);
    }
    let summary: Vec<(String, usize, f64)> = adapted
        .iter()
        .map(|(m, ad)| (m.clone(), ad.rank, ad.alpha))
        .collect();
    let header: HashMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        (
            alpha::ADAPTER_METADATA_KEY.to_string(),
            alpha::adapter_metadata(&summary),
        ),
        // read by older lpo versions (one alpha for all layers)
        (
            alpha::OUR_RANK_KEY.to_string(),
            adapted[0].1.rank.to_string(),
        ),
        (
            alpha::OUR_ALPHA_KEY.to_string(),
            adapted[0].1.alpha.to_string(),
        ),
    ]
    .into();
    let bytes = safetensors::serialize(&tensors, Some(header))
        .with_context(|| format!("save_lora: cannot serialize {}", path.display()))?;
    crate::fsutil::atomic_write(path, &bytes)
        .with_context(|| format!("save_lora: cannot write {}", path.display()))
}
