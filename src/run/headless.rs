//! `lpo run`: a run folder per run, its lock, params and log, signals, and `--resume`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rhai::{Dynamic, Map};

use super::{engine_for, run_script, RunOptions};
use crate::runtime::confinement::Grants;
use crate::runtime::control::RunControl;
use crate::runtime::log;
use crate::runtime::run_dir::{Locked, RunDir, EXIT_LOCKED};
use crate::script::{Failure, Host, Limits};

/// What `lpo run` was asked to do.
pub struct Headless {
    /// The script of a fresh run (None with `resume`).
    pub script: Option<PathBuf>,
    /// Continue this run folder with its stored script and params.
    pub resume: Option<PathBuf>,
    /// `--params-json` values (a resumed run reads its stored params instead).
    pub params: Map,
    /// `--set KEY=VALUE` texts, read as the script's declared types.
    pub set: Vec<(String, String)>,
    pub device: String,
    pub seed: u64,
    pub limits: Limits,
    /// `--allow-read` / `--allow-write` folders (added to a resumed run's stored ones).
    pub grants: Grants,
    pub timeout: Option<Duration>,
    /// `--run-dir`: the run folder (default `runs/<stem>-<YYYYmmdd-HHMMSS>`).
    pub run_dir: Option<PathBuf>,
    pub keep_checkpoints: usize,
    pub halt_on_nonfinite: Vec<String>,
    /// How long a cooperative script gets after a signal before it is stopped by force.
    pub stop_grace: Duration,
}

/// Exit code of a rejected command line (`--set` of an undeclared, mistyped or out-of-range
/// parameter).
pub const EXIT_USAGE: i32 = 2;

/// The part of `params.json` a resumed run reads back.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredParams {
    script: String,
    params: serde_json::Value,
    seed: u64,
    device: String,
    max_operations: u64,
    max_call_levels: usize,
    max_string_size: usize,
    max_array_size: usize,
    max_map_size: usize,
    /// Absent in runs made before the cap existed (they get the default).
    #[serde(default)]
    max_tensor_memory: Option<u64>,
    /// The `--allow-read` / `--allow-write` folders of the run.
    #[serde(default)]
    grants: Grants,
    timeout_seconds: Option<f64>,
    keep_checkpoints: usize,
    halt_on_nonfinite: Vec<String>,
    started: String,
    lpo_version: String,
}

const SCRIPT_COPY: &str = "script.rhai";

