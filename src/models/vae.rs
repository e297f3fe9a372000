//! The Stable Diffusion VAE (diffusers `AutoencoderKL`): encoder -> quant_conv -> diagonal
//! Gaussian posterior (logvar clamped to [-30, 20]); post_quant_conv -> decoder. Built from
//! differentiable ops (conv2d, group norm from primitives, softmax with a backward, nearest
//! upsampling by broadcast), so gradients flow through decode.
//!
//! Latents are *unscaled*: multiply by `scaling_factor()` before handing them to a UNet, divide
//! before decoding, as diffusers pipelines do.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::checked_vb::{ParamSource, Params};
use super::config::read_config;
use super::loading::{WeightMode, Weights};
use crate::tensor::SeededRng;

fn default_in() -> usize {
    3
}
fn default_latent() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_layers() -> usize {
    1
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "silu".into()
}

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_in")]
    pub in_channels: usize,
    #[serde(default = "default_in")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

impl VaeConfig {
    fn validate(&self) -> Result<()> {
        if self.block_out_channels.is_empty() {
            bail!("block_out_channels is empty");
        }
        if self.norm_num_groups == 0 {
            bail!("norm_num_groups must be positive");
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            bail!(
                "block_out_channels entry {c} is not divisible by norm_num_groups {}",
                self.norm_num_groups
            );
        }
        if self.act_fn != "silu" {
            bail!("unsupported act_fn `{}`: only silu", self.act_fn);
        }
        let n = self.block_out_channels.len();
        for (field, types, expected) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(types) = types {
                if let Some(bad) = types.iter().find(|t| t.as_str() != expected) {
                    bail!("unsupported {field} entry `{bad}`: expected {expected}");
                }
                if types.len() != n {
                    bail!(
                        "{field} has {} entries, block_out_channels has {n}",
                        types.len()
                    );
                }
            }
        }
        Ok(())
    }
}

const EPS: f64 = 1e-6;

fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Conv2d> {
    let w = vb.get((cout, cin, k, k), "weight")?;
    let b = vb.get(cout, "bias")?;
    Ok(Conv2d::new(
        w,
        Some(b),
        Conv2dConfig {
            padding,
            stride,
            dilation: 1,
            groups: 1,
            cudnn_fwd_algo: None,
        },
    ))
}

fn group_norm(vb: VarBuilder, groups: usize, channels: usize) -> candle_core::Result<GroupNorm> {
    // candle-nn's GroupNorm is composed of differentiable primitives.
    GroupNorm::new(
        vb.get(channels, "weight")?,
        vb.get(channels, "bias")?,
        channels,
        groups,
        EPS,
    )
}

