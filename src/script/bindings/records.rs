//! The sampler's preference records in scripts: count, shuffle, batch, inspect, save.
//!
//! ```text
//! for batch in out.records.shuffled(r).batches(10) { lpo_train_step(policy, sched, batch, opt, #{}); }
//! ```

use std::sync::Arc;

use rhai::plugin::*;

use crate::lpo::Record;

/// Preference records of the sampler (cheap to clone; tensors are shared).
#[derive(Clone, Default)]
pub struct Records(pub Arc<Vec<Record>>);

impl Records {
    pub fn new(records: Vec<Record>) -> Self {
        Self(Arc::new(records))
    }
}

mod helpers {
    use rhai::{Dynamic, Map};

    use crate::lpo::Record;
    use crate::script::declared::to_map;

    /// A record as `#{t, x_t, x_win, x_lose, prompt, prompt_index, hidden, score_win, score_lose}`.
    pub(super) fn record_map(r: &Record) -> Result<Map, String> {
        let mut m = to_map(&r.summary())?;
        for (key, t) in [
            ("x_t", &r.x_t),
            ("x_win", &r.x_win),
            ("x_lose", &r.x_lose),
            ("hidden", &r.cond.hidden),
        ] {
            m.insert(key.into(), Dynamic::from(t.clone()));
        }
        Ok(m)
    }
}

#[export_module]
pub mod records_api {
    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use super::helpers::*;
    use super::Records;
    use crate::lpo::records_io::{
        records_from_checkpoint as core_from_checkpoint, records_to_checkpoint,
    };
    use crate::lpo::{BucketCounts, RecordBatch};
    use crate::script::bindings::rng::ScriptRng;
    use crate::script::convert::{tensors_from_map, tensors_to_map};
    use crate::script::declared::to_map;
    use crate::script::error::{OrScriptError, ScriptResult};

    /// Number of records.
    #[rhai_fn(get = "len", pure)]
    pub fn records_len(r: &mut Records) -> i64 {
        r.0.len() as i64
    }

    /// Number of records.
    #[rhai_fn(get = "count", pure)]
    pub fn records_count(r: &mut Records) -> i64 {
        r.0.len() as i64
    }

    /// Records per noise bucket: `#{pairs_t751_1000, pairs_t501_751, pairs_t251_501,
    /// pairs_t0_251}` (t > 751, 501 < t <= 751, 251 < t <= 501, t <= 251).
    #[rhai_fn(get = "buckets", pure, return_raw)]
    pub fn records_buckets(ctx: NativeCallContext, r: &mut Records) -> ScriptResult<Map> {
        to_map(&BucketCounts::of(&r.0)).or_script(&ctx)
    }

    /// Timesteps of the records (i64 [N]).
    #[rhai_fn(get = "t", pure, return_raw)]
    pub fn records_t(ctx: NativeCallContext, r: &mut Records) -> ScriptResult<Tensor> {
        let v: Vec<i64> = r.0.iter().map(|x| x.t).collect();
        let n = v.len();
        Tensor::from_vec(v, n, &candle_core::Device::Cpu).or_script(&ctx)
    }

    /// The records in a random order drawn from `rng` (seeded: the same state, the same order).
    #[rhai_fn(pure, volatile)]
    pub fn shuffled(r: &mut Records, rng: ScriptRng) -> Records {
        let order = rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .permutation(r.0.len());
        Records::new(order.into_iter().map(|i| r.0[i].clone()).collect())
    }

    /// Consecutive batches of `size` records (the last may be smaller).
    #[rhai_fn(pure, return_raw)]
    pub fn batches(ctx: NativeCallContext, r: &mut Records, size: i64) -> ScriptResult<Array> {
        if size < 1 {
            return Err(format!("batches: size must be >= 1, got {size}")).or_script(&ctx);
        }
        Ok(r.0
            .chunks(size as usize)
            .map(|c| Dynamic::from(Records::new(c.to_vec())))
            .collect())
    }

