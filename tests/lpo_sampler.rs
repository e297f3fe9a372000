//! LPO's multi-candidate sampler on the tiny models: recorded winners/losers really scored
//! highest/lowest, the record count equals the valid comparisons, the candidates follow the
//! DDIM step's Gaussian, and bad input gives clear errors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lpo::diffusion::DdimScheduler;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use lpo::tensor::SeededRng;
use rhai::{Array, Map};

fn engine() -> rhai::Engine {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
    .engine
}

const SETUP: &str = r#"
let model = "tests/fixtures/tiny-sd";
let te = load_text_encoder(model + "/text_encoder");
let tok = load_tokenizer(model + "/tokenizer");
let sched = load_scheduler(model);
let lrm = load_lrm("tests/fixtures/tiny-lrm", #{multi_scale: true, guidance_scale: 7.5});
let policy = lpo_policy(load_unet(model + "/unet"), #{lora: #{rank: 2, seed: 1}});
let prompts = ["a red circle", "a blue square", "two green dots"];
"#;

fn f64s(a: &Array) -> Vec<f64> {
    a.iter()
        .map(|v| v.as_float().unwrap_or_else(|_| v.as_int().unwrap() as f64))
        .collect()
}

#[test]
fn winners_scored_highest_and_count_equals_valid_comparisons() {
    let script = format!(
        r#"{SETUP}
        import "compare" as cmp;
        let opts = #{{mode: "static", threshold: 0.02}};
        let out = lpo_sample(policy, te, tok, sched, lrm, prompts,
            |s, t, o| cmp::preference_compare(s, t, o),
            #{{k: 3, steps: 4, divert_start: 1, seed: 7, compare_opts: opts}});
        // every comparison, recomputed from the logged scores
        let expected_valid = 0;
        let logged_valid = 0;
        for l in out.log {{
            let c = cmp::preference_compare(l.scores, tensor([l.t, l.t, l.t]), opts);
            expected_valid += c.valid.to_dtype("f32").sum().item();
            logged_valid += l.valid;
        }}
        let rec = out.records;
        let win_rescored = []; let lose_rescored = []; let max_logged = []; let min_logged = [];
        let others_max = [];
        for i in 0..rec.len {{
            let r = rec[i];
            let x = stack([r.x_win, r.x_lose], 0);
            let s = lrm.score(x, [r.prompt, r.prompt], r.t);
            win_rescored.push(s[0].item()); lose_rescored.push(s[1].item());
            for l in out.log {{
                if l.t == r.t {{
                    let col = l.scores.narrow(1, r.prompt_index, 1).reshape([3]);
                    let sorted = col.sort(0, true).values;
                    max_logged.push(sorted[0].item());
                    min_logged.push(sorted[2].item());
                    others_max.push(sorted[1].item());
                }}
            }}
        }}
        #{{count: rec.len, expected_valid: expected_valid, logged_valid: logged_valid,
          steps_logged: out.log.len, win: win_rescored, lose: lose_rescored,
          max: max_logged, min: min_logged, mid: others_max,
          latents: out.latents.shape, stats: out.stats, buckets: rec.buckets}}"#
    );
    let m: Map = engine().eval(&script).unwrap();
    let count = m["count"].as_int().unwrap();
    let expected = f64s(&vec![m["expected_valid"].clone()])[0];
    assert_eq!(
        m["steps_logged"].as_int().unwrap(),
        3,
        "divert from step 1 of 4"
    );
    assert_eq!(count as f64, expected, "records vs valid comparisons");
    assert_eq!(count, m["logged_valid"].as_int().unwrap());
    assert!(count > 0, "no valid pair at threshold 0.02");
    let stats = m["stats"].clone().cast::<Map>();
    assert_eq!(stats["valid_pairs"].as_int().unwrap(), count);
    assert_eq!(stats["comparisons"].as_int().unwrap(), 9);
    let buckets = m["buckets"].clone().cast::<Map>();
    let total: i64 = buckets.values().map(|v| v.as_int().unwrap()).sum();
    assert_eq!(total, count);
    let shape: Vec<i64> = m["latents"]
        .clone()
        .cast::<Array>()
        .iter()
        .map(|v| v.as_int().unwrap())
        .collect();
    assert_eq!(shape, vec![3, 4, 8, 8]);
    let win = f64s(&m["win"].clone().cast());
    let lose = f64s(&m["lose"].clone().cast());
    let max = f64s(&m["max"].clone().cast());
    let min = f64s(&m["min"].clone().cast());
    let mid = f64s(&m["mid"].clone().cast());
    assert_eq!(win.len(), count as usize);
    assert_eq!(max.len(), count as usize);
    for i in 0..win.len() {
        let tol = 1e-3 * (1.0 + max[i].abs());
        assert!(
            (win[i] - max[i]).abs() < tol,
            "winner {i}: rescored {} vs best logged {}",
            win[i],
            max[i]
        );
        assert!(
            (lose[i] - min[i]).abs() < tol,
            "loser {i}: rescored {} vs worst logged {}",
            lose[i],
            min[i]
        );
        assert!(
            win[i] + tol >= mid[i] && mid[i] + tol >= lose[i],
            "winner beats the middle candidate, which beats the loser"
        );
        assert!(win[i] > lose[i]);
    }
}

#[test]
fn same_seed_same_records() {
    let script = format!(
        r#"{SETUP}
        fn cmpf(s, t, o) {{ import "compare" as cmp; cmp::preference_compare(s, t, o) }}
        let a = lpo_sample(policy, te, tok, sched, lrm, prompts, Fn("cmpf"), #{{k: 2, steps: 3, seed: 3, compare_opts: #{{threshold: 0.0}}}});
        let b = lpo_sample(policy, te, tok, sched, lrm, prompts, Fn("cmpf"), #{{k: 2, steps: 3, seed: 3, compare_opts: #{{threshold: 0.0}}}});
        [max_abs_diff(a.latents, b.latents), a.records.len, b.records.len,
         max_abs_diff(a.records.to_tensors().x_win, b.records.to_tensors().x_win)]"#
    );
    let v: Array = engine().eval(&script).unwrap();
    assert_eq!(v[0].as_float().unwrap(), 0.0);
    assert_eq!(v[1].as_int().unwrap(), v[2].as_int().unwrap());
    assert_eq!(v[3].as_float().unwrap(), 0.0);
}

#[test]
fn candidates_follow_the_ddim_step() {
    let dev = Device::Cpu;
    let s = DdimScheduler::load(Path::new("tests/fixtures/tiny-sd"), &dev).unwrap();
    s.set_timesteps(20).unwrap();
    let mut rng = SeededRng::new(11);
    let x = rng.randn((2, 4, 3, 3), &dev).unwrap();
    let eps = rng.randn((2, 4, 3, 3), &dev).unwrap();
    let t = Tensor::new(&[501i64, 901], &dev).unwrap();
    let k = 4000;
    let c = s.candidates(&eps, &t, &x, k, 1.0, &mut rng).unwrap();
    let mean = c.mean(0).unwrap();
    let var = c
        .broadcast_sub(&mean)
        .unwrap()
        .sqr()
        .unwrap()
        .mean(0)
        .unwrap();
    let want_mean = s.prev_sample_mean(&eps, &t, &x, 1.0).unwrap();
    let want_std = s.std_dev(&t, 1.0).unwrap().to_vec1::<f32>().unwrap();
    for (b, &std_b) in want_std.iter().enumerate().take(2) {
        let m = mean
            .get(b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let w = want_mean
            .get(b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sd = var
            .get(b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sigma = std_b;
        assert!(sigma > 0.01);
        // standard error of a mean of 4000 draws: sigma / 63; 5 SE bound
        for (i, (a, e)) in m.iter().zip(&w).enumerate() {
            assert!(
                (a - e).abs() < 5.0 * sigma / (k as f32).sqrt(),
                "row {b} elem {i}: mean {a} vs {e}"
            );
        }
        for v in sd {
            assert!(
                (v / sigma - 1.0).abs() < 0.06,
                "row {b}: std {v} vs sigma {sigma}"
            );
        }
    }
}

fn err_of(script: &str) -> String {
    engine()
        .eval::<rhai::Dynamic>(script)
        .map(|_| ())
        .expect_err("the call must fail")
        .to_string()
}

#[test]
fn empty_prompts_and_bad_compare_results_are_clear_errors() {
    let e = err_of(&format!(
        r#"{SETUP} lpo_sample(policy, te, tok, sched, lrm, [], |s, t, o| #{{}}, #{{k: 2, steps: 2}})"#
    ));
    assert!(e.contains("prompt list is empty"), "{e}");

    let e = err_of(&format!(
        r#"{SETUP}
        fn bad_shape(s, t, o) {{ #{{indices: zeros([3, 3]).to_dtype("i64"), valid: ones([3])}} }}
        lpo_sample(policy, te, tok, sched, lrm, prompts, Fn("bad_shape"), #{{k: 2, steps: 2}})"#
    ));
    assert!(e.contains("`bad_shape`") && e.contains("[2, 3]"), "{e}");

    let e = err_of(&format!(
        r#"{SETUP}
        fn no_valid(s, t, o) {{ #{{indices: zeros([2, 3]).to_dtype("i64")}} }}
        lpo_sample(policy, te, tok, sched, lrm, prompts, Fn("no_valid"), #{{k: 2, steps: 2}})"#
    ));
    assert!(e.contains("`no_valid`") && e.contains("valid"), "{e}");

    let e = err_of(&format!(
        r#"{SETUP}
        fn out_of_range(s, t, o) {{ #{{indices: (ones([2, 3]) * 5).to_dtype("i64"), valid: ones([3])}} }}
        lpo_sample(policy, te, tok, sched, lrm, prompts, Fn("out_of_range"), #{{k: 2, steps: 2}})"#
    ));
    assert!(
        e.contains("`out_of_range`") && e.contains("outside 0..2"),
        "{e}"
    );

    let e = err_of(&format!(
        r#"{SETUP} lpo_sample(policy, te, tok, sched, lrm, prompts, |s, t, o| 42, #{{k: 2, steps: 2}})"#
    ));
    assert!(
        e.contains("returned a i64") || e.contains("returned a"),
        "{e}"
    );

    let e = err_of(&format!(
        r#"{SETUP} lpo_sample(policy, te, tok, sched, lrm, prompts, |s, t, o| 1, #{{k: 1, steps: 2}})"#
    ));
    assert!(e.contains("k must be >= 2"), "{e}");
}

/// A copy of the tiny CLIP text encoder cut to hidden size 16.
fn narrow_text_encoder(dir: &Path) {
    let src = Path::new("tests/fixtures/tiny-sd/text_encoder");
    std::fs::create_dir_all(dir).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json")).unwrap();
    let cfg = cfg.replace("\"hidden_size\": 32", "\"hidden_size\": 16");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (k, mut t) in tensors {
        for d in 0..t.rank() {
            if t.dim(d).unwrap() == 32 {
                t = t.narrow(d, 0, 16).unwrap().contiguous().unwrap();
            }
        }
        out.insert(k, t.to_dtype(DType::F32).unwrap());
    }
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
}

#[test]
fn a_text_encoder_that_does_not_fit_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let te16 = tmp.path().join("text_encoder");
    narrow_text_encoder(&te16);
    // The policy's own side: hidden 16 vs cross_attention_dim 32.
    let e = err_of(&format!(
        r#"{SETUP} let te16 = load_text_encoder("{}");
        lpo_sample(policy, te16, tok, sched, lrm, prompts, |s, t, o| 1, #{{k: 2, steps: 2}})"#,
        te16.display()
    ));
    assert!(
        e.contains("hidden states of size 16") && e.contains("cross_attention_dim"),
        "{e}"
    );
    // An LRM folder whose text encoder does not fit its projections.
    let lrm = tmp.path().join("lrm");
    for sub in ["unet", "tokenizer"] {
        std::fs::create_dir_all(lrm.join(sub)).unwrap();
        for f in std::fs::read_dir(Path::new("tests/fixtures/tiny-lrm").join(sub)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), lrm.join(sub).join(f.file_name())).unwrap();
        }
    }
    std::fs::copy(
        "tests/fixtures/tiny-lrm/projections.safetensors",
        lrm.join("projections.safetensors"),
    )
    .unwrap();
    narrow_text_encoder(&lrm.join("text_encoder"));
    let e = err_of(&format!(r#"load_lrm("{}")"#, lrm.display()));
    assert!(e.contains("hidden size is 16") || e.contains("16"), "{e}");
}

#[test]
fn a_reward_fn_replaces_the_lrm() {
    // Reward: minus the mean pixel of each candidate, so every recorded winner has a lower mean
    // than its loser, whatever the LRM would have said.
    let script = format!(
        r#"{SETUP}
        import "compare" as cmp;
        let calls = [];
        let reward = |c, t| {{
            let k = c.shape[0];
            let b = c.shape[1];
            calls.push(t.shape);
            c.reshape([k, b, c.numel / (k * b)]).mean(2) * -1.0
        }};
        let out = lpo_sample(policy, te, tok, sched, lrm, prompts,
            |s, t, o| cmp::preference_compare(s, t, o),
            #{{k: 3, steps: 3, seed: 5, compare_opts: #{{mode: "static", threshold: 0.0}}, reward_fn: reward}});
        let rec = out.records;
        let bad = 0;
        for i in 0..rec.len {{
            let r = rec[i];
            if r.x_win.mean().item() >= r.x_lose.mean().item() {{ bad += 1; }}
        }}
        [rec.len, bad]"#
    );
    let out: Array = engine().eval(&script).unwrap();
    let (n, bad) = (out[0].as_int().unwrap(), out[1].as_int().unwrap());
    assert!(n >= 3, "only {n} records");
    assert_eq!(bad, 0, "{bad} of {n} winners do not have the higher reward");

    let e = err_of(&format!(
        r#"{SETUP} lpo_sample(policy, te, tok, sched, lrm, prompts, |s, t, o| 1, #{{k: 2, steps: 2, reward_fn: |c, t| zeros([3])}})"#
    ));
    assert!(e.contains("[K, B] = [2, 3]"), "{e}");
    let e = err_of(&format!(
        r#"{SETUP} lpo_sample(policy, te, tok, sched, lrm, prompts, |s, t, o| 1, #{{k: 2, steps: 2, reward_fn: |c, t| 7}})"#
    ));
    assert!(e.contains("reward_fn returned a"), "{e}");
}
