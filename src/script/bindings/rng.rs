//! Seeded random draws: `let r = rng(42); r.randn([2, 3])`.

use std::sync::{Arc, Mutex};

use rhai::plugin::*;

use crate::tensor::SeededRng;

/// A generator shared by every clone of its script value, so draws advance one stream.
pub type ScriptRng = Arc<Mutex<SeededRng>>;

mod helpers {
    use super::ScriptRng;
    use crate::tensor::SeededRng;

    pub(super) fn lock(r: &ScriptRng) -> std::sync::MutexGuard<'_, SeededRng> {
        r.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[export_module]
pub mod rng_api {
    use super::helpers::*;
    use candle_core::{DType, Tensor};
    use rhai::{Array, Dynamic};

    use super::ScriptRng;
    use crate::script::convert::shape_from_array;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;
    use crate::tensor::SeededRng;

    /// A generator seeded with `seed`: the same seed gives the same draws on every run.
    #[rhai_fn(volatile)]
    pub fn rng(seed: i64) -> ScriptRng {
        std::sync::Arc::new(std::sync::Mutex::new(SeededRng::new(seed as u64)))
    }

    /// A generator seeded with the run's seed (`--seed`, default 0).
    #[rhai_fn(name = "rng", volatile)]
    pub fn rng_default(ctx: NativeCallContext) -> ScriptRng {
        rng(Host::of(&ctx).seed as i64)
    }

    /// Standard normal f32 draws of `shape`.
    #[rhai_fn(return_raw, volatile)]
    pub fn randn(ctx: NativeCallContext, r: &mut ScriptRng, shape: Array) -> ScriptResult<Tensor> {
        let dims = shape_from_array(&shape).or_script(&ctx)?;
        Host::of(&ctx)
            .check_tensor_size("randn", &dims, DType::F32)
            .or_script(&ctx)?;
        lock(r).randn(dims, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// Uniform [0, 1) f32 draws of `shape`.
    #[rhai_fn(return_raw, volatile)]
    pub fn rand(ctx: NativeCallContext, r: &mut ScriptRng, shape: Array) -> ScriptResult<Tensor> {
        let dims = shape_from_array(&shape).or_script(&ctx)?;
        Host::of(&ctx)
            .check_tensor_size("rand", &dims, DType::F32)
            .or_script(&ctx)?;
        lock(r).rand(dims, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// i64 draws uniform in [low, high) of `shape`.
    #[rhai_fn(return_raw, volatile)]
    pub fn randint(
        ctx: NativeCallContext,
        r: &mut ScriptRng,
        low: i64,
        high: i64,
        shape: Array,
    ) -> ScriptResult<Tensor> {
        let dims = shape_from_array(&shape).or_script(&ctx)?;
        Host::of(&ctx)
            .check_tensor_size("randint", &dims, DType::I64)
            .or_script(&ctx)?;
        lock(r)
            .randint(low, high, dims, &Host::of(&ctx).device)
            .or_script(&ctx)
    }

    /// One int uniform in [low, high).
    #[rhai_fn(name = "int", volatile, return_raw)]
    pub fn next_int(r: &mut ScriptRng, low: i64, high: i64) -> Result<i64, Box<EvalAltResult>> {
        if high <= low {
            return Err(format!("int: empty range [{low}, {high})").into());
        }
        Ok(lock(r).int_in(low, high))
    }

    /// One float uniform in [0, 1).
    #[rhai_fn(name = "float", volatile)]
    pub fn next_float(r: &mut ScriptRng) -> f64 {
        lock(r).uniform()
    }

    /// A random permutation of 0..n as an array.
    #[rhai_fn(return_raw, volatile)]
    pub fn permutation(ctx: NativeCallContext, r: &mut ScriptRng, n: i64) -> ScriptResult<Array> {
        let n = n.max(0) as usize;
        // The indices, then as many script values.
        let bytes_each = 8 + std::mem::size_of::<Dynamic>();
        Host::of(&ctx)
            .check_tensor_size("permutation", &[n, bytes_each], DType::U8)
            .or_script(&ctx)?;
        Ok(lock(r)
            .permutation(n)
            .into_iter()
            .map(|i| Dynamic::from(i as i64))
            .collect())
    }

    /// An independent generator split off this one.
    #[rhai_fn(volatile)]
    pub fn fork(r: &mut ScriptRng) -> ScriptRng {
        std::sync::Arc::new(std::sync::Mutex::new(lock(r).fork()))
    }

    /// The generator's full state (a string), to store in a checkpoint.
    #[rhai_fn(get = "state", pure)]
    pub fn state(r: &mut ScriptRng) -> String {
        lock(r).state_json()
    }

    /// Restore a state saved with `r.state`.
    #[rhai_fn(set = "state", return_raw)]
    pub fn set_state(r: &mut ScriptRng, state: &str) -> Result<(), Box<EvalAltResult>> {
        let restored = SeededRng::from_state_json(state).map_err(|e| format!("rng state: {e}"))?;
        *lock(r) = restored;
        Ok(())
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn to_string(r: &mut ScriptRng) -> String {
        format!("Rng(seed={})", lock(r).seed())
    }
}
