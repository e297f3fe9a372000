//! The LRM's own parameters beside its UNet and text encoder: `visual_projection`,
//! `text_projection` (absent for SDXL) and `logit_scale` (the raw parameter; scores use its exp).
//!
//! Two layouts load: ours (`projections.safetensors`) and the official one (`state_dict.pt`, a
//! PyTorch zip pickle whose `logit_scale` may be a tensor or a plain float).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

/// CLIP's initial temperature: ln(1 / 0.07).
pub const INITIAL_LOGIT_SCALE: f64 = 2.6592;

#[derive(Debug, Clone)]
pub struct Projections {
    /// [D, F] (nn.Linear layout [out, in], no bias).
    pub visual: Tensor,
    /// [D, T]; None when the text feature is already projected (SDXL's second encoder).
    pub text: Option<Tensor>,
    /// 0-d raw parameter.
    pub logit_scale: Tensor,
}

impl Projections {
    /// Load from a folder: `projections.safetensors` if present, else `state_dict.pt`.
    /// `visual_key` selects the visual projection (`visual_projection.weight`, or
    /// `visual_projection_single_scale.weight` for a single-scale model).
    pub fn load(dir: &Path, visual_key: &str, dtype: DType, device: &Device) -> Result<Self> {
        let ours = dir.join("projections.safetensors");
        let official = dir.join("state_dict.pt");
        let (tensors, file) = if ours.is_file() {
            (
                crate::tensor::io::load_safetensors(&ours, &Device::Cpu)?,
                ours,
            )
        } else if official.is_file() {
            (read_state_dict_pt(&official)?, official)
        } else {
            bail!(
                "no LRM projections in {}: expected projections.safetensors or state_dict.pt",
                dir.display()
            );
        };
        Self::from_map(&tensors, visual_key, dtype, device)
            .with_context(|| format!("LRM projections {}", file.display()))
    }

    pub fn from_map(
        tensors: &HashMap<String, Tensor>,
        visual_key: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let find = |stem: &str| -> Option<&Tensor> {
            tensors
                .get(stem)
                .or_else(|| tensors.get(&format!("{stem}.weight")))
                .or_else(|| tensors.get(stem.trim_end_matches(".weight")))
        };
        let visual = find(visual_key)
            .with_context(|| format!("missing `{visual_key}`; found: {}", keys(tensors)))?;
        if visual.rank() != 2 {
            bail!(
                "`{visual_key}` has shape {:?}, expected [out, in]",
                visual.dims()
            );
        }
        let text = find("text_projection.weight").cloned();
        if let Some(t) = &text {
            if t.rank() != 2 || t.dim(0)? != visual.dim(0)? {
                bail!(
                    "`text_projection.weight` has shape {:?}, expected [{}, text_dim] to match visual_projection {:?}",
                    t.dims(),
                    visual.dim(0)?,
                    visual.dims()
                );
            }
        }
        let logit_scale = find("logit_scale")
            .with_context(|| format!("missing `logit_scale`; found: {}", keys(tensors)))?;
        if logit_scale.elem_count() != 1 {
            bail!(
                "`logit_scale` has shape {:?}, expected a scalar",
                logit_scale.dims()
            );
        }
        let to = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(dtype)?.to_device(device)?) };
        Ok(Self {
            visual: to(visual)?,
            text: text.as_ref().map(to).transpose()?,
            logit_scale: logit_scale
                .flatten_all()?
                .squeeze(0)?
                .to_dtype(DType::F32)?
                .to_device(device)?,
        })
    }

    /// The map saved as `projections.safetensors`.
    pub fn to_map(&self) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        m.insert("visual_projection.weight".to_string(), self.visual.clone());
        if let Some(t) = &self.text {
            m.insert("text_projection.weight".to_string(), t.clone());
        }
        m.insert("logit_scale".to_string(), self.logit_scale.clone());
        m
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::tensor::io::save_safetensors(&self.to_map(), &dir.join("projections.safetensors"))
    }
}

fn keys(tensors: &HashMap<String, Tensor>) -> String {
    let mut k: Vec<&str> = tensors.keys().map(String::as_str).collect();
    k.sort();
    k.join(", ")
}

/// Every tensor of a PyTorch `state_dict.pt`, plus plain float/int entries as 0-d f32 tensors
/// (the official LRM saves `logit_scale` as either).
pub fn read_state_dict_pt(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = candle_core::pickle::read_all(path)
        .with_context(|| format!("cannot read PyTorch checkpoint {}", path.display()))?
        .into_iter()
        .collect();
    for (name, value) in scalar_entries(path)? {
        out.entry(name)
            .or_insert(Tensor::new(value as f32, &Device::Cpu)?);
    }
    Ok(out)
}

/// Top-level dict entries of `data.pkl` holding a float or an int.
fn scalar_entries(path: &Path) -> Result<Vec<(String, f64)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{} is not a PyTorch zip checkpoint", path.display()))?;
    let name = (0..zip.len())
        .filter_map(|i| {
            zip.by_index(i)
                .ok()
                .and_then(|f| f.name().ok().map(|n| n.to_string()))
        })
        .find(|n| n.ends_with("data.pkl"))
        .with_context(|| format!("{}: no data.pkl inside", path.display()))?;
    let mut bytes = Vec::new();
    zip.by_name(&name)?.read_to_end(&mut bytes)?;
    let mut stack = Stack::empty();
    stack.read_loop(&mut std::io::BufReader::new(bytes.as_slice()))?;
    let root = stack.finalize()?;
    let mut found = Vec::new();
    if let Object::Dict(entries) = root {
        for (k, v) in entries {
            let Object::Unicode(key) = k else { continue };
            let value = match v {
                Object::Float(f) => f,
                Object::Int(i) => i as f64,
                Object::Long(i) => i as f64,
                _ => continue,
            };
            found.push((key, value));
        }
    }
    Ok(found)
}
