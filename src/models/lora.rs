//! LoRA adapters on linear and convolution layers (diffusers/PEFT style).
//!
//! A [`LoraLayer`] is a linear layer `y = x W^T + b` or a 2-D convolution `y = W * x + b` that
//! can carry an adapter `y += scale * up(down(x))` with `scale = alpha / rank`:
//! - linear: `down = x A^T`, `up = h B^T`, `A: [rank, in]`, `B: [out, rank]`;
//! - conv (as PEFT and kohya LoCon): `down` is a convolution with the layer's kernel, stride and
//!   padding into `rank` channels (`A: [rank, in, kh, kw]`), `up` a 1x1 convolution
//!   (`B: [out, rank, 1, 1]`), so `scale * B A` reshaped is the weight delta.
//!
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
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::models::conv::Conv2d;
use crate::models::frozen_layer::{self, LowRank};
use crate::tensor::recompute::recompute;
use crate::tensor::SeededRng;

/// `targets` entry that selects every linear layer (PEFT's `target_modules="all-linear"`).
pub const ALL_LINEAR: &str = "all-linear";
/// `targets` entry that selects every convolution.
pub const ALL_CONV: &str = "all-conv";

/// Where adapters go and how big they are.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Module-name suffixes that get adapters (default: `to_q`, `to_k`, `to_v`, `to_out.0`),
    /// or [`ALL_LINEAR`] / [`ALL_CONV`].
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

/// A [`LoraConfig`] as a caller writes it, alpha and seed optional.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct LoraOptions {
    /// Adapter rank r.
    pub rank: usize,
    /// The adapters apply at scale alpha / rank (unset: alpha = rank).
    pub alpha: Option<f64>,
    /// Modules that get adapters, by path suffix as PEFT's `target_modules`: any linear or
    /// conv (`conv1`, `conv2`, `conv_shortcut`, `time_emb_proj`, `proj_in`, `proj_out`,
    /// `ff.net.0.proj`, `ff.net.2`, `time_embedding.linear_1`, `conv_in`,
    /// `downsamplers.0.conv`, ...), or "all-linear" / "all-conv".
    pub targets: Vec<String>,
    /// Seed of the A draws (unset: the run's seed).
    pub seed: Option<i64>,
}

impl Default for LoraOptions {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: None,
            targets: LoraConfig::default_targets(),
            seed: None,
        }
    }
}

impl LoraOptions {
    /// The config, `default_seed` standing in for an unset seed.
    pub fn config(self, default_seed: u64) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha.unwrap_or(self.rank as f64),
            targets: self.targets,
            seed: self.seed.map_or(default_seed, |s| s as u64),
        }
    }
}

/// One adapter: `A` (down) and `B` (up), shaped as [`LoraLayer::adapter_shapes`] says.
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

fn candle_lock_err<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("LoRA layer lock poisoned".into())
}

/// How a [`LoraLayer`] applies its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// weight `[out, in]`
    Linear,
    /// weight `[out, in, kh, kw]`; groups 1, dilation 1
    Conv { stride: usize, padding: usize },
}

/// A linear or conv layer whose weight can be merged into and which may carry a LoRA adapter.
#[derive(Debug)]
pub struct LoraLayer {
    /// Full module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    kind: LayerKind,
    weight: RwLock<Tensor>,
    bias: Option<Tensor>,
    adapter: RwLock<Option<LoraAdapter>>,
    enabled: Arc<AtomicBool>,
}

impl LoraLayer {
    pub fn kind(&self) -> LayerKind {
        self.kind
    }
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

    /// The shapes of `A` and `B` for a rank-`rank` adapter on this layer: `[r, in]` / `[out, r]`
    /// for linear, `[r, in, kh, kw]` / `[out, r, 1, 1]` for conv (PEFT's and kohya's layout).
    pub fn adapter_shapes(&self, rank: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        let w = self.weight.read().map_err(lock_err)?;
        let dims = w.dims();
        let mut a = dims.to_vec();
        a[0] = rank;
        let mut b = vec![dims[0], rank];
        b.resize(dims.len(), 1);
        Ok((a, b))
    }

