//! The run: its folder, checkpoints, metrics, progress and stop requests.
//!
//! Under `lpo run` every run has a folder (see `crate::runtime::run_dir`). Without one (the REPL, a
//! bare engine): `run_dir()` and `checkpoint_save` fail with a clear error, `checkpoint_latest()`
//! returns `()`, `log_metrics` only logs the line, `progress` and `should_stop` work as usual.

use rhai::plugin::*;

/// A progress bar on a TTY; periodic log lines otherwise.
#[derive(Clone)]
pub struct Progress(std::sync::Arc<std::sync::Mutex<helpers::ProgressState>>);

#[export_module]
pub mod run_api {
    use rhai::{Dynamic, Map};

    use super::helpers;
    use super::Progress;
    use crate::script::convert::tensors_from_map;
    use crate::script::declared::to_map;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// True once the run was asked to stop (SIGINT/SIGTERM, deadline): end the loop at a safe
    /// point, save a checkpoint and return. A script that polls this gets a grace period after
    /// a signal (host calls go on); one that never polls is stopped at once.
    #[rhai_fn(volatile)]
    pub fn should_stop(ctx: NativeCallContext) -> bool {
        let host = Host::of(&ctx);
        if let Some(run) = &host.run {
            run.mark_cooperative();
            if run.soft_stop().is_some() {
                return true;
            }
        }
        host.control.should_stop()
    }

    /// The run folder of this run (`lpo run`: `runs/<script>-<time>/` or `--run-dir`).
    /// Outputs written under it stay with the run's params, log and checkpoints.
    #[rhai_fn(return_raw, volatile)]
    pub fn run_dir(ctx: NativeCallContext) -> ScriptResult<String> {
        let run = helpers::require_run(&ctx, "run_dir")?;
        Ok(run.path().display().to_string())
    }

    /// Save a checkpoint `run_dir/checkpoints/step-<step>/` (tensors.safetensors + state.json),
    /// atomically; older ones beyond `--keep-checkpoints` (default 3) are removed.
    /// `tensors` maps names to tensors, `state` is any map of plain values. Returns the folder.
    #[rhai_fn(return_raw)]
    pub fn checkpoint_save(
        ctx: NativeCallContext,
        step: i64,
        tensors: Map,
        state: Map,
    ) -> ScriptResult<String> {
        let run = helpers::require_run(&ctx, "checkpoint_save")?;
        let tensors = tensors_from_map(&tensors, "checkpoint_save", false).or_script(&ctx)?;
        let state: serde_json::Value = rhai::serde::from_dynamic(&Dynamic::from_map(state))
            .map_err(|e| format!("checkpoint_save: state is not plain data: {e}"))
            .or_script(&ctx)?;
        let path = run
            .save_checkpoint(step, &tensors, &state)
            .or_script(&ctx)?;
        tracing::info!("checkpoint step {step}: {}", path.display());
        Ok(path.display().to_string())
    }

    /// The newest checkpoint of this run as `#{step, tensors, state, path}`, or `()` when there
    /// is none (also without a run folder). A checkpoint that does not load is skipped with a
    /// warning naming it. `lpo run --resume` sets `params.resume = true`.
    #[rhai_fn(return_raw, volatile)]
    pub fn checkpoint_latest(ctx: NativeCallContext) -> ScriptResult<Dynamic> {
        let host = Host::of(&ctx);
        let Some(run) = &host.run else {
            return Ok(Dynamic::UNIT);
        };
        let Some(ck) = run.latest_checkpoint(&host.device).or_script(&ctx)? else {
            return Ok(Dynamic::UNIT);
        };
        let mut out = to_map(&helpers::CheckpointInfo {
            step: ck.step,
            state: ck.state,
            path: ck.path.display().to_string(),
        })
        .or_script(&ctx)?;
        let tensors: Map = ck
            .tensors
            .into_iter()
            .map(|(k, t)| (k.into(), Dynamic::from(t)))
            .collect();
        out.insert("tensors".into(), Dynamic::from_map(tensors));
        Ok(Dynamic::from_map(out))
    }

