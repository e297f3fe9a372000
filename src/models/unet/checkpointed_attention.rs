//! Multi-head attention as one graph node that recomputes its scores in backward.
//!
//! Sliced attention bounds the score matrices a forward builds at once, but a forward that keeps
//! its graph still holds every slice's scores and softmax for backward: at 64x64 latents that is
//! [rows, heads, 4096, 4096] per attention layer, which is what ran SD1.5 training at batch 10
//! and SDXL training out of memory. Here the forward runs on detached inputs (no graph, slices
//! freed as they go) and a custom op carries the result; its backward recomputes one query slice
//! at a time and returns dq, dk and dv by the softmax-attention formulas. The node takes the
//! projections' token-major outputs and splits the heads itself, so the graph keeps q, k, v and
//! the output once each (not also their head-major copies and the transposed keys).

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Result, Tensor, D};

use crate::tensor::custom_backward::{with_backward, Backward};

static RECOMPUTED_BACKWARDS: AtomicUsize = AtomicUsize::new(0);

/// How many attention backward passes this process recomputed (diagnostics and tests).
pub fn recomputed_backwards() -> usize {
    RECOMPUTED_BACKWARDS.load(Ordering::Relaxed)
}

/// How one attention call splits and computes its heads.
#[derive(Debug, Clone, Copy)]
pub struct HeadsConfig {
    pub heads: usize,
    /// Multiplies q kᵀ (1/√head_dim).
    pub scale: f64,
    /// Query rows per score block.
    pub rows: usize,
    /// Compute q kᵀ and P v in f32 for half-precision inputs (the softmax always is).
    pub upcast: bool,
}

/// softmax(q kᵀ · scale) for one block of queries, in f32 (for half-precision inputs too).
/// Without a graph it is candle's fused softmax kernel (one pass, no temporaries, but no
/// backward); with one, the composed differentiable ops.
fn probabilities(q: &Tensor, kt: &Tensor, scale: f64) -> Result<Tensor> {
    // Scaling q (n x d) costs a pass over far fewer elements than scaling the scores (n x M).
    let scores = (q * scale)?.contiguous()?.matmul(kt)?;
    let scores = if matches!(scores.dtype(), DType::F16 | DType::BF16) {
        scores.to_dtype(DType::F32)?
    } else {
        scores
    };
    if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

/// softmax(q kᵀ · scale) v for one block of queries; the softmax runs in f32 for half
/// precision inputs. `q: [B, H, n, d]`, `kt: [B, H, d, M]`, `v: [B, H, M, d]`.
pub fn attend(q: &Tensor, kt: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    probabilities(q, kt, scale)?.to_dtype(v.dtype())?.matmul(v)
}

/// [`attend`] over blocks of `rows` queries (the exact result: each query row's softmax only
/// sees its own row).
pub fn attend_sliced(
    q: &Tensor,
    kt: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> Result<Tensor> {
    let n = q.dim(2)?;
    if rows >= n {
        return attend(q, kt, v, scale);
    }
    let mut parts = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        parts.push(attend(&q.narrow(2, start, len)?, kt, v, scale)?);
        start += len;
    }
    Tensor::cat(&parts, 2)
}

/// `[B, N, H·d]` -> `[B, H, N, d]`, contiguous (in f32 when `to_f32`).
fn split_heads(x: &Tensor, heads: usize, to_f32: bool) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let x = if to_f32 {
        x.to_dtype(DType::F32)?
    } else {
        x.clone()
    };
    x.reshape((b, n, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[B, H, N, d]` -> `[B, N, H·d]`, contiguous.
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, n, h * d))
}

/// Multi-head attention of token-major projections: `q: [B, N, H·d]`, `k, v: [B, M, H·d]`
/// -> `[B, N, H·d]`, sliced by `cfg.rows` query rows. With a graph on any input it is one node
/// that keeps only q, k, v and the output and recomputes the scores in backward.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: HeadsConfig,
) -> Result<Tensor> {
    let out = heads_forward(&q.detach(), &k.detach(), &v.detach(), cfg)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    with_backward(out, &[q, k, v], RecomputedAttention(cfg))
}

fn heads_forward(q: &Tensor, k: &Tensor, v: &Tensor, cfg: HeadsConfig) -> Result<Tensor> {
    let up = cfg.upcast && matches!(q.dtype(), DType::F16 | DType::BF16);
    let qh = split_heads(q, cfg.heads, up)?;
    let kt = split_heads(k, cfg.heads, up)?.t()?.contiguous()?;
    let vh = split_heads(v, cfg.heads, up)?;
    merge_heads(&attend_sliced(&qh, &kt, &vh, cfg.scale, cfg.rows)?.to_dtype(q.dtype())?)
}

/// The backward of [`multi_head_attention`].
struct RecomputedAttention(HeadsConfig);

impl Backward for RecomputedAttention {
    fn name(&self) -> &'static str {
        "recomputed-attention"
    }

    /// Per block of queries, with P = softmax(S), S = q kᵀ · scale and g the output's
    /// gradient: dv += Pᵀ g, dS = P ⊙ (g vᵀ − rowsum(g vᵀ ⊙ P)), dq = dS k · scale,
    /// dkᵀ += qᵀ dS · scale. In f32; the gradients come back in the inputs' dtypes.
    fn grads(&self, args: &[&Tensor], grad_out: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let [q, k, v] = args else {
            candle_core::bail!("recomputed-attention: expected q, k and v");
        };
        RECOMPUTED_BACKWARDS.fetch_add(1, Ordering::Relaxed);
        let HeadsConfig {
            heads, scale, rows, ..
        } = self.0;
        let q32 = split_heads(&q.detach(), heads, true)?;
        let k32 = split_heads(&k.detach(), heads, true)?;
        let v32 = split_heads(&v.detach(), heads, true)?;
        let g32 = split_heads(grad_out, heads, true)?;
        let kt32 = k32.t()?.contiguous()?;
        let vt32 = v32.t()?;
        let n = q32.dim(2)?;
        let rows = rows.clamp(1, n);
        let mut dq = Vec::with_capacity(n.div_ceil(rows));
        let mut dkt: Option<Tensor> = None;
        let mut dv: Option<Tensor> = None;
        let accumulate = |acc: Option<Tensor>, part: Tensor| match acc {
            Some(acc) => acc + part,
            None => Ok(part),
        };
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let qs = q32.narrow(2, start, len)?;
            let g = g32.narrow(2, start, len)?;
            let p = probabilities(&qs, &kt32, scale)?;
            dv = Some(accumulate(dv, p.t()?.matmul(&g)?)?);
            let dp = g.matmul(&vt32)?;
            let row_sums = (&dp * &p)?.sum_keepdim(D::Minus1)?;
            let ds = (dp.broadcast_sub(&row_sums)? * p)?;
            dq.push((ds.matmul(&k32)? * scale)?);
            dkt = Some(accumulate(dkt, (qs.t()?.matmul(&ds)? * scale)?)?);
            start += len;
        }
        let token_major = |t: &Tensor, like: &Tensor| merge_heads(t)?.to_dtype(like.dtype());
        let dk = match dkt {
            Some(dkt) => Some(token_major(&dkt.t()?, k)?),
            None => None,
        };
        let dv = match dv {
            Some(dv) => Some(token_major(&dv, v)?),
            None => None,
        };
        Ok(vec![Some(token_major(&Tensor::cat(&dq, 2)?, q)?), dk, dv])
    }
}