    /// An adapter from `A` / `B` read from a file, checked against this layer's shapes and
    /// moved to its dtype and device. The error names the layer and both shapes.
    pub fn adapter_from(&self, a: &Tensor, b: &Tensor, alpha: Option<f64>) -> Result<LoraAdapter> {
        let rank = a.dims().first().copied().unwrap_or(0);
        let (want_a, want_b) = self.adapter_shapes(rank)?;
        if rank == 0 || a.dims() != want_a.as_slice() || b.dims() != want_b.as_slice() {
            // the expected shapes with the rank left open, e.g. `[r, 320, 3, 3] / [320, r, 1, 1]`
            let (ea, eb) = self.adapter_shapes(0)?;
            let show = |s: Vec<usize>, r_at: usize| {
                let v: Vec<String> = s
                    .iter()
                    .enumerate()
                    .map(|(i, d)| if i == r_at { "r".into() } else { d.to_string() })
                    .collect();
                format!("[{}]", v.join(", "))
            };
            bail!(
                "`{}` has lora_A {:?} / lora_B {:?}, expected {} / {}",
                self.path,
                a.dims(),
                b.dims(),
                show(ea, 0),
                show(eb, 1)
            );
        }
        let w = self.weight()?;
        let a = a.to_dtype(w.dtype())?.to_device(w.device())?;
        let b = b.to_dtype(w.dtype())?.to_device(w.device())?;
        Ok(LoraAdapter {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            rank,
            alpha: alpha.unwrap_or(rank as f64),
        })
    }

    /// `scale * B A` in the weight's shape (what merging adds to the weight), detached, in the
    /// adapter's dtype and on its device.
    pub fn delta(&self, ad: &LoraAdapter) -> Result<Tensor> {
        let a = ad.a.as_tensor().detach();
        let b = ad.b.as_tensor().detach();
        let shape = self.weight.read().map_err(lock_err)?.dims().to_vec();
        let ab = b
            .reshape((b.dim(0)?, ad.rank))?
            .matmul(&a.reshape((ad.rank, ()))?)?;
        Ok((ab.reshape(shape)? * ad.scale())?)
    }

    /// `W <- W + scale * B A` and drop the adapter.
    pub fn merge(&self) -> Result<bool> {
        let Some(ad) = self.adapter() else {
            return Ok(false);
        };
        let delta = self.delta(&ad)?;
        let mut w = self.weight.write().map_err(lock_err)?;
        *w = (w.detach() + delta.to_dtype(w.dtype())?)?;
        drop(w);
        self.set_adapter(None)?;
        Ok(true)
    }
}

impl LoraLayer {
    /// `forward(x) + add` (broadcast), as one graph node when the layer is frozen and carries
    /// no active adapter (see [`frozen_layer::forward_add`]).
    pub fn forward_add(&self, x: &Tensor, add: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.read().map_err(candle_lock_err)?.clone();
        let adapter_on = self.enabled.load(Ordering::Relaxed)
            && self.adapter.read().map(|a| a.is_some()).unwrap_or(true);
        let trainable_base = w.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        if adapter_on || trainable_base {
            return self.forward(x)?.broadcast_add(add);
        }
        frozen_layer::forward_add(self.kind, &w, self.bias.as_ref(), x, add)
    }
}

