//! Declared script parameters through the real binary: `lpo run` checks `--set` against a
//! script's `const PARAMS` (exit 2 with the accepted names, before a run folder is made),
//! `lpo run SCRIPT --help` lists them without running the script, and every shipped recipe
//! declares its parameters. Also the small command-line defects of issue #17: a non-UTF-8
//! script, `lpo fns` with no match, a JSON object as a prompt file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

fn lpo(dir: &Path, args: &[&str]) -> Output {
    common::run_lpo(dir, args, Duration::from_secs(60))
}

fn code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {o:?}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A script that declares four parameters and writes what it got to `got.json` in its run folder.
const DECLARING: &str = r#"// Trains nothing; reports its params.
const PARAMS = #{
    epochs: #{value: 5, min: 1, doc: "training epochs"},
    lr: #{value: 1e-5, doc: "learning rate"},
    name: #{value: "run", type: "path", doc: "a name"},
    clip: #{value: (), type: "float", doc: "clipping; () = off"},
    mode: #{value: "a", choices: ["a", "b"], doc: "the mode"},
};
let p = check_params(PARAMS, params);
write_json(p, run_dir() + "/got.json");
"#;

fn declaring_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("decl.rhai"), DECLARING).unwrap();
    dir
}

fn run_with(dir: &Path, sets: &[&str]) -> Output {
    let mut args = vec!["run", "decl.rhai", "--run-dir", "run"];
    for s in sets {
        args.extend(["--set", s]);
    }
    lpo(dir, &args)
}

#[test]
fn unknown_mistyped_and_out_of_range_params_exit_2_with_the_accepted_list() {
    let dir = declaring_dir();
    for (set, problem) in [
        (
            "epoch=5",
            "unknown parameter `epoch` (did you mean `epochs`?)",
        ),
        ("epochs=abc", "`epochs` takes int >= 1, got `abc`"),
        ("epochs=2.5", "`epochs` takes int >= 1, got `2.5`"),
        ("epochs=-3", "`epochs` must be int >= 1, got -3"),
        ("lr=fast", "`lr` takes float, got `fast`"),
        ("mode=c", "`mode` must be one of \"a\", \"b\", got \"c\""),
    ] {
        let o = run_with(dir.path(), &[set]);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "--set {set}: {err}");
        assert!(err.contains(problem), "--set {set}: {err}");
        assert!(
            err.contains("accepted parameters: clip, epochs, lr, mode, name"),
            "--set {set}: {err}"
        );
        assert!(
            !dir.path().join("run").exists(),
            "--set {set}: a rejected run makes no run folder"
        );
    }
}

