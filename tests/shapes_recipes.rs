//! The shapes pipeline on tiny budgets: the model maker's output loads with the standard
//! loaders (tokenizer ids, shapes, save/load round trip), and each recipe (pretrain ->
//! make_pairs -> train_lrm -> lpo -> eval) runs a few steps through the real binary and writes
//! its files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use candle_core::Device;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};

fn lpo(dir: &Path, args: &[&str]) -> Output {
    common::run_lpo(dir, args, Duration::from_secs(120))
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({:?}):\n{}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Everything a run printed (stdout and the log on stderr).
fn printed(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn recipe(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/shapes")
        .join(name)
        .display()
        .to_string()
}

/// `lpo run scripts/shapes/<name> --run-dir <run_dir> --set <each of sets>` in `dir`.
fn run_recipe(dir: &Path, name: &str, run_dir: &str, sets: &[&str]) -> Output {
    let script = recipe(name);
    let mut args = vec!["run", script.as_str(), "--run-dir", run_dir];
    for set in sets {
        args.extend(["--set", set]);
    }
    lpo(dir, &args)
}

fn engine() -> lpo::script::ScriptEngine {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
}

/// label_0 of a manifest row as make_pairs derives it: the higher grade wins, equal grades tie.
fn label_from_grades(row: &serde_json::Value) -> f64 {
    let (g0, g1) = (
        row["grade_0"].as_f64().unwrap(),
        row["grade_1"].as_f64().unwrap(),
    );
    if g0 > g1 {
        1.0
    } else if g0 < g1 {
        0.0
    } else {
        0.5
    }
}

fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn model_maker_output_loads_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(
        &lpo(dir, &["new-model", "shapes", "--out", "m", "--seed", "3"]),
        "new-model",
    );
    ok(
        &lpo(dir, &["new-model", "shapes", "--out", "m2", "--seed", "3"]),
        "new-model",
    );
    ok(
        &lpo(dir, &["new-model", "shapes", "--out", "m3", "--seed", "4"]),
        "new-model",
    );
    let w = |m: &str| {
        std::fs::read(dir.join(m).join("unet/diffusion_pytorch_model.safetensors")).unwrap()
    };
    assert_eq!(w("m"), w("m2"), "same seed, same weights");
    assert_ne!(w("m"), w("m3"), "another seed, other weights");
    let bad = lpo(dir, &["new-model", "sdxl", "--out", "x"]);
    assert_eq!(bad.status.code(), Some(2));

    let e = engine();
    let script = format!(
        r#"
        let d = "{d}";
        let tok = load_tokenizer(d + "/tokenizer");
        let ids = tok.encode(["a red circle", "A  Blue   TRIANGLE", "", "a mauve circle"]).to_array();
        let te = load_text_encoder(d + "/text_encoder");
        let enc = te.encode(tok.encode(["a red circle", "a red square"]));
        let unet = load_unet(d);
        let s = load_scheduler(d + "/scheduler");
        let r = rng(5);
        let x = r.randn([2, 3, 16, 16]);
        let eps = unet.forward(x, tensor([500, 10]), enc.hidden);
        unet.save(d + "/copy/unet");
        let back = load_unet(d + "/copy");
        let eps2 = back.forward(x, tensor([500, 10]), enc.hidden);
        unet.save(d + "/half/unet", #{{dtype: "f16"}});
        let eps3 = load_unet(d + "/half").forward(x, tensor([500, 10]), enc.hidden);
        let pooled_differs = (enc.pooled.narrow(0, 0, 1) - enc.pooled.narrow(0, 1, 1)).abs().max().item();
        #{{
            ids: ids,
            hidden: enc.hidden.shape,
            eps: eps.shape,
            params: unet.param_count,
            exact: max_abs_diff(eps, eps2),
            half: max_abs_diff(eps, eps3),
            scale: eps.abs().max().item(),
            pooled_differs: pooled_differs,
            steps: s.num_train_timesteps,
            vocab: tok.vocab_size,
            max_len: tok.max_length
        }}
        "#,
        d = dir.join("m").display()
    );
    let m: rhai::Map = e.engine.eval(&script).unwrap();
    let ints = |v: &rhai::Dynamic| -> Vec<Vec<i64>> {
        v.clone()
            .into_array()
            .unwrap()
            .into_iter()
            .map(|r| {
                r.into_array()
                    .unwrap()
                    .into_iter()
                    .map(|x| x.as_int().unwrap())
                    .collect()
            })
            .collect()
    };
    let ids = ints(&m["ids"]);
    // bos 0, eos 1, pad 2, unk 3, "a" 4, colours 5.., shapes 11..
    assert_eq!(ids[0], vec![0, 4, 5, 11, 1, 2, 2, 2]);
    assert_eq!(
        ids[1],
        vec![0, 4, 7, 13, 1, 2, 2, 2],
        "lowercase + whitespace"
    );
    assert_eq!(ids[2], vec![0, 1, 2, 2, 2, 2, 2, 2], "empty prompt");
    assert_eq!(ids[3], vec![0, 4, 3, 11, 1, 2, 2, 2], "unknown word");
    assert_eq!(m["vocab"].as_int().unwrap(), 14);
    assert_eq!(m["max_len"].as_int().unwrap(), 8);
    let shape = |k: &str| -> Vec<i64> {
        m[k].clone()
            .into_array()
            .unwrap()
            .into_iter()
            .map(|x| x.as_int().unwrap())
            .collect()
    };
    assert_eq!(shape("hidden"), vec![2, 8, 64]);
    assert_eq!(shape("eps"), vec![2, 3, 16, 16]);
    let params = m["params"].as_int().unwrap();
    assert!(
        (1_000_000..=2_000_000).contains(&params),
        "{params} parameters"
    );
    assert_eq!(
        m["exact"].as_float().unwrap(),
        0.0,
        "f32 save/load is exact"
    );
    let half = m["half"].as_float().unwrap();
    let scale = m["scale"].as_float().unwrap();
    assert!(
        half < 1e-2 * scale.max(1.0),
        "f16 storage: {half} vs scale {scale}"
    );
    assert!(
        m["pooled_differs"].as_float().unwrap() > 1e-3,
        "pooled output at eos differs by prompt"
    );
    assert_eq!(m["steps"].as_int().unwrap(), 1000);
}

