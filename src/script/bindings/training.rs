//! LPO's training step in scripts: one optimizer step on a batch of records, and the
//! log-probs it trains.
//!
//! ```text
//! for batch in out.records.shuffled(r).batches(10) {
//!     let m = lpo_train_step(policy, sched, batch, opt, #{beta: 500, eps: 0.1});
//! }
//! ```

use rhai::plugin::*;

use crate::lpo::TrainConfig;
use crate::script::declared::{option_docs, OptionDoc};

/// The declared options of this module's functions, for the docs.
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    vec![
        ("lpo_train_step", option_docs::<TrainConfig>()),
        ("lpo_log_probs", option_docs::<TrainConfig>()),
    ]
}

#[export_module]
pub mod training_api {
    use rhai::{Dynamic, Map};

    use crate::lpo::train::{batch_log_probs, train_step, RecordBatch};
    use crate::lpo::{Record, TrainConfig};
    use crate::script::bindings::diffusion::Scheduler;
    use crate::script::bindings::optim::ScriptOptimizer;
    use crate::script::bindings::policy::ScriptPolicy;
    use crate::script::bindings::records::Records;
    use crate::script::declared::{from_map, to_map};
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// One LPO optimizer step on `records` (a Records batch), with the options listed below.
    /// Gradients the optimizer held before are dropped; policy and reference predict once per
    /// micro-batch for both winner and loser. Returns `#{loss, ratio_win, ratio_lose, lp_win,
    /// lp_lose, lp_win_ref, lp_lose_ref, implicit_acc, margin, grad_norm, lr, step, pairs}`.
    #[rhai_fn(return_raw)]
    pub fn lpo_train_step(
        ctx: NativeCallContext,
        policy: ScriptPolicy,
        scheduler: Scheduler,
        records: Records,
        optimizer: ScriptOptimizer,
        opts: Map,
    ) -> ScriptResult<Map> {
        let cfg: TrainConfig = from_map(&opts, "lpo_train_step").or_script(&ctx)?;
        let host = Host::of(&ctx);
        host.check().or_script(&ctx)?;
        let refs: Vec<&Record> = records.0.iter().collect();
        let mut opt = optimizer.lock().unwrap_or_else(|e| e.into_inner());
        let metrics = train_step(
            &policy,
            &scheduler,
            &refs,
            &mut opt,
            &cfg,
            Some(&host.control),
        )
        .or_script(&ctx)?;
        to_map(&metrics).or_script(&ctx)
    }

    /// Log-probs of the records' winners and losers under the policy and the reference
    /// (detached): `#{lp_win, lp_lose, lp_win_ref, lp_lose_ref}` tensors [N]. Options as
    /// `lpo_train_step` (beta, eps, micro_batch unused).
    #[rhai_fn(return_raw)]
    pub fn lpo_log_probs(
        ctx: NativeCallContext,
        policy: ScriptPolicy,
        scheduler: Scheduler,
        records: Records,
        opts: Map,
    ) -> ScriptResult<Map> {
        let cfg: TrainConfig = from_map(&opts, "lpo_log_probs").or_script(&ctx)?;
        let refs: Vec<&Record> = records.0.iter().collect();
        let batch = RecordBatch::stack(&refs).or_script(&ctx)?;
        let lps = batch_log_probs(&policy, &scheduler, &batch, &cfg).or_script(&ctx)?;
        let names = ["lp_win", "lp_win_ref", "lp_lose", "lp_lose_ref"];
        Ok(names
            .iter()
            .zip(lps)
            .map(|(n, t)| ((*n).into(), Dynamic::from(t.detach())))
            .collect())
    }
}
