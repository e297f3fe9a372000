//! Norm layers with a backward pass (candle-nn's fused versions have none) that keep only
//! their input and output in a graph.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::tensor::recompute::recompute;

/// LayerNorm over the last dim, built from differentiable ops (candle-nn's fused LayerNorm
/// on contiguous input has no backward). Statistics in f32 for half-precision inputs. In a
/// graph it is one node that keeps its input and output and recomputes the rest in backward.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }

    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    fn eval(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = if dtype == DType::F16 || dtype == DType::BF16 {
            x.to_dtype(DType::F32)?
        } else {
            x.clone()
        };
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered
            .broadcast_div(&(var + eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        normed.broadcast_mul(weight)?.broadcast_add(bias)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let eps = self.eps;
        recompute(
            "layer-norm",
            &[x, &self.weight, &self.bias],
            Arc::new(move |t| Self::eval(&t[0], &t[1], &t[2], eps)),
        )
    }
}

/// GroupNorm over dim 1 (what candle-nn's computes), optionally followed by SiLU as one op.
/// In a graph it keeps only its input and output: backward recomputes the statistics.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "{}: {channels} channels do not split into {groups} groups",
                vb.prefix()
            );
        }
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?,
            groups,
            eps,
        })
    }

    /// `silu(norm(x))`, the pre-activation of every ResnetBlock2D conv.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (groups, eps) = (self.groups, self.eps);
        recompute(
            if silu {
                "group-norm-silu"
            } else {
                "group-norm"
            },
            &[x, &self.weight, &self.bias],
            Arc::new(move |t| {
                let y = Self::eval(&t[0], &t[1], &t[2], groups, eps)?;
                if silu {
                    y.silu()
                } else {
                    Ok(y)
                }
            }),
        )
    }

    fn eval(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        if c != weight.dim(0)? {
            candle_core::bail!(
                "group norm: input has {c} channels, the weight {}",
                weight.dim(0)?
            );
        }
        let dtype = x.dtype();
        let grouped = x.reshape((b, groups, ()))?;
        let grouped = if dtype == DType::F16 || dtype == DType::BF16 {
            grouped.to_dtype(DType::F32)?
        } else {
            grouped
        };
        let n = grouped.dim(2)? as f64;
        let mean = (grouped.sum_keepdim(2)? / n)?;
        let centered = grouped.broadcast_sub(&mean)?;
        let var = (centered.sqr()?.sum_keepdim(2)? / n)?;
        let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
        let mut channel_dims = vec![1; dims.len()];
        channel_dims[1] = c;
        normed
            .to_dtype(dtype)?
            .reshape(dims)?
            .broadcast_mul(&weight.reshape(channel_dims.clone())?)?
            .broadcast_add(&bias.reshape(channel_dims)?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

/// Softmax over the last dim with a backward pass.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn layer_norm_normalizes_and_has_gradient() {
        let x =
            Var::from_tensor(&Tensor::new(&[[1f32, 2., 4.], [0., -1., 3.]], &Device::Cpu).unwrap())
                .unwrap();
        let ln = LayerNorm::from_tensors(
            Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            1e-5,
        );
        let y = ln.forward(x.as_tensor()).unwrap();
        let m = y.mean(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(m.iter().all(|v| v.abs() < 1e-5));
        let w = Tensor::new(&[[1f32, 0., 0.], [0., 0., 1.]], &Device::Cpu).unwrap();
        let grads = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("gradient reaches the input");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}
