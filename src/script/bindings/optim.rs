//! The optimizer in scripts: `Params` (named trainable tensors) and AdamW.
//!
//! ```text
//! let p = params_from(#{w: zeros([3, 1]), b: zeros([1])});
//! let opt = adamw(p, #{lr: 1e-2, warmup_steps: 10});
//! let info = opt.backward_step(loss);   // #{grad_norm, lr, step}
//! ```

use std::sync::{Arc, Mutex};

use rhai::plugin::*;

use crate::optim::{AdamW, AdamWOptions};
use crate::script::declared::{option_docs, OptionDoc};

/// The optimizer as a script value (every clone drives the same optimizer).
pub type ScriptOptimizer = Arc<Mutex<AdamW>>;

/// The options of this module's functions, for `lpo fns`.
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    vec![("adamw", option_docs::<AdamWOptions>())]
}

mod helpers {
    use candle_core::{DType, Tensor};
    use rhai::Map;

    use super::ScriptOptimizer;
    use crate::optim::{AdamW, AdamWConfig, AdamWOptions};
    use crate::script::declared::from_map;

    pub(super) fn lock(o: &ScriptOptimizer) -> std::sync::MutexGuard<'_, AdamW> {
        o.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `adamw`'s options, checked.
    pub(super) fn adamw_config(opts: &Map) -> Result<AdamWConfig, String> {
        let options: AdamWOptions = from_map(opts, "adamw")?;
        AdamWConfig::try_from(options).map_err(|e| e.to_string())
    }

    pub(super) fn float_param(t: Tensor) -> Result<Tensor, String> {
        if crate::tensor::ops::is_float(t.dtype()) {
            Ok(t)
        } else {
            t.to_dtype(DType::F32).map_err(|e| e.to_string())
        }
    }
}

#[export_module]
pub mod optim_api {
    use super::helpers::*;
    use super::ScriptOptimizer;
    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use crate::optim::{AdamW, Params};
    use crate::script::convert::{
        dynamic_f64, tensor_from_dynamic, tensors_from_map, tensors_to_map,
    };
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    // ---- Params ----

    /// Fresh trainable variables from a map name -> tensor (or nested array; int values become
    /// f32), in name order. For toy problems and tests; models expose their own Params.
    #[rhai_fn(return_raw)]
    pub fn params_from(ctx: NativeCallContext, tensors: Map) -> ScriptResult<Params> {
        let device = Host::of(&ctx).device;
        let mut items = Vec::new();
        for (k, v) in &tensors {
            let t = tensor_from_dynamic(v, &device)
                .map_err(|e| format!("params_from: entry `{k}`: {e}"))
                .and_then(float_param)
                .or_script(&ctx)?;
            items.push((k.to_string(), t));
        }
        Params::from_tensors(items).or_script(&ctx)
    }

    /// One Params from several (names must stay unique), e.g. to train two parts together.
    #[rhai_fn(return_raw)]
    pub fn merge_params(ctx: NativeCallContext, parts: Array) -> ScriptResult<Params> {
        let mut ps = Vec::with_capacity(parts.len());
        for (i, p) in parts.into_iter().enumerate() {
            let tn = p.type_name();
            ps.push(
                p.try_cast::<Params>()
                    .ok_or_else(|| format!("merge_params: item {i} is a {tn}, not Params"))
                    .or_script(&ctx)?,
            );
        }
        Params::merge(&ps).or_script(&ctx)
    }

    /// The parameters whose names start with `prefix` (the same variables, not copies).
    #[rhai_fn(pure)]
    pub fn select(p: &mut Params, prefix: &str) -> Params {
        p.select(prefix)
    }

    /// Parameter names, in order.
    #[rhai_fn(pure)]
    pub fn names(p: &mut Params) -> Array {
        p.names().into_iter().map(Dynamic::from).collect()
    }

