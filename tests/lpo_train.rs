//! The LPO training step and the tiny recipe: one step raises the winners' log-ratio margin
//! over the losers' on the same batch, and a run interrupted mid-epoch then resumed ends with
//! exactly (bitwise) the weights of an uninterrupted run.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use lpo::runtime::control::RunControl;
use lpo::runtime::run_dir::RunDir;
use lpo::script::{build_engine, EngineOptions, Host};
use rhai::{Dynamic, Map, Scope};

fn engine_with(run: Option<&Path>) -> rhai::Engine {
    let mut host = Host::new(RunControl::new(), Device::Cpu, 0);
    if let Some(dir) = run {
        host = host.with_run_dir(Arc::new(RunDir::open(dir).unwrap()));
    }
    build_engine(host, &EngineOptions::default()).engine
}

fn num(v: &Dynamic) -> f64 {
    v.as_float().unwrap_or_else(|_| v.as_int().unwrap() as f64)
}

#[test]
fn one_step_raises_the_winners_log_ratio_margin() {
    let script = r#"
        import "compare" as cmp;
        let model = "tests/fixtures/tiny-sd";
        let te = load_text_encoder(model + "/text_encoder");
        let tok = load_tokenizer(model + "/tokenizer");
        let sched = load_scheduler(model);
        let lrm = load_lrm("tests/fixtures/tiny-lrm");
        let policy = lpo_policy(load_unet(model + "/unet"), #{lora: #{rank: 4, seed: 2}});
        let opt = adamw(policy.params, #{lr: 1e-3, weight_decay: 0.0});
        let out = lpo_sample(policy, te, tok, sched, lrm, ["a red circle", "a blue square"],
            |s, t, o| cmp::preference_compare(s, t, o),
            #{k: 3, steps: 4, seed: 5, compare_opts: #{threshold: 0.0}});
        let rec = out.records;
        let margin = |lp| ((lp.lp_win - lp.lp_win_ref) - (lp.lp_lose - lp.lp_lose_ref)).mean().item();
        let before = lpo_log_probs(policy, sched, rec, #{});
        let m = lpo_train_step(policy, sched, rec, opt, #{beta: 500, eps: 0.1, micro_batch: 1});
        let after = lpo_log_probs(policy, sched, rec, #{});
        // the reference is untouched by the step (adapters off = base model)
        let ref_diff = max_abs_diff(before.lp_win_ref, after.lp_win_ref);
        #{n: rec.len, before: margin.call(before), after: margin.call(after), ref_diff: ref_diff,
          loss: m.loss, pairs: m.pairs, step: m.step, acc: m.implicit_acc,
          lp_win: m.lp_win, lp_win_ref: m.lp_win_ref}
    "#;
    let m: Map = engine_with(None).eval(script).unwrap();
    let n = m["n"].as_int().unwrap();
    assert!(n >= 2, "need pairs, got {n}");
    assert_eq!(m["pairs"].as_int().unwrap(), n);
    assert_eq!(m["step"].as_int().unwrap(), 1);
    let before = num(&m["before"]);
    let after = num(&m["after"]);
    // fresh LoRA (B = 0): policy == reference, so the margin starts at 0 exactly
    assert_eq!(before, 0.0);
    assert_eq!(num(&m["lp_win"]), num(&m["lp_win_ref"]));
    assert!(
        (num(&m["loss"]) - 2f64.ln()).abs() < 1e-6,
        "loss at init is ln 2"
    );
    assert!(after > before, "margin {before} -> {after}");
    assert_eq!(num(&m["ref_diff"]), 0.0);
}

fn run_recipe(dir: &Path, extra: &[(&str, Dynamic)]) -> Map {
    let mut params = Map::new();
    for (k, v) in [
        ("epochs", Dynamic::from(3_i64)),
        ("steps", Dynamic::from(3_i64)),
        ("k", Dynamic::from(2_i64)),
        ("sample_batch", Dynamic::from(2_i64)),
        ("train_batch", Dynamic::from(2_i64)),
        ("threshold_mode", Dynamic::from("static")),
        ("threshold", Dynamic::from(0.0_f64)),
        ("lr", Dynamic::from(1e-3_f64)),
        (
            "prompts",
            Dynamic::from_array(vec![
                Dynamic::from("a red circle"),
                Dynamic::from("a blue square"),
            ]),
        ),
    ] {
        params.insert(k.into(), v);
    }
    for (k, v) in extra {
        params.insert((*k).into(), v.clone());
    }
    let src = std::fs::read_to_string("scripts/lpo_tiny.rhai").unwrap();
    let engine = engine_with(Some(dir));
    let mut scope = Scope::new();
    scope.push_constant("params", params);
    engine.eval_with_scope::<Map>(&mut scope, &src).unwrap()
}

fn weights(m: &Map) -> Vec<(String, Vec<f32>)> {
    let p = m["params"].clone().cast::<Map>();
    let mut v: Vec<(String, Vec<f32>)> = p
        .iter()
        .map(|(k, t)| {
            let t = t.clone().cast::<Tensor>();
            (
                k.to_string(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn resume_after_an_interrupted_epoch_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let full = run_recipe(&tmp.path().join("full"), &[]);
    let total = full["global_step"].as_int().unwrap();
    assert_eq!(full["epoch"].as_int().unwrap(), 3);
    assert!(total >= 3, "{total} steps");
    // Interrupted in the last epoch, after the epoch-2 checkpoint.
    let cut_dir = tmp.path().join("cut");
    let cut = run_recipe(&cut_dir, &[("halt_at_step", Dynamic::from(total - 1))]);
    assert!(cut["stopped"].as_bool().unwrap());
    let ck = lpo::runtime::run_dir::latest_checkpoint(&cut_dir.join("checkpoints"), &Device::Cpu)
        .unwrap()
        .expect("a checkpoint before the interruption");
    assert!(ck.step >= 1);
    let resumed = run_recipe(&cut_dir, &[("resume", Dynamic::TRUE)]);
    assert!(!resumed["stopped"].as_bool().unwrap());
    assert_eq!(resumed["global_step"].as_int().unwrap(), total);
    let a = weights(&full);
    let b = weights(&resumed);
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(
            va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "`{na}` differs"
        );
    }
    // the run trained something
    assert!(a.iter().any(|(_, v)| v.iter().any(|x| *x != 0.0)));
    assert!(tmp.path().join("full/lora.safetensors").is_file());
}
