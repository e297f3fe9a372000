//! `lpo schedule` as a real process with a fake clock (`--now`): due jobs, `after` ordering,
//! retries, the ledger, a SIGKILLed job resumed, a running job never started twice, bad files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
    if step % 5 == 0 { checkpoint_save(step, #{x: x}, #{acc: acc}); }
    sleep(params.delay ?? 0.0);
}
if !should_stop() { write_json(#{acc: acc, resumed: params.resume}, run_dir() + "/result.json"); }
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

fn schedule(dir: &Path, now: &str) -> (i32, String) {
    let out = lpo(dir)
        .args(["schedule", "jobs.toml", "--once", "--now", now])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ledger(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("jobs.ledger.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events(ledger: &[serde_json::Value], job: &str, event: &str) -> Vec<serde_json::Value> {
    ledger
        .iter()
        .filter(|r| r["job"] == job && r["event"] == event)
        .cloned()
        .collect()
}

fn position(ledger: &[serde_json::Value], job: &str, event: &str) -> usize {
    ledger
        .iter()
        .position(|r| r["job"] == job && r["event"] == event)
        .unwrap_or_else(|| panic!("no {event} of {job}"))
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn due_jobs_run_once_and_after_jobs_follow() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ck.rhai", CHECKPOINTING);
    write(
        d,
        "jobs.toml",
        r#"
[jobs.train]
script = "ck.rhai"
cron = "0 0 * * *"
params = { steps = 6 }

[jobs.eval]
script = "ck.rhai"
after = "train"
params = { steps = 2 }

[jobs.noon]
script = "ck.rhai"
cron = "0 12 * * *"
"#,
    );
    let (code, err) = schedule(d, "2026-01-01T00:00:00Z");
    assert_eq!(code, 0, "{err}");
    let l = ledger(d);
    assert_eq!(l[0]["event"], "created");
    assert_eq!(events(&l, "train", "start").len(), 1);
    assert!(
        position(&l, "train", "end") < position(&l, "eval", "start"),
        "{l:?}"
    );
    assert_eq!(events(&l, "eval", "end")[0]["exit_code"], 0);
    assert!(
        events(&l, "noon", "start").is_empty(),
        "noon is not due at midnight"
    );
    let train_dir = PathBuf::from(events(&l, "train", "start")[0]["run_dir"].as_str().unwrap());
    assert!(train_dir.join("result.json").is_file());
    assert!(std::fs::read_to_string(train_dir.join("params.json"))
        .unwrap()
        .contains("\"steps\": 6"));

    // Thirty seconds later nothing is due again.
    let (code, err) = schedule(d, "2026-01-01T00:00:30Z");
    assert_eq!(code, 0, "{err}");
    assert_eq!(ledger(d).len(), l.len());

    // At noon only `noon`; the next midnight `train` then `eval` again.
    let (code, err) = schedule(d, "2026-01-01T12:00:10Z");
    assert_eq!(code, 0, "{err}");
    let l = ledger(d);
    assert_eq!(events(&l, "noon", "start").len(), 1);
    assert_eq!(events(&l, "train", "start").len(), 1);
    let (code, err) = schedule(d, "2026-01-02T00:00:05Z");
    assert_eq!(code, 0, "{err}");
    let l = ledger(d);
    assert_eq!(events(&l, "train", "start").len(), 2);
    assert_eq!(events(&l, "eval", "start").len(), 2);
}

#[test]
fn a_failing_job_is_retried_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "fail.rhai", "throw \"no data\";");
    write(d, "ck.rhai", CHECKPOINTING);
    write(
        d,
        "jobs.toml",
        r#"
[jobs.flaky]
script = "fail.rhai"
cron = "* * * * *"
retries = 2
backoff_seconds = 0.05

[jobs.report]
script = "ck.rhai"
after = "flaky"
"#,
    );
    let (code, err) = schedule(d, "2026-03-01T08:30:00Z");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("job `flaky` failed 3 time(s)"), "{err}");
    let l = ledger(d);
    let starts = events(&l, "flaky", "start");
    assert_eq!(
        starts
            .iter()
            .map(|r| r["attempt"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let dirs: std::collections::HashSet<_> =
        starts.iter().map(|r| r["run_dir"].to_string()).collect();
    assert_eq!(dirs.len(), 3, "each attempt has its own run folder");
    assert!(events(&l, "flaky", "end")
        .iter()
        .all(|r| r["exit_code"] == 1));
    assert_eq!(events(&l, "flaky", "gave_up").len(), 1);
    assert!(
        events(&l, "report", "start").is_empty(),
        "a failed job's dependents do not run"
    );
    // Given up: not retried again for the same slot.
    let (code, _) = schedule(d, "2026-03-01T08:30:30Z");
    assert_eq!(code, 0);
    assert_eq!(events(&ledger(d), "flaky", "start").len(), 3);
}

#[test]
fn a_running_job_is_not_started_twice_and_a_killed_one_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ck.rhai", CHECKPOINTING);
    // The reference result, uninterrupted.
    let out = lpo(d)
        .args(["run", "ck.rhai", "--run-dir", "reference"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("reference/result.json")).unwrap())
            .unwrap();
    write(
        d,
        "jobs.toml",
        r#"
[jobs.long]
script = "ck.rhai"
cron = "0 * * * *"
params = { steps = 20, delay = 0.1 }
"#,
    );
    let now = "2026-05-05T05:00:00Z";
    let mut first = lpo(d)
        .args(["schedule", "jobs.toml", "--once", "--now", now])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut run_dir = PathBuf::new();
    let mut pid = 0;
    wait_for(
        "the job's first checkpoint",
        Duration::from_secs(20),
        || {
            if let Some(start) = events(&ledger(d), "long", "start").first() {
                run_dir = PathBuf::from(start["run_dir"].as_str().unwrap());
                pid = start["pid"].as_i64().unwrap() as i32;
            }
            run_dir.join("checkpoints/step-5").is_dir()
        },
    );
    // A second scheduler leaves the running job alone.
    let (code, err) = schedule(d, now);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already running"), "{err}");
    assert_eq!(events(&ledger(d), "long", "start").len(), 1);

    // SIGKILL the scheduler and the job: the ledger keeps a start without an end.
    first.kill().unwrap();
    first.wait().unwrap();
    // SAFETY: signalling the job process the scheduler started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("the job to die", Duration::from_secs(10), || {
        std::fs::OpenOptions::new()
            .write(true)
            .open(run_dir.join("lock"))
            .map(|f| f.try_lock().is_ok())
            .unwrap_or(false)
    });
    assert!(events(&ledger(d), "long", "end").is_empty());
    assert!(!run_dir.join("result.json").exists());

    let (code, err) = schedule(d, "2026-05-05T05:00:40Z");
    assert_eq!(code, 0, "{err}");
    let l = ledger(d);
    let starts = events(&l, "long", "start");
    assert_eq!(starts.len(), 2, "{l:?}");
    assert_eq!(starts[1]["resume"], true);
    assert_eq!(
        PathBuf::from(starts[1]["run_dir"].as_str().unwrap()),
        run_dir
    );
    assert_eq!(events(&l, "long", "end")[0]["exit_code"], 0);
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("result.json")).unwrap())
            .unwrap();
    assert_eq!(result["resumed"], true);
    assert_eq!(result["acc"], reference["acc"]);
}

