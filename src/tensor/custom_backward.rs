//! An op whose output is computed without a graph and whose backward is written by hand: the
//! graph then keeps only the op's arguments and its output, not the intermediates of the
//! computation (the base of recomputation, fused layers and checkpointing).

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage,
    Tensor,
};

/// Gradients of an op's arguments (one to three, in order) from the gradient of its output.
/// None for an argument means no gradient (it tracks no graph, or does not affect the output).
pub trait Backward: Send + Sync {
    fn name(&self) -> &'static str;
    fn grads(&self, args: &[&Tensor], grad_out: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

/// `out` (computed from `args` without a graph) as a node of the graph over `args`, whose
/// backward is `backward`.
pub fn with_backward(
    out: Tensor,
    args: &[&Tensor],
    backward: impl Backward + 'static,
) -> Result<Tensor> {
    let op = HandOver {
        out: Mutex::new(Some(out.detach().contiguous()?)),
        backward,
    };
    match args {
        [a] => a.apply_op1_arc(Arc::new(Box::new(op))),
        [a, b] => a.apply_op2_arc(b, Arc::new(Box::new(op))),
        [a, b, c] => a.apply_op3_arc(b, c, Arc::new(Box::new(op))),
        _ => candle_core::bail!(
            "{}: a custom op takes 1 to 3 arguments, got {}",
            op.backward.name(),
            args.len()
        ),
    }
}

struct HandOver<B> {
    /// Taken by the op's forward, so the op does not keep a second reference to the output.
    out: Mutex<Option<Tensor>>,
    backward: B,
}

impl<B: Backward> HandOver<B> {
    /// The precomputed output's storage (copied out) with its shape, as the backend's storage
    /// type (`pick` selects the variant of the device the op runs on).
    fn output<S>(&self, pick: fn(Storage) -> Option<S>) -> Result<(S, Shape)> {
        let name = self.backward.name();
        let out = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{name}: poisoned lock")))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{name}: forward ran twice")))?;
        let (storage, layout) = out.storage_and_layout();
        match pick(storage.try_clone(layout)?) {
            Some(s) => Ok((s, out.shape().clone())),
            None => candle_core::bail!("{name}: output on another device"),
        }
    }

    /// The gradients, dropped for arguments without a graph (candle would keep them in the
    /// gradient store for nothing).
    fn tracked_grads(&self, args: &[&Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let grads = self.backward.grads(args, grad)?;
        Ok(grads
            .into_iter()
            .zip(args)
            .map(|(g, a)| g.filter(|_| a.track_op()))
            .collect())
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        self.output(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        self.output(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }
}

impl<B: Backward> CustomOp1 for HandOver<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(&self, a: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut g = self.tracked_grads(&[a], grad)?.into_iter();
        Ok(g.next().flatten())
    }
}

impl<B: Backward> CustomOp2 for HandOver<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.tracked_grads(&[a, b], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl<B: Backward> CustomOp3 for HandOver<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.tracked_grads(&[a, b, c], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}
