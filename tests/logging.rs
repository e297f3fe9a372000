//! The log filter through the real binary: `RUST_LOG` is honoured as tracing users expect,
//! `LPO_LOG` wins over it, a bad filter is reported, and `lpo --help` documents both.

use std::path::Path;
use std::process::{Command, Output, Stdio};

const SCRIPT: &str = "print(\"info-marker\");\ndebug(\"debug-marker\");\n";

/// `lpo run log.rhai` in `dir` with exactly the log variables given (none inherited).
fn run_with(dir: &Path, vars: &[(&str, &str)]) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lpo"));
    c.args(["run", "log.rhai"])
        .current_dir(dir)
        .env_remove("LPO_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for (k, v) in vars {
        c.env(k, v);
    }
    let o: Output = c.output().expect("spawn lpo");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "lpo run failed: {err}");
    err
}

fn script_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("log.rhai"), SCRIPT).unwrap();
    dir
}

#[test]
fn rust_log_turns_on_debug_lines_of_a_target() {
    let dir = script_dir();
    let plain = run_with(dir.path(), &[]);
    assert!(plain.contains("info-marker"), "{plain}");
    assert!(
        !plain.contains("debug-marker"),
        "debug logged by default: {plain}"
    );

    let debug = run_with(dir.path(), &[("RUST_LOG", "script=debug")]);
    assert!(
        debug.contains("debug-marker"),
        "RUST_LOG=script=debug ignored: {debug}"
    );
}

#[test]
fn lpo_log_wins_over_rust_log() {
    let dir = script_dir();
    let err = run_with(
        dir.path(),
        &[("RUST_LOG", "script=debug"), ("LPO_LOG", "warn")],
    );
    assert!(
        !err.contains("debug-marker") && !err.contains("info-marker"),
        "LPO_LOG=warn did not take precedence: {err}"
    );
    let err = run_with(dir.path(), &[("LPO_LOG", "script=debug")]);
    assert!(err.contains("debug-marker"), "{err}");
}

#[test]
fn a_bad_filter_is_reported_and_the_default_kept() {
    let dir = script_dir();
    let err = run_with(dir.path(), &[("RUST_LOG", "script=loud")]);
    assert!(
        err.contains("RUST_LOG") && err.contains("script=loud"),
        "bad RUST_LOG not reported: {err}"
    );
    assert!(err.contains("info-marker"), "default level lost: {err}");
}

#[test]
fn help_documents_the_log_variables() {
    let o = Command::new(env!("CARGO_BIN_EXE_lpo"))
        .arg("--help")
        .output()
        .expect("spawn lpo");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("LPO_LOG") && out.contains("RUST_LOG"),
        "`lpo --help` lacks the log variables: {out}"
    );
}