/// Run `h` to completion; returns the process exit code (see `lpo run --help`).
pub fn run(mut h: Headless) -> i32 {
    let (script, run_path, stored) = if let Some(dir) = &h.resume {
        match read_stored(dir) {
            Ok(stored) => (dir.join(SCRIPT_COPY), dir.clone(), Some(stored)),
            Err(e) => {
                log::report(&format!("error: cannot resume {}: {e:#}", dir.display()));
                return Failure::NotFound.exit_code();
            }
        }
    } else {
        let Some(script) = h.script.clone() else {
            log::report("error: give a SCRIPT or --resume RUN_DIR");
            return 2;
        };
        let path = h
            .run_dir
            .clone()
            .unwrap_or_else(|| RunDir::default_path(Path::new("runs"), &script));
        (script, path, None)
    };
    if !script.is_file() {
        log::report(&format!("error: script not found: {}", script.display()));
        return Failure::NotFound.exit_code();
    }
    let source = match super::read_script(&script) {
        Ok(s) => s,
        Err((code, e)) => {
            log::report(&format!("error: {e}"));
            return code;
        }
    };
    let original = stored
        .as_ref()
        .map(|s| PathBuf::from(&s.script))
        .unwrap_or_else(|| script.clone());
    if let Some(stored) = &stored {
        h.params = match super::params_json::params_from_json(stored.params.clone()) {
            Ok(m) => m,
            Err(_) => {
                log::report(&format!(
                    "error: {}: `params` is not a map",
                    run_path.join("params.json").display()
                ));
                return 1;
            }
        };
        h.seed = stored.seed;
        h.device = stored.device.clone();
        h.limits = Limits {
            max_operations: stored.max_operations,
            max_call_levels: stored.max_call_levels,
            max_string_size: stored.max_string_size,
            max_array_size: stored.max_array_size,
            max_map_size: stored.max_map_size,
            max_tensor_memory: stored
                .max_tensor_memory
                .unwrap_or_else(crate::tensor::memory::default_cap),
            ..Limits::default()
        };
        h.grants = stored.grants.clone().union(&h.grants);
        if h.timeout.is_none() {
            h.timeout = stored.timeout_seconds.map(Duration::from_secs_f64);
        }
        h.keep_checkpoints = stored.keep_checkpoints;
        h.halt_on_nonfinite = stored.halt_on_nonfinite.clone();
    }
    let device = match crate::tensor::parse_device(&h.device) {
        Ok(d) => d,
        Err(e) => {
            log::report(&format!("error: {e:#}"));
            return 2;
        }
    };
    // Parse errors and rejected params are reported before a run folder is made.
    {
        let se = engine_for(
            &original,
            Host::new(RunControl::new(), candle_core::Device::Cpu, 0),
            h.limits.clone(),
        );
        let declared = match super::declaration_of(&se, &original, &source) {
            Ok(d) => d,
            Err(code) => return code,
        };
        let set = std::mem::take(&mut h.set);
        match super::cli_params(declared.as_ref(), std::mem::take(&mut h.params), &set) {
            Ok(params) => h.params = params,
            Err(problems) => {
                let name = original.display().to_string();
                log::report(&super::params_report(&name, declared.as_ref(), &problems));
                return EXIT_USAGE;
            }
        }
    }
    let mut run = match RunDir::open(&run_path) {
        Ok(r) => r,
        Err(e) => {
            log::report(&format!("error: {e:#}"));
            return if e.downcast_ref::<Locked>().is_some() {
                EXIT_LOCKED
            } else {
                1
            };
        }
    };
    run.keep_checkpoints = h.keep_checkpoints;
    run.halt_on_nonfinite = h.halt_on_nonfinite.clone();
    let run = Arc::new(run);
    if let Err(e) = log::tee_to(&run_path.join("run.log")) {
        tracing::warn!("cannot write {}: {e}", run_path.join("run.log").display());
    }
    let resuming = stored.is_some();
    if !resuming && run_path.join("params.json").exists() {
        log::report(&format!(
            "error: run folder {} already holds a run; continue it with `lpo run --resume {}` or choose another --run-dir",
            run_path.display(),
            run_path.display()
        ));
        return 1;
    }
    if !resuming {
        h.params.entry("resume".into()).or_insert(Dynamic::FALSE);
        if let Err(e) = write_stored(&run_path, &script, &source, &h) {
            log::report(&format!(
                "error: cannot write the run folder {}: {e:#}",
                run_path.display()
            ));
            return 1;
        }
        tracing::info!("run folder {}", run_path.display());
    } else {
        if run.finished() {
            log::report(&format!(
                "run {} has already finished (exit code 0 in {}): nothing to resume",
                run_path.display(),
                run_path.join("exit.json").display()
            ));
            return 0;
        }
        h.params.insert("resume".into(), Dynamic::TRUE);
        let latest = match run.clear_exit().and_then(|()| run.prepare_resume()) {
            Ok(latest) => latest,
            Err(e) => {
                log::report(&format!(
                    "error: cannot resume {}: {e:#}",
                    run_path.display()
                ));
                return 1;
            }
        };
        tracing::info!(
            "resuming {} ({})",
            run_path.display(),
            latest
                .map(|s| format!("latest checkpoint: step {s}"))
                .unwrap_or_else(|| "no checkpoint yet".into())
        );
    }
    let control = RunControl::new();
    if let Err(e) = crate::runtime::signals::install(control.clone(), run.clone(), h.stop_grace) {
        tracing::warn!("cannot install signal handlers: {e}");
    }
    // Writes go to this run folder and --allow-write folders only: a scheduled job cannot
    // touch another job's folder.
    let files = h.grants.for_run(&original, &run_path, &h.params);
    let code = run_script(
        RunOptions {
            script: script.clone(),
            params: h.params,
            device,
            seed: h.seed,
            limits: h.limits,
            timeout: h.timeout,
            run: Some(run.clone()),
            source_name: Some(original),
            files,
        },
        control,
    );
    if let Err(e) = run.write_exit(code) {
        tracing::warn!("cannot record the exit code: {e:#}");
    }
    tracing::info!("run {} ended with exit code {code}", run_path.display());
    code
}

fn read_stored(dir: &Path) -> anyhow::Result<StoredParams> {
    use anyhow::Context;
    if !dir.is_dir() {
        anyhow::bail!("no such run folder");
    }
    let path = dir.join("params.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a params file of lpo", path.display()))
}

fn write_stored(dir: &Path, script: &Path, source: &str, h: &Headless) -> anyhow::Result<()> {
    crate::fsutil::atomic_write(&dir.join(SCRIPT_COPY), source.as_bytes())?;
    let params = super::params_json::to_json(&Dynamic::from_map(h.params.clone()))
        .map_err(|e| anyhow::anyhow!("params: {e}"))?;
    let stored = StoredParams {
        script: std::path::absolute(script)
            .unwrap_or_else(|_| script.to_path_buf())
            .display()
            .to_string(),
        params,
        seed: h.seed,
        device: h.device.clone(),
        max_operations: h.limits.max_operations,
        max_call_levels: h.limits.max_call_levels,
        max_string_size: h.limits.max_string_size,
        max_array_size: h.limits.max_array_size,
        max_map_size: h.limits.max_map_size,
        max_tensor_memory: Some(h.limits.max_tensor_memory),
        grants: h.grants.absolute(),
        timeout_seconds: h.timeout.map(|t| t.as_secs_f64()),
        keep_checkpoints: h.keep_checkpoints,
        halt_on_nonfinite: h.halt_on_nonfinite.clone(),
        started: chrono::Local::now().to_rfc3339(),
        lpo_version: env!("CARGO_PKG_VERSION").into(),
    };
    crate::fsutil::atomic_write(
        &dir.join("params.json"),
        serde_json::to_string_pretty(&stored)?.as_bytes(),
    )
}
