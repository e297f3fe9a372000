//! Attention with recomputation in the backward pass (gradient checkpointing for one op).
//!
//! Sliced attention bounds the score matrices a forward builds at once, but a forward that keeps
//! its graph still holds every slice's scores and softmax for backward: at 64x64 latents that is
//! [rows, heads, 4096, 4096] per attention layer, which is what runs SD1.5 training at batch 10
//! and SDXL training out of memory. Here the forward runs on detached inputs (no graph, slices
//! freed as they go) and a custom op carries the result; its backward recomputes one query slice
//! at a time and returns dq, dk and dv. Memory: the inputs and the output, plus one slice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, Var, D,
};

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
    let op = RecomputedAttention {
        out: Mutex::new(Some(out.contiguous()?)),
        scale,
        rows,
    };
    q.apply_op3_arc(kt, v, Arc::new(Box::new(op)))
}

/// The custom op: its forward hands over the precomputed output, its backward recomputes.
struct RecomputedAttention {
    /// Taken by the forward (so the op does not keep a second reference to the output).
    out: Mutex<Option<Tensor>>,
    scale: f64,
    rows: usize,
}

impl RecomputedAttention {
    fn take_out(&self) -> candle_core::Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention checkpoint: poisoned lock".into()))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg("attention checkpoint: forward ran twice".into())
            })
    }
}

impl RecomputedAttention {
    /// The precomputed output's storage (copied out) with its shape, as the backend's storage
    /// type (`pick` selects the variant of the device the op runs on).
    fn output<S>(&self, pick: fn(Storage) -> Option<S>) -> candle_core::Result<(S, Shape)> {
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("attention checkpoint: the output is not a fresh contiguous tensor");
        }
        match pick(storage.try_clone(layout)?) {
            Some(s) => Ok((s, out.shape().clone())),
            None => candle_core::bail!("attention checkpoint: output on another device"),
        }
    }
}

impl CustomOp3 for RecomputedAttention {
    fn name(&self) -> &'static str {
        "recomputed-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.output(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        kt: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        RECOMPUTED_BACKWARDS.fetch_add(1, Ordering::Relaxed);
        let n = q.dim(2)?;
        let kt_var = Var::from_tensor(&kt.detach())?;
        let v_var = Var::from_tensor(&v.detach())?;
        let q = q.detach();
        let mut dq = Vec::with_capacity(n.div_ceil(self.rows));
        let mut dk: Option<Tensor> = None;
        let mut dv: Option<Tensor> = None;
        let mut start = 0;
        while start < n {
            let len = self.rows.min(n - start);
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
        Ok((Some(Tensor::cat(&dq, 2)?), dk, dv))
    }
}
