//! `tests/interop/run_python_checks.sh`, the runner of the optional Python interop checks,
//! without Python: a stand-in interpreter (a shell script) "imports" diffusers or not and runs
//! check files written as shell scripts, so skipping, failing and passing are all exercised.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RUNNER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/run_python_checks.sh"
);

fn write_script(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

/// A stand-in for python: `-c CODE` succeeds when `imports` (else fails like a missing module),
/// and a file argument runs as a shell script.
fn fake_python(dir: &Path, imports: bool) -> PathBuf {
    let import = if imports {
        "exit 0"
    } else {
        "echo \"ModuleNotFoundError: No module named 'diffusers'\" >&2; exit 1"
    };
    write_script(
        &dir.join(if imports { "python-ok" } else { "python-bare" }),
        &format!("#!/bin/sh\nif [ \"$1\" = -c ]; then {import}; fi\nexec /bin/sh \"$@\"\n"),
    )
}

fn run(python: &Path, lpo_bin: &str, checks: &[&Path]) -> (i32, String) {
    let o: Output = Command::new("bash")
        .arg(RUNNER)
        .args(checks)
        .env("PYTHON", python)
        .env("LPO_BIN", lpo_bin)
        .output()
        .expect("run bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().expect("exit code"), text)
}

const LPO: &str = env!("CARGO_BIN_EXE_lpo");

#[test]
fn checks_are_skipped_with_one_line_when_diffusers_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let python = fake_python(dir.path(), false);
    let failing = write_script(&dir.path().join("check_fails.py"), "exit 1\n");
    let (code, out) = run(&python, LPO, &[&failing]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("skipped") && out.contains("No module named 'diffusers'"),
        "{out}"
    );
}

#[test]
fn a_failing_check_fails_the_run_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let python = fake_python(dir.path(), true);
    let failing = write_script(&dir.path().join("check_fails.py"), "exit 3\n");
    let passing = write_script(&dir.path().join("check_passes.py"), "echo ran-ok\n");
    let (code, out) = run(&python, LPO, &[&failing, &passing]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ran-ok"), "later checks still run: {out}");
    assert!(
        out.contains("1 passed, 1 failed") && out.contains("check_fails.py"),
        "{out}"
    );
}

#[test]
fn passing_checks_get_the_lpo_binary_as_an_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let python = fake_python(dir.path(), true);
    let check = write_script(
        &dir.path().join("check_bin.py"),
        "\"$LPO_BIN\" --version || exit 1\necho \"bin=$LPO_BIN\"\n",
    );
    let (code, out) = run(&python, LPO, &[&check]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("lpo "), "lpo --version did not run: {out}");
    assert!(out.contains("bin=/"), "LPO_BIN not absolute: {out}");

    let (code, out) = run(&python, "/nonexistent/lpo", &[&check]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("/nonexistent/lpo"), "{out}");
}