    /// Append `metrics` (a map; one-element tensors become numbers) as a JSON line with the
    /// time to `run_dir/metrics.jsonl`. A non-finite value for `loss` (or a key given to
    /// `--halt-on-nonfinite`) halts the run with an error; the last good checkpoint is kept.
    #[rhai_fn(return_raw)]
    pub fn log_metrics(ctx: NativeCallContext, metrics: Map) -> ScriptResult<()> {
        let host = Host::of(&ctx);
        let (record, nonfinite) = helpers::metrics_record(metrics).or_script(&ctx)?;
        let step = record
            .get("step")
            .map(|s| s.to_string())
            .unwrap_or_else(|| "?".into());
        let halting = match &host.run {
            Some(run) => run.log_metrics(record, &nonfinite).or_script(&ctx)?,
            None => {
                tracing::info!("metrics {}", serde_json::Value::Object(record));
                nonfinite.into_iter().filter(|k| k == "loss").collect()
            }
        };
        if halting.is_empty() {
            return Ok(());
        }
        Err(format!(
            "log_metrics: non-finite {} at step {step}: the run is halted; {}",
            halting
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            helpers::last_good_checkpoint(&host)
        ))
        .or_script(&ctx)
    }

    /// Sleep for `seconds` (a stop request ends it early).
    #[rhai_fn(name = "sleep", return_raw, volatile)]
    pub fn sleep_float(ctx: NativeCallContext, seconds: f64) -> ScriptResult<()> {
        helpers::sleep(&ctx, seconds)
    }

    /// Sleep for `seconds` (a stop request ends it early).
    #[rhai_fn(name = "sleep", return_raw, volatile)]
    pub fn sleep_int(ctx: NativeCallContext, seconds: i64) -> ScriptResult<()> {
        helpers::sleep(&ctx, seconds as f64)
    }

    /// A progress indicator for `total` steps: a bar on a terminal, a log line every 10%
    /// (at most every 2 s) otherwise. Advance with `p.inc(n)`, end with `p.finish()`.
    #[rhai_fn(name = "progress", volatile)]
    pub fn progress(total: i64) -> Progress {
        helpers::new_progress(total, "")
    }

    /// `progress(total)` with a label shown before the bar / in the log lines.
    #[rhai_fn(name = "progress", volatile)]
    pub fn progress_labelled(total: i64, label: &str) -> Progress {
        helpers::new_progress(total, label)
    }

    /// Advance the progress indicator by `n` steps.
    #[rhai_fn(name = "inc")]
    pub fn progress_inc(p: &mut Progress, n: i64) {
        helpers::inc(p, n.max(0) as u64)
    }

    /// Show `msg` beside the progress indicator (e.g. the current loss).
    #[rhai_fn(name = "set_message")]
    pub fn progress_message(p: &mut Progress, msg: &str) {
        helpers::set_message(p, msg)
    }

    /// End the progress indicator.
    #[rhai_fn(name = "finish")]
    pub fn progress_finish(p: &mut Progress) {
        helpers::finish(p)
    }

    /// Steps done so far.
    #[rhai_fn(get = "position", pure)]
    pub fn progress_position(p: &mut Progress) -> i64 {
        p.0.lock().unwrap_or_else(|e| e.into_inner()).pos as i64
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn progress_to_string(p: &mut Progress) -> String {
        let s = p.0.lock().unwrap_or_else(|e| e.into_inner());
        format!("Progress[{}/{}]", s.pos, s.total)
    }
}

pub mod helpers {
    use std::io::IsTerminal;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use candle_core::Tensor;
    use rhai::{Map, NativeCallContext};

    use super::Progress;
    use crate::runtime::run_dir::RunDir;
    use crate::script::error::{host_error, stopped_error, ScriptResult};
    use crate::script::Host;

    pub fn require_run(ctx: &NativeCallContext, name: &str) -> ScriptResult<Arc<RunDir>> {
        Host::of(ctx).run.clone().ok_or_else(|| {
            host_error(
                ctx,
                format!("{name}(): this session has no run folder (run the script with `lpo run`, which makes one under runs/ or at --run-dir)"),
            )
        })
    }

    /// A checkpoint as `checkpoint_latest` returns it, less its tensors.
    #[derive(serde::Serialize)]
    pub struct CheckpointInfo {
        pub step: i64,
        pub state: serde_json::Value,
        pub path: String,
    }

