//! A frozen linear or conv layer, with or without a LoRA adapter, as one graph node.
//!
//! candle's matmul and conv backward compute the gradient of both operands, so every frozen
//! weight got a full-size gradient (and a zero-initialised accumulator in the gradient store)
//! that nobody reads, and the graph kept every intermediate: a conv's im2col columns (nine
//! times its input), the adapter's down/up/scaled outputs and the sum. Here the node keeps
//! only its input, the adapter's `A` and `B` and its output; backward computes the input's
//! gradient through the frozen weight by hand and the adapter's part by autograd over the
//! small low-rank branch.

use candle_core::{Module, Result, Tensor, Var};

use super::conv::Conv2d;
use super::lora::LayerKind;
use crate::tensor::custom_backward::{with_backward, Backward};

/// `A`, `B` and `scale` of an active adapter.
pub struct LowRank<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

/// `x W^T + b` (or the conv) plus `scale · up(down(x))`, as plain ops.
pub fn eval(
    kind: LayerKind,
    weight: &Tensor,
    bias: Option<&Tensor>,
    adapter: Option<&LowRank>,
    x: &Tensor,
) -> Result<Tensor> {
    let y = apply(kind, weight, bias, x)?;
    match adapter {
        None => Ok(y),
        Some(ad) => y + (low_rank(kind, ad.a, ad.b, x)? * ad.scale)?,
    }
}

/// [`eval`] as one node that computes no gradient for `weight` and `bias` (which must be
/// frozen) and keeps none of the intermediates.
pub fn forward(
    kind: LayerKind,
    weight: &Tensor,
    bias: Option<&Tensor>,
    adapter: Option<&LowRank>,
    x: &Tensor,
) -> Result<Tensor> {
    let trains_adapter = adapter.is_some_and(|a| a.a.track_op() || a.b.track_op());
    if !x.track_op() && !trains_adapter {
        return eval(kind, weight, bias, adapter, x);
    }
    let detached = adapter.map(|a| (a.a.detach(), a.b.detach(), a.scale));
    let detached = detached.as_ref().map(|(a, b, scale)| LowRank {
        a,
        b,
        scale: *scale,
    });
    let out = eval(kind, weight, bias, detached.as_ref(), &x.detach())?;
    let backward = FrozenLayerBackward {
        kind,
        weight: weight.detach(),
        scale: adapter.map_or(1.0, |a| a.scale),
    };
    match adapter {
        None => with_backward(out, &[x], backward),
        Some(ad) => with_backward(out, &[x, ad.a, ad.b], backward),
    }
}

/// `eval(x) + add` (`add` broadcast onto the output: a residual, or a per-channel bias such as
/// a ResnetBlock2D's time embedding) as one node, for a frozen layer without adapter: the graph
/// then keeps neither the layer's own output nor the sum's operands, only `x`, `add` and the sum.
pub fn forward_add(
    kind: LayerKind,
    weight: &Tensor,
    bias: Option<&Tensor>,
    x: &Tensor,
    add: &Tensor,
) -> Result<Tensor> {
    if !x.track_op() && !add.track_op() {
        return apply(kind, weight, bias, x)?.broadcast_add(add);
    }
    let out = apply(kind, weight, bias, &x.detach())?.broadcast_add(&add.detach())?;
    let backward = FrozenLayerBackward {
        kind,
        weight: weight.detach(),
        scale: 1.0,
    };
    with_backward(out, &[x, add], backward)
}

/// `grad` summed over the dims where `like` is broadcast (size 1), so it has `like`'s shape.
fn sum_to(grad: &Tensor, like: &Tensor) -> Result<Tensor> {
    let mut g = grad.clone();
    for (d, (&want, &have)) in like.dims().iter().zip(grad.dims()).enumerate() {
        if want == 1 && have != 1 {
            g = g.sum_keepdim(d)?;
        }
    }
    Ok(g)
}

/// The layer's own op with `weight`.
fn apply(kind: LayerKind, weight: &Tensor, bias: Option<&Tensor>, x: &Tensor) -> Result<Tensor> {
    match kind {
        LayerKind::Linear => candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(x),
        LayerKind::Conv { stride, padding } => {
            Conv2d::new(weight.clone(), bias.cloned(), stride, padding).forward(x)
        }
    }
}

/// `up(down(x))`: down with the layer's op into `rank` channels, up a linear / 1x1 conv.
fn low_rank(kind: LayerKind, a: &Tensor, b: &Tensor, x: &Tensor) -> Result<Tensor> {
    let down = apply(kind, a, None, x)?;
    match kind {
        LayerKind::Linear => candle_nn::Linear::new(b.clone(), None).forward(&down),
        LayerKind::Conv { .. } => Conv2d::new(b.clone(), None, 1, 0).forward(&down),
    }
}

struct FrozenLayerBackward {
    kind: LayerKind,
    weight: Tensor,
    scale: f64,
}

impl FrozenLayerBackward {
    /// The input's gradient through the frozen weight alone.
    fn base_input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        match self.kind {
            LayerKind::Linear => {
                let out = self.weight.dim(0)?;
                let rows = grad.elem_count() / out;
                grad.reshape((rows, out))?
                    .matmul(&self.weight)?
                    .reshape(x.shape())
            }
            LayerKind::Conv { stride, padding } => {
                Conv2d::new(self.weight.clone(), None, stride, padding).input_grad(grad, x.dims())
            }
        }
    }
}

impl Backward for FrozenLayerBackward {
    fn name(&self) -> &'static str {
        "frozen-layer"
    }

    fn grads(&self, args: &[&Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = args[0];
        let base = if x.track_op() {
            Some(self.base_input_grad(x, grad)?)
        } else {
            None
        };
        let (a, b) = match args {
            [_] => return Ok(vec![base]),
            [_, add] => {
                let dadd = add.track_op().then(|| sum_to(grad, add)).transpose()?;
                return Ok(vec![base, dadd]);
            }
            [_, a, b] => (a, b),
            _ => candle_core::bail!("frozen-layer: 1 to 3 arguments, got {}", args.len()),
        };
        // The low-rank branch is small: autograd over it gives dA, dB and its part of dx.
        let xv = x
            .track_op()
            .then(|| Var::from_tensor(&x.detach()))
            .transpose()?;
        let av = Var::from_tensor(&a.detach())?;
        let bv = Var::from_tensor(&b.detach())?;
        let x_in = xv
            .as_ref()
            .map_or_else(|| x.detach(), |v| v.as_tensor().clone());
        let branch = low_rank(self.kind, av.as_tensor(), bv.as_tensor(), &x_in)?;
        let mut grads = ((branch * self.scale)? * grad)?.sum_all()?.backward()?;
        let dx = match (base, xv) {
            (Some(base), Some(xv)) => match grads.remove(xv.as_tensor()) {
                Some(g) => Some((base + g)?),
                None => Some(base),
            },
            (base, _) => base,
        };
        let da = a.track_op().then(|| grads.remove(av.as_tensor())).flatten();
        let db = b.track_op().then(|| grads.remove(bv.as_tensor())).flatten();
        Ok(vec![dx, da, db])
    }
}
