//! LoRA adapters on linear projections (diffusers/PEFT style).
//!
//! A [`LoraLinear`] is a linear layer `y = x W^T + b` that can carry an adapter
//! `y += scale * (x A^T) B^T` with `A: [rank, in]`, `B: [out, rank]`, `scale = alpha / rank`.
//! `A` is drawn N(0, (1/rank)^2) from our [`SeededRng`] (PEFT's `init_lora_weights="gaussian"`),
//! `B` starts at zero, so a fresh adapter leaves the output unchanged. The base weight is a plain
//! tensor (frozen); the adapter weights are `Var`s. All layers of one model share a [`LoraHub`]
//! whose switch turns every adapter off at once: with adapters off the output is exactly the
//! base model's, so the reference policy needs no second copy of the network.
//!
//! Files use the PEFT/diffusers key naming `unet.<module path>.lora_A.weight` / `lora_B.weight`
//! (as `get_peft_model_state_dict` + diffusers' `unet.` prefix); rank and alpha are stored in the
//! safetensors metadata (`lora_rank`, `lora_alpha`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;

use crate::tensor::SeededRng;

/// Where adapters go and how big they are.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Module-name suffixes that get adapters (default: `to_q`, `to_k`, `to_v`, `to_out.0`).
    pub targets: Vec<String>,
    pub seed: u64,
}

impl LoraConfig {
    pub fn default_targets() -> Vec<String> {
        ["to_q", "to_k", "to_v", "to_out.0"]
            .map(String::from)
            .to_vec()
    }
}

/// One adapter: `A: [rank, in]`, `B: [out, rank]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Var,
    pub b: Var,
    pub rank: usize,
    pub alpha: f64,
}

impl LoraAdapter {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

fn lock_err<T>(_: T) -> anyhow::Error {
    anyhow::anyhow!("LoRA layer lock poisoned")
}

/// A linear layer whose weight can be merged into and which may carry a LoRA adapter.
#[derive(Debug)]
pub struct LoraLinear {
    /// Full module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    weight: RwLock<Tensor>,
    bias: Option<Tensor>,
    adapter: RwLock<Option<LoraAdapter>>,
    enabled: Arc<AtomicBool>,
}

impl LoraLinear {
    pub fn in_dim(&self) -> Result<usize> {
        Ok(self.weight.read().map_err(lock_err)?.dim(1)?)
    }
    pub fn out_dim(&self) -> Result<usize> {
        Ok(self.weight.read().map_err(lock_err)?.dim(0)?)
    }
    pub fn adapter(&self) -> Option<LoraAdapter> {
        self.adapter.read().ok().and_then(|a| a.clone())
    }
    pub fn set_adapter(&self, adapter: Option<LoraAdapter>) -> Result<()> {
        *self.adapter.write().map_err(lock_err)? = adapter;
        Ok(())
    }
    pub fn weight(&self) -> Result<Tensor> {
        Ok(self.weight.read().map_err(lock_err)?.clone())
    }

    /// `W <- W + scale * B A` and drop the adapter.
    pub fn merge(&self) -> Result<bool> {
        let Some(ad) = self.adapter() else {
            return Ok(false);
        };
        let mut w = self.weight.write().map_err(lock_err)?;
        let delta = (ad
            .b
            .as_tensor()
            .detach()
            .matmul(&ad.a.as_tensor().detach())?
            * ad.scale())?;
        *w = (w.detach() + delta.to_dtype(w.dtype())?)?;
        drop(w);
        self.set_adapter(None)?;
        Ok(true)
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self
            .weight
            .read()
            .map_err(|_| candle_core::Error::Msg("LoRA layer lock poisoned".into()))?
            .clone();
        let lin = candle_nn::Linear::new(w, self.bias.clone());
        let y = lin.forward(x)?;
        if !self.enabled.load(Ordering::Relaxed) {
            return Ok(y);
        }
        let adapter = self.adapter.read().ok().and_then(|a| a.clone());
        match adapter {
            None => Ok(y),
            Some(ad) => {
                let down = candle_nn::Linear::new(ad.a.as_tensor().clone(), None).forward(x)?;
                let up = candle_nn::Linear::new(ad.b.as_tensor().clone(), None).forward(&down)?;
                y + (up * ad.scale())?
            }
        }
    }
}

/// The LoRA-capable layers of one model and their common on/off switch.
#[derive(Debug, Clone, Default)]
pub struct LoraHub {
    enabled: Arc<AtomicBool>,
    layers: Arc<Mutex<Vec<Arc<LoraLinear>>>>,
}

impl LoraHub {
    pub fn new() -> Self {
        Self {
            enabled: Arc::new(AtomicBool::new(true)),
            layers: Arc::default(),
        }
    }