#[test]
fn bad_schedule_files_are_rejected_with_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ok.rhai", "1");
    let cases = [
        ("[jobs.a]\nscript = \"ok.rhai\"\ncron = \"61 * * * *\"\n", ":3:", "invalid cron expression `61 * * * *`"),
        ("[jobs.a]\nscript = \"ok.rhai\"\ncron = \"* * * * *\"\nretires = 2\n", ":4:", "unknown field `retires`"),
        (
            "[jobs.a]\nscript = \"ok.rhai\"\nafter = \"b\"\n\n[jobs.b]\nscript = \"ok.rhai\"\nafter = \"a\"\n",
            ":3:",
            "dependency cycle",
        ),
        ("[jobs.a]\nscript = \"ok.rhai\"\nafter = \"nobody\"\n", ":3:", "names no job"),
        ("[jobs.a]\nscript = \"missing.rhai\"\ncron = \"* * * * *\"\n", ":2:", "script not found"),
        ("[jobs.a]\nscript = \"ok.rhai\"\n", ":1:", "needs `cron"),
        (
            "[jobs.feb]\nscript = \"ok.rhai\"\ncron = \"0 0 31 2 *\"\n",
            ":3:",
            "job `feb`: cron expression `0 0 31 2 *` never fires",
        ),
    ];
    for (text, line, reason) in cases {
        write(d, "jobs.toml", text);
        let (code, err) = schedule(d, "2026-01-01T00:00:00Z");
        assert_eq!(code, 65, "{text}: {err}");
        assert!(
            err.contains(&format!("jobs.toml{line}")) && err.contains(reason),
            "{text}: {err}"
        );
        assert!(
            !d.join("jobs.ledger.jsonl").exists(),
            "a rejected file runs nothing"
        );
    }
    let out = lpo(d)
        .args(["schedule", "nope.toml", "--once"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66));
}

