//! The command line contract of API.md through the real binary: every exit code, `--set`
//! typing, `check` and `fns`. Every run happens in a temporary working directory.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LPO: &str = env!("CARGO_BIN_EXE_lpo");

fn lpo(dir: &Path, args: &[&str]) -> Output {
    common::run_lpo(dir, args, Duration::from_secs(30))
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {o:?}"))
}

#[test]
fn success_and_runtime_error_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "ok.rhai",
        "let t = tensor([1.0, 2.0]) * 2;\nif t.sum().item() != 6.0 { throw \"bad\"; }\n",
    );
    let o = lpo(dir.path(), &["run", "ok.rhai"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    write(
        dir.path(),
        "boom.rhai",
        "let a = zeros([2]);\n\nlet b = a + zeros([3]);\n",
    );
    let o = lpo(dir.path(), &["run", "boom.rhai"]);
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(err.contains("boom.rhai:3:11"), "{err}");
    assert!(
        err.contains("let b = a + zeros([3]);"),
        "the source line is shown: {err}"
    );

    write(
        dir.path(),
        "throw.rhai",
        "let x = 1;\nthrow \"custom failure\";\n",
    );
    let o = lpo(dir.path(), &["run", "throw.rhai"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("custom failure"), "{}", stderr(&o));
}

#[test]
fn parse_errors_exit_65_and_check_lists_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let bad = "let a = 1;\nlet b = ;\nlet c = 3;\nfn f( { }\nlet d = 4;\nlet e = (1 + ;\n";
    write(dir.path(), "bad.rhai", bad);
    let o = lpo(dir.path(), &["run", "bad.rhai"]);
    assert_eq!(code(&o), 65, "{}", stderr(&o));
    assert!(stderr(&o).contains("bad.rhai:2:"), "{}", stderr(&o));

    let o = lpo(dir.path(), &["check", "bad.rhai"]);
    assert_eq!(code(&o), 65);
    let err = stderr(&o);
    for (line, text) in [(2, "let b = ;"), (4, "fn f( { }"), (6, "let e = (1 + ;")] {
        assert!(
            err.contains(&format!("bad.rhai:{line}:")),
            "line {line} missing: {err}"
        );
        assert!(err.contains(text), "source line `{text}` missing: {err}");
    }

    write(dir.path(), "good.rhai", "let a = 1;\n");
    let o = lpo(dir.path(), &["check", "good.rhai"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn missing_script_and_missing_module_exit_66() {
    let dir = tempfile::tempdir().unwrap();
    let o = lpo(dir.path(), &["run", "nope.rhai"]);
    assert_eq!(code(&o), 66);
    assert!(stderr(&o).contains("nope.rhai"), "{}", stderr(&o));
    let o = lpo(dir.path(), &["check", "nope.rhai"]);
    assert_eq!(code(&o), 66);

    write(
        dir.path(),
        "imp.rhai",
        "import \"no_such_module\" as m;\nm::f();\n",
    );
    let o = lpo(dir.path(), &["run", "imp.rhai"]);
    assert_eq!(code(&o), 66, "{}", stderr(&o));
    assert!(stderr(&o).contains("no_such_module"), "{}", stderr(&o));
}

#[test]
fn stdlib_import_works_from_any_directory() {
    // No ./stdlib here: the copy compiled into the binary is used.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "imp.rhai",
        "import \"util\" as u;\nu::check(u::mean_of([1, 3]) == 2.0, \"mean\");\n",
    );
    let o = lpo(dir.path(), &["run", "imp.rhai"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn errors_inside_the_embedded_stdlib_show_file_line_and_source() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "m.rhai",
        "import \"util\" as u;\nlet a = zeros([2]);\nu::check_close(a, zeros([3]), 0.0);\n",
    );
    let o = Command::new(LPO)
        .args(["run", "m.rhai"])
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(code(&o), 1);
    let err = stderr(&o);
    assert!(
        err.contains("<stdlib>/util.rhai:") && err.contains("shapes differ"),
        "{err}"
    );
    assert!(
        err.contains("let d = max_abs_diff(a, b);"),
        "module source line shown: {err}"
    );
    assert!(
        err.contains("in call to `check_close` at m.rhai:3:"),
        "{err}"
    );
    assert!(
        !err.contains("candle_core::error"),
        "no Rust backtrace in a script error: {err}"
    );
}

#[test]
fn safety_limit_exits_3_and_deadline_124() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "spin.rhai", "let x = 0;\nloop { x += 1; }\n");
    let o = lpo(
        dir.path(),
        &["run", "spin.rhai", "--max-operations", "10000"],
    );
    assert_eq!(code(&o), 3, "{}", stderr(&o));

    let start = Instant::now();
    let o = lpo(dir.path(), &["run", "spin.rhai", "--timeout", "0.5"]);
    assert_eq!(code(&o), 124, "{}", stderr(&o));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn sigint_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "wait.rhai",
        "print(\"ready\");\nlet x = 0;\nloop { x += 1; }\n",
    );
    let mut child = Command::new(LPO)
        .args(["run", "wait.rhai"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the script runs (signal handlers are installed before it starts).
    let mut reader = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let start = Instant::now();
    while !line.contains("ready") {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 || start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("script never became ready");
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Drain stderr so the child cannot block on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("no exit after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130), "{status:?}");
}

#[test]
fn set_values_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "params.rhai",
        r#"
// Script functions do not see the caller's scope: `params` is passed in.
fn expect(params, key, ty, value) {
    if type_of(params[key]) != ty { throw `${key}: type ${type_of(params[key])}, expected ${ty}`; }
    if params[key] != value { throw `${key}: value ${params[key]}, expected ${value}`; }
}
expect(params, "i", "i64", 3);
expect(params, "neg", "i64", -4);
expect(params, "f", "f64", 2.5);
expect(params, "small", "f64", 0.001);
expect(params, "b", "bool", true);
expect(params, "off", "bool", false);
expect(params, "s", "string", "hello world");
expect(params, "path", "string", "a/b.json");
"#,
    );
    let o = lpo(
        dir.path(),
        &[
            "run",
            "params.rhai",
            "--set",
            "i=3",
            "--set",
            "neg=-4",
            "--set",
            "f=2.5",
            "--set",
            "small=1e-3",
            "--set",
            "b=true",
            "--set",
            "off=false",
            "--set",
            "s=hello world",
            "--set",
            "path=a/b.json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // A missing parameter is a runtime error, not a crash.
    let o = lpo(dir.path(), &["run", "params.rhai", "--set", "i=3"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    // Errors inside script functions name the call site as file:line:col.
    assert!(stderr(&o).contains("params.rhai:8:1"), "{}", stderr(&o));
}

#[test]
fn fns_lists_every_api_tensor_function() {
    let dir = tempfile::tempdir().unwrap();
    let o = lpo(dir.path(), &["fns"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let names = [
        "tensor",
        "zeros",
        "ones",
        "arange",
        "rng",
        "randn",
        "rand",
        "randint",
        "shape",
        "dtype",
        "to_array",
        "item",
        "exp",
        "log",
        "sqrt",
        "sigmoid",
        "softmax",
        "clamp",
        "sum",
        "mean",
        "argmax",
        "reshape",
        "transpose",
        "narrow",
        "index_select",
        "gather",
        "sort",
        "cat",
        "stack",
        "load_safetensors",
        "save_safetensors",
        "max_abs_diff",
        "params_from",
        "adamw",
        "backward",
        "backward_step",
        "load_state",
    ];
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| {
            !out.lines()
                .any(|l| l.starts_with(&format!("{n}(")) || l.starts_with(&format!("get${n}(")))
        })
        .collect();
    assert!(missing.is_empty(), "not listed by `lpo fns`: {missing:?}");
    // Doc comments are shown under the signatures.
    assert!(out.contains("seeded"), "docs missing");
}

/// docs/API.md is what `lpo fns --markdown` prints: a binding whose docs or signature change
/// without regenerating it fails here (it had drifted from the code before this check).
#[test]
fn api_reference_is_regenerated() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = lpo(root, &["fns", "--markdown"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let committed = std::fs::read_to_string(root.join("docs/API.md")).unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout) == committed,
        "docs/API.md is stale: run `lpo fns --markdown > docs/API.md`"
    );
}

/// The reference names host types as scripts see them (`Lrm`, not the Rust `ScriptLrm`), and
/// lists the declared options of functions that take an option map.
#[test]
fn api_reference_uses_script_names_and_lists_options() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = lpo(root, &["fns", "--markdown"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let rust_names: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| w.starts_with("Script") && w.len() > "Script".len())
        .collect();
    assert!(
        rust_names.is_empty(),
        "Rust type names in the reference: {rust_names:?}"
    );
    let o = lpo(root, &["fns", "lpo_train_step"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("options:") && text.contains("beta: float = 500.0"),
        "{text}"
    );
}
