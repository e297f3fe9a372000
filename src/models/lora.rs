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
//! Files (reading every diffusers / PEFT / kohya convention, writing PEFT keys with diffusers'
//! alpha metadata) live in [`super::lora_file`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{bail, Result};
use candle_core::{Module, Tensor, Var};
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
}