/// A diffusers `Linear` weight, also accepting the [out, in, 1, 1] conv layout of some exports.
fn linear(vb: VarBuilder, dim: usize) -> candle_core::Result<Linear> {
    let w = if vb.contains_tensor("weight") {
        let w = vb.get_unchecked("weight")?;
        match w.dims() {
            [o, i] if *o == dim && *i == dim => w,
            [o, i, 1, 1] if *o == dim && *i == dim => w.reshape((dim, dim))?,
            d => candle_core::bail!(
                "tensor `{}` has shape {d:?}, expected [{dim}, {dim}]",
                vb.prefix()
            ),
        }
    } else {
        vb.get((dim, dim), "weight")?
    };
    Ok(Linear::new(w, Some(vb.get(dim, "bias")?)))
}

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), groups, cin)?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: group_norm(vb.pp("norm2"), groups, cout)?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self
            .conv1
            .forward(&candle_nn::ops::silu(&self.norm1.forward(x)?)?)?;
        let h = self
            .conv2
            .forward(&candle_nn::ops::silu(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// Single-head self-attention over the spatial positions (diffusers `Attention` in the VAE
/// mid block: group norm, residual connection). Old exports name the projections
/// `query`/`key`/`value`/`proj_attn`; both spellings load.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let name = |new: &'static str, old: &'static str| if legacy { old } else { new };
        Ok(Self {
            norm: group_norm(vb.pp("group_norm"), groups, channels)?,
            q: linear(vb.pp(name("to_q", "query")), channels)?,
            k: linear(vb.pp(name("to_k", "key")), channels)?,
            v: linear(vb.pp(name("to_v", "value")), channels)?,
            out: linear(vb.pp(name("to_out.0", "proj_attn")), channels)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.q.forward(&hs)?;
        let k = self.k.forward(&hs)?;
        let v = self.v.forward(&hs)?;
        let dtype = q.dtype();
        // diffusers upcasts the VAE attention softmax; f32 scores for half-precision weights.
        let (qf, kf) = if dtype == DType::F16 || dtype == DType::BF16 {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q, k)
        };
        let scores = (qf.matmul(&kf.t()?)? * (c as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
        let out = self.out.forward(&probs.matmul(&v)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    res0: ResnetBlock,
    attn: Option<AttentionBlock>,
    res1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize, attention: bool) -> candle_core::Result<Self> {
        Ok(Self {
            res0: ResnetBlock::new(vb.pp("resnets.0"), c, c, groups)?,
            attn: if attention {
                Some(AttentionBlock::new(vb.pp("attentions.0"), c, groups)?)
            } else {
                None
            },
            res1: ResnetBlock::new(vb.pp("resnets.1"), c, c, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.res0.forward(x)?;
        if let Some(a) = &self.attn {
            h = a.forward(&h)?;
        }
        self.res1.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    /// 3x3 stride-2 conv after padding (0, 1, 0, 1) (diffusers `Downsample2D`, padding=0).
    down: Option<Conv2d>,
}

impl DownBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        if let Some(d) = &self.down {
            h = d.forward(&h.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(
                D::Minus2,
                0,
                1,
            )?)?;
        }
        Ok(h)
    }
}

/// Nearest-neighbour x2 upsampling by broadcasting (its backward is an exact sum).
fn upsample2x(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    up: Option<Conv2d>,
}

impl UpBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        if let Some(u) = &self.up {
            h = u.forward(&upsample2x(&h)?)?;
        }
        Ok(h)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = conv(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut blocks = Vec::new();
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let resnets = resnet_stack(&bvb, cfg.layers_per_block, cin, cout, g)?;
            let down = if i + 1 < ch.len() {
                Some(conv(bvb.pp("downsamplers.0.conv"), cout, cout, 3, 2, 0)?)
            } else {
                None
            };
            blocks.push(DownBlock { resnets, down });
            cin = cout;
        }
        let last = *ch.last().expect("validated non-empty");
        Ok(Self {
            conv_in,
            blocks,
            mid: MidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            norm_out: group_norm(vb.pp("conv_norm_out"), g, last)?,
            conv_out: conv(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        let h = self.mid.forward(&h)?;
        self.conv_out
            .forward(&candle_nn::ops::silu(&self.norm_out.forward(&h)?)?)
    }
}

/// `n` resnets of a block: the first maps `cin` to `cout`, the rest keep `cout`.
fn resnet_stack(
    vb: &VarBuilder,
    n: usize,
    cin: usize,
    cout: usize,
    groups: usize,
) -> candle_core::Result<Vec<ResnetBlock>> {
    (0..n)
        .map(|j| {
            ResnetBlock::new(
                vb.pp(format!("resnets.{j}")),
                if j == 0 { cin } else { cout },
                cout,
                groups,
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let conv_in = conv(vb.pp("conv_in"), cfg.latent_channels, ch[0], 3, 1, 1)?;
        let mid = MidBlock::new(vb.pp("mid_block"), ch[0], g, cfg.mid_block_add_attention)?;
        let mut blocks = Vec::new();
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let resnets = resnet_stack(&bvb, cfg.layers_per_block + 1, cin, cout, g)?;
            let up = if i + 1 < ch.len() {
                Some(conv(bvb.pp("upsamplers.0.conv"), cout, cout, 3, 1, 1)?)
            } else {
                None
            };
            blocks.push(UpBlock { resnets, up });
            cin = cout;
        }
        let last = *ch.last().expect("validated non-empty");
        Ok(Self {
            conv_in,
            mid,
            blocks,
            norm_out: group_norm(vb.pp("conv_norm_out"), g, last)?,
            conv_out: conv(vb.pp("conv_out"), last, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid.forward(&h)?;
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        self.conv_out
            .forward(&candle_nn::ops::silu(&self.norm_out.forward(&h)?)?)
    }
}

/// The VAE posterior: a diagonal Gaussian over latents (unscaled).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    pub fn std(&self) -> candle_core::Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// mean + std * eps with eps ~ N(0, 1) from the project's seeded generator.
    pub fn sample(&self, rng: &mut SeededRng) -> candle_core::Result<Tensor> {
        let eps = rng
            .randn(self.mean.shape().clone(), self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        self.mean.broadcast_add(&(self.std()? * eps)?)
    }

    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// diffusers `AutoencoderKL`.
pub struct AutoencoderKL {
    cfg: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    params: Params,
    dtype: DType,
    device: Device,
}

impl AutoencoderKL {
    /// Load `dir/config.json` and `dir/diffusion_pytorch_model*.safetensors`.
    pub fn load(dir: &Path, dtype: DType, device: &Device, mode: WeightMode) -> Result<Self> {
        let cfg: VaeConfig = read_config(dir, "config.json")?;
        cfg.validate()
            .with_context(|| format!("VAE config {}", dir.join("config.json").display()))?;
        let weights = Weights::load(dir, "diffusion_pytorch_model", dtype, device)?;
        Self::from_weights(cfg, weights, mode)
            .with_context(|| format!("loading VAE from {}", dir.display()))
    }

    pub fn from_weights(cfg: VaeConfig, weights: Weights, mode: WeightMode) -> Result<Self> {
        cfg.validate()?;
        let (dtype, device) = (weights.dtype, weights.device.clone());
        let src = ParamSource::new(weights, mode)?;
        let vb = src.var_builder();
        let l2 = 2 * cfg.latent_channels;
        let encoder = Encoder::new(vb.pp("encoder"), &cfg)?;
        let decoder = Decoder::new(vb.pp("decoder"), &cfg)?;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv(vb.pp("quant_conv"), l2, l2, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv(
                vb.pp("post_quant_conv"),
                cfg.latent_channels,
                cfg.latent_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let params = src.finish();
        Ok(Self {
            cfg,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            params,
            dtype,
            device,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }
    pub fn scaling_factor(&self) -> f64 {
        self.cfg.scaling_factor
    }
    pub fn shift_factor(&self) -> Option<f64> {
        self.cfg.shift_factor
    }
    pub fn latent_channels(&self) -> usize {
        self.cfg.latent_channels
    }
    /// Spatial downscale factor image -> latent (2^(levels-1), 8 for SD).
    pub fn downscale(&self) -> usize {
        1 << (self.cfg.block_out_channels.len() - 1)
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.params.trainable_vars()
    }
    pub fn trainable_names(&self) -> Vec<String> {
        self.params.trainable_names()
    }
    pub fn param_count(&self) -> usize {
        self.params.param_count()
    }

    fn check_input(
        &self,
        x: &Tensor,
        channels: usize,
        what: &str,
        multiple: usize,
    ) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != channels {
            bail!("VAE {what}: expected [batch, {channels}, height, width], got shape {dims:?}");
        }
        if !dims[2].is_multiple_of(multiple)
            || !dims[3].is_multiple_of(multiple)
            || dims[2] == 0
            || dims[3] == 0
        {
            bail!(
                "VAE {what}: height and width must be positive multiples of {multiple}, got {}x{}",
                dims[2],
                dims[3]
            );
        }
        Ok(x.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// Images [B, in_channels, H, W] in [-1, 1] -> posterior over latents [B, C, H/f, W/f].
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let x = self.check_input(images, self.cfg.in_channels, "encode", self.downscale())?;
        let mut moments = self.encoder.forward(&x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let c = self.cfg.latent_channels;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f64, 20f64)?;
        Ok(DiagonalGaussian { mean, logvar })
    }

    /// Latents [B, latent_channels, h, w] (unscaled) -> images [B, out_channels, h*f, w*f].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut z = self.check_input(latents, self.cfg.latent_channels, "decode", 1)?;
        if let Some(p) = &self.post_quant_conv {
            z = p.forward(&z)?;
        }
        Ok(self.decoder.forward(&z)?)
    }
}
