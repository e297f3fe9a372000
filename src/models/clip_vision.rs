//! The CLIP image tower (transformers `CLIPVisionModel` + `visual_projection`), as PickScore,
//! HPSv2 (open_clip ViT-H/14, renamed by [`super::open_clip`]), the LAION aesthetic predictor
//! (ViT-L/14) and CLIP score use it: patch embedding, class token, learned positions,
//! `pre_layrnorm`, pre-LN encoder blocks, `post_layernorm` of the class token, projection.
//!
//! Inference only: attention uses candle's fused softmax (no backward); layer norms are ours.

use anyhow::{bail, Result};
use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;

use super::clip_text::ClipActivation;
use super::nn::LayerNorm;

fn d_hidden() -> usize {
    768
}
fn d_intermediate() -> usize {
    3072
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}

/// `vision_config` of a transformers `CLIPConfig` (defaults: transformers' `CLIPVisionConfig`,
/// since `save_pretrained` may leave default values out).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "vision_config: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            bail!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                self.image_size,
                self.patch_size
            );
        }
        if self.num_channels != 3 {
            bail!(
                "vision_config: num_channels {} (only RGB, 3, is supported)",
                self.num_channels
            );
        }
        if self.num_hidden_layers == 0 {
            bail!("vision_config: num_hidden_layers must be at least 1");
        }
        ClipActivation::parse(&self.hidden_act)?;
        Ok(())
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(
        vb.get((out_dim, in_dim), "weight")?,
        Some(vb.get(out_dim, "bias")?),
    ))
}

/// One pre-LN transformer block without a mask (the image tower's), transformers' key names.
#[derive(Debug, Clone)]
struct Block {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: ClipActivation,
}

impl Block {
    fn new(
        vb: VarBuilder,
        cfg: &ClipVisionConfig,
        act: ClipActivation,
    ) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let a = vb.pp("self_attn");
        Ok(Self {
            ln1: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            q: linear(a.pp("q_proj"), h, h)?,
            k: linear(a.pp("k_proj"), h, h)?,
            v: linear(a.pp("v_proj"), h, h)?,
            out: linear(a.pp("out_proj"), h, h)?,
            ln2: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(vb.pp("mlp.fc1"), h, cfg.intermediate_size)?,
            fc2: linear(vb.pp("mlp.fc2"), cfg.intermediate_size, h)?,
            heads: cfg.num_attention_heads,
            act,
        })
    }

    fn attention(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q.forward(x)? * (d as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        self.out.forward(&ctx)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attention(&self.ln1.forward(x)?)?)?;
        let m = self
            .act
            .forward(&self.fc1.forward(&self.ln2.forward(&x)?)?)?;
        x + self.fc2.forward(&m)?
    }
}

/// Image tower + `visual_projection`. Built from a var builder rooted at the `CLIPModel` keys
/// (`vision_model.*`, `visual_projection.weight`).
pub struct ClipVisionModel {
    cfg: ClipVisionConfig,
    /// [hidden, 3 * patch * patch] (the patch conv as a matrix; the conv has no bias).
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    blocks: Vec<Block>,
    post_ln: LayerNorm,
    /// [projection_dim, hidden].
    projection: Tensor,
}

impl ClipVisionModel {
    pub fn new(vb: VarBuilder, cfg: ClipVisionConfig, projection_dim: usize) -> Result<Self> {
        cfg.validate()?;
        let act = ClipActivation::parse(&cfg.hidden_act)?;
        let (h, p) = (cfg.hidden_size, cfg.patch_size);
        let v = vb.pp("vision_model");
        let e = v.pp("embeddings");
        let patch_weight = e
            .get((h, cfg.num_channels, p, p), "patch_embedding.weight")?
            .reshape((h, cfg.num_channels * p * p))?;
        let class_embedding = e.get(h, "class_embedding")?;
        let n_pos = cfg.grid() * cfg.grid() + 1;
        let position_embedding = e.get((n_pos, h), "position_embedding.weight")?;
        let pre_ln = LayerNorm::new(h, cfg.layer_norm_eps, v.pp("pre_layrnorm"))?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| Block::new(v.pp(format!("encoder.layers.{i}")), &cfg, act))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let post_ln = LayerNorm::new(h, cfg.layer_norm_eps, v.pp("post_layernorm"))?;
        let projection = vb.get((projection_dim, h), "visual_projection.weight")?;
        Ok(Self {
            cfg,
            patch_weight,
            class_embedding,
            position_embedding,
            pre_ln,
            blocks,
            post_ln,
            projection,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// Normalised pixels [B, 3, S, S] (S = image_size) -> the pooled, post-LN class token
    /// [B, hidden] and its projection [B, projection_dim] (`image_embeds`, not normalised).
    pub fn forward(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = self.cfg.image_size;
        let dims = pixels.dims();
        if dims.len() != 4 || dims[1] != 3 || dims[2] != s || dims[3] != s {
            bail!("CLIP vision: expected pixels [B, 3, {s}, {s}], got {dims:?}");
        }
        let b = dims[0];
        let (p, g, h) = (self.cfg.patch_size, self.cfg.grid(), self.cfg.hidden_size);
        let x = pixels.to_dtype(self.patch_weight.dtype())?;
        // [B, 3, g, p, g, p] -> [B, g, g, 3, p, p] -> [B, g*g, 3*p*p]: the stride-p conv as a matmul.
        let patches = x
            .reshape((b, 3, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, 3 * p * p))?;
        let tokens = patches
            .matmul(&self.patch_weight.t()?)?
            .reshape((b, g * g, h))?;
        let cls = self.class_embedding.reshape((1, 1, h))?.repeat((b, 1, 1))?;
        let mut x = Tensor::cat(&[&cls, &tokens], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        x = self.pre_ln.forward(&x)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let pooled = self.post_ln.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        let embeds = pooled.matmul(&self.projection.t()?)?;
        Ok((pooled, embeds))
    }
}
