//! CLIP text encoders (`CLIPTextModel`, `CLIPTextModelWithProjection`) as Stable Diffusion
//! uses them: causal self-attention without a padding mask, pre-LN blocks, final layer norm.
//! Built from differentiable ops only (candle_nn::ops::softmax, our LayerNorm), so the
//! encoder trains with correct gradients.
//!
//! Weights load from `text_encoder/model.safetensors` with either key layout: transformers 4
//! (`text_model.` prefix, as SD1.5 ships) or transformers 5 (no prefix); `text_projection.weight`
//! sits at the top level; buffers such as `position_ids` are ignored.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use super::checked_vb::{ParamSource, Params};
use super::config::read_config;
use super::loading::{WeightMode, Weights};
use super::nn::LayerNorm;
use crate::tensor::recompute::recompute;

/// The MLP activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// x * sigmoid(1.702 x) (OpenAI CLIP, SD1.5).
    QuickGelu,
    /// Exact erf GELU (`gelu`, SD2.1 / SDXL's OpenCLIP encoders).
    Gelu,
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl ClipActivation {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            other => bail!(
                "unsupported hidden_act `{other}`: expected quick_gelu, gelu, gelu_new or gelu_pytorch_tanh"
            ),
        })
    }

    pub(crate) fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
        }
    }
}

fn default_eps() -> f64 {
    1e-5
}
fn default_max_pos() -> usize {
    77
}
fn default_eos() -> i64 {
    2
}
fn default_act() -> String {
    "quick_gelu".into()
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

impl ClipTextConfig {
    pub fn activation(&self) -> Result<ClipActivation> {
        ClipActivation::parse(&self.hidden_act)
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.num_hidden_layers == 0 {
            bail!("num_hidden_layers must be at least 1");
        }
        self.activation()?;
        Ok(())
    }

    /// Whether the config names the projection model.
    pub fn wants_projection(&self) -> bool {
        self.architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|s| s.contains("WithProjection")))
    }
}

/// What the encoder returns for a batch of ids [B, L].
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// [B, L, H] after the final layer norm (`last_hidden_state`).
    pub hidden: Tensor,
    /// [B, L, H] output of the second-to-last layer, before the final layer norm
    /// (`hidden_states[-2]`, what SDXL conditions on).
    pub penultimate: Tensor,
    /// [B, H] final-LN hidden state at the end-of-text position.
    pub pooled: Tensor,
    /// [B, P] `pooled @ text_projection.T` for the projection model.
    pub text_embeds: Option<Tensor>,
}