    /// Build a linear layer from `vb` (weight `[out, in]`, optional bias) and register it.
    pub fn linear(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Arc<LoraLinear>> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        let layer = Arc::new(LoraLinear {
            path: vb.prefix(),
            weight: RwLock::new(weight),
            bias,
            adapter: RwLock::new(None),
            enabled: self.enabled.clone(),
        });
        self.layers
            .lock()
            .map_err(|_| candle_core::Error::Msg("LoRA hub lock poisoned".into()))?
            .push(layer.clone());
        Ok(layer)
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turn every adapter on or off (off = the base model, bit for bit).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed)
    }

    /// All registered layers, sorted by path.
    pub fn layers(&self) -> Vec<Arc<LoraLinear>> {
        let mut v = self.layers.lock().map(|l| l.clone()).unwrap_or_default();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    pub fn has_adapters(&self) -> bool {
        self.layers().iter().any(|l| l.adapter().is_some())
    }

    fn matches(path: &str, targets: &[String]) -> bool {
        targets
            .iter()
            .any(|t| path == t || path.ends_with(&format!(".{t}")))
    }

    /// Attach fresh adapters to every layer whose path ends in one of `cfg.targets`.
    /// Returns the number of adapted layers.
    pub fn add(&self, cfg: &LoraConfig) -> Result<usize> {
        if cfg.rank == 0 {
            bail!("add_lora: rank must be >= 1");
        }
        if cfg.targets.is_empty() {
            bail!("add_lora: `targets` is empty");
        }
        if self.has_adapters() {
            bail!(
                "add_lora: this model already has LoRA adapters (merge_lora or load_lora instead)"
            );
        }
        let mut rng = SeededRng::new(cfg.seed);
        let std = 1.0 / cfg.rank as f64;
        let mut count = 0;
        for layer in self.layers() {
            if !Self::matches(&layer.path, &cfg.targets) {
                continue;
            }
            let w = layer.weight()?;
            let (out_dim, in_dim) = w.dims2()?;
            let a = (rng.randn((cfg.rank, in_dim), w.device())? * std)?.to_dtype(w.dtype())?;
            let b = Tensor::zeros((out_dim, cfg.rank), w.dtype(), w.device())?;
            layer.set_adapter(Some(LoraAdapter {
                a: Var::from_tensor(&a)?,
                b: Var::from_tensor(&b)?,
                rank: cfg.rank,
                alpha: cfg.alpha,
            }))?;
            count += 1;
        }
        if count == 0 {
            bail!("add_lora: no layer matches targets {:?}", cfg.targets);
        }
        Ok(count)
    }

    /// The adapter Vars with their file key names (`unet.<path>.lora_A.weight`), sorted.
    pub fn vars(&self, prefix: &str) -> Vec<(String, Var)> {
        let mut out = BTreeMap::new();
        for layer in self.layers() {
            if let Some(ad) = layer.adapter() {
                out.insert(
                    format!("{prefix}{}.lora_A.weight", layer.path),
                    ad.a.clone(),
                );
                out.insert(
                    format!("{prefix}{}.lora_B.weight", layer.path),
                    ad.b.clone(),
                );
            }
        }
        out.into_iter().collect()
    }

    /// Merge every adapter into its base weight; returns how many were merged.
    pub fn merge(&self) -> Result<usize> {
        let mut n = 0;
        for layer in self.layers() {
            if layer.merge()? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Write the adapters as f32 safetensors (atomically).
    pub fn save(&self, path: &Path, prefix: &str) -> Result<()> {
        let vars = self.vars(prefix);
        if vars.is_empty() {
            bail!("save_lora: the model has no LoRA adapters");
        }
        let first = self
            .layers()
            .into_iter()
            .find_map(|l| l.adapter())
            .expect("adapters exist");
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, var) in &vars {
            let t = var
                .as_tensor()
                .detach()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            bufs.push((name.clone(), t.dims().to_vec(), bytes));
        }
        let views = bufs
            .iter()
            .map(|(n, s, b)| {
                Ok((
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta: HashMap<String, String> = [
            ("format".to_string(), "pt".to_string()),
            ("lora_rank".to_string(), first.rank.to_string()),
            ("lora_alpha".to_string(), first.alpha.to_string()),
        ]
        .into_iter()
        .collect();
        let bytes = safetensors::serialize(views, Some(meta)).context("save_lora: serialize")?;
        crate::fsutil::atomic_write(path, &bytes)
            .with_context(|| format!("save_lora: cannot write {}", path.display()))
    }

    /// Load adapters written by [`LoraHub::save`] or by diffusers/PEFT (keys with or without the
    /// `unet.` / `base_model.model.` prefix). Existing adapters of the same shape are updated in
    /// place (their Vars stay the same objects), others are created. Returns the number of layers.
    pub fn load(&self, path: &Path) -> Result<usize> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("load_lora: cannot read {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "load_lora: {} is not a safetensors file (truncated?): {e}",
                path.display()
            )
        })?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let file_alpha = meta.get("lora_alpha").and_then(|v| v.parse::<f64>().ok());
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("load_lora: cannot read tensors of {}", path.display()))?;
        let layers: HashMap<String, Arc<LoraLinear>> = self
            .layers()
            .into_iter()
            .map(|l| (l.path.clone(), l))
            .collect();
        let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, t) in tensors {
            let k = key
                .strip_prefix("unet.")
                .or_else(|| key.strip_prefix("base_model.model."))
                .unwrap_or(&key);
            let (module, is_a) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, true)
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, false)
            } else if k.ends_with(".alpha") {
                continue;
            } else {
                bail!("load_lora: {}: unexpected key `{key}` (expected `<module>.lora_A.weight` / `.lora_B.weight`)", path.display());
            };
            if !layers.contains_key(module) {
                bail!(
                    "load_lora: {}: key `{key}` names no LoRA-capable layer of this model",
                    path.display()
                );
            }
            let e = pairs.entry(module.to_string()).or_default();
            if is_a {
                e.0 = Some(t)
            } else {
                e.1 = Some(t)
            }
        }
        if pairs.is_empty() {
            bail!("load_lora: {} holds no LoRA tensors", path.display());
        }
        for (module, (a, b)) in &pairs {
            let layer = &layers[module];
            let (Some(a), Some(b)) = (a, b) else {
                bail!(
                    "load_lora: {}: `{module}` lacks its lora_A or lora_B weight",
                    path.display()
                );
            };
            let (rank, in_dim) = a
                .dims2()
                .with_context(|| format!("load_lora: `{module}.lora_A.weight` must be 2-D"))?;
            let (out_dim, rank_b) = b
                .dims2()
                .with_context(|| format!("load_lora: `{module}.lora_B.weight` must be 2-D"))?;
            if in_dim != layer.in_dim()?
                || out_dim != layer.out_dim()?
                || rank != rank_b
                || rank == 0
            {
                bail!(
                    "load_lora: {}: `{module}` has lora_A {:?} / lora_B {:?}, expected [r, {}] / [{}, r]",
                    path.display(),
                    a.dims(),
                    b.dims(),
                    layer.in_dim()?,
                    layer.out_dim()?
                );
            }
            let w = layer.weight()?;
            let a = a.to_dtype(w.dtype())?.to_device(w.device())?;
            let b = b.to_dtype(w.dtype())?.to_device(w.device())?;
            match layer.adapter() {
                Some(ad) if ad.rank == rank => {
                    ad.a.set(&a)?;
                    ad.b.set(&b)?;
                    if let Some(alpha) = file_alpha {
                        layer.set_adapter(Some(LoraAdapter { alpha, ..ad }))?;
                    }
                }
                _ => layer.set_adapter(Some(LoraAdapter {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    rank,
                    alpha: file_alpha.unwrap_or(rank as f64),
                }))?,
            }
        }
        Ok(pairs.len())
    }
}