    /// Where a halted run can resume from, in words.
    pub fn last_good_checkpoint(host: &Host) -> String {
        let Some(run) = &host.run else {
            return "no run folder".into();
        };
        match crate::runtime::run_dir::list_checkpoints(&run.checkpoints_dir())
            .into_iter()
            .max_by_key(|(s, _)| *s)
        {
            Some((s, p)) => format!("the last good checkpoint is {} (step {s})", p.display()),
            None => "no checkpoint was written before".into(),
        }
    }

    /// The JSON record of a metrics map and the keys whose float value is not finite.
    #[allow(clippy::type_complexity)]
    pub fn metrics_record(
        map: Map,
    ) -> Result<(serde_json::Map<String, serde_json::Value>, Vec<String>), String> {
        let mut record = serde_json::Map::new();
        let mut nonfinite = Vec::new();
        for (k, v) in map {
            let v = match v.clone().try_cast::<Tensor>() {
                Some(t) => crate::script::convert::tensor_item(&t)
                    .map_err(|e| format!("log_metrics: `{k}`: {e}"))?,
                None => v,
            };
            let json = if let Ok(f) = v.as_float() {
                if f.is_finite() {
                    serde_json::Value::from(f)
                } else {
                    nonfinite.push(k.to_string());
                    serde_json::Value::from(f.to_string())
                }
            } else {
                rhai::serde::from_dynamic::<serde_json::Value>(&v)
                    .map_err(|e| format!("log_metrics: `{k}` is not plain data: {e}"))?
            };
            record.insert(k.to_string(), json);
        }
        Ok((record, nonfinite))
    }

    pub fn sleep(ctx: &NativeCallContext, seconds: f64) -> ScriptResult<()> {
        if !seconds.is_finite() || seconds < 0.0 {
            return Err(host_error(
                ctx,
                format!("sleep: {seconds} is not a duration in seconds"),
            ));
        }
        let host = Host::of(ctx);
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        loop {
            if let Err(stopped) = host.check() {
                return Err(stopped_error(ctx, stopped));
            }
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            std::thread::sleep((end - now).min(Duration::from_millis(20)));
        }
    }

    pub struct ProgressState {
        pub total: u64,
        pub pos: u64,
        label: String,
        message: String,
        bar: Option<indicatif::ProgressBar>,
        last_log: Option<Instant>,
        last_decile: u64,
        finished: bool,
    }

    pub fn new_progress(total: i64, label: &str) -> Progress {
        let total = total.max(0) as u64;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = crate::runtime::log::bars().add(indicatif::ProgressBar::new(total));
            let style = indicatif::ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar
        });
        Progress(Arc::new(std::sync::Mutex::new(ProgressState {
            total,
            pos: 0,
            label: label.to_string(),
            message: String::new(),
            bar,
            last_log: None,
            last_decile: 0,
            finished: false,
        })))
    }

    pub fn inc(p: &Progress, n: u64) {
        let mut s = p.0.lock().unwrap_or_else(|e| e.into_inner());
        s.pos = s.pos.saturating_add(n);
        if let Some(bar) = &s.bar {
            bar.inc(n);
            return;
        }
        let decile = (s.pos.min(s.total) * 10).checked_div(s.total).unwrap_or(0);
        let due = s
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
        if decile > s.last_decile && due {
            s.last_decile = decile;
            s.last_log = Some(Instant::now());
            log_line(&s);
        }
    }

    fn log_line(s: &ProgressState) {
        let label = if s.label.is_empty() {
            "progress".to_string()
        } else {
            s.label.clone()
        };
        let pct = (s.pos.min(s.total) * 100)
            .checked_div(s.total)
            .unwrap_or(100);
        if s.message.is_empty() {
            tracing::info!("{label}: {}/{} ({pct}%)", s.pos, s.total);
        } else {
            tracing::info!("{label}: {}/{} ({pct}%) {}", s.pos, s.total, s.message);
        }
    }

    pub fn set_message(p: &Progress, msg: &str) {
        let mut s = p.0.lock().unwrap_or_else(|e| e.into_inner());
        s.message = msg.to_string();
        if let Some(bar) = &s.bar {
            bar.set_message(msg.to_string());
        }
    }

    pub fn finish(p: &Progress) {
        let mut s = p.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.finished {
            return;
        }
        s.finished = true;
        match &s.bar {
            Some(bar) => {
                bar.finish();
                crate::runtime::log::bars().remove(bar);
            }
            None => log_line(&s),
        }
    }
}
