//! Tensor operations with PyTorch semantics where candle's differ: dtype promotion for mixed
//! int/float arithmetic, sort along any dim, gather with a smaller index, scalar operands.

use candle_core::{DType, Result, Tensor, D};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    /// The operation's name in error messages.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "subtract",
            BinaryOp::Mul => "multiply",
            BinaryOp::Div => "divide",
        }
    }
}

pub fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// The dtype two operands meet at, as PyTorch promotes: int with float gives the float,
/// two floats give the wider one.
pub fn promoted_dtype(a: DType, b: DType) -> DType {
    if a == b {
        return a;
    }
    match (is_float(a), is_float(b)) {
        (true, false) => a,
        (false, true) => b,
        (false, false) => DType::I64,
        (true, true) => {
            if a.size_in_bytes() > b.size_in_bytes() {
                a
            } else if b.size_in_bytes() > a.size_in_bytes() {
                b
            } else {
                DType::F32
            }
        }
    }
}

/// Broadcasting binary op with dtype promotion. Division of integers is true division (f32).
pub fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut dtype = promoted_dtype(a.dtype(), b.dtype());
    if op == BinaryOp::Div && !is_float(dtype) {
        dtype = DType::F32;
    }
    let a = a.to_dtype(dtype)?;
    let b = b.to_dtype(dtype)?;
    match op {
        BinaryOp::Add => a.broadcast_add(&b),
        BinaryOp::Sub => a.broadcast_sub(&b),
        BinaryOp::Mul => a.broadcast_mul(&b),
        BinaryOp::Div => a.broadcast_div(&b),
    }
}

/// A 0-d tensor holding `value` in `like`'s dtype and device (float scalars make int tensors
/// float first, like PyTorch).
fn scalar_like(like: &Tensor, value: f64, value_is_float: bool) -> Result<(Tensor, Tensor)> {
    let target = if value_is_float && !is_float(like.dtype()) {
        DType::F32
    } else {
        like.dtype()
    };
    let t = like.to_dtype(target)?;
    let s = Tensor::new(value, like.device())?.to_dtype(target)?;
    Ok((t, s))
}

/// `t op value` (or `value op t` when `scalar_first`).
pub fn scalar(
    op: BinaryOp,
    t: &Tensor,
    value: f64,
    value_is_float: bool,
    scalar_first: bool,
) -> Result<Tensor> {
    let (t, s) = scalar_like(t, value, value_is_float)?;
    if scalar_first {
        binary(op, &s, &t)
    } else {
        binary(op, &t, &s)
    }
}

/// Normalize a possibly negative dim.
pub fn resolve_dim(t: &Tensor, dim: i64) -> Result<usize> {
    let rank = t.rank() as i64;
    let d = if dim < 0 { dim + rank } else { dim };
    if d < 0 || d >= rank.max(1) {
        candle_core::bail!("dim {dim} is out of range for a tensor of rank {rank}");
    }
    Ok(d as usize)
}

/// Sort along `dim`: (values, i64 indices), like `torch.sort`.
pub fn sort(t: &Tensor, dim: usize, descending: bool) -> Result<(Tensor, Tensor)> {
    let last = t.rank() - 1;
    let moved = if dim == last {
        t.clone()
    } else {
        t.transpose(dim, last)?.contiguous()?
    };
    let indices = moved.arg_sort_last_dim(!descending)?;
    let values = moved.contiguous()?.gather(&indices, last)?;
    let indices = indices.to_dtype(DType::I64)?;
    if dim == last {
        Ok((values, indices))
    } else {
        Ok((
            values.transpose(dim, last)?.contiguous()?,
            indices.transpose(dim, last)?.contiguous()?,
        ))
    }
}

