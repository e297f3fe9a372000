//! Layers with a backward pass where candle-nn's fused versions have none.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// LayerNorm over the last dim, built from differentiable ops (candle-nn's fused LayerNorm
/// on contiguous input has no backward). Statistics in f32 for half-precision inputs.
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
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
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
