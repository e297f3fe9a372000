//! Tensors in scripts: construction, arithmetic with broadcasting and int/float scalars on
//! either side, reductions, shape ops and PyTorch-style sort/gather.

use rhai::plugin::*;

mod helpers {
    use candle_core::{DType, Tensor};
    use rhai::{Array, Dynamic, NativeCallContext};

    use crate::script::convert::{dynamic_f64, tensor_from_dynamic};
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;
    use crate::tensor::ops::{self, resolve_dim, BinaryOp, Scalar};

    /// Elements of `start..end`.
    pub(super) fn range_len(start: i64, end: i64) -> usize {
        end.saturating_sub(start).max(0) as usize
    }

    /// An error before allocating a tensor of `dims` beyond `--max-tensor-memory`.
    pub(super) fn fits(
        ctx: &NativeCallContext,
        what: &str,
        dims: &[usize],
        dtype: DType,
    ) -> ScriptResult<()> {
        Host::of(ctx)
            .check_tensor_size(what, dims, dtype)
            .or_script(ctx)
    }

    /// `fits` for the broadcast result of `a` and `b` (a shape mismatch is left to the op).
    pub(super) fn broadcast_fits(
        ctx: &NativeCallContext,
        what: &'static str,
        a: &Tensor,
        b: &Tensor,
    ) -> ScriptResult<()> {
        match a.shape().broadcast_shape_binary_op(b.shape(), what) {
            Ok(shape) => fits(
                ctx,
                what,
                shape.dims(),
                ops::promoted_dtype(a.dtype(), b.dtype()),
            ),
            Err(_) => Ok(()),
        }
    }

    /// `a op b` with broadcasting and dtype promotion.
    pub(super) fn tensor_op_tensor(
        ctx: &NativeCallContext,
        a: &Tensor,
        op: BinaryOp,
        b: &Tensor,
    ) -> ScriptResult<Tensor> {
        broadcast_fits(ctx, op.name(), a, b)?;
        ops::binary(op, a, b).or_script(ctx)
    }

    /// `tensor op scalar` (`t - 1`).
    pub(super) fn tensor_op_scalar(
        ctx: &NativeCallContext,
        tensor: &Tensor,
        op: BinaryOp,
        scalar: Scalar,
    ) -> ScriptResult<Tensor> {
        ops::tensor_op_scalar(tensor, op, scalar).or_script(ctx)
    }

    /// `scalar op tensor` (`1 - t`).
    pub(super) fn scalar_op_tensor(
        ctx: &NativeCallContext,
        scalar: Scalar,
        op: BinaryOp,
        tensor: &Tensor,
    ) -> ScriptResult<Tensor> {
        ops::scalar_op_tensor(scalar, op, tensor).or_script(ctx)
    }

    /// An error before a matmul whose result `[batch.., m, n]` would not fit (a shape
    /// mismatch is left to the op).
    pub(super) fn matmul_fits(ctx: &NativeCallContext, a: &Tensor, b: &Tensor) -> ScriptResult<()> {
        let (Some((&m, a_batch)), Some((&n, b_rest))) = (
            a.dims().split_last().and_then(|(_, d)| d.split_last()),
            b.dims().split_last(),
        ) else {
            return Ok(());
        };
        let b_batch = b_rest.split_last().map(|(_, d)| d).unwrap_or(&[]);
        let batch = candle_core::Shape::from(a_batch)
            .broadcast_shape_binary_op(&candle_core::Shape::from(b_batch), "matmul");
        match batch {
            Ok(batch) => {
                let dims: Vec<usize> = batch.dims().iter().copied().chain([m, n]).collect();
                let dtype = ops::promoted_dtype(a.dtype(), b.dtype());
                fits(ctx, "matmul", &dims, dtype)
            }
            Err(_) => Ok(()),
        }
    }

    /// `t` itself if it is float, else as f32 (ops that are only defined on floats).
    pub(super) fn float_tensor(ctx: &NativeCallContext, t: &Tensor) -> ScriptResult<Tensor> {
        if ops::is_float(t.dtype()) {
            Ok(t.clone())
        } else {
            t.to_dtype(DType::F32).or_script(ctx)
        }
    }