#[test]
fn recipes_run_on_a_tiny_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 1. Pretrain: 4 steps, a checkpoint at step 2, a tiny sampled evaluation.
    let o = lpo(
        dir,
        &[
            "run",
            &recipe("pretrain.rhai"),
            "--run-dir",
            "pre",
            "--set",
            "steps=4",
            "--set",
            "batch=2",
            "--set",
            "ckpt_every=2",
            "--set",
            "log_every=1",
            "--set",
            "eval_n=3",
            "--set",
            "eval_steps=2",
            "--set",
            "out=base",
            // The model is written outside the run folder.
            "--allow-write",
            "base",
        ],
    );
    ok(&o, "pretrain");
    let base = dir.join("base");
    for f in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
        "pretrain.json",
    ] {
        assert!(base.join(f).is_file(), "missing {f}");
    }
    assert!(dir.join("pre/checkpoints/step-2").is_dir());
    assert!(dir.join("pre/samples.png").is_file());
    let pj = read_json(&base.join("pretrain.json"));
    assert_eq!(pj["judged"]["n"], 3);
    let a = pj["judged"]["aligned"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&a));
    let metrics = std::fs::read_to_string(dir.join("pre/metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"loss\"")).count(),
        4
    );
    let first = std::fs::read(base.join("unet/diffusion_pytorch_model.safetensors")).unwrap();

    // Resume from the step-2 checkpoint: the same final weights, bit for bit. Without its
    // exit.json (and its output) the run stands for one cut short after that checkpoint; a
    // finished run is not resumed.
    std::fs::remove_file(dir.join("pre/exit.json")).unwrap();
    std::fs::remove_file(base.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    ok(&lpo(dir, &["run", "--resume", "pre"]), "pretrain resume");
    let again = std::fs::read(base.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(first == again, "resume from step 2 gives the same weights");

    // 2. Pairs from the base: 3 draws of 3 images, 2 draws per sampling batch.
    let make_pairs_recipe = recipe("make_pairs.rhai");
    let make_pairs = |run_dir: &str, out: &str, extra: &[&str]| {
        let out = format!("out={out}");
        let mut args = vec![
            "run",
            &make_pairs_recipe,
            "--run-dir",
            run_dir,
            "--set",
            "base=base",
            "--set",
            "groups=3",
            "--set",
            "group=3",
            "--set",
            "steps=2",
            "--set",
            "chunk=2",
            "--set",
            &out,
            "--allow-write",
            &out[4..],
        ];
        args.extend_from_slice(extra);
        lpo(dir, &args)
    };
    let o = make_pairs("mp", "pairs", &["--set", "cross=2"]);
    ok(&o, "make_pairs");
    let manifest = std::fs::read_to_string(dir.join("pairs/pairs.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = manifest
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // 3 draws of 3 images: every pair within a draw, one prompt and one group id per draw.
    assert_eq!(rows.len(), 9);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["group"], i / 3, "row {i}");
        assert_eq!(r["prompt"], rows[i / 3 * 3]["prompt"], "row {i}");
    }
    let images: std::collections::HashSet<&str> = rows
        .iter()
        .flat_map(|r| {
            [
                r["image_0"].as_str().unwrap(),
                r["image_1"].as_str().unwrap(),
            ]
        })
        .collect();
    assert_eq!(images.len(), 9);
    for r in &rows {
        for k in ["image_0", "image_1"] {
            assert!(dir.join("pairs").join(r[k].as_str().unwrap()).is_file());
        }
        let (l0, l1) = (
            r["label_0"].as_f64().unwrap(),
            r["label_1"].as_f64().unwrap(),
        );
        assert_eq!(l0 + l1, 1.0);
        assert_eq!(l0, label_from_grades(r), "label follows the judge's grade");
    }
    // The manifest reads with the preference-set reader.
    let e = engine();
    let n: i64 = e
        .engine
        .eval(&format!(
            r#"let p = read_pair_manifest("{}"); let x = load_png(p[0].image_0); if x.shape == [3, 16, 16] {{ p.len() }} else {{ -1 }}"#,
            dir.join("pairs/pairs.jsonl").display()
        ))
        .unwrap();
    assert_eq!(n, 9);

    // Cross-prompt pairs: draws 0 and 1 share a sampling batch (chunk 2), draw 2 is alone, so
    // each of draws 0 and 1 pairs 2 of its images with the other draw's, judged for its prompt.
    let cross: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("pairs/cross_pairs.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(cross.len(), 4);
    let draw_of = |image: &str| -> usize {
        let row = rows
            .iter()
            .position(|r| r["image_0"] == image || r["image_1"] == image)
            .unwrap();
        row / 3
    };
    let own_grade = |image: &str| -> f64 {
        let r = rows
            .iter()
            .find(|r| r["image_0"] == image || r["image_1"] == image)
            .unwrap();
        if r["image_0"] == image {
            r["grade_0"].as_f64().unwrap()
        } else {
            r["grade_1"].as_f64().unwrap()
        }
    };
    for r in &cross {
        let g = r["group"].as_u64().unwrap() as usize;
        let (a, b) = (
            r["image_0"].as_str().unwrap(),
            r["image_1"].as_str().unwrap(),
        );
        assert_eq!(draw_of(a), g, "image_0 comes from the row's draw");
        assert_eq!(draw_of(b), 1 - g, "image_1 comes from the other draw");
        assert_eq!(
            r["prompt"],
            rows[g * 3]["prompt"],
            "judged for image_0's prompt"
        );
        assert_eq!(r["grade_0"].as_f64().unwrap(), own_grade(a));
        assert_eq!(r["label_0"].as_f64().unwrap(), label_from_grades(r));
    }
    // The cross pairs draw from their own generator: without them the images are the same.
    let o = make_pairs("mp0", "pairs0", &[]);
    ok(&o, "make_pairs without cross pairs");
    assert!(!dir.join("pairs0/cross_pairs.jsonl").exists());
    for name in &images {
        let a = std::fs::read(dir.join("pairs").join(name)).unwrap();
        let b = std::fs::read(dir.join("pairs0").join(name)).unwrap();
        assert!(a == b, "{name} differs when cross pairs are drawn");
    }

    // 3. LRM: decided labels so the held-out accuracy is computed.
    let decided: String = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            r["label_0"] = serde_json::json!(if i % 2 == 0 { 1.0 } else { 0.0 });
            r["label_1"] = serde_json::json!(if i % 2 == 0 { 0.0 } else { 1.0 });
            format!("{r}\n")
        })
        .collect();
    std::fs::write(dir.join("pairs/decided.jsonl"), decided).unwrap();
    // Cross pairs, decided. The split below holds out draw 2: row 3 is moved onto two of its
    // images (evaluated), row 2 gets one of them (dropped), rows 0-1 train.
    let cross_decided: String = cross
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            r["label_0"] = serde_json::json!(1.0);
            r["label_1"] = serde_json::json!(0.0);
            if i == 3 {
                r["image_0"] = rows[6]["image_0"].clone();
                r["image_1"] = rows[6]["image_1"].clone();
            }
            if i == 2 {
                r["image_1"] = rows[6]["image_0"].clone();
            }
            format!("{r}\n")
        })
        .collect();
    std::fs::write(dir.join("pairs/cross_decided.jsonl"), cross_decided).unwrap();
    let o = lpo(
        dir,
        &[
            "run",
            &recipe("train_lrm.rhai"),
            "--run-dir",
            "lr",
            "--set",
            "base=base",
            "--set",
            "pairs=pairs/decided.jsonl",
            "--set",
            "steps=2",
            "--set",
            "batch=2",
            "--set",
            "eval_frac=0.5",
            "--set",
            "augment=dihedral",
            "--set",
            "cross_pairs=pairs/cross_decided.jsonl",
            "--set",
            "out=lrm",
            "--allow-write",
            "lrm",
        ],
    );
    ok(&o, "train_lrm");
    // Half of 9 rows would cut draw 1 (rows 3..6) in two: the split moves to its end.
    let ev = read_json(&dir.join("lrm/lrm_eval.json"));
    // 6 pairs of draws 0-1 and 2 cross pairs train; one cross pair is held out, one dropped.
    assert_eq!(ev["train_pairs"], 8);
    assert_eq!(ev["eval_pairs"], 3);
    assert_eq!(ev["eval_cross_pairs"], 1);
    assert_eq!(ev["cross_dropped"], 1);
    for t in ["t1", "t951"] {
        let a = ev["accuracy_cross"][t].as_f64().unwrap();
        assert!(a == 0.0 || a == 1.0, "cross {t}: {a}");
    }
    for t in ["t1", "t201", "t501", "t801", "t951"] {
        let a = ev["accuracy"][t].as_f64().unwrap();
        let right = a * 3.0;
        assert!(
            (right - right.round()).abs() < 1e-9 && (0.0..=3.0).contains(&right),
            "{t}: {a}"
        );
    }
    let s: f64 = e
        .engine
        .eval(&format!(
            r#"let l = load_lrm("{}"); l.score(zeros([1, 3, 16, 16]), ["a red circle"], 500).item()"#,
            dir.join("lrm").display()
        ))
        .unwrap();
    assert!(s.is_finite());

    // 4. LPO with that LRM, then the evaluation; the judge and random-reward controls.
    //    Threshold 0 so every comparison makes a pair and a training step runs. The first run
    //    samples the base for the evaluation and caches it in base/eval_cache; the others reuse it.
    let mut first_before = None;
    for (reward, run) in [
        ("lrm", "lpo"),
        ("judge", "lpo-judge"),
        ("random", "lpo-random"),
    ] {
        let o = lpo(
            dir,
            &[
                "run",
                &recipe("lpo.rhai"),
                "--run-dir",
                run,
                // The base's evaluation samples are cached in base/eval_cache.
                "--allow-write",
                "base",
                "--set",
                "base=base",
                "--set",
                "lrm=lrm",
                "--set",
                &format!("reward={reward}"),
                "--set",
                "iters=1",
                "--set",
                "prompts_per_iter=2",
                "--set",
                "steps=2",
                "--set",
                "threshold_mode=static",
                "--set",
                "threshold=0",
                "--set",
                "eval_n=4",
                "--set",
                "eval_heldout_n=2",
                "--set",
                "chunk=4",
                "--set",
                "lr=0.01",
            ],
        );
        ok(&o, &format!("lpo.rhai reward={reward}"));
        let out = printed(&o);
        for line in [
            "train prompts: aligned",
            "held-out prompts: aligned",
            "report: ",
        ] {
            assert!(out.contains(line), "{reward}: no `{line}` in\n{out}");
        }
        let run = dir.join(run);
        let summary = read_json(&run.join("summary.json"));
        assert_eq!(summary["n"], 4);
        assert_eq!(summary["reward"], reward);
        for key in ["before", "after", "delta", "ci95_low", "ci95_high"] {
            let v = summary[key]
                .as_f64()
                .unwrap_or_else(|| panic!("summary.{key}"));
            assert!((-1.0..=1.0).contains(&v), "{key} = {v}");
        }
        let d = summary["after"].as_f64().unwrap() - summary["before"].as_f64().unwrap();
        assert!((summary["delta"].as_f64().unwrap() - d).abs() < 1e-9);
        assert_eq!(summary["heldout"]["n"], 2);
        assert_eq!(summary["heldout"]["shape"]["n"], 2);
        assert_eq!(summary["colour"]["n"], 4);
        assert!(
            summary["optimizer_steps"].as_i64().unwrap() >= 1,
            "{reward}: no training step"
        );
        for f in [
            "report.html",
            "before_after.png",
            "alignment.png",
            "loss.png",
            "valid_pairs.png",
        ] {
            assert!(run.join(f).is_file(), "{reward}: missing {f}");
        }
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        assert!(metrics.contains("\"implicit_acc\""));
        // The saved model is the trained UNet (lr 0.01 moves it well past f16 rounding), not
        // the base's copied over it.
        let weights = "unet/diffusion_pytorch_model.safetensors";
        let moved: f64 = e
            .engine
            .eval(&format!(
                r#"let a = load_safetensors("{}"); let b = load_safetensors("{}"); let m = 0.0;
                   for k in a.keys() {{ let d = a[k].to_dtype("f32").max_abs_diff(b[k].to_dtype("f32")); if d > m {{ m = d; }} }} m"#,
                run.join("model").join(weights).display(),
                dir.join("base").join(weights).display()
            ))
            .unwrap();
        assert!(
            moved > 1e-3,
            "{reward}: model/ holds the base's UNet (max diff {moved})"
        );
        let cached = summary["eval_settings"]["before_cached"].as_bool().unwrap();
        match &first_before {
            None => {
                assert!(!cached, "{reward}: the first run found a cache");
                first_before = Some(summary["before"].clone());
            }
            Some(before) => {
                assert!(cached, "{reward}: the base's samples were not reused");
                assert_eq!(&summary["before"], before);
            }
        }
    }
    let o = lpo(
        dir,
        &[
            "run",
            &recipe("eval.rhai"),
            "--run-dir",
            "ev",
            "--set",
            "base=base",
            "--set",
            "after=lpo/model",
            "--set",
            "n=4",
            "--set",
            "n_heldout=0",
            "--set",
            "steps=2",
            "--set",
            "chunk=4",
            "--set",
            "eval_cache=",
        ],
    );
    ok(&o, "eval.rhai");
    let out = printed(&o);
    assert!(out.contains("train prompts: aligned"), "{out}");
    assert!(!out.contains("held-out prompts"), "n_heldout=0: {out}");
    // The same seeds and models as lpo.rhai's own evaluation: the same numbers, sampled afresh
    // (no cache), so the cached base samples above were the real ones.
    let ev = read_json(&dir.join("ev/summary.json"));
    let lp = read_json(&dir.join("lpo/summary.json"));
    assert_eq!(ev["eval_settings"]["before_cached"], false);
    assert_eq!(ev["before"], lp["before"]);
    assert!(dir.join("ev/report.html").is_file());

    // Two trained models on the same seeds: B's judged flags against A's.
    let o = run_recipe(dir, "compare_runs.rhai", "cmp", &["a=lpo-random", "b=lpo"]);
    ok(&o, "compare_runs.rhai");
    let cmp = read_json(&dir.join("cmp/comparison.json"));
    let random = read_json(&dir.join("lpo-random/summary.json"));
    assert_eq!(cmp["train"]["mean_a"], random["after"]);
    assert_eq!(cmp["train"]["mean_b"], lp["after"]);
    let d = lp["after"].as_f64().unwrap() - random["after"].as_f64().unwrap();
    assert!((cmp["train"]["delta"].as_f64().unwrap() - d).abs() < 1e-9);
    assert_eq!(cmp["heldout"]["mean_b"], lp["heldout"]["after"]);
    assert_eq!(cmp["train"]["shape"]["n"], 4);
    // Runs evaluated with different settings are not paired.
    let o = run_recipe(dir, "compare_runs.rhai", "cmp-bad", &["a=lpo", "b=ev"]);
    assert_eq!(o.status.code(), Some(1), "{}", printed(&o));
    assert!(
        printed(&o).contains("eval_settings.n_heldout differs"),
        "{}",
        printed(&o)
    );
}
