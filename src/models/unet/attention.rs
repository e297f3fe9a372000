//! Cross-attention, the GEGLU feed-forward, `BasicTransformerBlock` and `Transformer2DModel`.
//! Softmax is candle_nn::ops::softmax (has a backward) and LayerNorm is ours (differentiable).

use std::sync::Arc;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::checkpointed_attention::{multi_head_attention, HeadsConfig};
use crate::models::lora::{LoraHub, LoraLayer};
use crate::models::nn::{GroupNorm, LayerNorm};
use crate::tensor::recompute::recompute;

/// Multi-head attention (`attn1` self, `attn2` cross); projections can carry LoRA adapters.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Arc<LoraLayer>,
    to_k: Arc<LoraLayer>,
    to_v: Arc<LoraLayer>,
    to_out: Arc<LoraLayer>,
    heads: usize,
    head_dim: usize,
    upcast: bool,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        hub: &LoraHub,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: hub.linear(query_dim, inner, false, vb.pp("to_q"))?,
            to_k: hub.linear(ctx, inner, false, vb.pp("to_k"))?,
            to_v: hub.linear(ctx, inner, false, vb.pp("to_v"))?,
            to_out: hub.linear(inner, query_dim, true, vb.pp("to_out.0"))?,
            heads,
            head_dim,
            upcast,
        })
    }

    /// `x: [B, N, C]`, `context: [B, M, Cc]` (None = self-attention) -> `[B, N, C]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let b = x.dim(0)?;
        let m = ctx.dim(1)?;
        // Sliced attention: the [B, heads, N, M] score matrix is built a block of queries at a
        // time, so its size stays bounded (64x64 latents: N = M = 4096); with a graph, the
        // scores are recomputed in backward instead of kept (see checkpointed_attention.rs).
        let cfg = HeadsConfig {
            heads: self.heads,
            scale: 1.0 / (self.head_dim as f64).sqrt(),
            rows: (slice_budget(x.device()) / (b * self.heads * m).max(1)).max(1),
            upcast: self.upcast,
        };
        let out = multi_head_attention(
            &self.to_q.forward(x)?,
            &self.to_k.forward(ctx)?,
            &self.to_v.forward(ctx)?,
            cfg,
        )?;
        self.to_out.forward(&out)
    }
}

/// Largest attention score matrix (elements) built at once by default (256 MiB in f32);
/// larger ones are sliced by queries.
pub const ATTENTION_SLICE_ELEMENTS: usize = 1 << 26;

static SLICE_ELEMENTS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(ATTENTION_SLICE_ELEMENTS);

/// Set the attention slice size (score-matrix elements built at once) for this process: smaller
/// saves memory at 64x64+ latents, larger saves kernel launches. Results do not change.
pub fn set_attention_slice(elements: usize) {
    SLICE_ELEMENTS.store(elements.max(1), std::sync::atomic::Ordering::Relaxed);
}

pub fn attention_slice() -> usize {
    SLICE_ELEMENTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// At most this many score elements per slice on the CPU (16 MiB in f32): slices and their
/// softmax temporaries then stay below glibc's mmap threshold (see malloc_tuning.rs) and are
/// reused from the heap instead of page-faulted in afresh for every slice, and stay closer to
/// the caches (an SD1.5 training step at 32x32 latents: 16.7 s -> 16.3 s on 2 cores).
const CPU_SLICE_ELEMENTS: usize = 1 << 22;

fn slice_budget(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        attention_slice().min(CPU_SLICE_ELEMENTS)
    } else {
        attention_slice()
    }
}

/// GEGLU feed-forward: `net.2(h * gelu(gate))` with `[h, gate] = net.0.proj(x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Arc<LoraLayer>,
    out: Arc<LoraLayer>,
    inner: usize,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, hub: &LoraHub, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: hub.linear(dim, inner * 2, true, vb.pp("net.0.proj"))?,
            out: hub.linear(inner, dim, true, vb.pp("net.2"))?,
            inner,
        })
    }
}

impl FeedForward {
    /// `forward(x) + residual`, the residual added in `net.2`'s node.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out.forward_add(&self.gated(x)?, residual)
    }

    fn gated(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let inner = self.inner;
        // GEGLU as one node: backward recomputes gelu(gate) instead of keeping it.
        let gated = recompute(
            "geglu",
            &[&h],
            Arc::new(move |t| {
                let a = t[0].narrow(D::Minus1, 0, inner)?;
                let gate = t[0].narrow(D::Minus1, inner, inner)?;
                a * gate.gelu_erf()?
            }),
        )?;
        Ok(gated)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.gated(x)?)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-LayerNorm with a residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    hub: LoraHub,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        hub: &LoraHub,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross: usize,
        upcast: bool,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), hub, dim, None, heads, head_dim, upcast)?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(
                vb.pp("attn2"),
                hub,
                dim,
                Some(cross),
                heads,
                head_dim,
                upcast,
            )?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), hub, dim)?,
            hub: hub.clone(),
        })
    }

    /// The block; with gradient checkpointing on, one node that recomputes it in backward.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        if !self.hub.gradient_checkpointing() {
            return self.eval(x, context);
        }
        let block = self.clone();
        self.hub
            .checkpoint("transformer-block-checkpoint", &[x, context], move |t| {
                block.eval(&t[0], &t[1])
            })
    }

    fn eval(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        self.ff.forward_add(&self.norm3.forward(&x)?, &x)
    }
}

/// `Transformer2DModel` (continuous input): GroupNorm(eps 1e-6) -> proj_in (1x1 conv, or linear
/// with `use_linear_projection`) -> transformer blocks over the H*W tokens -> proj_out -> + input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    /// 1x1 convs, or linear layers over the tokens with `use_linear_projection`.
    proj_in: Arc<LoraLayer>,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Arc<LoraLayer>,
    linear_projection: bool,
    inner: usize,
}

pub struct TransformerCfg {
    pub heads: usize,
    pub layers: usize,
    pub cross: usize,
    pub groups: usize,
    pub linear: bool,
    pub upcast: bool,
}

impl Transformer2DModel {
    pub fn new(
        vb: VarBuilder,
        hub: &LoraHub,
        channels: usize,
        cfg: &TransformerCfg,
    ) -> Result<Self> {
        let head_dim = channels / cfg.heads;
        let inner = cfg.heads * head_dim;
        let (proj_in, proj_out) = if cfg.linear {
            (
                hub.linear(channels, inner, true, vb.pp("proj_in"))?,
                hub.linear(inner, channels, true, vb.pp("proj_out"))?,
            )
        } else {
            (
                hub.conv(channels, inner, 1, 1, 0, vb.pp("proj_in"))?,
                hub.conv(inner, channels, 1, 1, 0, vb.pp("proj_out"))?,
            )
        };
        let blocks = (0..cfg.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    hub,
                    inner,
                    cfg.heads,
                    head_dim,
                    cfg.cross,
                    cfg.upcast,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(cfg.groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
            linear_projection: cfg.linear,
            inner,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let tokens = |t: &Tensor, ch: usize| -> Result<Tensor> {
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let mut hs = if self.linear_projection {
            self.proj_in.forward(&tokens(&normed, c)?)?
        } else {
            tokens(&self.proj_in.forward(&normed)?, self.inner)?
        };
        for block in &self.blocks {
            hs = block.forward(&hs, context)?;
        }
        let spatial = |t: &Tensor, ch: usize| -> Result<Tensor> {
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        if self.linear_projection {
            spatial(&self.proj_out.forward(&hs)?, c)? + x
        } else {
            self.proj_out.forward_add(&spatial(&hs, self.inner)?, x)
        }
    }
}
