//! Safety limits and file confinement through the real binary: a tensor too large for
//! `--max-tensor-memory` and recursion too deep for the native stack end as script errors (with
//! the script position and the run log's end line) instead of aborting the process, and scripts
//! read and write only where the rules of `lpo run` let them.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

fn lpo(dir: &Path, args: &[&str]) -> Output {
    common::run_lpo(dir, args, Duration::from_secs(60))
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal (an abort?): {o:?}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The last line of `run_dir/run.log`.
fn log_end(run_dir: &Path) -> String {
    let log = std::fs::read_to_string(run_dir.join("run.log")).unwrap();
    log.lines().last().unwrap_or_default().to_string()
}

#[test]
fn a_tensor_beyond_the_memory_cap_is_a_runtime_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 37 GiB: more than the default cap (half the RAM) on any machine that runs the tests.
    write(
        d,
        "big.rhai",
        "let a = 1;\nlet z = zeros([100000, 100000]);\n",
    );
    let o = lpo(d, &["run", "big.rhai", "--run-dir", "r"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("big.rhai:2:9")
            && err.contains("zeros: a f32 tensor of shape [100000, 100000] needs 37.3 GiB")
            && err.contains("--max-tensor-memory"),
        "{err}"
    );
    assert!(
        log_end(&d.join("r")).contains("ended with exit code 1"),
        "{}",
        log_end(&d.join("r"))
    );

    // Other ways to build a large tensor from a small script, under a 1 MiB cap.
    for (script, what) in [
        ("rng(0).randn([600, 600])", "randn"),
        ("zeros([1000, 1]) + zeros([1, 1000])", "add"),
        ("ones([1000, 1]).matmul(ones([1, 1000]))", "matmul"),
        (
            "ones([1000, 1, 1, 1]).matmul(ones([1, 1000, 1, 1]))",
            "matmul",
        ),
        ("arange(0, 1000000)", "arange"),
        ("zeros([10, 10]).repeat([100, 100])", "repeat"),
        ("linspace(0, 1, 1000000)", "linspace"),
        ("rng(0).permutation(1000000)", "permutation"),
        ("shapes_world().batch(2000, rng(0), #{})", "batch"),
        (
            "paired_bootstrap([1.0], [0.0], #{samples: 1000000})",
            "paired_bootstrap",
        ),
        (
            "line_plot(\"p.png\", \"t\", #{a: [1.0]}, #{width: 100000, height: 100000})",
            "line_plot",
        ),
    ] {
        write(d, "s.rhai", &format!("let x = {script};\n"));
        let o = lpo(d, &["run", "s.rhai", "--max-tensor-memory", "1M"]);
        assert_eq!(code(&o), 1, "{script}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("{what}: a ")) && stderr(&o).contains("(1.0 MiB)"),
            "{script}: {}",
            stderr(&o)
        );
    }
    write(d, "ok.rhai", "let x = zeros([500, 500]);\n");
    let o = lpo(d, &["run", "ok.rhai", "--max-tensor-memory", "1M"]);
    assert_eq!(code(&o), 0, "1 MB fits: {}", stderr(&o));
}

#[test]
fn deep_recursion_stops_as_a_safety_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recursion = |n: u64| {
        format!("fn f(n) {{ if n == 0 {{ 0 }} else {{ 1 + f(n - 1) }} }}\nlet depth = f({n});\n")
    };
    // Far more levels than any stack holds: stopped before the stack overflows.
    write(d, "deep.rhai", &recursion(100_000_000));
    let o = lpo(
        d,
        &[
            "run",
            "deep.rhai",
            "--run-dir",
            "r",
            "--max-call-levels",
            "1000000000",
        ],
    );
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("too many call levels") && err.contains("deep.rhai:2:"),
        "{err}"
    );
    assert!(
        log_end(&d.join("r")).contains("ended with exit code 3"),
        "{}",
        log_end(&d.join("r"))
    );
    // The script thread's stack holds deep recursion when it is allowed.
    write(d, "ten_k.rhai", &recursion(10_000));
    let o = lpo(d, &["run", "ten_k.rhai", "--max-call-levels", "20000"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // An error deep in a recursion names the repeated call once, with its count.
    write(
        d,
        "trail.rhai",
        "fn f(n) { if n == 0 { throw \"bottom\"; } else { 1 + f(n - 1) } }\nlet x = f(50);\n",
    );
    let o = lpo(d, &["run", "trail.rhai"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("in call to `f` at trail.rhai:1:") && err.contains("(x50)"),
        "{err}"
    );
    assert!(err.lines().count() < 20, "{err}");
    // --max-call-levels itself: the same exit code and message.
    write(d, "levels.rhai", &recursion(500));
    let o = lpo(d, &["run", "levels.rhai"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("too many call levels (more than --max-call-levels)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn scripts_cannot_read_outside_their_folders() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("job")).unwrap();
    write(
        &d.join("job"),
        "etc.rhai",
        "let p = read_prompts(\"/etc/passwd\");\n",
    );
    let o = lpo(d, &["run", "job/etc.rhai", "--run-dir", "r"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("cannot read /etc/passwd") && err.contains("--allow-read DIR"),
        "{err}"
    );
    assert!(log_end(&d.join("r")).contains("ended with exit code 1"));

    // Imports are read through the same gate.
    std::fs::create_dir(d.join("lib")).unwrap();
    write(&d.join("lib"), "m.rhai", "fn f() { 1 }\n");
    write(
        &d.join("job"),
        "imp.rhai",
        "import \"../lib/m\" as m;\nprint(m::f());\n",
    );
    let o = lpo(d, &["run", "job/imp.rhai"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot read job/../lib/m.rhai"),
        "{}",
        stderr(&o)
    );
    let o = lpo(d, &["run", "job/imp.rhai", "--allow-read", "lib"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // A link inside the script's folder pointing out of it.
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "secret.txt", "a secret prompt\n");
    std::os::unix::fs::symlink(outside.path(), d.join("job/link")).unwrap();
    write(
        &d.join("job"),
        "link.rhai",
        "let p = read_prompts(\"job/link/secret.txt\");\nprint(p[0]);\n",
    );
    let o = lpo(d, &["run", "job/link.rhai"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("cannot read job/link/secret.txt (resolved: ")
            && !err.contains("a secret prompt"),
        "{err}"
    );
    // ... readable with --allow-read, or when a param names it.
    let allowed = outside.path().to_str().unwrap();
    let o = lpo(d, &["run", "job/link.rhai", "--allow-read", allowed]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("a secret prompt"));
    let given = outside.path().join("secret.txt");
    write(
        &d.join("job"),
        "given.rhai",
        "print(read_prompts(params.prompts)[0]);\n",
    );
    let o = lpo(
        d,
        &[
            "run",
            "job/given.rhai",
            "--set",
            &format!("prompts={}", given.display()),
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("a secret prompt"));
}

#[test]
fn scripts_write_only_under_the_run_folder_and_allowed_folders() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "escape.rhai",
        "write_json(#{a: 1}, run_dir() + \"/../../x.json\");\n",
    );
    std::fs::create_dir(d.join("runs")).unwrap();
    let o = lpo(d, &["run", "escape.rhai", "--run-dir", "runs/r"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("cannot write runs/r/../../x.json")
            && err.contains("--allow-write DIR")
            && !d.join("x.json").exists(),
        "{err}"
    );
    assert!(log_end(&d.join("runs/r")).contains("ended with exit code 1"));

    // A link in the run folder does not lead out of it.
    write(
        d,
        "link.rhai",
        "write_json(#{a: 1}, run_dir() + \"/out/x.json\");\n",
    );
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.join("runs/l")).unwrap();
    std::os::unix::fs::symlink(outside.path(), d.join("runs/l/out")).unwrap();
    let o = lpo(d, &["run", "link.rhai", "--run-dir", "runs/l"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(!outside.path().join("x.json").exists());

    // --allow-write grants a folder, also for a resumed run.
    write(
        d,
        "out.rhai",
        "write_json(#{a: 1}, params.out + \"/x.json\");\nlet back = read_json(params.out + \"/x.json\");\n",
    );
    std::fs::create_dir(d.join("models")).unwrap();
    let o = lpo(
        d,
        &[
            "run",
            "out.rhai",
            "--run-dir",
            "runs/w",
            "--set",
            "out=models",
        ],
    );
    assert_eq!(code(&o), 1, "a param path is readable, not writable");
    let o = lpo(
        d,
        &[
            "run",
            "out.rhai",
            "--run-dir",
            "runs/w2",
            "--set",
            "out=models",
            "--allow-write",
            "models",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(d.join("models/x.json").is_file());
    std::fs::remove_file(d.join("models/x.json")).unwrap();
    // Without exit.json the run stands for one cut short, so the resume runs the script again.
    std::fs::remove_file(d.join("runs/w2/exit.json")).unwrap();
    let o = lpo(d, &["run", "--resume", "runs/w2"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(d.join("models/x.json").is_file());
}

#[test]
fn a_scheduled_job_cannot_write_beside_its_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "first.rhai",
        "write_json(#{owner: \"first\"}, run_dir() + \"/result.json\");\n",
    );
    // The second job knows where the jobs' folders are (a param), and tries to write there.
    write(
        d,
        "second.rhai",
        "write_json(#{owner: \"second\"}, params.runs + \"/result.json\");\n",
    );
    write(
        d,
        "jobs.toml",
        r#"
[jobs.first]
script = "first.rhai"
cron = "0 0 * * *"

[jobs.second]
script = "second.rhai"
after = "first"
params = { runs = "runs" }

[jobs.third]
script = "second.rhai"
after = "first"
params = { runs = "shared" }
allow_write = ["shared"]
"#,
    );
    std::fs::create_dir(d.join("shared")).unwrap();
    let o = common::run_lpo(
        d,
        &[
            "schedule",
            "jobs.toml",
            "--once",
            "--now",
            "2026-01-01T00:00:00Z",
        ],
        Duration::from_secs(60),
    );
    let ledger = std::fs::read_to_string(d.join("jobs.ledger.jsonl")).unwrap();
    let ends: Vec<serde_json::Value> = ledger
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "end")
        .collect();
    let exit = |job: &str| {
        ends.iter()
            .find(|r| r["job"] == job)
            .unwrap_or_else(|| panic!("no end of {job}: {ledger}\n{}", stderr(&o)))["exit_code"]
            .clone()
    };
    assert_eq!(exit("first"), 0, "{}", stderr(&o));
    assert_eq!(exit("second"), 1, "{}", stderr(&o));
    assert!(!d.join("runs/result.json").exists());
    // A job's `allow_write` entry is its --allow-write.
    assert_eq!(exit("third"), 0, "{}", stderr(&o));
    assert!(d.join("shared/result.json").is_file());
}
