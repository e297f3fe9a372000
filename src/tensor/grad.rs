//! Gradient utilities shared by the optimizer and the tests of every differentiable model:
//! the global norm of a set of gradients, clipping by it, and a central finite-difference
//! checker.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Sum of squares of one tensor, accumulated in f64.
fn sum_sq(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// The global L2 norm over every tensor of `grads` (as `torch.nn.utils.clip_grad_norm_`
/// computes it): sqrt of the sum of squares of every element. Non-finite values give a
/// non-finite norm.
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a Tensor>) -> Result<f64> {
    let mut total = 0.0;
    for g in grads {
        total += sum_sq(g)?;
    }
    Ok(total.sqrt())
}

/// The factor `torch.nn.utils.clip_grad_norm_` scales gradients by: max_norm / (norm + 1e-6),
/// at most 1.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

/// Scale `grads` in place so their global norm is at most `max_norm`; returns the norm before
/// clipping. A non-finite norm is an error and leaves the gradients untouched.
pub fn clip_by_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        bail!("clip: max_grad_norm must be > 0, got {max_norm}");
    }
    let norm = global_norm(grads.iter())?;
    if !norm.is_finite() {
        bail!("clip: gradient norm is {norm}");
    }
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

/// Central finite differences against autograd for the scalar function `f` of `var`.
///
/// For each flat element index in `indices`, returns `(analytic, numeric)`: the gradient of
/// `f()` with respect to that element from `backward()`, and `(f(x + h) - f(x - h)) / 2h`.
/// The variable is restored afterwards. Use f64 variables (or a generous `h`) for tight
/// agreement; `f` must return a one-element tensor.
pub fn finite_difference_check<F>(
    f: F,
    var: &Var,
    indices: &[usize],
    h: f64,
) -> Result<Vec<(f64, f64)>>
where
    F: Fn() -> Result<Tensor>,
{
    if h.is_nan() || h <= 0.0 {
        bail!("finite_difference_check: h must be > 0, got {h}");
    }
    let n = var.elem_count();
    if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
        bail!(
            "finite_difference_check: index {bad} out of range for a variable of {n} elements (shape {:?})",
            var.dims()
        );
    }
    let scalar = |t: Tensor| -> Result<f64> {
        if t.elem_count() != 1 {
            bail!(
                "finite_difference_check: f must return one element, got shape {:?}",
                t.dims()
            );
        }
        Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0])
    };
    let loss = f()?;
    if loss.elem_count() != 1 {
        bail!(
            "finite_difference_check: f must return one element, got shape {:?}",
            loss.dims()
        );
    }
    let grads = super::recompute::backward(&loss)?;
    let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        None => vec![0.0; n],
    };
    let original = var.as_tensor().detach().copy()?;
    let base: Vec<f64> = original
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let with = |i: usize, delta: f64| -> Result<Tensor> {
        let mut v = base.clone();
        v[i] += delta;
        Ok(Tensor::from_vec(v, original.shape(), original.device())?.to_dtype(original.dtype())?)
    };
    let mut out = Vec::with_capacity(indices.len());
    let result = (|| -> Result<()> {
        for &i in indices {
            var.set(&with(i, h)?)?;
            let plus = scalar(f()?)?;
            var.set(&with(i, -h)?)?;
            let minus = scalar(f()?)?;
            out.push((analytic[i], (plus - minus) / (2.0 * h)));
        }
        Ok(())
    })();
    var.set(&original)
        .context("finite_difference_check: cannot restore the variable")?;
    result?;
    Ok(out)
}

/// Names of the variables that got no gradient in `grads` (or, with `count_zero`, an all-zero
/// one): the "every trainable tensor has a gradient" check of a model's tests. A name here
/// usually means an op without a backward pass cut the graph.
pub fn vars_without_grad(
    vars: &[(String, Var)],
    grads: &GradStore,
    count_zero: bool,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (name, var) in vars {
        match grads.get(var.as_tensor()) {
            None => out.push(name.clone()),
            Some(g) if count_zero && sum_sq(g)? == 0.0 => out.push(name.clone()),
            Some(_) => {}
        }
    }
    Ok(out)
}