impl Module for LoraLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.read().map_err(candle_lock_err)?.clone();
        let adapter = if self.enabled.load(Ordering::Relaxed) {
            self.adapter.read().ok().and_then(|a| a.clone())
        } else {
            None
        };
        let low_rank = adapter.as_ref().map(|ad| LowRank {
            a: ad.a.as_tensor(),
            b: ad.b.as_tensor(),
            scale: ad.scale(),
        });
        let trainable_base = w.track_op() || self.bias.as_ref().is_some_and(|b| b.track_op());
        if trainable_base {
            // Full fine-tuning: the weight's gradient is wanted, plain ops give it.
            frozen_layer::eval(self.kind, &w, self.bias.as_ref(), low_rank.as_ref(), x)
        } else {
            frozen_layer::forward(self.kind, &w, self.bias.as_ref(), low_rank.as_ref(), x)
        }
    }
}

/// The LoRA-capable layers of one model and the switches all its blocks share: adapters on/off
/// and gradient checkpointing.
#[derive(Debug, Clone, Default)]
pub struct LoraHub {
    enabled: Arc<AtomicBool>,
    checkpointing: Arc<AtomicBool>,
    layers: Arc<Mutex<Vec<Arc<LoraLayer>>>>,
}

impl LoraHub {
    pub fn new() -> Self {
        Self {
            enabled: Arc::new(AtomicBool::new(true)),
            checkpointing: Arc::default(),
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
    ) -> candle_core::Result<Arc<LoraLayer>> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        self.register(vb.prefix(), LayerKind::Linear, weight, bias)
    }

