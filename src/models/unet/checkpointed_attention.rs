//! Attention with recomputation in the backward pass (gradient checkpointing for one op).
//!
//! Sliced attention bounds the score matrices a forward builds at once, but a forward that keeps
//! its graph still holds every slice's scores and softmax for backward: at 64x64 latents that is
//! [rows, heads, 4096, 4096] per attention layer, which is what runs SD1.5 training at batch 10
//! and SDXL training out of memory. Here the forward runs on detached inputs (no graph, slices
//! freed as they go) and a custom op carries the result; its backward recomputes one query slice
//! at a time and returns dq, dk and dv. Memory: the inputs and the output, plus one slice.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Tensor, Var, D};

use crate::tensor::custom_backward::{with_backward, Backward};

static RECOMPUTED_BACKWARDS: AtomicUsize = AtomicUsize::new(0);

/// How many attention backward passes this process recomputed (diagnostics and tests).
pub fn recomputed_backwards() -> usize {
    RECOMPUTED_BACKWARDS.load(Ordering::Relaxed)
}

/// softmax(q kᵀ · scale) v for one block of queries; the softmax runs in f32 for half
/// precision inputs. `q: [B, H, n, d]`, `kt: [B, H, d, M]`, `v: [B, H, M, d]`.
pub fn attend(q: &Tensor, kt: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let scores = (q.contiguous()?.matmul(kt)? * scale)?;
    let probs = if matches!(v.dtype(), DType::F16 | DType::BF16) {
        candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(v.dtype())?
    } else {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    };
    probs.matmul(v)
}

/// [`attend`] over blocks of `rows` queries (the exact result: each query row's softmax only
/// sees its own row).
pub fn attend_sliced(
    q: &Tensor,
    kt: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> candle_core::Result<Tensor> {
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

/// Sliced attention whose backward recomputes the slices instead of storing them. Inputs that
/// carry no graph give the same result as [`attend_sliced`] without the custom op.
pub fn attend_checkpointed(
    q: &Tensor,
    kt: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> candle_core::Result<Tensor> {
    let out = attend_sliced(&q.detach(), &kt.detach(), &v.detach(), scale, rows)?;
    if !(q.track_op() || kt.track_op() || v.track_op()) {
        return Ok(out);
    }
    with_backward(out, &[q, kt, v], RecomputedAttention { scale, rows })
}

/// The backward: recompute one query slice at a time and return dq, dk and dv.
struct RecomputedAttention {
    scale: f64,
    rows: usize,
}

impl Backward for RecomputedAttention {
    fn name(&self) -> &'static str {
        "recomputed-attention"
    }

    fn grads(
        &self,
        args: &[&Tensor],
        grad_out: &Tensor,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let [q, kt, v] = args else {
            candle_core::bail!("recomputed-attention: expected q, kᵀ and v");
        };
        RECOMPUTED_BACKWARDS.fetch_add(1, Ordering::Relaxed);
        let n = q.dim(2)?;
        let rows = self.rows.min(n);
        let kt_var = Var::from_tensor(&kt.detach())?;
        let v_var = Var::from_tensor(&v.detach())?;
        let q = q.detach();
        let mut dq = Vec::with_capacity(n.div_ceil(rows));
        let mut dk: Option<Tensor> = None;
        let mut dv: Option<Tensor> = None;
        let mut start = 0;
        while start < n {
            let len = rows.min(n - start);
            let q_var = Var::from_tensor(&q.narrow(2, start, len)?)?;
            let o = attend(
                q_var.as_tensor(),
                kt_var.as_tensor(),
                v_var.as_tensor(),
                self.scale,
            )?;
            // d/dx of sum(o * g) is the vector-Jacobian product with the incoming gradient g.
            let g = grad_out.narrow(2, start, len)?.to_dtype(DType::F32)?;
            let grads = (o.to_dtype(DType::F32)? * g)?.sum_all()?.backward()?;
            let pick = |var: &Var| {
                grads.get(var.as_tensor()).cloned().ok_or_else(|| {
                    candle_core::Error::Msg("attention checkpoint: no gradient".into())
                })
            };
            dq.push(pick(&q_var)?);
            let (gk, gv) = (pick(&kt_var)?, pick(&v_var)?);
            dk = Some(match dk {
                Some(acc) => (acc + gk)?,
                None => gk,
            });
            dv = Some(match dv {
                Some(acc) => (acc + gv)?,
                None => gv,
            });
            start += len;
        }
        Ok(vec![Some(Tensor::cat(&dq, 2)?), dk, dv])
    }
}