    /// `len` records from `start` (clamped to the end).
    #[rhai_fn(pure, name = "batch")]
    pub fn records_batch(r: &mut Records, start: i64, len: i64) -> Records {
        let n = r.0.len();
        let s = (start.max(0) as usize).min(n);
        let e = (s + len.max(0) as usize).min(n);
        Records::new(r.0[s..e].to_vec())
    }

    /// Record `i` as `#{t, x_t, x_win, x_lose, prompt, prompt_index, hidden, score_win, score_lose}`.
    #[rhai_fn(index_get, pure, return_raw)]
    pub fn records_get(ctx: NativeCallContext, r: &mut Records, i: i64) -> ScriptResult<Map> {
        let n = r.0.len() as i64;
        let j = if i < 0 { n + i } else { i };
        if j < 0 || j >= n {
            return Err(format!("records: index {i} out of range for {n} records")).or_script(&ctx);
        }
        record_map(&r.0[j as usize]).or_script(&ctx)
    }

    /// Both record lists, `a` first.
    #[rhai_fn(name = "+", name = "concat")]
    pub fn records_concat(a: Records, b: Records) -> Records {
        Records::new(a.0.iter().chain(b.0.iter()).cloned().collect())
    }

    /// No records (to collect several sampling batches with `+`).
    pub fn empty_records() -> Records {
        Records::default()
    }

    /// The records as a map of stacked tensors `#{t [N], x_t, x_win, x_lose [N, C, H, W],
    /// hidden [N, L, H]}`.
    #[rhai_fn(pure, return_raw)]
    pub fn to_tensors(ctx: NativeCallContext, r: &mut Records) -> ScriptResult<Map> {
        let refs: Vec<&crate::lpo::Record> = r.0.iter().collect();
        let b = RecordBatch::stack(&refs).or_script(&ctx)?;
        Ok(tensors_to_map([
            ("t".to_string(), b.t),
            ("x_t".to_string(), b.x_t),
            ("x_win".to_string(), b.x_win),
            ("x_lose".to_string(), b.x_lose),
            ("hidden".to_string(), b.cond.hidden),
        ]))
    }

    /// The records as checkpoint parts `#{tensors, state}`: save `tensors` (under a key prefix
    /// of your choice) with `checkpoint_save` and `state` among its plain data, and get the
    /// records back with `records_from_checkpoint(tensors, state)` (a run stopped mid-epoch
    /// keeps the pairs it sampled).
    #[rhai_fn(pure, return_raw)]
    pub fn to_checkpoint(ctx: NativeCallContext, r: &mut Records) -> ScriptResult<Map> {
        let (tensors, state) = records_to_checkpoint(&r.0).or_script(&ctx)?;
        let mut m = Map::new();
        m.insert("tensors".into(), Dynamic::from_map(tensors_to_map(tensors)));
        m.insert(
            "state".into(),
            rhai::serde::to_dynamic(state).or_script(&ctx)?,
        );
        Ok(m)
    }

    /// Records saved with `records.to_checkpoint()`: its `tensors` (as loaded from a checkpoint,
    /// the key prefix removed) and its `state`. Errors name a missing tensor or bad shape.
    #[rhai_fn(return_raw)]
    pub fn records_from_checkpoint(
        ctx: NativeCallContext,
        tensors: Map,
        state: Map,
    ) -> ScriptResult<Records> {
        let tensors =
            tensors_from_map(&tensors, "records_from_checkpoint", false).or_script(&ctx)?;
        let state: serde_json::Value = rhai::serde::from_dynamic(&Dynamic::from_map(state))
            .map_err(|e| format!("records_from_checkpoint: state is not plain data: {e}"))
            .or_script(&ctx)?;
        let v = core_from_checkpoint(&tensors, &state).or_script(&ctx)?;
        Ok(Records::new(v))
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn records_to_string(r: &mut Records) -> String {
        format!(
            "Records({} pairs; by noise t>751/501-751/251-501/<=251: {:?})",
            r.0.len(),
            BucketCounts::of(&r.0).as_array()
        )
    }
}