    /// The u8 mask of `t op other` (a number or a tensor, broadcasting).
    pub(super) fn compare(
        ctx: &NativeCallContext,
        t: &Tensor,
        other: &Dynamic,
        op: candle_core::op::CmpOp,
    ) -> ScriptResult<Tensor> {
        let rhs = match dynamic_f64(other) {
            Some(v) => Tensor::new(v, t.device())
                .and_then(|s| s.to_dtype(t.dtype()))
                .or_script(ctx)?,
            None => tensor_from_dynamic(other, t.device()).or_script(ctx)?,
        };
        let dtype = ops::promoted_dtype(t.dtype(), rhs.dtype());
        let (a, b) = (
            t.to_dtype(dtype).or_script(ctx)?,
            rhs.to_dtype(dtype).or_script(ctx)?,
        );
        let shape = a
            .shape()
            .broadcast_shape_binary_op(b.shape(), "compare")
            .or_script(ctx)?;
        fits(ctx, "compare", shape.dims(), dtype)?;
        let (a, b) = (
            a.broadcast_as(shape.clone()).or_script(ctx)?,
            b.broadcast_as(shape).or_script(ctx)?,
        );
        a.cmp(&b, op).or_script(ctx)
    }

    /// An index tensor as i64; float indices are an error (as in PyTorch), not truncated.
    pub(super) fn int_index(
        ctx: &NativeCallContext,
        idx: &Tensor,
        what: &str,
    ) -> ScriptResult<Tensor> {
        if ops::is_float(idx.dtype()) {
            return Err(format!(
                "{what}: index must be an int tensor, got {}",
                idx.dtype().as_str()
            ))
            .or_script(ctx);
        }
        idx.to_dtype(DType::I64).or_script(ctx)
    }

    pub(super) fn dim_of(ctx: &NativeCallContext, t: &Tensor, dim: i64) -> ScriptResult<usize> {
        resolve_dim(t, dim).or_script(ctx)
    }

    /// The tensors of a non-empty array, promoted to one dtype (`cat`, `stack`).
    pub(super) fn same_dtype_tensors(
        ctx: &NativeCallContext,
        items: &Array,
        what: &str,
    ) -> ScriptResult<Vec<Tensor>> {
        if items.is_empty() {
            return Err(format!("{what}: needs at least one tensor")).or_script(ctx);
        }
        let device = Host::of(ctx).device;
        let ts = items
            .iter()
            .map(|v| tensor_from_dynamic(v, &device))
            .collect::<Result<Vec<_>, _>>()
            .or_script(ctx)?;
        let dtype = ts
            .iter()
            .skip(1)
            .fold(ts[0].dtype(), |acc, t| ops::promoted_dtype(acc, t.dtype()));
        ts.into_iter()
            .map(|t| t.to_dtype(dtype))
            .collect::<Result<Vec<_>, _>>()
            .or_script(ctx)
    }
}

#[export_module]
pub mod tensor_api {
    use super::helpers::*;
    use candle_core::{DType, Tensor};
    use rhai::{Array, Dynamic, Map};

    use crate::script::convert::{
        dynamic_f64, shape_from_array, shape_to_array, tensor_from_dynamic, tensor_item,
        tensor_to_dynamic,
    };
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;
    use crate::tensor::ops::{self, resolve_dim, BinaryOp, Scalar};
    use crate::tensor::{format, parse_device, parse_dtype};

    // ---- construction ----

