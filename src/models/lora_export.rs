//! LoRA exports users can take elsewhere.
//!
//! - **PEFT/diffusers** (`export_peft`): keys `unet.<module path>.lora_A.weight` / `lora_B.weight`,
//!   as diffusers' `load_lora_weights` expects for a PEFT state dict. diffusers reads the rank
//!   from the shapes and uses `lora_alpha = rank` unless told otherwise, so when our alpha differs
//!   from the rank the scale `alpha / rank` is folded into `lora_B` (the product `scale * B A` is
//!   unchanged); the file then holds an alpha == rank adapter. The true rank/alpha and the folding
//!   are noted in the safetensors metadata (`lora_rank`, `lora_alpha` = rank, `lora_alpha_orig`).
//! - **kohya/webui** (`export_kohya`): `lora_unet_<module path, `.` -> `_`>.lora_down.weight` (= A),
//!   `.lora_up.weight` (= B), `.alpha` (0-d f32); the scale is `alpha / rank` as in our adapters.
//!   `import_kohya` reads such a file back (via [`lora_file::load`], which reads every format).
//! - **Merged UNet folder** (`save_merged`): `config.json` + `diffusion_pytorch_model.safetensors`
//!   in diffusers layout, every base weight from the folder the UNet was loaded from, with
//!   `W + scale * B A` for every adapted layer (whether or not the adapter switch is on); for a
//!   fully fine-tuned UNet (loaded trainable) the trained weights are written instead.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::loading::Weights;
use super::lora::{LoraAdapter, LoraHub, LoraLayer};
use super::lora_file::{self, keys::kohya_name};
use super::unet::{UNet2DConditionModel, WEIGHTS_STEM};

fn cpu_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.detach()
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .contiguous()?)
}

fn adapted(hub: &LoraHub, what: &str) -> Result<Vec<(Arc<LoraLayer>, LoraAdapter)>> {
    let v: Vec<_> = hub
        .layers()
        .into_iter()
        .filter_map(|l| l.adapter().map(|a| (l, a)))
        .collect();
    if v.is_empty() {
        bail!("{what}: the model has no LoRA adapters");
    }
    Ok(v)
}

fn write(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    meta: HashMap<String, String>,
    what: &str,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors, Some(meta))
        .with_context(|| format!("{what}: cannot serialize {}", path.display()))?;
    crate::fsutil::atomic_write(path, &bytes)
        .with_context(|| format!("{what}: cannot write {}", path.display()))
}

/// The file layout [`export`] writes; in configs by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ExportFormat {
    /// PEFT/diffusers keys ([`export_peft`]); also spelled "diffusers".
    Peft,
    /// kohya/webui keys ([`export_kohya`]); also spelled "webui".
    Kohya,
}

impl TryFrom<String> for ExportFormat {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        match name.as_str() {
            "peft" | "diffusers" => Ok(ExportFormat::Peft),
            "kohya" | "webui" => Ok(ExportFormat::Kohya),
            other => Err(format!(
                "unknown format `{other}` (expected \"peft\" or \"kohya\")"
            )),
        }
    }
}

impl From<ExportFormat> for String {
    fn from(f: ExportFormat) -> String {
        match f {
            ExportFormat::Peft => "peft".into(),
            ExportFormat::Kohya => "kohya".into(),
        }
    }
}

/// How `export_lora` writes the adapters.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ExportLoraOptions {
    /// "peft" (diffusers' `load_lora_weights`: `unet.<module>.lora_A.weight` /
    /// `lora_B.weight`, alpha / rank folded into lora_B so alpha == rank) or "kohya" (webui:
    /// `lora_unet_<module_>.lora_down.weight`, `.lora_up.weight`, `.alpha`).
    #[schemars(with = "String")]
    pub format: ExportFormat,
}

impl Default for ExportLoraOptions {
    fn default() -> Self {
        Self {
            format: ExportFormat::Peft,
        }
    }
}

/// Write `hub`'s adapters to `path` in `format`.
pub fn export(hub: &LoraHub, path: &Path, format: ExportFormat) -> Result<()> {
    match format {
        ExportFormat::Peft => export_peft(hub, path),
        ExportFormat::Kohya => export_kohya(hub, path),
    }
}

