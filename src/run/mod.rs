//! Headless runs: compile a script, run it with `params`, and turn the outcome into an exit
//! code and a readable error report.

pub mod confinement;
pub mod dir;
pub mod headless;
pub mod log;
pub mod params_json;
pub mod report;
pub mod signals;

use std::path::{Path, PathBuf};

use rhai::{Dynamic, Map, Scope};

use crate::control::RunControl;
use crate::script::{build_engine, classify, EngineOptions, Failure, Host, Limits, ScriptEngine};

/// Everything `lpo run` needs.
pub struct RunOptions {
    pub script: PathBuf,
    pub params: Map,
    pub device: candle_core::Device,
    pub seed: u64,
    pub limits: Limits,
    pub timeout: Option<std::time::Duration>,
    /// The run folder (checkpoints, metrics, `run_dir()`); None runs without one.
    pub run: Option<std::sync::Arc<dir::RunDir>>,
    /// The name errors and relative imports use for the script (default: `script` itself;
    /// a resumed run reads the stored copy but keeps the original name).
    pub source_name: Option<PathBuf>,
    /// The files the script may touch (see [`confinement`]).
    pub files: confinement::Confinement,
}

impl RunOptions {
    /// Options with no run folder, the default limits and no deadline.
    pub fn new(script: PathBuf, params: Map) -> Self {
        Self {
            script,
            params,
            device: candle_core::Device::Cpu,
            seed: 0,
            limits: Limits::default(),
            timeout: None,
            run: None,
            source_name: None,
            files: confinement::Confinement::unconfined(),
        }
    }
}

/// Parse `key=value` with a typed value: int, float, bool, else string.
pub fn parse_set(arg: &str) -> Result<(String, Dynamic), String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("--set `{arg}`: expected key=value"))?;
    let key = key.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return Err(format!(
            "--set `{arg}`: `{key}` is not a valid parameter name"
        ));
    }
    Ok((key.to_string(), typed_value(value)))
}

pub fn typed_value(value: &str) -> Dynamic {
    if let Ok(i) = value.parse::<i64>() {
        Dynamic::from(i)
    } else if let Ok(f) = value.parse::<f64>() {
        Dynamic::from(f)
    } else if value == "true" || value == "false" {
        Dynamic::from(value == "true")
    } else if value == "()" {
        Dynamic::UNIT
    } else {
        Dynamic::from(value.to_string())
    }
}

/// An engine for a script file: imports resolve beside it and in `./stdlib`.
pub fn engine_for(script: &Path, host: Host, limits: Limits) -> ScriptEngine {
    let options = EngineOptions {
        limits,
        script_dir: script.parent().map(Path::to_path_buf),
        ..EngineOptions::default()
    };
    build_engine(host, &options)
}

/// Run a script to completion; returns the process exit code.
pub fn run_script(opts: RunOptions, control: std::sync::Arc<RunControl>) -> i32 {
    let source = match std::fs::read_to_string(&opts.script) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read script {}: {e}", opts.script.display());
            return Failure::NotFound.exit_code();
        }
    };
    if let Some(timeout) = opts.timeout {
        control.set_timeout(timeout);
    }
    let mut host = Host::new(control.clone(), opts.device, opts.seed).with_confinement(opts.files);
    if let Some(run) = &opts.run {
        host = host.with_run_dir(run.clone());
    }
    let name_path = opts
        .source_name
        .clone()
        .unwrap_or_else(|| opts.script.clone());
    let se = engine_for(&name_path, host, opts.limits);
    let name = name_path.display().to_string();
    let mut ast = match se.engine.compile(&source) {
        Ok(ast) => ast,
        Err(e) => {
            log::report(&format!(
                "error: {}",
                report::format_at(&name, &source, e.position(), &e.err_type().to_string())
            ));
            return Failure::Parse.exit_code();
        }
    };
    ast.set_source(name.clone());
    let mut scope = Scope::new();
    scope.push_constant("params", opts.params);
    match se.engine.run_ast_with_scope(&mut scope, &ast) {
        Ok(()) => {
            // A script that stopped at a safe point after a signal still reports the signal.
            let soft = opts.run.as_ref().and_then(|r| r.soft_stop());
            match soft.or_else(|| control.stop_reason()) {
                Some(reason) => {
                    log::report(&format!("stopped at a safe point: {}", reason.describe()));
                    reason.exit_code()
                }
                None => 0,
            }
        }
        Err(err) => {
            let failure = classify(&err, &control);
            let text = match failure {
                Failure::Stopped(reason) => report::format_at(
                    &name,
                    &source,
                    err.position(),
                    &format!("stopped: {}", reason.describe()),
                ),
                _ => report::format_eval_error(&name, &source, &err),
            };
            log::report(&format!("error: {text}"));
            failure.exit_code()
        }
    }
}

/// Compile only; report every parse error found. Returns the exit code.
pub fn check_script(path: &Path) -> i32 {
    let source = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read script {}: {e}", path.display());
            return Failure::NotFound.exit_code();
        }
    };
    let se = engine_for(
        path,
        Host::new(RunControl::new(), candle_core::Device::Cpu, 0),
        Limits::default(),
    );
    let errors = report::all_parse_errors(&se.engine, &source);
    let name = path.display().to_string();
    for e in &errors {
        report::print_parse_error(&name, &source, e);
    }
    if errors.is_empty() {
        println!("{name}: ok");
        0
    } else {
        eprintln!("{name}: {} error(s)", errors.len());
        Failure::Parse.exit_code()
    }
}
