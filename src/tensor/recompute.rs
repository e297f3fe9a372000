//! Recomputation in backward: a function of up to three tensors whose graph keeps only its
//! inputs and its output, and whose backward runs it again (gradient checkpointing for any
//! block, and the fused norm/activation ops that would otherwise keep every intermediate).
//!
//! The forward runs `f` on detached inputs and a custom op hands the result over; the op's
//! backward runs `f` again on fresh variables and backpropagates through that small graph.
//! Gradients of the inputs go back through the op. Gradients of the variables `f` captures
//! (LoRA adapters, trainable weights) cannot, since a custom op only has its inputs: they go to
//! a per-thread side store that [`backward`] merges into the [`GradStore`] it returns. So every
//! backward pass over a graph that may hold such an op goes through [`backward`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, TensorId, Var};

use super::custom_backward::{with_backward, Backward};

/// The recomputed function: the inputs in the order given to [`recompute`], one output.
pub type RecomputeFn = Arc<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

thread_local! {
    /// Gradients of captured variables while a [`backward`] runs on this thread (None outside).
    static CAPTURED_GRADS: RefCell<Option<HashMap<TensorId, Tensor>>> = const { RefCell::new(None) };
}

/// `loss.backward()`, plus the gradients that recomputed ops routed around the graph.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let outer = CAPTURED_GRADS.with(|c| c.borrow_mut().replace(HashMap::new()));
    let result = loss.backward();
    let captured = CAPTURED_GRADS.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
    let mut grads = result?;
    for (id, grad) in captured.unwrap_or_default() {
        let total = match grads.get_id(id) {
            Some(prev) => (prev + grad)?,
            None => grad,
        };
        grads.insert_id(id, total);
    }
    Ok(grads)
}

fn add_captured(id: TensorId, grad: Tensor) -> Result<()> {
    CAPTURED_GRADS.with(|c| {
        let mut store = c.borrow_mut();
        let Some(store) = store.as_mut() else {
            candle_core::bail!(
                "a recomputed block ran backward outside tensor::recompute::backward: \
                 the gradients of its weights would be lost"
            )
        };
        let total = match store.remove(&id) {
            Some(prev) => (prev + grad)?,
            None => grad,
        };
        store.insert(id, total);
        Ok(())
    })
}

/// `f(inputs)`, keeping only the inputs and the output for backward. Without anything to
/// differentiate (no input tracks a graph and `f` uses no variable) it is plain `f(inputs)`.
/// At most three inputs may carry gradients; the others are kept as constants.
pub fn recompute(name: &'static str, inputs: &[&Tensor], f: RecomputeFn) -> Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let out = f(&detached)?;
    let tracked: Vec<usize> = (0..inputs.len())
        .filter(|&i| inputs[i].track_op())
        .collect();
    if tracked.is_empty() && !out.track_op() {
        return Ok(out);
    }
    if tracked.len() > 3 {
        candle_core::bail!(
            "{name}: recomputation takes at most 3 inputs with gradients, got {}",
            tracked.len()
        );
    }
    let constants = (0..inputs.len())
        .map(|i| (!tracked.contains(&i)).then(|| detached[i].clone()))
        .collect();
    let mut args: Vec<&Tensor> = tracked.iter().map(|&i| inputs[i]).collect();
    // Only captured variables need gradients: an anchor puts the op into the graph.
    let anchor;
    if args.is_empty() {
        anchor = Var::zeros((), DType::F32, out.device())?;
        args.push(anchor.as_tensor());
    }
    with_backward(out, &args, Recomputed { name, f, constants })
}

struct Recomputed {
    name: &'static str,
    f: RecomputeFn,
    /// One slot per input of `f`: Some(value) for inputs without gradient, None for the op's
    /// arguments (in order).
    constants: Vec<Option<Tensor>>,
}

impl Backward for Recomputed {
    fn name(&self) -> &'static str {
        self.name
    }

    /// Gradients of the op's arguments; those of captured variables go to the side store.
    fn grads(&self, args: &[&Tensor], grad_out: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let has_inputs = self.constants.iter().any(Option::is_none);
        let vars = if has_inputs {
            args.iter()
                .map(|a| Var::from_tensor(&a.detach()))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let mut next_var = vars.iter();
        let inputs = self
            .constants
            .iter()
            .map(|c| match c {
                Some(t) => Ok(t.clone()),
                None => next_var
                    .next()
                    .map(|v| v.as_tensor().clone())
                    .ok_or_else(|| {
                        candle_core::Error::Msg(format!("{}: argument count mismatch", self.name))
                    }),
            })
            .collect::<Result<Vec<_>>>()?;
        let out = (self.f)(&inputs)?;
        if !out.track_op() {
            return Ok(vec![None; args.len()]);
        }
        let captured: Vec<TensorId> = out
            .sorted_nodes()
            .iter()
            .filter(|n| n.is_variable() && !vars.iter().any(|v| v.as_tensor().id() == n.id()))
            .map(|n| n.id())
            .collect();
        // d/dx <f(x), g> is the vector-Jacobian product with the incoming gradient g.
        let mut grads = (out * grad_out)?.sum_all()?.backward()?;
        for id in captured {
            if let Some(g) = grads.get_id(id).cloned() {
                add_captured(id, g)?;
            }
        }
        if !has_inputs {
            return Ok(vec![None; args.len()]);
        }
        Ok(vars.iter().map(|v| grads.remove(v.as_tensor())).collect())
    }
}