fn linear(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
    bias: bool,
) -> candle_core::Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q: linear(vb.pp("q_proj"), h, h, true)?,
            k: linear(vb.pp("k_proj"), h, h, true)?,
            v: linear(vb.pp("v_proj"), h, h, true)?,
            out: linear(vb.pp("out_proj"), h, h, true)?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    fn split_heads(&self, x: &Tensor, b: usize, l: usize) -> candle_core::Result<Tensor> {
        x.reshape((b, l, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = self.split_heads(&(self.q.forward(x)? * scale)?, b, l)?;
        let k = self.split_heads(&self.k.forward(x)?, b, l)?;
        let v = self.split_heads(&self.v.forward(x)?, b, l)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        self.out.forward(&ctx)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    attn: SelfAttention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig, act: ClipActivation) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            ln1: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: SelfAttention::new(vb.pp("self_attn"), cfg)?,
            ln2: LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(vb.pp("mlp.fc1"), h, cfg.intermediate_size, true)?,
            fc2: linear(vb.pp("mlp.fc2"), cfg.intermediate_size, h, true)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let h = self
            .act
            .forward(&self.fc1.forward(&self.ln2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// `CLIPTextModel`, or `CLIPTextModelWithProjection` when the weights carry
/// `text_projection.weight` (or the config names the projection model).
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
    projection: Option<Tensor>,
    params: Params,
    dtype: DType,
    device: Device,
    /// Gradient checkpointing: each encoder layer recomputed in backward.
    checkpointing: AtomicBool,
}

impl ClipTextModel {
    /// Load `dir/config.json` and the weights `dir/model*.safetensors` in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device, mode: WeightMode) -> Result<Self> {
        let cfg: ClipTextConfig = read_config(dir, "config.json")?;
        cfg.validate().with_context(|| {
            format!("text encoder config {}", dir.join("config.json").display())
        })?;
        let weights = Weights::load(dir, "model", dtype, device)?.strip_prefix("text_model.");
        Self::from_weights(cfg, weights, mode)
            .with_context(|| format!("loading CLIP text encoder from {}", dir.display()))
    }

    /// Build from a parsed config and loaded weights (keys without the `text_model.` prefix).
    pub fn from_weights(cfg: ClipTextConfig, weights: Weights, mode: WeightMode) -> Result<Self> {
        cfg.validate()?;
        let act = cfg.activation()?;
        let (dtype, device) = (weights.dtype, weights.device.clone());
        let src = ParamSource::new(weights, mode)?;
        let vb = src.var_builder();
        let h = cfg.hidden_size;
        let tok = vb.get((cfg.vocab_size, h), "embeddings.token_embedding.weight")?;
        let token_embedding = Embedding::new(tok, h);
        let position_embedding = vb.get(
            (cfg.max_position_embeddings, h),
            "embeddings.position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), &cfg, act))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_ln = LayerNorm::new(h, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?;
        let projection = if cfg.wants_projection() || src.contains("text_projection.weight") {
            let p = cfg.projection_dim.unwrap_or(h);
            Some(vb.get((p, h), "text_projection.weight")?)
        } else {
            None
        };
        let params = src.finish();
        Ok(Self {
            cfg,
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            projection,
            params,
            dtype,
            device,
            checkpointing: AtomicBool::new(false),
        })
    }

    /// Gradient checkpointing (for a trainable encoder): each layer keeps only its input for
    /// backward and recomputes its activations there.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed)
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn has_projection(&self) -> bool {
        self.projection.is_some()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Trainable tensors sorted by name (`embeddings.token_embedding.weight`, ...); empty when
    /// loaded frozen.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.params.trainable_vars()
    }

    pub fn trainable_names(&self) -> Vec<String> {
        self.params.trainable_names()
    }

    pub fn is_trainable(&self) -> bool {
        self.params.is_trainable()
    }

    /// Number of scalar parameters.
    pub fn param_count(&self) -> usize {
        self.params.param_count()
    }

    /// The end-of-text position of each row: argmax(ids) for the legacy eos_token_id 2 (first
    /// maximal id, as torch.argmax), else the first position equal to eos_token_id (the last
    /// position when a row has none).
    pub fn eos_positions(&self, ids: &[Vec<i64>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                if self.cfg.eos_token_id == 2 {
                    let mut best = 0;
                    for (i, &v) in row.iter().enumerate() {
                        if v > row[best] {
                            best = i;
                        }
                    }
                    best
                } else {
                    row.iter()
                        .position(|&v| v == self.cfg.eos_token_id)
                        .unwrap_or(row.len().saturating_sub(1))
                }
            })
            .collect()
    }

    fn causal_mask(&self, l: usize) -> candle_core::Result<Tensor> {
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (1, 1, l, l), &self.device)?.to_dtype(self.dtype)
    }

    /// Encode token ids [B, L] (any int dtype, or integral floats) with L <= max_position_embeddings.
    pub fn encode(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, l) = ids.dims2().map_err(|_| {
            anyhow::anyhow!(
                "text encoder: ids must be [batch, seq], got shape {:?}",
                ids.dims()
            )
        })?;
        if l == 0 || l > self.cfg.max_position_embeddings {
            bail!(
                "text encoder: sequence length {l} must be in 1..={} (max_position_embeddings)",
                self.cfg.max_position_embeddings
            );
        }
        let host: Vec<Vec<i64>> = ids
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?
            .into_iter()
            .map(|r| r.into_iter().map(|v| v as i64).collect())
            .collect();
        let vocab = self.cfg.vocab_size as i64;
        if let Some(bad) = host.iter().flatten().find(|&&v| v < 0 || v >= vocab) {
            bail!("text encoder: token id {bad} is outside the vocabulary [0, {vocab})");
        }
        let flat: Vec<u32> = host.iter().flatten().map(|&v| v as u32).collect();
        let ids_u32 = Tensor::from_vec(flat, (b, l), &self.device)?;

        let tok = self.token_embedding.forward(&ids_u32)?;
        let pos = self.position_embedding.narrow(0, 0, l)?.unsqueeze(0)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mask = self.causal_mask(l)?;
        let n = self.layers.len();
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == n {
                penultimate = x.clone();
            }
            x = if self.checkpointing.load(Ordering::Relaxed) {
                let layer = layer.clone();
                recompute(
                    "clip-layer-checkpoint",
                    &[&x, &mask],
                    Arc::new(move |t| layer.forward(&t[0], &t[1])),
                )?
            } else {
                layer.forward(&x, &mask)?
            };
        }
        let hidden = self.final_ln.forward(&x)?;

        let eos = self.eos_positions(&host);
        let index: Vec<u32> = eos
            .iter()
            .enumerate()
            .map(|(r, &p)| (r * l + p) as u32)
            .collect();
        let index = Tensor::from_vec(index, b, &self.device)?;
        let pooled = hidden
            .reshape((b * l, self.cfg.hidden_size))?
            .index_select(&index, 0)?;
        let text_embeds = match &self.projection {
            Some(w) => Some(pooled.matmul(&w.t()?)?),
            None => None,
        };
        Ok(ClipTextOutput {
            hidden,
            penultimate,
            pooled,
            text_embeds,
        })
    }
}