/// `torch.gather`: the index may be smaller than the input in every dim but `dim`.
pub fn gather(t: &Tensor, dim: usize, index: &Tensor) -> Result<Tensor> {
    if index.rank() != t.rank() {
        candle_core::bail!(
            "gather: index has rank {} but the input has rank {} (shapes {:?} and {:?})",
            index.rank(),
            t.rank(),
            index.dims(),
            t.dims()
        );
    }
    let mut input = t.clone();
    for (d, (&n_idx, &n_in)) in index.dims().iter().zip(t.dims()).enumerate() {
        if d == dim {
            continue;
        }
        if n_idx > n_in {
            candle_core::bail!(
                "gather: index size {n_idx} exceeds input size {n_in} in dim {d} (index {:?}, input {:?})",
                index.dims(),
                t.dims()
            );
        }
        if n_idx < n_in {
            input = input.narrow(d, 0, n_idx)?;
        }
    }
    input.contiguous()?.gather(&index.contiguous()?, dim)
}

/// Softmax with a backward pass (candle_nn's `softmax_last_dim` has none).
pub fn softmax(t: &Tensor, dim: usize) -> Result<Tensor> {
    let max = t.max_keepdim(dim)?.detach();
    let e = t.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(dim)?)
}

pub fn log_softmax(t: &Tensor, dim: usize) -> Result<Tensor> {
    let max = t.max_keepdim(dim)?.detach();
    let shifted = t.broadcast_sub(&max)?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(dim)?.log()?)
}

/// `log(1 + exp(x))` without overflow: max(x, 0) + log1p(exp(-|x|)).
pub fn softplus(t: &Tensor) -> Result<Tensor> {
    let relu = t.relu()?;
    let neg_abs = t.abs()?.neg()?;
    relu + (neg_abs.exp()? + 1.0)?.log()?
}

/// Classifier-free guidance over a doubled batch [cond; uncond]: u + g·(c − u) for each half.
pub fn cfg_guided(doubled: &Tensor, guidance: f64) -> Result<Tensor> {
    let n = doubled.dim(0)? / 2;
    let cond = doubled.narrow(0, 0, n)?;
    let uncond = doubled.narrow(0, n, n)?;
    &uncond + ((cond - &uncond)? * guidance)?
}

/// Largest absolute elementwise difference; an error if shapes differ.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        candle_core::bail!(
            "max_abs_diff: shapes differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        );
    }
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    if a.elem_count() == 0 {
        return Ok(0.0);
    }
    (a - b)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f64>()
}

/// Every element as f64, row-major (for printing and conversion to script values).
pub fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sort_matches_torch_on_dim0() {
        let t = Tensor::new(&[[3f32, 1.], [1., 5.], [2., 0.]], &Device::Cpu).unwrap();
        let (v, i) = sort(&t, 0, true).unwrap();
        assert_eq!(
            v.to_vec2::<f32>().unwrap(),
            vec![vec![3., 5.], vec![2., 1.], vec![1., 0.]]
        );
        assert_eq!(
            i.to_vec2::<i64>().unwrap(),
            vec![vec![0, 1], vec![2, 0], vec![1, 2]]
        );
    }

    #[test]
    fn gather_with_smaller_index() {
        let t = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.], [7., 8., 9.]], &Device::Cpu).unwrap();
        let idx = Tensor::new(&[[2i64, 0]], &Device::Cpu).unwrap();
        let g = gather(&t, 1, &idx).unwrap();
        assert_eq!(g.to_vec2::<f32>().unwrap(), vec![vec![3., 1.]]);
    }

    #[test]
    fn softplus_is_finite_at_extremes() {
        let t = Tensor::new(&[-100.3f32, 0., 100.3], &Device::Cpu).unwrap();
        let v = softplus(&t).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (v[0] - 0.0).abs() < 1e-6
                && (v[1] - 2f32.ln()).abs() < 1e-6
                && (v[2] - 100.3).abs() < 1e-4
        );
    }

    #[test]
    fn int_division_is_true_division() {
        let a = Tensor::new(&[1i64, 3], &Device::Cpu).unwrap();
        let b = Tensor::new(&[2i64, 2], &Device::Cpu).unwrap();
        let q = binary(BinaryOp::Div, &a, &b).unwrap();
        assert_eq!(q.to_vec1::<f32>().unwrap(), vec![0.5, 1.5]);
    }
}
