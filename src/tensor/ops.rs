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

/// A number operand: an int keeps an int tensor int, a float makes it float (as in PyTorch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar {
    Int(i64),
    Float(f64),
}

impl Scalar {
    /// `tensor` in the dtype the two meet at, and the scalar as a 0-d tensor of that dtype.
    fn meet(self, tensor: &Tensor) -> Result<(Tensor, Tensor)> {
        let (value, float_scalar) = match self {
            Scalar::Int(i) => (i as f64, false),
            Scalar::Float(x) => (x, true),
        };
        let target = if float_scalar && !is_float(tensor.dtype()) {
            DType::F32
        } else {
            tensor.dtype()
        };
        let t = tensor.to_dtype(target)?;
        let s = Tensor::new(value, tensor.device())?.to_dtype(target)?;
        Ok((t, s))
    }
}

/// `tensor op scalar`, e.g. `t - 1`.
pub fn tensor_op_scalar(tensor: &Tensor, op: BinaryOp, scalar: Scalar) -> Result<Tensor> {
    let (t, s) = scalar.meet(tensor)?;
    binary(op, &t, &s)
}

/// `scalar op tensor`, e.g. `1 - t`.
pub fn scalar_op_tensor(scalar: Scalar, op: BinaryOp, tensor: &Tensor) -> Result<Tensor> {
    let (t, s) = scalar.meet(tensor)?;
    binary(op, &s, &t)
}

/// The dims of a reshape of `from` into `dims`, where one entry may be -1 (inferred).
pub fn reshape_dims(from: &[usize], dims: &[i64]) -> Result<Vec<usize>> {
    let count: usize = from.iter().product();
    let known: i64 = dims.iter().filter(|&&d| d != -1).product();
    let free = dims.iter().filter(|&&d| d == -1).count();
    if free > 1
        || dims.iter().any(|&d| d < -1)
        || (free == 1 && (known == 0 || count as i64 % known != 0))
    {
        candle_core::bail!("cannot reshape {from:?} into {dims:?}");
    }
    let resolved: Vec<usize> = dims
        .iter()
        .map(|&d| {
            if d == -1 {
                (count as i64 / known) as usize
            } else {
                d as usize
            }
        })
        .collect();
    if resolved.iter().product::<usize>() != count {
        candle_core::bail!("cannot reshape {from:?} ({count} elements) into {dims:?}");
    }
    Ok(resolved)
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

/// True when |a - b| <= atol + rtol * |b| everywhere (as `torch.allclose`); an error if the
/// shapes differ.
pub fn allclose(a: &Tensor, b: &Tensor, atol: f64, rtol: f64) -> Result<bool> {
    if a.dims() != b.dims() {
        candle_core::bail!("allclose: shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    if a.elem_count() == 0 {
        return Ok(true);
    }
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let excess = ((&a - &b)?.abs()? - ((b.abs()? * rtol)? + atol)?)?;
    Ok(excess.flatten_all()?.max(D::Minus1)?.to_scalar::<f64>()? <= 0.0)
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
    fn scalar_operands_keep_their_side_and_promote_like_torch() {
        let t = Tensor::new(&[1i64, 2, 3], &Device::Cpu).unwrap();
        let minus = tensor_op_scalar(&t, BinaryOp::Sub, Scalar::Int(1)).unwrap();
        assert_eq!(minus.dtype(), DType::I64);
        assert_eq!(minus.to_vec1::<i64>().unwrap(), [0, 1, 2]);
        let from = scalar_op_tensor(Scalar::Float(1.0), BinaryOp::Sub, &t).unwrap();
        assert_eq!(from.dtype(), DType::F32);
        assert_eq!(from.to_vec1::<f32>().unwrap(), [0.0, -1.0, -2.0]);
    }

    #[test]
    fn reshape_dims_infer_one_free_dim() {
        assert_eq!(reshape_dims(&[2, 3], &[-1, 2]).unwrap(), [3, 2]);
        assert!(reshape_dims(&[2, 3], &[-1, -1]).is_err());
        assert!(reshape_dims(&[2, 3], &[4, -1]).is_err());
        let err = reshape_dims(&[2, 3], &[4, 4]).unwrap_err().to_string();
        assert!(err.contains("(6 elements)"), "{err}");
    }

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