/// PEFT/diffusers file (see the module docs): alpha folded into `lora_B` so that alpha == rank.
pub fn export_peft(hub: &LoraHub, path: &Path) -> Result<()> {
    let layers = adapted(hub, "export_lora")?;
    let mut out = HashMap::new();
    let mut ranks = Vec::new();
    let mut alphas = Vec::new();
    for (l, ad) in &layers {
        let a = cpu_f32(ad.a.as_tensor())?;
        let b = (cpu_f32(ad.b.as_tensor())? * ad.scale())?;
        out.insert(format!("unet.{}.lora_A.weight", l.path), a);
        out.insert(format!("unet.{}.lora_B.weight", l.path), b);
        ranks.push(ad.rank);
        alphas.push(ad.alpha);
    }
    let rank = ranks[0];
    let mut meta: HashMap<String, String> = [
        ("format", "pt".to_string()),
        ("lora_rank", rank.to_string()),
        ("lora_alpha", rank.to_string()),
        ("lora_alpha_orig", alphas[0].to_string()),
        (
            "lpo_note",
            "alpha/rank folded into lora_B; load with lora_alpha = rank (diffusers' default)"
                .to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if ranks.iter().any(|&r| r != rank) {
        meta.remove("lora_rank");
        meta.remove("lora_alpha");
    }
    write(path, &out, meta, "export_lora")
}

/// kohya/webui file: `lora_unet_*.lora_down.weight`, `.lora_up.weight`, `.alpha` (0-d f32).
pub fn export_kohya(hub: &LoraHub, path: &Path) -> Result<()> {
    let layers = adapted(hub, "export_lora")?;
    let mut out = HashMap::new();
    for (l, ad) in &layers {
        let name = kohya_name(&l.path);
        out.insert(
            format!("{name}.lora_down.weight"),
            cpu_f32(ad.a.as_tensor())?,
        );
        out.insert(format!("{name}.lora_up.weight"), cpu_f32(ad.b.as_tensor())?);
        out.insert(
            format!("{name}.alpha"),
            Tensor::new(ad.alpha as f32, &Device::Cpu)?,
        );
    }
    let meta: HashMap<String, String> = [
        ("format", "pt"),
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", &layers[0].1.rank.to_string()),
        ("ss_network_alpha", &layers[0].1.alpha.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    write(path, &out, meta, "export_lora")
}

/// Read a kohya/webui file into `hub`'s layers (replacing their adapters). Returns the count.
/// The same as [`lora_file::load`] restricted to kohya keys (kept for scripts that call it).
pub fn import_kohya(hub: &LoraHub, path: &Path) -> Result<usize> {
    Ok(lora_file::load(hub, path, lora_file::Accept::Kohya, None)?.layers)
}

/// Write `dir/config.json` + `dir/diffusion_pytorch_model.safetensors` with the adapters merged.
pub fn save_merged(unet: &UNet2DConditionModel, dir: &Path) -> Result<()> {
    let Some(src) = unet.source_dir() else {
        bail!("save_merged: this UNet was not loaded from a folder (random weights), so its base weights cannot be written");
    };
    let weights =
        Weights::load(src, WEIGHTS_STEM, unet.dtype(), &Device::Cpu).with_context(|| {
            format!(
                "save_merged: cannot re-read the base weights of {}",
                src.display()
            )
        })?;
    let mut tensors = weights.tensors;
    // full fine-tuning: the trained base weights replace the file's
    if !unet.lora().has_adapters() {
        for (name, var) in unet.trainable_vars() {
            if !tensors.contains_key(&name) {
                bail!(
                    "save_merged: trained weight `{name}` is not among the base weights of {}",
                    src.display()
                );
            }
            let t = var
                .as_tensor()
                .detach()
                .to_device(&Device::Cpu)?
                .contiguous()?;
            tensors.insert(name, t);
        }
    }
    for layer in unet.lora().layers() {
        let key = format!("{}.weight", layer.path);
        if !tensors.contains_key(&key) {
            bail!(
                "save_merged: base weights in {} lack `{key}`",
                src.display()
            );
        }
        let mut w = layer.weight()?.detach().to_device(&Device::Cpu)?;
        if let Some(ad) = layer.adapter() {
            let delta = cpu_f32(&layer.delta(&ad)?)?;
            w = (w.to_dtype(DType::F32)? + delta)?.to_dtype(unet.dtype())?;
        }
        tensors.insert(key, w.contiguous()?);
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("save_merged: cannot create {}", dir.display()))?;
    let config = match std::fs::read(src.join("config.json")) {
        Ok(bytes) => bytes,
        Err(_) => serde_json::to_vec_pretty(&unet.config.to_diffusers_json()?)?,
    };
    crate::fsutil::atomic_write(&dir.join("config.json"), &config)
        .with_context(|| format!("save_merged: cannot write {}/config.json", dir.display()))?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write(
        &dir.join(format!("{WEIGHTS_STEM}.safetensors")),
        &tensors,
        meta,
        "save_merged",
    )
}