#[test]
fn valid_set_values_reach_the_script_as_the_declared_types_over_the_defaults() {
    let dir = declaring_dir();
    let o = run_with(dir.path(), &["epochs=7", "lr=1", "name=007", "clip=0.5"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/got.json")).unwrap())
            .unwrap();
    assert_eq!(got["epochs"], serde_json::json!(7));
    // An int where a float is declared stays as given; a path keeps its text.
    assert_eq!(got["lr"], serde_json::json!(1));
    assert_eq!(got["name"], serde_json::json!("007"));
    assert_eq!(got["clip"], serde_json::json!(0.5));
    // Unset ones get their defaults; the host's `resume` passes.
    assert_eq!(got["mode"], serde_json::json!("a"));
    assert_eq!(got["resume"], serde_json::json!(false));
}

#[test]
fn help_lists_the_params_without_running_the_script() {
    let dir = declaring_dir();
    let o = lpo(dir.path(), &["run", "decl.rhai", "--help"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    for text in [
        "Trains nothing; reports its params.",
        "epochs",
        "int >= 1 = 5",
        "training epochs",
        "clip",
        "float|() = ()",
        "one of \"a\", \"b\" = \"a\"",
    ] {
        assert!(out.contains(text), "`{text}` missing from:\n{out}");
    }
    assert!(!dir.path().join("run/got.json").exists(), "the script ran");
    assert!(!dir.path().join("runs").exists(), "a run folder was made");

    // `lpo run --help` alone is the command's own help.
    let o = lpo(dir.path(), &["run", "--help"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("--set"), "{}", stdout(&o));
}

#[test]
fn a_script_without_a_declaration_keeps_free_params() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("free.rhai"),
        "if params.anything != 3 { throw \"not passed\"; }\n",
    )
    .unwrap();
    let o = lpo(dir.path(), &["run", "free.rhai", "--set", "anything=3"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = lpo(dir.path(), &["run", "free.rhai", "--help"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("declares no parameters"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_declaration_that_is_not_literal_is_a_parse_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("computed.rhai"),
        concat!(
            "let x = 2;\n",
            "const PARAMS = #{n: #{value: x, doc: \"n\"}};\n",
            "let p = check_params(PARAMS, params);\n"
        ),
    )
    .unwrap();
    for cmd in ["check", "run"] {
        let o = lpo(dir.path(), &[cmd, "computed.rhai"]);
        assert_eq!(code(&o), 65, "{cmd}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("computed.rhai") && stderr(&o).contains("literals"),
            "{cmd}: {}",
            stderr(&o)
        );
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every recipe under scripts/ (common.rhai is a module, not a recipe).
fn recipes() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![repo().join("scripts")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rhai")
                && path.file_name().is_some_and(|n| n != "common.rhai")
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_recipe_declares_its_params_and_rejects_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let recipes = recipes();
    assert!(recipes.len() >= 10, "{recipes:?}");
    for recipe in recipes {
        let path = recipe.display().to_string();
        let o = lpo(dir.path(), &["run", &path, "--help"]);
        assert_eq!(code(&o), 0, "{path}: {}", stderr(&o));
        assert!(
            stdout(&o).contains("Parameters ("),
            "{path}:\n{}",
            stdout(&o)
        );
        let o = lpo(dir.path(), &["run", &path, "--set", "no_such_param=1"]);
        assert_eq!(code(&o), 2, "{path}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("unknown parameter `no_such_param`"),
            "{path}: {}",
            stderr(&o)
        );
    }
    assert!(
        !dir.path().join("runs").exists(),
        "a rejected run made a folder"
    );
}

#[test]
fn a_non_utf8_script_is_a_parse_error_naming_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("latin1.rhai"),
        b"let a = 1;\nlet b = \"caf\xe9\";\n",
    )
    .unwrap();
    for cmd in ["run", "check"] {
        let o = lpo(dir.path(), &[cmd, "latin1.rhai"]);
        assert_eq!(code(&o), 65, "{cmd}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("latin1.rhai:2:13: not UTF-8"),
            "{cmd}: {}",
            stderr(&o)
        );
    }
    let o = lpo(dir.path(), &["run", "latin1.rhai", "--help"]);
    assert_eq!(code(&o), 65, "{}", stderr(&o));
    // The same for an imported module.
    std::fs::write(
        dir.path().join("latin1mod.rhai"),
        b"fn f() { \"caf\xe9\" }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("imports.rhai"),
        "import \"./latin1mod\" as m;\nm::f();\n",
    )
    .unwrap();
    let o = lpo(dir.path(), &["run", "imports.rhai"]);
    assert_eq!(code(&o), 65, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("latin1mod.rhai") && stderr(&o).contains("not UTF-8"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn fns_with_no_match_says_so_and_suggests_close_names() {
    let dir = tempfile::tempdir().unwrap();
    let o = lpo(dir.path(), &["fns", "load_unte"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no function matches `load_unte`")
            && stderr(&o).contains("`load_unet`"),
        "{}",
        stderr(&o)
    );
    let o = lpo(dir.path(), &["fns", "load_unet"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("load_unet("), "{}", stdout(&o));
}

#[test]
fn a_json_object_prompt_file_is_an_error_naming_the_accepted_shapes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("prompts.json"),
        r#"{"caption": "a red circle"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("read.rhai"),
        "let p = read_prompts(\"prompts.json\");\n",
    )
    .unwrap();
    let o = lpo(dir.path(), &["run", "read.rhai"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("prompts.json") && err.contains("a JSON list of strings"),
        "{err}"
    );
}