    /// The live tensor of parameter `name` (use it in the loss: gradients flow to it).
    #[rhai_fn(return_raw, pure, name = "get")]
    pub fn get_param(ctx: NativeCallContext, p: &mut Params, name: &str) -> ScriptResult<Tensor> {
        p.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| {
                format!(
                    "params: no parameter `{name}` (have: {})",
                    p.names().join(", ")
                )
            })
            .or_script(&ctx)
    }

    /// Total number of elements over every parameter.
    #[rhai_fn(get = "numel", pure)]
    pub fn params_numel(p: &mut Params) -> i64 {
        p.numel() as i64
    }

    /// Number of parameter tensors.
    #[rhai_fn(get = "len", pure)]
    pub fn params_len(p: &mut Params) -> i64 {
        p.len() as i64
    }

    /// Detached copies of the current values, name -> tensor (for checkpoints).
    #[rhai_fn(return_raw, pure)]
    pub fn to_map(ctx: NativeCallContext, p: &mut Params) -> ScriptResult<Map> {
        p.to_map().map(tensors_to_map).or_script(&ctx)
    }

    /// Set every parameter in place from a map name -> tensor; an error names a missing or
    /// mis-shaped key and changes nothing.
    #[rhai_fn(return_raw, pure)]
    pub fn load_map(ctx: NativeCallContext, p: &mut Params, values: Map) -> ScriptResult<()> {
        let m = tensors_from_map(&values, "load_map", false).or_script(&ctx)?;
        p.load_map(&m).or_script(&ctx)
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn params_to_string(p: &mut Params) -> String {
        format!("Params({} tensors, {} elements)", p.len(), p.numel())
    }

    // ---- AdamW ----

    /// AdamW with the default options (`adamw(params, #{})`).
    #[rhai_fn(return_raw, name = "adamw")]
    pub fn adamw_default(ctx: NativeCallContext, params: Params) -> ScriptResult<ScriptOptimizer> {
        adamw(ctx, params, Map::new())
    }

    /// AdamW (decoupled weight decay) over `params`; options `#{lr, betas, eps, weight_decay,
    /// max_grad_norm, warmup_steps, schedule, total_steps}` (declared with their defaults and
    /// docs by the optimizer's options).
    #[rhai_fn(return_raw, name = "adamw")]
    pub fn adamw(
        ctx: NativeCallContext,
        params: Params,
        options: Map,
    ) -> ScriptResult<ScriptOptimizer> {
        let cfg = adamw_config(&options).or_script(&ctx)?;
        let opt = AdamW::new(params, cfg).or_script(&ctx)?;
        Ok(std::sync::Arc::new(std::sync::Mutex::new(opt)))
    }

    /// Backpropagate a scalar loss and accumulate its gradients.
    #[rhai_fn(return_raw, name = "backward")]
    pub fn backward(
        ctx: NativeCallContext,
        opt: &mut ScriptOptimizer,
        loss: Tensor,
    ) -> ScriptResult<()> {
        Host::of(&ctx).check().or_script(&ctx)?;
        lock(opt).backward(&loss, 1.0).or_script(&ctx)
    }

    /// Backpropagate a scalar loss and accumulate `scale` times its gradients (e.g. 1/n for
    /// n micro-batches of a mean loss).
    #[rhai_fn(return_raw, name = "backward")]
    pub fn backward_scaled(
        ctx: NativeCallContext,
        opt: &mut ScriptOptimizer,
        loss: Tensor,
        scale: Dynamic,
    ) -> ScriptResult<()> {
        let s = dynamic_f64(&scale)
            .ok_or("backward: scale must be a number")
            .or_script(&ctx)?;
        Host::of(&ctx).check().or_script(&ctx)?;
        lock(opt).backward(&loss, s).or_script(&ctx)
    }

    /// Apply the accumulated gradients, then zero them: `#{grad_norm, lr, step}` (grad_norm
    /// before clipping, the lr this step used, steps taken).
    #[rhai_fn(return_raw, name = "step")]
    pub fn step(ctx: NativeCallContext, opt: &mut ScriptOptimizer) -> ScriptResult<Map> {
        let info = lock(opt).step().or_script(&ctx)?;
        crate::script::declared::to_map(&info).or_script(&ctx)
    }

    /// `backward(loss)` then `step()`.
    #[rhai_fn(return_raw)]
    pub fn backward_step(
        ctx: NativeCallContext,
        opt: &mut ScriptOptimizer,
        loss: Tensor,
    ) -> ScriptResult<Map> {
        Host::of(&ctx).check().or_script(&ctx)?;
        let mut o = lock(opt);
        o.backward(&loss, 1.0).or_script(&ctx)?;
        let info = o.step().or_script(&ctx)?;
        crate::script::declared::to_map(&info).or_script(&ctx)
    }

    /// Drop the accumulated gradients.
    pub fn zero_grad(opt: &mut ScriptOptimizer) {
        lock(opt).zero_grad();
    }

    /// The base learning rate (before warmup and schedule).
    #[rhai_fn(get = "lr", pure)]
    pub fn get_lr(opt: &mut ScriptOptimizer) -> f64 {
        lock(opt).lr()
    }

    /// Set the base learning rate.
    #[rhai_fn(set = "lr", return_raw)]
    pub fn set_lr(
        ctx: NativeCallContext,
        opt: &mut ScriptOptimizer,
        lr: Dynamic,
    ) -> ScriptResult<()> {
        let v = dynamic_f64(&lr)
            .ok_or("lr must be a number")
            .or_script(&ctx)?;
        lock(opt).set_lr(v).or_script(&ctx)
    }

    /// The learning rate the next step will use (warmup and schedule applied).
    #[rhai_fn(get = "current_lr", pure)]
    pub fn current_lr(opt: &mut ScriptOptimizer) -> f64 {
        lock(opt).current_lr()
    }

    /// Optimizer steps taken.
    #[rhai_fn(get = "step_count", pure)]
    pub fn step_count(opt: &mut ScriptOptimizer) -> i64 {
        lock(opt).step_count() as i64
    }

    /// The parameters this optimizer updates.
    #[rhai_fn(get = "params", pure)]
    pub fn opt_params(opt: &mut ScriptOptimizer) -> Params {
        lock(opt).params().clone()
    }

    /// Names of parameters with no accumulated gradient since the last step.
    #[rhai_fn(pure)]
    pub fn missing_grads(opt: &mut ScriptOptimizer) -> Array {
        lock(opt)
            .missing_grads()
            .into_iter()
            .map(Dynamic::from)
            .collect()
    }

    /// The state as a map of tensors (`step`, `lr`, `exp_avg.NAME`, `exp_avg_sq.NAME`,
    /// `steps.NAME`, `master.NAME` for half-precision params): `save_safetensors` it.
    #[rhai_fn(return_raw, pure)]
    pub fn state(ctx: NativeCallContext, opt: &mut ScriptOptimizer) -> ScriptResult<Map> {
        lock(opt).state().map(tensors_to_map).or_script(&ctx)
    }

    /// Restore a state from `opt.state()` (or `load_safetensors` of it); resumes exactly.
    #[rhai_fn(return_raw)]
    pub fn load_state(
        ctx: NativeCallContext,
        opt: &mut ScriptOptimizer,
        state: Map,
    ) -> ScriptResult<()> {
        let m = tensors_from_map(&state, "load_state", true).or_script(&ctx)?;
        lock(opt).load_state(&m).or_script(&ctx)
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn opt_to_string(opt: &mut ScriptOptimizer) -> String {
        let o = lock(opt);
        format!(
            "AdamW(lr={}, step={}, {} params)",
            o.lr(),
            o.step_count(),
            o.params().len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::declared_options;

    #[test]
    fn adamw_options_show_the_core_defaults() {
        let (name, docs) = &declared_options()[0];
        assert_eq!(*name, "adamw");
        let get = |n: &str| docs.iter().find(|d| d.name == n).unwrap();
        assert_eq!(get("lr").default.as_deref(), Some("0.00001"));
        assert_eq!(get("betas").default.as_deref(), Some("[0.9, 0.999]"));
        assert_eq!(
            get("schedule").kind,
            "\"constant\" | \"cosine\" | \"linear\""
        );
        assert_eq!(get("max_grad_norm").default, None);
    }
}
