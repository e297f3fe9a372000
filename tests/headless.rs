//! `lpo run` as a real process: run folders, signals, resume, locks, non-finite losses and
//! every exit code of the command line contract.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CHECKPOINTING: &str = r#"
let steps = params.steps ?? 20;
let x = tensor([1.0, 2.0]);
let acc = 0.0;
let step = 0;
let ck = checkpoint_latest();
if ck != () { step = ck.step; x = ck.tensors.x; acc = ck.state.acc; }
while step < steps {
    if should_stop() { checkpoint_save(step, #{x: x}, #{acc: acc}); break; }
    x = x * 0.9 + 0.1;
    acc += x.sum().item();
    step += 1;
    log_metrics(#{step: step, loss: acc});
    if step % 5 == 0 { checkpoint_save(step, #{x: x}, #{acc: acc}); }
    sleep(params.delay ?? 0.0);
}
if !should_stop() { write_json(#{acc: acc, x: x.to_array(), resumed: params.resume}, run_dir() + "/result.json"); }
"#;

fn lpo(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lpo"));
    c.current_dir(dir).env("LPO_LOG", "info");
    c
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn output(c: &mut Command) -> (i32, String) {
    let Output { status, stderr, .. } = c.output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn finish(child: Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

fn checkpoint_steps(run: &Path) -> Vec<i64> {
    let mut steps: Vec<i64> = std::fs::read_dir(run.join("checkpoints"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("step-")
                        .and_then(|s| s.parse().ok())
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

#[test]
fn sigterm_checkpoints_and_resume_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ck.rhai", CHECKPOINTING);
    // Uninterrupted.
    let (code, err) = output(lpo(dir.path()).args(["run", "ck.rhai", "--run-dir", "full"]));
    assert_eq!(code, 0, "{err}");
    let full = json(&dir.path().join("full/result.json"));
    assert!(
        dir.path().join("full/params.json").is_file()
            && dir.path().join("full/script.rhai").is_file()
    );
    assert!(std::fs::read_to_string(dir.path().join("full/run.log"))
        .unwrap()
        .contains("run folder full"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("full/metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        20
    );

    // SIGTERM after the first checkpoint: the script stops at its next safe point.
    let run = dir.path().join("cut");
    let child = lpo(dir.path())
        .args(["run", "ck.rhai", "--run-dir", "cut", "--set", "delay=0.05"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first checkpoint", Duration::from_secs(20), || {
        run.join("checkpoints/step-5").is_dir()
    });
    signal(&child, libc::SIGTERM);
    let (code, err) = finish(child);
    assert_eq!(code, 143, "{err}");
    assert!(err.contains("terminated (SIGTERM)"), "{err}");
    let steps = checkpoint_steps(&run);
    let last = *steps.last().unwrap();
    assert!((5..20).contains(&last), "checkpoints {steps:?}");
    assert!(!run.join("result.json").exists());

    let (code, err) = output(lpo(dir.path()).args(["run", "--resume", "cut"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("latest checkpoint: step {last}")),
        "{err}"
    );
    let resumed = json(&run.join("result.json"));
    assert_eq!(resumed["acc"], full["acc"]);
    assert_eq!(resumed["x"], full["x"]);
    assert_eq!(resumed["resumed"], true);
    assert_eq!(full["resumed"], false);
}

#[test]
fn a_second_process_on_the_same_run_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "ck.rhai", CHECKPOINTING);
    let run = dir.path().join("shared");
    let mut first = lpo(dir.path())
        .args([
            "run",
            "ck.rhai",
            "--run-dir",
            "shared",
            "--set",
            "delay=0.2",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the first run to start", Duration::from_secs(20), || {
        run.join("params.json").is_file()
    });
    let (code, err) = output(lpo(dir.path()).args(["run", "ck.rhai", "--run-dir", "shared"]));
    assert_eq!(code, 75, "{err}");
    assert!(
        err.contains(&format!("in use by process {}", first.id())),
        "{err}"
    );
    let (code, err) = output(lpo(dir.path()).args(["run", "--resume", "shared"]));
    assert_eq!(code, 75, "{err}");
    first.kill().unwrap();
    first.wait().unwrap();
    // A finished run folder is not overwritten by a fresh run.
    let (code, err) = output(lpo(dir.path()).args(["run", "ck.rhai", "--run-dir", "shared"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already holds a run"), "{err}");
}

#[test]
fn a_nan_loss_halts_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "nan.rhai",
        r#"
        let w = tensor([1.0]);
        for step in 1..=10 {
            let loss = if step == 8 { 0.0 / 0.0 } else { 1.0 / step };
            w = w * 0.5;
            if step % 3 == 0 { checkpoint_save(step, #{w: w}, #{loss: loss}); }
            log_metrics(#{step: step, loss: loss, lr: 0.1});
        }
        "#,
    );
    let (code, err) = output(lpo(dir.path()).args(["run", "nan.rhai", "--run-dir", "r"]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("non-finite `loss` at step 8"), "{err}");
    assert!(err.contains("step-6"), "{err}");
    let run = dir.path().join("r");
    assert_eq!(checkpoint_steps(&run), vec![3, 6]);
    let state = json(&run.join("checkpoints/step-6/state.json"));
    assert_eq!(state["step"], 6);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 8);
    assert!(
        metrics.lines().last().unwrap().contains("\"loss\":\"NaN\""),
        "{metrics}"
    );
    assert!(std::fs::read_to_string(run.join("run.log"))
        .unwrap()
        .contains("non-finite"));
}

#[test]
fn every_exit_code_of_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ok.rhai", "let x = tensor([1.0]); print(x);");
    write(d, "parse.rhai", "let x = ;");
    write(d, "runtime.rhai", "let x = 1;\nthrow \"bad value\";");
    write(d, "spin.rhai", "let i = 0; loop { i += 1; }");
    write(d, "import.rhai", "import \"no_such_module\" as m;");
    let cases: &[(&[&str], i32, &str)] = &[
        (&["run", "ok.rhai"], 0, ""),
        (&["run", "parse.rhai"], 65, "parse.rhai:1:9"),
        (&["run", "missing.rhai"], 66, "script not found"),
        (&["run", "import.rhai"], 66, "no_such_module"),
        (&["run", "runtime.rhai"], 1, "runtime.rhai:2:1: bad value"),
        (
            &["run", "spin.rhai", "--max-operations", "10000"],
            3,
            "operations",
        ),
        (&["run", "spin.rhai", "--timeout", "0.3"], 124, "deadline"),
    ];
    for (args, want, text) in cases {
        let (code, err) = output(lpo(d).args(*args));
        assert_eq!(code, *want, "{args:?}: {err}");
        assert!(err.contains(text), "{args:?}: {err}");
    }
    // A parse error makes no run folder.
    let made: Vec<String> = std::fs::read_dir(d.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(made.iter().any(|n| n.starts_with("ok-")), "{made:?}");
    assert!(!made.iter().any(|n| n.starts_with("parse-")), "{made:?}");
    // SIGINT on a script that never polls should_stop(): stopped at once, 130.
    let child = lpo(d)
        .args(["run", "spin.rhai", "--run-dir", "int"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the run to start", Duration::from_secs(20), || {
        d.join("int/params.json").is_file()
    });
    std::thread::sleep(Duration::from_millis(100));
    signal(&child, libc::SIGINT);
    let (code, err) = finish(child);
    assert_eq!(code, 130, "{err}");
}

#[test]
fn fns_markdown_is_the_api_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = lpo(dir.path())
        .args(["fns", "--markdown"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let md = String::from_utf8(out.stdout).unwrap();
    for want in [
        "# lpo script API reference",
        "## Functions",
        "## Tensor methods",
        "- `checkpoint_save(step: int, tensors: Map, state: Map) -> String`",
        "atomically",
        "## stdlib `util`",
        "- `util::param(p, key, fallback)`",
    ] {
        assert!(md.contains(want), "missing {want:?} in\n{md}");
    }
}

/// CHECKPOINTING that crashes at step 17 on its first attempt (not on a resume).
const CRASHING: &str = r#"
let x = tensor([1.0, 2.0]);
let acc = 0.0;
let step = 0;
let ck = checkpoint_latest();
if ck != () { step = ck.step; x = ck.tensors.x; acc = ck.state.acc; }
while step < 20 {
    x = x * 0.9 + 0.1;
    acc += x.sum().item();
    step += 1;
    log_metrics(#{step: step, loss: acc});
    if step % 5 == 0 { checkpoint_save(step, #{x: x}, #{acc: acc}); }
    if step == 17 && !params.resume { throw "crash"; }
}
write_json(#{acc: acc, resumed_from: if ck == () { 0 } else { ck.step }}, run_dir() + "/result.json");
"#;

fn metric_steps(run: &Path) -> Vec<i64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_i64()
                .unwrap()
        })
        .collect()
}

#[test]
fn resume_falls_back_past_a_corrupt_checkpoint_drops_later_metrics_and_stale_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "crash.rhai", CRASHING);
    write(d, "ck.rhai", CHECKPOINTING);
    let (code, err) = output(lpo(d).args(["run", "ck.rhai", "--run-dir", "full"]));
    assert_eq!(code, 0, "{err}");
    let (code, err) = output(lpo(d).args(["run", "crash.rhai", "--run-dir", "cut"]));
    assert_eq!(code, 1, "{err}");
    let run = d.join("cut");
    assert_eq!(checkpoint_steps(&run), vec![5, 10, 15]);
    assert_eq!(metric_steps(&run), (1..=17).collect::<Vec<_>>());
    // The newest checkpoint is cut short; a killed save left its temporary folder behind.
    let tensors = run.join("checkpoints/step-15/tensors.safetensors");
    let bytes = std::fs::read(&tensors).unwrap();
    std::fs::write(&tensors, &bytes[..bytes.len() / 2]).unwrap();
    let stale = run.join("checkpoints/.step-16.tmp-4000000");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("state.json"), "{").unwrap();

    let (code, err) = output(lpo(d).args(["run", "--resume", "cut"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("step-15") && err.contains("corrupt"),
        "the warning names the corrupt checkpoint: {err}"
    );
    assert!(err.contains("latest checkpoint: step 10"), "{err}");
    let result = json(&run.join("result.json"));
    assert_eq!(result["resumed_from"], 10);
    assert_eq!(result["acc"], json(&d.join("full/result.json"))["acc"]);
    // Each step's metrics once; the rows past step 10 were set aside, not lost.
    assert_eq!(metric_steps(&run), (1..=20).collect::<Vec<_>>());
    let discarded = std::fs::read_to_string(run.join("metrics.discarded.jsonl")).unwrap();
    assert_eq!(discarded.lines().count(), 7);
    assert!(run.join("checkpoints/corrupt-step-15").is_dir());
    assert!(!stale.exists(), "the stale temporary folder is removed");
}

#[test]
fn resuming_a_finished_run_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ck.rhai", CHECKPOINTING);
    let (code, err) =
        output(lpo(d).args(["run", "ck.rhai", "--run-dir", "done", "--set", "steps=6"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&d.join("done/exit.json"))["exit_code"], 0);
    let (code, err) = output(lpo(d).args(["run", "--resume", "done"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already finished"), "{err}");
    assert_eq!(metric_steps(&d.join("done")), (1..=6).collect::<Vec<_>>());
    assert_eq!(json(&d.join("done/result.json"))["resumed"], false);
}

#[test]
fn non_finite_set_values_survive_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "p.rhai",
        r#"
if !params.resume { throw "first attempt fails"; }
write_json(#{a_nan: params.a.is_nan(), b: `${type_of(params.b)} ${params.b}`,
             c: `${type_of(params.c)} ${params.c}`, d: params.d, s: params.s},
           run_dir() + "/seen.json");
"#,
    );
    let (code, err) = output(lpo(d).args([
        "run",
        "p.rhai",
        "--run-dir",
        "r",
        "--set",
        "a=NaN",
        "--set",
        "b=inf",
        "--set",
        "c=-inf",
        "--set",
        "d=0.5",
        "--set",
        "s=text",
    ]));
    assert_eq!(code, 1, "{err}");
    let stored = json(&d.join("r/params.json"));
    assert_eq!(stored["params"]["a"], serde_json::json!({"$float": "NaN"}));
    assert_eq!(stored["params"]["c"], serde_json::json!({"$float": "-inf"}));
    let (code, err) = output(lpo(d).args(["run", "--resume", "r"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json(&d.join("r/seen.json")),
        serde_json::json!({"a_nan": true, "b": "f64 inf", "c": "f64 -inf", "d": 0.5, "s": "text"})
    );
}
