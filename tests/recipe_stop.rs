//! SIGTERM mid-epoch on the LPO recipe (scripts/lpo_tiny.rhai): the epoch in progress is saved
//! within the grace period, and `lpo run --resume` continues it to the same LoRA as a run that
//! was never stopped.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;

const SETTINGS: [&str; 10] = [
    "epochs=3",
    "steps=3",
    "k=2",
    "sample_batch=2",
    "train_batch=2",
    "threshold_mode=static",
    "threshold=0.0",
    "lr=1e-3",
    "eval_every=0",
    "seed=0",
];

fn lpo_tiny(run_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lpo"));
    c.env("LPO_LOG", "info")
        .args(["run", "scripts/lpo_tiny.rhai", "--run-dir"])
        .arg(run_dir);
    for s in SETTINGS {
        c.args(["--set", s]);
    }
    c
}

fn lora(run_dir: &Path) -> Vec<(String, Vec<f32>)> {
    let m =
        lpo::tensor::io::load_safetensors(&run_dir.join("lora.safetensors"), &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = m
        .into_iter()
        .map(|(k, t)| {
            let values = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (k, values)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn newest_state(run_dir: &Path) -> serde_json::Value {
    let newest = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-")?.parse::<i64>().ok()
        })
        .max()
        .expect("a checkpoint");
    let path = run_dir.join(format!("checkpoints/step-{newest}/state.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn sigterm_mid_epoch_saves_the_epoch_and_resume_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let out = lpo_tiny(&full).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Stopped once epoch 1 has started training: well after the epoch-1 checkpoint.
    let cut = tmp.path().join("cut");
    let child = lpo_tiny(&cut).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(cut.join("metrics.jsonl"))
        .unwrap_or_default()
        .contains("\"epoch\":1")
    {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "epoch 1 never trained"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("progress saved"), "{err}");
    let state = newest_state(&cut)["state"].clone();
    let partial = &state["partial"];
    assert!(
        partial.is_object(),
        "the newest checkpoint is mid-epoch: {state}"
    );
    assert!(state["epoch"].as_i64().unwrap() >= 1, "{state}");
    assert!(!cut.join("lora.safetensors").exists());

    let out = Command::new(env!("CARGO_BIN_EXE_lpo"))
        .env("LPO_LOG", "info")
        .args(["run", "--resume"])
        .arg(&cut)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("resumed mid-epoch"), "{err}");
    let (a, b) = (lora(&full), lora(&cut));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(
            va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "`{na}` differs from the uninterrupted run"
        );
    }
}

fn metric_steps(run: &Path) -> Vec<i64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_i64())
        .collect()
}

/// `lpo run SCRIPT --run-dir RUN --set ..` SIGTERMed after its third metrics row: exits 143
/// with a checkpoint at the step it reached (the only one: checkpoints are set off) and none of
/// `outputs`; `--resume` then exits 0 from that step, with every step's metrics once and the
/// outputs written.
fn stop_and_resume(script: &str, run: &Path, sets: &[&str], steps: i64, outputs: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lpo"));
    cmd.env("LPO_LOG", "info")
        .args(["run", script, "--run-dir"])
        .arg(run);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while metric_steps(run).len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{script}: no steps logged"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{script}: {err}");
    let saved = newest_state(run)["step"].as_i64().unwrap();
    assert!(
        (3..steps).contains(&saved),
        "{script}: checkpoint at step {saved}"
    );
    for o in outputs {
        assert!(
            !run.join(o).exists(),
            "{script}: a stopped run writes no {o}"
        );
    }

    let out = Command::new(env!("CARGO_BIN_EXE_lpo"))
        .env("LPO_LOG", "info")
        .args(["run", "--resume"])
        .arg(run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{script}: {err}");
    assert!(err.contains(&format!("step {saved}")), "{script}: {err}");
    assert_eq!(
        metric_steps(run),
        (1..=steps).collect::<Vec<_>>(),
        "{script}"
    );
    for o in outputs {
        assert!(run.join(o).exists(), "{script}: {o} after the resume");
    }
}

/// The LRM recipe (stdlib/lrm_train.rhai via scripts/train_lrm.rhai) saves the steps done on
/// SIGTERM and skips its evaluation and save; a resume continues from that step.
#[test]
fn sigterm_saves_the_lrm_recipe_and_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    stop_and_resume(
        "scripts/train_lrm.rhai",
        &tmp.path().join("lrm"),
        &[
            "steps=60",
            "batch_size=2",
            "checkpoint_every=1000",
            "synthetic_pairs=16",
        ],
        60,
        &["lrm"],
    );
}

/// The shapes pretraining recipe does the same.
#[test]
fn sigterm_saves_the_shapes_pretraining_and_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    stop_and_resume(
        "scripts/shapes/pretrain.rhai",
        &tmp.path().join("pre"),
        &[
            "steps=40",
            "batch=2",
            "ckpt_every=1000",
            "log_every=1",
            "eval_n=0",
        ],
        40,
        &["model/unet"],
    );
}