    /// Build a conv layer from `vb` (weight `[cout, cin, kernel, kernel]`, bias `[cout]`) and
    /// register it. Without an adapter it runs [`Conv2d`] as is (the CPU im2col path).
    pub fn conv(
        &self,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Arc<LoraLayer>> {
        let path = vb.prefix();
        let conv = Conv2d::load(vb, cin, cout, kernel, stride, padding)?;
        let kind = LayerKind::Conv {
            stride: stride.max(1),
            padding,
        };
        self.register(path, kind, conv.weight().clone(), conv.bias().cloned())
    }

    fn register(
        &self,
        path: String,
        kind: LayerKind,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> candle_core::Result<Arc<LoraLayer>> {
        let layer = Arc::new(LoraLayer {
            path,
            kind,
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

    /// Whether blocks keep only their inputs for backward and recompute the rest (diffusers'
    /// `enable_gradient_checkpointing`).
    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing.load(Ordering::Relaxed)
    }

    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed)
    }

    /// Run `f` with the adapters switched `on`, then restore the switch (a recomputed block's
    /// backward must see the adapters as its forward did).
    pub fn with_enabled<T>(&self, on: bool, f: impl FnOnce() -> T) -> T {
        let before = self.enabled.swap(on, Ordering::Relaxed);
        let out = f();
        self.enabled.store(before, Ordering::Relaxed);
        out
    }

    /// A block of this model under gradient checkpointing: `block(inputs)` recomputed in
    /// backward with the adapters as they are now.
    pub fn checkpoint(
        &self,
        name: &'static str,
        inputs: &[&Tensor],
        block: impl Fn(&[Tensor]) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> candle_core::Result<Tensor> {
        let hub = self.clone();
        let adapters_on = self.enabled();
        recompute(
            name,
            inputs,
            Arc::new(move |t| hub.with_enabled(adapters_on, || block(t))),
        )
    }

    /// All registered layers, sorted by path.
    pub fn layers(&self) -> Vec<Arc<LoraLayer>> {
        let mut v = self.layers.lock().map(|l| l.clone()).unwrap_or_default();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    pub fn has_adapters(&self) -> bool {
        self.layers().iter().any(|l| l.adapter().is_some())
    }

    /// PEFT's `target_modules` rule: a target names a module by a dot-separated suffix of its
    /// path; [`ALL_LINEAR`] / [`ALL_CONV`] take every layer of that kind.
    fn matches(layer: &LoraLayer, targets: &[String]) -> bool {
        let path = layer.path.as_str();
        targets.iter().any(|t| match t.as_str() {
            ALL_LINEAR => layer.kind == LayerKind::Linear,
            ALL_CONV => matches!(layer.kind, LayerKind::Conv { .. }),
            t => path == t || path.ends_with(&format!(".{t}")),
        })
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
        if let Some(t) = cfg
            .targets
            .iter()
            .find(|t| t.starts_with("all-") && ![ALL_LINEAR, ALL_CONV].contains(&t.as_str()))
        {
            bail!("add_lora: unknown target `{t}` (expected a module-name suffix, \"{ALL_LINEAR}\" or \"{ALL_CONV}\")");
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
            if !Self::matches(&layer, &cfg.targets) {
                continue;
            }
            let w = layer.weight()?;
            let (a_shape, b_shape) = layer.adapter_shapes(cfg.rank)?;
            let a = (rng.randn(a_shape, w.device())? * std)?.to_dtype(w.dtype())?;
            let b = Tensor::zeros(b_shape, w.dtype(), w.device())?;
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device};

    use super::*;
    use crate::tensor::grad::finite_difference_check;

    /// A hub holding one conv layer `[4, 3, k, k]` under the name `block.conv` and one linear
    /// layer `[5, 3]` under `block.proj`, with seeded random weights.
    fn hub_with_layers(k: usize, stride: usize, padding: usize) -> (LoraHub, Arc<LoraLayer>) {
        let dev = Device::Cpu;
        let mut rng = SeededRng::new(3);
        let mut map = HashMap::new();
        map.insert(
            "block.conv.weight".to_string(),
            rng.randn((4, 3, k, k), &dev).unwrap(),
        );
        map.insert("block.conv.bias".to_string(), rng.randn(4, &dev).unwrap());
        map.insert(
            "block.proj.weight".to_string(),
            rng.randn((5, 3), &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let hub = LoraHub::new();
        let conv = hub
            .conv(3, 4, k, stride, padding, vb.pp("block").pp("conv"))
            .unwrap();
        hub.linear(3, 5, false, vb.pp("block").pp("proj")).unwrap();
        (hub, conv)
    }

    fn config(targets: &[&str]) -> LoraConfig {
        LoraConfig {
            rank: 2,
            alpha: 3.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            seed: 1,
        }
    }

    /// B starts at zero; random values make A's gradient nonzero and the adapter visible.
    fn randomize_b(layer: &LoraLayer, seed: u64) {
        let ad = layer.adapter().expect("adapter");
        let b = SeededRng::new(seed)
            .randn(ad.b.dims(), &Device::Cpu)
            .unwrap();
        ad.b.set(&b).unwrap();
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::tensor::ops::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn conv_adapters_have_peft_shapes_and_targets_select_by_kind() -> Result<()> {
        let (hub, conv) = hub_with_layers(3, 2, 1);
        assert_eq!(hub.add(&config(&["all-conv"]))?, 1);
        let ad = conv.adapter().expect("conv adapter");
        assert_eq!(ad.a.dims(), &[2, 3, 3, 3]);
        assert_eq!(ad.b.dims(), &[4, 2, 1, 1]);
        assert_eq!(ad.b.as_tensor().abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);

        let (hub, _) = hub_with_layers(3, 1, 1);
        assert_eq!(hub.add(&config(&["all-linear"]))?, 1);
        let names: Vec<String> = hub.vars("").into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["block.proj.lora_A.weight", "block.proj.lora_B.weight"]
        );

        // PEFT's suffix rule: whole dot-separated components only
        let (hub, _) = hub_with_layers(3, 1, 1);
        assert_eq!(hub.add(&config(&["conv", "block.proj"]))?, 2);
        let (hub, _) = hub_with_layers(3, 1, 1);
        let err = hub.add(&config(&["onv"])).unwrap_err().to_string();
        assert!(err.contains("no layer matches"), "{err}");
        let err = hub
            .add(&config(&["all-attention"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown target `all-attention`"), "{err}");
        Ok(())
    }

    /// The adapter's output is that of the conv with the merged weight `W + scale * B A`, and
    /// merging keeps the output; the switch off gives the base conv exactly.
    #[test]
    fn conv_adapter_equals_its_merged_weight_and_switches_off_exactly() -> Result<()> {
        for &(k, s, p) in &[(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0)] {
            let (hub, conv) = hub_with_layers(k, s, p);
            let x = SeededRng::new(9).randn((2, 3, 7, 7), &Device::Cpu)?;
            let base = conv.forward(&x)?;
            hub.add(&config(&["conv"]))?;
            assert_eq!(
                max_diff(&conv.forward(&x)?, &base),
                0.0,
                "fresh adapter is a no-op"
            );
            randomize_b(&conv, 4);
            let adapted = conv.forward(&x)?;
            assert!(
                max_diff(&adapted, &base) > 1e-2,
                "k{k} s{s} p{p}: no effect"
            );
            hub.set_enabled(false);
            assert_eq!(max_diff(&conv.forward(&x)?, &base), 0.0, "switched off");
            hub.set_enabled(true);
            let merged_w = (conv.weight()? + conv.delta(&conv.adapter().unwrap())?)?;
            let merged = Conv2d::new(merged_w, conv.bias.clone(), s, p).forward(&x)?;
            assert!(max_diff(&adapted, &merged) < 1e-4, "k{k} s{s} p{p}: delta");
            assert!(conv.merge()?);
            assert!(conv.adapter().is_none());
            assert!(
                max_diff(&conv.forward(&x)?, &adapted) < 1e-4,
                "k{k} s{s} p{p}: merge"
            );
        }
        Ok(())
    }

    /// Central differences of L = <probe, conv(x)> at sampled entries of A and B against the
    /// autograd gradient (L is bilinear in A and B, so exact up to f32 rounding).
    #[test]
    fn conv_adapter_gradients_match_finite_differences() -> Result<()> {
        for &(k, s, p) in &[(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
            let (hub, conv) = hub_with_layers(k, s, p);
            hub.add(&config(&["conv"]))?;
            randomize_b(&conv, 5);
            let mut rng = SeededRng::new(6);
            let x = rng.randn((2, 3, 6, 6), &Device::Cpu)?;
            let probe = rng.randn(conv.forward(&x)?.dims(), &Device::Cpu)?;
            let loss = || Ok((conv.forward(&x)? * &probe)?.sum_all()?);
            let ad = conv.adapter().unwrap();
            let grads = loss()?.backward()?;
            for (name, v) in [("A", &ad.a), ("B", &ad.b)] {
                let g = grads.get(v).expect("gradient");
                assert!(
                    g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
                    "{name}: zero"
                );
                let n = v.elem_count();
                for (g, fd) in finite_difference_check(loss, v, &[0, n / 3, n / 2, n - 1], 0.5)? {
                    assert!(
                        (fd - g).abs() < 1e-3 * fd.abs().max(1.0),
                        "{name} k{k} s{s} p{p}: fd {fd} vs {g}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn adapter_from_names_the_layer_and_expected_shapes() -> Result<()> {
        let (_, conv) = hub_with_layers(3, 1, 1);
        let dev = Device::Cpu;
        let ok = conv.adapter_from(
            &Tensor::zeros((2, 3, 3, 3), DType::F32, &dev)?,
            &Tensor::zeros((4, 2, 1, 1), DType::F32, &dev)?,
            Some(8.0),
        )?;
        assert_eq!((ok.rank, ok.alpha), (2, 8.0));
        // a linear-shaped adapter on a conv layer
        let err = conv
            .adapter_from(
                &Tensor::zeros((2, 3), DType::F32, &dev)?,
                &Tensor::zeros((4, 2), DType::F32, &dev)?,
                None,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`block.conv`") && err.contains("[r, 3, 3, 3] / [4, r, 1, 1]"),
            "{err}"
        );
        Ok(())
    }
}