    /// A tensor from a (nested) array: all ints give i64, any float gives f32.
    #[rhai_fn(return_raw)]
    pub fn tensor(ctx: NativeCallContext, values: Dynamic) -> ScriptResult<Tensor> {
        tensor_from_dynamic(&values, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// f32 zeros of `shape`.
    #[rhai_fn(return_raw)]
    pub fn zeros(ctx: NativeCallContext, shape: Array) -> ScriptResult<Tensor> {
        let dims = shape_from_array(&shape).or_script(&ctx)?;
        fits(&ctx, "zeros", &dims, DType::F32)?;
        Tensor::zeros(dims, DType::F32, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// f32 ones of `shape`.
    #[rhai_fn(return_raw)]
    pub fn ones(ctx: NativeCallContext, shape: Array) -> ScriptResult<Tensor> {
        let dims = shape_from_array(&shape).or_script(&ctx)?;
        fits(&ctx, "ones", &dims, DType::F32)?;
        Tensor::ones(dims, DType::F32, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// f32 tensor of `shape` filled with `value`.
    #[rhai_fn(return_raw, name = "full")]
    pub fn full(ctx: NativeCallContext, shape: Array, value: Dynamic) -> ScriptResult<Tensor> {
        let dims = shape_from_array(&shape).or_script(&ctx)?;
        let v = dynamic_f64(&value)
            .ok_or("full: value must be a number")
            .or_script(&ctx)?;
        fits(&ctx, "full", &dims, DType::F32)?;
        Tensor::full(v as f32, dims, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// f32 values start, start+1, ..., end-1.
    #[rhai_fn(return_raw)]
    pub fn arange(ctx: NativeCallContext, start: i64, end: i64) -> ScriptResult<Tensor> {
        fits(&ctx, "arange", &[range_len(start, end)], DType::I64)?;
        Tensor::arange(start, end, &Host::of(&ctx).device)
            .and_then(|t| t.to_dtype(DType::F32))
            .or_script(&ctx)
    }

    /// i64 values start, start+1, ..., end-1 (ids, timesteps).
    #[rhai_fn(return_raw)]
    pub fn arange_int(ctx: NativeCallContext, start: i64, end: i64) -> ScriptResult<Tensor> {
        fits(&ctx, "arange_int", &[range_len(start, end)], DType::I64)?;
        Tensor::arange(start, end, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// f32 tensor of `n` values evenly spaced from `start` to `end` inclusive.
    #[rhai_fn(return_raw)]
    pub fn linspace(
        ctx: NativeCallContext,
        start: Dynamic,
        end: Dynamic,
        n: i64,
    ) -> ScriptResult<Tensor> {
        let (a, b) = (dynamic_f64(&start), dynamic_f64(&end));
        let (Some(a), Some(b)) = (a, b) else {
            return Err("linspace: start and end must be numbers").or_script(&ctx);
        };
        if n < 1 {
            return Err(format!("linspace: n must be >= 1, got {n}")).or_script(&ctx);
        }
        fits(&ctx, "linspace", &[n as usize], DType::F32)?;
        let step = if n > 1 { (b - a) / (n - 1) as f64 } else { 0.0 };
        let v: Vec<f32> = (0..n).map(|i| (a + step * i as f64) as f32).collect();
        Tensor::from_vec(v, n as usize, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// Zeros with the shape, dtype and device of `t`.
    #[rhai_fn(return_raw, pure)]
    pub fn zeros_like(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        t.zeros_like().or_script(&ctx)
    }

    /// Ones with the shape, dtype and device of `t`.
    #[rhai_fn(return_raw, pure)]
    pub fn ones_like(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        t.ones_like().or_script(&ctx)
    }

    // ---- inspection ----

    /// The shape as an array of ints.
    #[rhai_fn(get = "shape", pure)]
    pub fn shape(t: &mut Tensor) -> Array {
        shape_to_array(t.dims())
    }

    /// The dtype name: f32, f16, bf16, f64, i64, u32, u8.
    #[rhai_fn(get = "dtype", pure)]
    pub fn dtype(t: &mut Tensor) -> String {
        t.dtype().as_str().to_string()
    }

    /// The device the tensor lives on: cpu, cuda:N.
    #[rhai_fn(get = "device", pure)]
    pub fn tensor_device(t: &mut Tensor) -> String {
        crate::tensor::device::device_name(t.device())
    }

    /// Number of dimensions.
    #[rhai_fn(get = "rank", pure)]
    pub fn rank(t: &mut Tensor) -> i64 {
        t.rank() as i64
    }

    /// Number of elements.
    #[rhai_fn(get = "numel", pure)]
    pub fn numel(t: &mut Tensor) -> i64 {
        t.elem_count() as i64
    }

    /// The values as nested arrays (ints for integer dtypes, floats otherwise).
    #[rhai_fn(return_raw, pure)]
    pub fn to_array(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Dynamic> {
        tensor_to_dynamic(t).or_script(&ctx)
    }

    /// The single value of a one-element tensor.
    #[rhai_fn(return_raw, pure)]
    pub fn item(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Dynamic> {
        tensor_item(t).or_script(&ctx)
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn to_string(t: &mut Tensor) -> String {
        format::summary(t)
    }

    /// Convert to a dtype by name (`"f16"`, `"bf16"`, `"f32"`, `"i64"`, ...).
    #[rhai_fn(return_raw, pure)]
    pub fn to_dtype(ctx: NativeCallContext, t: &mut Tensor, dtype: &str) -> ScriptResult<Tensor> {
        let d = parse_dtype(dtype).or_script(&ctx)?;
        t.to_dtype(d).or_script(&ctx)
    }

    /// Move to a device by name (`"cpu"`, `"cuda:0"`).
    #[rhai_fn(return_raw, pure)]
    pub fn to_device(ctx: NativeCallContext, t: &mut Tensor, device: &str) -> ScriptResult<Tensor> {
        let d = parse_device(device).or_script(&ctx)?;
        t.to_device(&d).or_script(&ctx)
    }

    /// The same values cut from the autograd graph.
    #[rhai_fn(pure)]
    pub fn detach(t: &mut Tensor) -> Tensor {
        t.detach()
    }

    // ---- arithmetic ----

    #[rhai_fn(return_raw, name = "+")]
    pub fn add_tt(ctx: NativeCallContext, a: Tensor, b: Tensor) -> ScriptResult<Tensor> {
        tensor_op_tensor(&ctx, &a, BinaryOp::Add, &b)
    }
    #[rhai_fn(return_raw, name = "-")]
    pub fn sub_tt(ctx: NativeCallContext, a: Tensor, b: Tensor) -> ScriptResult<Tensor> {
        tensor_op_tensor(&ctx, &a, BinaryOp::Sub, &b)
    }
    #[rhai_fn(return_raw, name = "*")]
    pub fn mul_tt(ctx: NativeCallContext, a: Tensor, b: Tensor) -> ScriptResult<Tensor> {
        tensor_op_tensor(&ctx, &a, BinaryOp::Mul, &b)
    }
    #[rhai_fn(return_raw, name = "/")]
    pub fn div_tt(ctx: NativeCallContext, a: Tensor, b: Tensor) -> ScriptResult<Tensor> {
        tensor_op_tensor(&ctx, &a, BinaryOp::Div, &b)
    }

    #[rhai_fn(return_raw, name = "+")]
    pub fn add_tf(ctx: NativeCallContext, a: Tensor, b: f64) -> ScriptResult<Tensor> {
        tensor_op_scalar(&ctx, &a, BinaryOp::Add, Scalar::Float(b))
    }
    #[rhai_fn(return_raw, name = "-")]
    pub fn sub_tf(ctx: NativeCallContext, a: Tensor, b: f64) -> ScriptResult<Tensor> {
        tensor_op_scalar(&ctx, &a, BinaryOp::Sub, Scalar::Float(b))
    }
    #[rhai_fn(return_raw, name = "*")]
    pub fn mul_tf(ctx: NativeCallContext, a: Tensor, b: f64) -> ScriptResult<Tensor> {
        tensor_op_scalar(&ctx, &a, BinaryOp::Mul, Scalar::Float(b))
    }
    #[rhai_fn(return_raw, name = "/")]
    pub fn div_tf(ctx: NativeCallContext, a: Tensor, b: f64) -> ScriptResult<Tensor> {
        tensor_op_scalar(&ctx, &a, BinaryOp::Div, Scalar::Float(b))
    }

    #[rhai_fn(return_raw, name = "+")]
    pub fn add_ft(ctx: NativeCallContext, a: f64, b: Tensor) -> ScriptResult<Tensor> {
        scalar_op_tensor(&ctx, Scalar::Float(a), BinaryOp::Add, &b)
    }
    #[rhai_fn(return_raw, name = "-")]
    pub fn sub_ft(ctx: NativeCallContext, a: f64, b: Tensor) -> ScriptResult<Tensor> {
        scalar_op_tensor(&ctx, Scalar::Float(a), BinaryOp::Sub, &b)
    }
    #[rhai_fn(return_raw, name = "*")]
    pub fn mul_ft(ctx: NativeCallContext, a: f64, b: Tensor) -> ScriptResult<Tensor> {
        scalar_op_tensor(&ctx, Scalar::Float(a), BinaryOp::Mul, &b)
    }
    #[rhai_fn(return_raw, name = "/")]
    pub fn div_ft(ctx: NativeCallContext, a: f64, b: Tensor) -> ScriptResult<Tensor> {
        scalar_op_tensor(&ctx, Scalar::Float(a), BinaryOp::Div, &b)
    }

    #[rhai_fn(return_raw, name = "+")]
    pub fn add_ti(ctx: NativeCallContext, a: Tensor, b: i64) -> ScriptResult<Tensor> {
        tensor_op_scalar(&ctx, &a, BinaryOp::Add, Scalar::Int(b))
    }
    #[rhai_fn(return_raw, name = "-")]
    pub fn sub_ti(ctx: NativeCallContext, a: Tensor, b: i64) -> ScriptResult<Tensor> {
        tensor_op_scalar(&ctx, &a, BinaryOp::Sub, Scalar::Int(b))
    }
    #[rhai_fn(return_raw, name = "*")]
    pub fn mul_ti(ctx: NativeCallContext, a: Tensor, b: i64) -> ScriptResult<Tensor> {
        tensor_op_scalar(&ctx, &a, BinaryOp::Mul, Scalar::Int(b))
    }
    #[rhai_fn(return_raw, name = "/")]
    pub fn div_ti(ctx: NativeCallContext, a: Tensor, b: i64) -> ScriptResult<Tensor> {
        tensor_op_scalar(&ctx, &a, BinaryOp::Div, Scalar::Int(b))
    }

    #[rhai_fn(return_raw, name = "+")]
    pub fn add_it(ctx: NativeCallContext, a: i64, b: Tensor) -> ScriptResult<Tensor> {
        scalar_op_tensor(&ctx, Scalar::Int(a), BinaryOp::Add, &b)
    }
    #[rhai_fn(return_raw, name = "-")]
    pub fn sub_it(ctx: NativeCallContext, a: i64, b: Tensor) -> ScriptResult<Tensor> {
        scalar_op_tensor(&ctx, Scalar::Int(a), BinaryOp::Sub, &b)
    }
    #[rhai_fn(return_raw, name = "*")]
    pub fn mul_it(ctx: NativeCallContext, a: i64, b: Tensor) -> ScriptResult<Tensor> {
        scalar_op_tensor(&ctx, Scalar::Int(a), BinaryOp::Mul, &b)
    }
    #[rhai_fn(return_raw, name = "/")]
    pub fn div_it(ctx: NativeCallContext, a: i64, b: Tensor) -> ScriptResult<Tensor> {
        scalar_op_tensor(&ctx, Scalar::Int(a), BinaryOp::Div, &b)
    }

    /// Negation.
    #[rhai_fn(return_raw, name = "-")]
    pub fn neg(ctx: NativeCallContext, t: Tensor) -> ScriptResult<Tensor> {
        t.neg().or_script(&ctx)
    }

    /// Elementwise power with a scalar exponent.
    #[rhai_fn(return_raw, name = "**", name = "pow")]
    pub fn pow(ctx: NativeCallContext, t: Tensor, exponent: Dynamic) -> ScriptResult<Tensor> {
        let e = dynamic_f64(&exponent)
            .ok_or("pow: exponent must be a number")
            .or_script(&ctx)?;
        float_tensor(&ctx, &t)?.powf(e).or_script(&ctx)
    }

    /// Matrix product (batched, broadcasting over leading dims).
    #[rhai_fn(return_raw, pure)]
    pub fn matmul(ctx: NativeCallContext, a: &mut Tensor, b: Tensor) -> ScriptResult<Tensor> {
        matmul_fits(&ctx, a, &b)?;
        a.broadcast_matmul(&b)
            .map_err(|e| {
                format!(
                    "matmul: cannot multiply {}{:?} by {}{:?}: {e}",
                    a.dtype().as_str(),
                    a.dims(),
                    b.dtype().as_str(),
                    b.dims()
                )
            })
            .or_script(&ctx)
    }

    // ---- elementwise ----

    #[rhai_fn(return_raw, pure)]
    pub fn exp(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        float_tensor(&ctx, t)?.exp().or_script(&ctx)
    }
    #[rhai_fn(return_raw, pure)]
    pub fn log(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        float_tensor(&ctx, t)?.log().or_script(&ctx)
    }
    #[rhai_fn(return_raw, pure)]
    pub fn sqrt(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        float_tensor(&ctx, t)?.sqrt().or_script(&ctx)
    }
    #[rhai_fn(return_raw, pure)]
    pub fn abs(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        t.abs().or_script(&ctx)
    }
    #[rhai_fn(return_raw, pure)]
    pub fn square(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        t.sqr().or_script(&ctx)
    }
    #[rhai_fn(return_raw, pure)]
    pub fn tanh(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        float_tensor(&ctx, t)?.tanh().or_script(&ctx)
    }
    #[rhai_fn(return_raw, pure)]
    pub fn sin(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        float_tensor(&ctx, t)?.sin().or_script(&ctx)
    }
    #[rhai_fn(return_raw, pure)]
    pub fn cos(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        float_tensor(&ctx, t)?.cos().or_script(&ctx)
    }
    #[rhai_fn(return_raw, pure)]
    pub fn relu(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        t.relu().or_script(&ctx)
    }
    #[rhai_fn(return_raw, pure)]
    pub fn silu(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        float_tensor(&ctx, t)?.silu().or_script(&ctx)
    }

    /// 1 / (1 + exp(-t)).
    #[rhai_fn(return_raw, pure)]
    pub fn sigmoid(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        let t = float_tensor(&ctx, t)?;
        ((t.neg().and_then(|n| n.exp())).and_then(|e| e + 1.0))
            .and_then(|d| d.recip())
            .or_script(&ctx)
    }

    /// log(1 + exp(t)), finite for large |t|.
    #[rhai_fn(return_raw, pure)]
    pub fn softplus(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        ops::softplus(&float_tensor(&ctx, t)?).or_script(&ctx)
    }

    /// Softmax along `dim` (differentiable).
    #[rhai_fn(return_raw, pure)]
    pub fn softmax(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let d = resolve_dim(t, dim).or_script(&ctx)?;
        ops::softmax(&float_tensor(&ctx, t)?, d).or_script(&ctx)
    }

    /// Log-softmax along `dim`.
    #[rhai_fn(return_raw, pure)]
    pub fn log_softmax(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let d = resolve_dim(t, dim).or_script(&ctx)?;
        ops::log_softmax(&float_tensor(&ctx, t)?, d).or_script(&ctx)
    }

    /// Clamp every value into [lo, hi] (ints or floats).
    #[rhai_fn(return_raw, pure)]
    pub fn clamp(
        ctx: NativeCallContext,
        t: &mut Tensor,
        lo: Dynamic,
        hi: Dynamic,
    ) -> ScriptResult<Tensor> {
        let (Some(lo), Some(hi)) = (dynamic_f64(&lo), dynamic_f64(&hi)) else {
            return Err("clamp: bounds must be numbers").or_script(&ctx);
        };
        if lo > hi {
            return Err(format!("clamp: lower bound {lo} exceeds upper bound {hi}"))
                .or_script(&ctx);
        }
        t.clamp(lo, hi).or_script(&ctx)
    }

    // ---- comparisons (u8 masks) ----

    /// u8 mask of t > other (scalar or tensor).
    #[rhai_fn(return_raw, pure)]
    pub fn gt(ctx: NativeCallContext, t: &mut Tensor, other: Dynamic) -> ScriptResult<Tensor> {
        compare(&ctx, t, &other, candle_core::op::CmpOp::Gt)
    }
    /// u8 mask of t < other.
    #[rhai_fn(return_raw, pure)]
    pub fn lt(ctx: NativeCallContext, t: &mut Tensor, other: Dynamic) -> ScriptResult<Tensor> {
        compare(&ctx, t, &other, candle_core::op::CmpOp::Lt)
    }
    /// u8 mask of t >= other.
    #[rhai_fn(return_raw, pure)]
    pub fn ge(ctx: NativeCallContext, t: &mut Tensor, other: Dynamic) -> ScriptResult<Tensor> {
        compare(&ctx, t, &other, candle_core::op::CmpOp::Ge)
    }
    /// u8 mask of t <= other.
    #[rhai_fn(return_raw, pure)]
    pub fn le(ctx: NativeCallContext, t: &mut Tensor, other: Dynamic) -> ScriptResult<Tensor> {
        compare(&ctx, t, &other, candle_core::op::CmpOp::Le)
    }
    /// u8 mask of t == other.
    #[rhai_fn(return_raw, pure, name = "eq")]
    pub fn eq_mask(ctx: NativeCallContext, t: &mut Tensor, other: Dynamic) -> ScriptResult<Tensor> {
        compare(&ctx, t, &other, candle_core::op::CmpOp::Eq)
    }

    /// Elementwise `mask ? a : b` (broadcasting).
    #[rhai_fn(return_raw)]
    pub fn where_cond(
        ctx: NativeCallContext,
        mask: Tensor,
        a: Tensor,
        b: Tensor,
    ) -> ScriptResult<Tensor> {
        let shape = mask
            .shape()
            .broadcast_shape_binary_op(a.shape(), "where")
            .and_then(|s| s.broadcast_shape_binary_op(b.shape(), "where"))
            .or_script(&ctx)?;
        let dtype = ops::promoted_dtype(a.dtype(), b.dtype());
        fits(&ctx, "where_cond", shape.dims(), dtype)?;
        let run = || -> candle_core::Result<Tensor> {
            mask.broadcast_as(shape.clone())?.where_cond(
                &a.to_dtype(dtype)?.broadcast_as(shape.clone())?,
                &b.to_dtype(dtype)?.broadcast_as(shape.clone())?,
            )
        };
        run().or_script(&ctx)
    }

    // ---- reductions ----

    /// Sum of every element (0-d tensor).
    #[rhai_fn(return_raw, name = "sum", pure)]
    pub fn sum_all(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        t.sum_all().or_script(&ctx)
    }
    /// Sum along `dim` (the dim is removed).
    #[rhai_fn(return_raw, name = "sum", pure)]
    pub fn sum_dim(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        t.sum(d).or_script(&ctx)
    }
    /// Mean of every element (0-d tensor).
    #[rhai_fn(return_raw, name = "mean", pure)]
    pub fn mean_all(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        float_tensor(&ctx, t)?.mean_all().or_script(&ctx)
    }
    /// Mean along `dim` (the dim is removed).
    #[rhai_fn(return_raw, name = "mean", pure)]
    pub fn mean_dim(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        float_tensor(&ctx, t)?.mean(d).or_script(&ctx)
    }
    /// Largest element (0-d tensor).
    #[rhai_fn(return_raw, name = "max", pure)]
    pub fn max_all(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        t.flatten_all().and_then(|f| f.max(0)).or_script(&ctx)
    }
    /// Largest value along `dim`.
    #[rhai_fn(return_raw, name = "max", pure)]
    pub fn max_dim(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        t.max(d).or_script(&ctx)
    }
    /// Smallest element (0-d tensor).
    #[rhai_fn(return_raw, name = "min", pure)]
    pub fn min_all(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        t.flatten_all().and_then(|f| f.min(0)).or_script(&ctx)
    }
    /// Smallest value along `dim`.
    #[rhai_fn(return_raw, name = "min", pure)]
    pub fn min_dim(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        t.min(d).or_script(&ctx)
    }
    /// Index of the largest value along `dim` (i64; the first on ties).
    #[rhai_fn(return_raw, pure)]
    pub fn argmax(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        t.argmax(d)
            .and_then(|i| i.to_dtype(DType::I64))
            .or_script(&ctx)
    }
    /// Index of the smallest value along `dim` (i64).
    #[rhai_fn(return_raw, pure)]
    pub fn argmin(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        t.argmin(d)
            .and_then(|i| i.to_dtype(DType::I64))
            .or_script(&ctx)
    }
    /// Standard deviation of every element (population, 0-d tensor).
    #[rhai_fn(return_raw, name = "std", pure)]
    pub fn std_all(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        let f = float_tensor(&ctx, t)?;
        let run = || -> candle_core::Result<Tensor> {
            let m = f.mean_all()?;
            f.broadcast_sub(&m)?.sqr()?.mean_all()?.sqrt()
        };
        run().or_script(&ctx)
    }

    // ---- shape ----

    /// Reshape; one dimension may be -1.
    #[rhai_fn(return_raw, pure)]
    pub fn reshape(ctx: NativeCallContext, t: &mut Tensor, shape: Array) -> ScriptResult<Tensor> {
        let dims = shape
            .iter()
            .map(|d| d.as_int().map_err(|_| "reshape: shape must be ints"))
            .collect::<Result<Vec<i64>, _>>()
            .or_script(&ctx)?;
        let dims = ops::reshape_dims(t.dims(), &dims)
            .map_err(|e| format!("reshape: {e}"))
            .or_script(&ctx)?;
        t.reshape(dims).or_script(&ctx)
    }
    /// Swap two dims.
    #[rhai_fn(return_raw, pure)]
    pub fn transpose(
        ctx: NativeCallContext,
        t: &mut Tensor,
        a: i64,
        b: i64,
    ) -> ScriptResult<Tensor> {
        let (a, b) = (dim_of(&ctx, t, a)?, dim_of(&ctx, t, b)?);
        t.transpose(a, b)
            .and_then(|x| x.contiguous())
            .or_script(&ctx)
    }
    /// Reorder dims.
    #[rhai_fn(return_raw, pure)]
    pub fn permute(ctx: NativeCallContext, t: &mut Tensor, dims: Array) -> ScriptResult<Tensor> {
        let mut order = Vec::new();
        for d in &dims {
            let d = d
                .as_int()
                .map_err(|_| "permute: dims must be ints")
                .or_script(&ctx)?;
            order.push(dim_of(&ctx, t, d)?);
        }
        t.permute(order)
            .and_then(|x| x.contiguous())
            .or_script(&ctx)
    }
    /// `len` entries of `dim` starting at `start`.
    #[rhai_fn(return_raw, pure)]
    pub fn narrow(
        ctx: NativeCallContext,
        t: &mut Tensor,
        dim: i64,
        start: i64,
        len: i64,
    ) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        if start < 0 || len < 0 {
            return Err(format!("narrow: start {start} and len {len} must be >= 0"))
                .or_script(&ctx);
        }
        t.narrow(d, start as usize, len as usize).or_script(&ctx)
    }
    /// Insert a dim of size 1.
    #[rhai_fn(return_raw, pure)]
    pub fn unsqueeze(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let rank = t.rank() as i64;
        let d = if dim < 0 { dim + rank + 1 } else { dim };
        if d < 0 || d > rank {
            return Err(format!("unsqueeze: dim {dim} out of range for rank {rank}"))
                .or_script(&ctx);
        }
        t.unsqueeze(d as usize).or_script(&ctx)
    }
    /// Remove a dim of size 1.
    #[rhai_fn(return_raw, pure)]
    pub fn squeeze(ctx: NativeCallContext, t: &mut Tensor, dim: i64) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        t.squeeze(d).or_script(&ctx)
    }
    /// All elements as one dim.
    #[rhai_fn(return_raw, pure)]
    pub fn flatten(ctx: NativeCallContext, t: &mut Tensor) -> ScriptResult<Tensor> {
        t.flatten_all().or_script(&ctx)
    }
    /// Repeat along each dim (`[2, 1]` doubles the first dim).
    #[rhai_fn(return_raw, pure)]
    pub fn repeat(ctx: NativeCallContext, t: &mut Tensor, times: Array) -> ScriptResult<Tensor> {
        let dims = shape_from_array(&times).or_script(&ctx)?;
        let out: Vec<usize> = std::iter::once(t.elem_count())
            .chain(dims.iter().copied())
            .collect();
        fits(&ctx, "repeat", &out, t.dtype())?;
        t.repeat(dims).or_script(&ctx)
    }
    /// Row `i` along dim 0 (negative counts from the end): `t[i]`.
    #[rhai_fn(return_raw, index_get, pure)]
    pub fn index_row(ctx: NativeCallContext, t: &mut Tensor, i: i64) -> ScriptResult<Tensor> {
        let n = t.dims().first().copied().unwrap_or(0) as i64;
        let idx = if i < 0 { i + n } else { i };
        if idx < 0 || idx >= n {
            return Err(format!("index {i} out of range for dim 0 of size {n}")).or_script(&ctx);
        }
        t.get(idx as usize).or_script(&ctx)
    }
    /// Entries of `dim` at the 1-D int tensor `idx` (torch.index_select).
    #[rhai_fn(return_raw, pure)]
    pub fn index_select(
        ctx: NativeCallContext,
        t: &mut Tensor,
        dim: i64,
        idx: Tensor,
    ) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        if idx.rank() != 1 {
            return Err(format!(
                "index_select: index must be 1-D, got shape {:?}",
                idx.dims()
            ))
            .or_script(&ctx);
        }
        let idx = int_index(&ctx, &idx, "index_select")?;
        let mut dims = t.dims().to_vec();
        dims[d] = idx.elem_count();
        fits(&ctx, "index_select", &dims, t.dtype())?;
        t.index_select(&idx, d).or_script(&ctx)
    }
    /// torch.gather along `dim`.
    #[rhai_fn(return_raw, pure)]
    pub fn gather(
        ctx: NativeCallContext,
        t: &mut Tensor,
        dim: i64,
        idx: Tensor,
    ) -> ScriptResult<Tensor> {
        let d = dim_of(&ctx, t, dim)?;
        let idx = int_index(&ctx, &idx, "gather")?;
        ops::gather(t, d, &idx).or_script(&ctx)
    }
    /// torch.sort along `dim`: `#{values, indices}`.
    #[rhai_fn(return_raw, pure)]
    pub fn sort(
        ctx: NativeCallContext,
        t: &mut Tensor,
        dim: i64,
        descending: bool,
    ) -> ScriptResult<Map> {
        let d = dim_of(&ctx, t, dim)?;
        let (values, indices) = ops::sort(t, d, descending).or_script(&ctx)?;
        let mut m = Map::new();
        m.insert("values".into(), Dynamic::from(values));
        m.insert("indices".into(), Dynamic::from(indices));
        Ok(m)
    }

    /// Concatenate along an existing dim.
    #[rhai_fn(return_raw)]
    pub fn cat(ctx: NativeCallContext, items: Array, dim: i64) -> ScriptResult<Tensor> {
        let ts = same_dtype_tensors(&ctx, &items, "cat")?;
        fits(
            &ctx,
            "cat",
            &[ts.iter().map(Tensor::elem_count).sum()],
            ts[0].dtype(),
        )?;
        let d = dim_of(&ctx, &ts[0], dim)?;
        Tensor::cat(&ts, d)
            .map_err(|e| format!("cat: {e}"))
            .or_script(&ctx)
    }
    /// Stack along a new dim.
    #[rhai_fn(return_raw)]
    pub fn stack(ctx: NativeCallContext, items: Array, dim: i64) -> ScriptResult<Tensor> {
        let ts = same_dtype_tensors(&ctx, &items, "stack")?;
        fits(
            &ctx,
            "stack",
            &[ts.iter().map(Tensor::elem_count).sum()],
            ts[0].dtype(),
        )?;
        let rank = ts[0].rank() as i64;
        let d = if dim < 0 { dim + rank + 1 } else { dim };
        if d < 0 || d > rank {
            return Err(format!("stack: dim {dim} out of range")).or_script(&ctx);
        }
        Tensor::stack(&ts, d as usize)
            .map_err(|e| format!("stack: {e}"))
            .or_script(&ctx)
    }

    // ---- comparisons between tensors ----

    /// Largest |a - b|; an error if the shapes differ.
    #[rhai_fn(return_raw)]
    pub fn max_abs_diff(ctx: NativeCallContext, a: Tensor, b: Tensor) -> ScriptResult<f64> {
        ops::max_abs_diff(&a, &b).or_script(&ctx)
    }

    /// True when |a - b| <= atol + rtol * |b| everywhere (shapes must match).
    #[rhai_fn(return_raw)]
    pub fn allclose(
        ctx: NativeCallContext,
        a: Tensor,
        b: Tensor,
        atol: Dynamic,
        rtol: Dynamic,
    ) -> ScriptResult<bool> {
        let (Some(atol), Some(rtol)) = (dynamic_f64(&atol), dynamic_f64(&rtol)) else {
            return Err("allclose: atol and rtol must be numbers").or_script(&ctx);
        };
        ops::allclose(&a, &b, atol, rtol).or_script(&ctx)
    }
}