#[test]
fn the_foreground_scheduler_runs_jobs_as_they_fall_due() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ck.rhai", CHECKPOINTING);
    // Every second (a leading seconds field); the clock starts just before a whole second.
    write(
        d,
        "jobs.toml",
        "poll_seconds = 0.2\n[jobs.tick]\nscript = \"ck.rhai\"\ncron = \"* * * * * *\"\nparams = { steps = 2 }\n",
    );
    let out = lpo(d)
        .args([
            "schedule",
            "jobs.toml",
            "--now",
            "2026-01-01T00:00:00Z",
            "--stop-after",
            "2.5",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = ledger(d);
    let starts = events(&l, "tick", "start");
    assert!((2..=4).contains(&starts.len()), "{l:?}");
    let slots: std::collections::HashSet<_> =
        starts.iter().map(|r| r["slot"].to_string()).collect();
    assert_eq!(slots.len(), starts.len(), "each occurrence runs once");
    assert_eq!(events(&l, "tick", "end").len(), starts.len());
}

/// Many `--once` schedulers started over and over, as from several crontabs: every cron slot runs
/// exactly once, a finished job is never taken for an interrupted one and resumed, and a job
/// `after` another runs once per end at most.
#[test]
fn concurrent_once_schedulers_run_each_slot_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Each execution leaves one metrics row in its run folder.
    write(d, "count.rhai", "log_metrics(#{step: 1}); sleep(0.3);");
    // Several short jobs every second: many job ends for the schedulers to race on.
    let cron_jobs = ["a", "b", "c", "d"];
    let mut toml = String::new();
    for job in cron_jobs {
        toml += &format!("[jobs.{job}]\nscript = \"count.rhai\"\ncron = \"* * * * * *\"\n\n");
    }
    toml += "[jobs.follow]\nscript = \"count.rhai\"\nafter = \"a\"\n";
    write(d, "jobs.toml", &toml);
    // A long history (as after weeks of crontab runs) makes each scheduler's decision take a
    // while under the lock: a job's end then often falls between another scheduler reading the
    // ledger and checking the job's process.
    let mut history = String::from("{\"time\":\"2025-12-31T00:00:00Z\",\"event\":\"created\"}\n");
    for _ in 0..20_000 {
        history += "{\"time\":\"2025-12-31T00:00:00Z\",\"event\":\"skipped\",\"job\":\"old\",\"reason\":\"already running\"}\n";
    }
    write(d, "jobs.ledger.jsonl", &history);
    let base = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let d = d.to_path_buf();
            std::thread::spawn(move || {
                while started.elapsed() < Duration::from_secs(4) {
                    // The fake clock follows the real one, so every worker sees the same time.
                    let now = base + chrono::Duration::from_std(started.elapsed()).unwrap();
                    let (code, err) = schedule(&d, &now.to_rfc3339());
                    assert_eq!(code, 0, "{err}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let l = ledger(d);
    let executions = |job: &str| -> usize {
        let dirs: std::collections::HashSet<String> = events(&l, job, "start")
            .iter()
            .map(|r| r["run_dir"].as_str().unwrap().to_string())
            .collect();
        dirs.iter()
            .map(|r| {
                std::fs::read_to_string(Path::new(r).join("metrics.jsonl"))
                    .unwrap_or_default()
                    .lines()
                    .count()
            })
            .sum()
    };
    for job in cron_jobs {
        let starts = events(&l, job, "start");
        let slots: std::collections::HashSet<String> =
            starts.iter().map(|r| r["slot"].to_string()).collect();
        assert!(!slots.is_empty(), "{job}: {l:?}");
        assert_eq!(
            starts.len(),
            slots.len(),
            "{job}: one start per slot: {l:?}"
        );
        assert_eq!(
            executions(job),
            slots.len(),
            "{job}: one execution per slot"
        );
        let ends = events(&l, job, "end");
        assert_eq!(ends.len(), starts.len(), "{job}: one end per start: {l:?}");
        assert!(ends.iter().all(|r| r["exit_code"] == 0), "{l:?}");
    }
    assert!(
        l.iter()
            .all(|r| r["event"] != "start" || r["resume"] == false),
        "no finished job was resumed: {l:?}"
    );
    let follow = events(&l, "follow", "start");
    assert!(
        !follow.is_empty() && follow.len() <= events(&l, "a", "end").len(),
        "{l:?}"
    );
    assert_eq!(executions("follow"), follow.len());
}
