//! Headless runs: compile a script, run it with `params`, and turn the outcome into an exit
//! code and a readable error report.

pub mod headless;
pub mod params_json;
pub mod report;

use std::path::{Path, PathBuf};

use rhai::{Map, Scope};

use crate::runtime::control::RunControl;
use crate::runtime::{confinement, log};
pub use crate::script::params::typed_value;
use crate::script::params::{Declaration, HOST_KEYS};
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
    pub run: Option<std::sync::Arc<crate::runtime::run_dir::RunDir>>,
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

/// Split `key=value`; the value stays text until it meets the script's declaration
/// ([`cli_params`]).
pub fn parse_set(arg: &str) -> Result<(String, String), String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("--set `{arg}`: expected key=value"))?;
    let key = key.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return Err(format!(
            "--set `{arg}`: `{key}` is not a valid parameter name"
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

/// The `params` of a run from `--params-json` values and `--set` texts. A script that declares
/// its parameters gets each text read as the declared type, and every unknown key, wrong type
/// or out-of-range value is returned as a problem; otherwise texts are typed as they read
/// (int, float, bool, `()`, else string).
pub fn cli_params(
    declared: Option<&Declaration>,
    mut params: Map,
    set: &[(String, String)],
) -> Result<Map, Vec<String>> {
    let Some(declared) = declared else {
        for (k, text) in set {
            params.insert(k.as_str().into(), typed_value(text));
        }
        return Ok(params);
    };
    let mut problems = Vec::new();
    for (k, text) in set {
        match declared.get(k) {
            Some(spec) => match spec.read_text(text) {
                Ok(v) => {
                    params.insert(k.as_str().into(), v);
                }
                Err(e) => problems.push(format!("--set {k}={text}: {e}")),
            },
            None if HOST_KEYS.contains(&k.as_str()) => {
                params.insert(k.as_str().into(), typed_value(text));
            }
            None => problems.push(format!("--set {k}: {}", declared.unknown(k))),
        }
    }
    let set_keys: Vec<&str> = set.iter().map(|(k, _)| k.as_str()).collect();
    let unset: Map = params
        .iter()
        .filter(|(k, _)| !set_keys.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    problems.extend(declared.problems(&unset, &|v| v.type_name().to_string()));
    if problems.is_empty() {
        Ok(params)
    } else {
        Err(problems)
    }
}

/// The message of `lpo run` for rejected params (exit 2): each problem and the accepted names.
pub fn params_report(name: &str, declared: Option<&Declaration>, problems: &[String]) -> String {
    let mut text = String::new();
    for p in problems {
        text.push_str(&format!("error: {name}: {p}\n"));
    }
    if let Some(d) = declared {
        text.push_str(&format!(
            "accepted parameters: {}\n(`lpo run {name} --help` describes each)",
            d.names().join(", ")
        ));
    }
    text.trim_end().to_string()
}

/// The text of a script file. Err: the exit code (66 unreadable, 65 not UTF-8) and a message
/// naming the file.
pub fn read_script(path: &Path) -> Result<String, (i32, String)> {
    let bytes = std::fs::read(path).map_err(|e| {
        (
            Failure::NotFound.exit_code(),
            format!("cannot read script {}: {e}", path.display()),
        )
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let col = good.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        (
            Failure::Parse.exit_code(),
            format!(
                "{}:{line}:{col}: not UTF-8 text (byte 0x{:02x}); a script must be UTF-8",
                path.display(),
                e.as_bytes()[good.len()]
            ),
        )
    })
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
    let source = match read_script(&opts.script) {
        Ok(s) => s,
        Err((code, e)) => {
            log::report(&format!("error: {e}"));
            return code;
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

/// The script's text and an engine to compile it with, for commands that never run it (`check`,
/// `run SCRIPT --help`). Err: the exit code, after the unreadable script was reported.
fn offline_engine(path: &Path) -> Result<(String, ScriptEngine), i32> {
    let source = read_script(path).map_err(|(code, e)| {
        eprintln!("error: {e}");
        code
    })?;
    let se = engine_for(
        path,
        Host::new(RunControl::new(), candle_core::Device::Cpu, 0),
        Limits::default(),
    );
    Ok((source, se))
}

/// Compile only; report every parse error found, and a malformed parameter declaration.
/// Returns the exit code.
pub fn check_script(path: &Path) -> i32 {
    let (source, se) = match offline_engine(path) {
        Ok(found) => found,
        Err(code) => return code,
    };
    let errors = report::all_parse_errors(&se.engine, &source);
    let name = path.display().to_string();
    for e in &errors {
        report::print_parse_error(&name, &source, e);
    }
    if !errors.is_empty() {
        eprintln!("{name}: {} error(s)", errors.len());
        return Failure::Parse.exit_code();
    }
    if let Err(code) = declaration_of(&se, path, &source) {
        return code;
    }
    println!("{name}: ok");
    0
}

/// The parameter declaration of a script (compiled with `se`, whose resolver finds the module
/// a `PARAMS_FROM` names). Err: the exit code, after the parse error or malformed declaration
/// was reported.
pub fn declaration_of(
    se: &ScriptEngine,
    path: &Path,
    source: &str,
) -> Result<Option<Declaration>, i32> {
    let name = path.display().to_string();
    se.engine.compile(source).map_err(|e| {
        log::report(&format!(
            "error: {}",
            report::format_at(&name, source, e.position(), &e.err_type().to_string())
        ));
        Failure::Parse.exit_code()
    })?;
    Declaration::of_script_with(source, &|module| se.resolver.source_of(module)).map_err(|e| {
        log::report(&format!("error: {name}: {e}"));
        Failure::Parse.exit_code()
    })
}

/// `lpo run SCRIPT --help`: the script's header comment and its declared parameters, read
/// from the compiled script without running it. Returns the exit code.
pub fn print_params_help(path: &Path) -> i32 {
    let (source, se) = match offline_engine(path) {
        Ok(found) => found,
        Err(code) => return code,
    };
    let declared = match declaration_of(&se, path, &source) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let name = path.display();
    let header: Vec<&str> = source
        .lines()
        .map_while(|l| l.trim_start().strip_prefix("//"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    let mut text = String::new();
    if !header.is_empty() {
        text.push_str(&header.join("\n"));
        text.push_str("\n\n");
    }
    match declared {
        Some(d) => text.push_str(&format!(
            "Parameters (lpo run {name} --set NAME=VALUE ...):\n{}",
            d.help()
        )),
        None => text.push_str(&format!(
            "{name} declares no parameters (no `const PARAMS`); it reads the map `params` itself.\n"
        )),
    }
    text.push_str("\n`lpo run --help` lists the options of `lpo run` itself.\n");
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
    0
}
