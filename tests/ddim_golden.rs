//! DDIM scheduler through the script API against the PyTorch/diffusers golden tensors
//! (tests/fixtures/golden/ddim*.safetensors), sampling statistics, seeded determinism, a
//! finite-difference check of d log_prob / d model_output, and bad input.

use candle_core::{DType, Device, Tensor, Var};
use lpo::diffusion::{DdimConfig, DdimScheduler};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host, ScriptEngine};
use rhai::{Dynamic, Map};

fn engine() -> ScriptEngine {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
}

fn eval_map(script: &str) -> Map {
    engine()
        .engine
        .eval::<Map>(script)
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

fn eval_err(script: &str) -> String {
    match engine().engine.eval::<Dynamic>(script) {
        Ok(v) => panic!("expected an error, got {v}"),
        Err(e) => e.to_string(),
    }
}

fn f(m: &Map, k: &str) -> f64 {
    let v = m.get(k).unwrap_or_else(|| panic!("no key {k}"));
    v.as_float()
        .or_else(|_| v.as_int().map(|i| i as f64))
        .unwrap_or_else(|_| panic!("{k} = {v} is not a number"))
}

const SD: &str = "tests/fixtures/tiny-sd";

/// A scheduler folder like tiny-sd's with some config keys replaced.
fn config_dir(changes: &[(&str, serde_json::Value)]) -> tempfile::TempDir {
    let text = std::fs::read_to_string(format!("{SD}/scheduler/scheduler_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (k, v) in changes {
        cfg[*k] = v.clone();
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("scheduler")).unwrap();
    std::fs::write(
        dir.path().join("scheduler/scheduler_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn schedule_tables_match_golden() {
    let m = eval_map(&format!(
        r#"
        let g = load_safetensors("tests/fixtures/golden/ddim.safetensors");
        let s = load_scheduler("{SD}");
        let ts = s.set_timesteps(20);
        let asc = s.std_dev_table(1.0);
        #{{
            ts_dtype: ts.dtype,
            ts: max_abs_diff(ts, g.timesteps),
            ts_getter: max_abs_diff(s.timesteps, g.timesteps),
            prev: max_abs_diff(s.prev_timestep(ts), g.prev_timesteps),
            betas: max_abs_diff(s.betas, g.betas),
            ac: max_abs_diff(s.alphas_cumprod, g.alphas_cumprod),
            ac64: max_abs_diff(s.alphas_cumprod, g.alphas_cumprod_f64),
            final_ac: s.final_alpha_cumprod - g.final_alpha_cumprod.item(),
            variance: max_abs_diff(s.variance(ts), g.variance),
            variance64: max_abs_diff(s.variance(ts), g.variance_f64),
            std: max_abs_diff(s.std_dev(ts, 1.0), g.std_dev_eta1),
            std_int_eta: max_abs_diff(s.std_dev(ts, 1), g.std_dev_eta1),
            std_half: max_abs_diff(s.std_dev(ts, 0.5), g.std_dev_eta1 * 0.5),
            sigma_table: max_abs_diff(asc, g.lpo_sigma_table),
            pred: s.prediction_type,
            n: s.num_inference_steps,
            one_t: max_abs_diff(s.std_dev(951, 1.0), g.std_dev_eta1.narrow(0, 0, 1)),
        }}
    "#
    ));
    assert_eq!(m["ts_dtype"].clone().into_string().unwrap(), "i64");
    assert_eq!(f(&m, "ts"), 0.0);
    assert_eq!(f(&m, "ts_getter"), 0.0);
    assert_eq!(f(&m, "prev"), 0.0);
    // torch's vectorized linspace differs from the scalar formula by an ulp or two
    assert!(f(&m, "betas") < 1e-8, "betas {}", f(&m, "betas"));
    assert!(f(&m, "ac") < 1e-6, "alphas_cumprod f32 {}", f(&m, "ac"));
    assert!(
        f(&m, "ac64") < 1e-6,
        "alphas_cumprod vs f64 {}",
        f(&m, "ac64")
    );
    assert!(f(&m, "final_ac").abs() < 1e-9);
    for k in [
        "variance",
        "variance64",
        "std",
        "std_int_eta",
        "std_half",
        "one_t",
    ] {
        assert!(f(&m, k) < 1e-6, "{k}: {}", f(&m, k));
    }
    // LPO's table has 4 decimals
    assert!(
        f(&m, "sigma_table") < 6e-5,
        "sigma table {}",
        f(&m, "sigma_table")
    );
    assert_eq!(m["pred"].clone().into_string().unwrap(), "epsilon");
    assert_eq!(f(&m, "n"), 20.0);
}

fn logprob_case(prefix: &str, dir: &str) {
    let m = eval_map(&format!(
        r#"
        let g = load_safetensors("tests/fixtures/golden/ddim_logprob.safetensors");
        let s = load_scheduler("{dir}");
        s.set_timesteps(20);
        let p = "{prefix}";
        let t = g.timesteps;
        let x = g.sample;
        let m = g[p + "model_output"];
        let prev = g[p + "prev_sample"];
        let std = s.std_dev(t, 1.0);
        // the golden prev_sample = mean(sampler output) + std * noise
        let rebuilt = s.prev_sample_mean(g[p + "model_output_sampler"], t, x, 1.0) + std.reshape([4, 1, 1, 1]) * g.noise;
        #{{
            pred: s.prediction_type,
            mean: max_abs_diff(s.prev_sample_mean(m, t, x, 1.0), g[p + "prev_sample_mean"]),
            std: max_abs_diff(std, g[p + "std_dev"]),
            lp: max_abs_diff(s.log_prob(m, t, x, prev, 1.0), g[p + "log_prob"]),
            lp_int_eta: max_abs_diff(s.log_prob(m, t, x, prev, 1), g[p + "log_prob"]),
            lp64: max_abs_diff(s.log_prob(m, t, x, prev, 1.0), g[p + "log_prob_f64"]),
            lp_f64_input: max_abs_diff(s.log_prob(m.to_dtype("f64"), t, x.to_dtype("f64"), prev, 1.0), g[p + "log_prob_f64"]),
            lp_ref: max_abs_diff(s.log_prob(g[p + "model_output_ref"], t, x, prev, 1.0), g[p + "log_prob_ref"]),
            rebuilt: max_abs_diff(rebuilt, prev),
            many: {{
                let both = s.log_prob(m, t, x, [prev, g[p + "prev_sample_mean"]], 1.0);
                max_abs_diff(both[0], g[p + "log_prob"])
                    + max_abs_diff(both[1], s.log_prob(m, t, x, g[p + "prev_sample_mean"], 1.0))
            }},
            shape: s.log_prob(m, t, x, prev, 1.0).shape,
        }}
    "#
    ));
    for k in [
        "mean",
        "std",
        "lp",
        "lp_int_eta",
        "lp64",
        "lp_ref",
        "rebuilt",
        "many",
    ] {
        assert!(f(&m, k) < 1e-4, "{prefix} {k}: {}", f(&m, k));
    }
    // f64 arithmetic on the f32 alphas_cumprod: only the table rounding separates it from f64
    assert!(
        f(&m, "lp_f64_input") < 1e-5,
        "{prefix} f64 log_prob: {}",
        f(&m, "lp_f64_input")
    );
    assert_eq!(m["shape"].clone().into_array().unwrap().len(), 1);
    let expected = if prefix == "eps_" {
        "epsilon"
    } else {
        "v_prediction"
    };
    assert_eq!(m["pred"].clone().into_string().unwrap(), expected);
}

#[test]
fn log_prob_epsilon_matches_golden() {
    logprob_case("eps_", SD);
}

#[test]
fn log_prob_v_prediction_matches_golden() {
    let dir = config_dir(&[("prediction_type", "v_prediction".into())]);
    logprob_case("v_", dir.path().to_str().unwrap());
}

#[test]
fn step_and_candidates_follow_the_step_distribution() {
    let m = eval_map(&format!(
        r#"
        let g = load_safetensors("tests/fixtures/golden/ddim_logprob.safetensors");
        let s = load_scheduler("{SD}");
        s.set_timesteps(20);
        let x = g.sample.narrow(0, 0, 2);
        let m = g.eps_model_output.narrow(0, 0, 2);
        let t = tensor([951, 1]);
        let k = 1000;
        let c = s.candidates(m, t, x, k, 1.0, rng(5));
        let mu = s.prev_sample_mean(m, t, x, 1.0);
        let sd = s.std_dev(t, 1.0);
        let z = (c - mu) / sd.reshape([1, 2, 1, 1, 1]);
        // step over a batch of identical rows: the same distribution, drawn row by row
        let xb = x.narrow(0, 0, 1).repeat([k, 1, 1, 1]);
        let mb = m.narrow(0, 0, 1).repeat([k, 1, 1, 1]);
        let st = s.step(mb, 951, xb, 1.0, rng(6));
        let zs = (st - mu.narrow(0, 0, 1)) / sd[0];
        #{{
            shape: c.shape,
            z_mean: z.mean().item(),
            z_std: z.std().item(),
            z0_std: z.narrow(1, 0, 1).std().item(),
            z1_std: z.narrow(1, 1, 1).std().item(),
            mean_err: (c.mean(0) - mu).abs().max().item(),
            mean_err_row1: (c.mean(0).narrow(0, 1, 1) - mu.narrow(0, 1, 1)).abs().max().item(),
            sd0: sd[0].item(),
            sd1: sd[1].item(),
            step_shape: st.shape,
            zs_mean: zs.mean().item(),
            zs_std: zs.std().item(),
            step_mean_err: (st.mean(0) - mu[0]).abs().max().item(),
            eta0: max_abs_diff(s.step(m, t, x, 0, rng(1)), s.prev_sample_mean(m, t, x, 0)),
            c_eta0: max_abs_diff(s.candidates(m, t, x, 3, 0.0, rng(1)), s.prev_sample_mean(m, t, x, 0).unsqueeze(0).repeat([3, 1, 1, 1, 1])),
        }}
    "#
    ));
    let shape: Vec<i64> = m["shape"]
        .clone()
        .into_array()
        .unwrap()
        .iter()
        .map(|v| v.as_int().unwrap())
        .collect();
    assert_eq!(shape, vec![1000, 2, 4, 8, 8]);
    let n = 1000.0 * 512.0;
    // standardized draws: mean 0 and std 1 within 6 standard errors
    assert!(
        f(&m, "z_mean").abs() < 6.0 / f64::sqrt(n),
        "z mean {}",
        f(&m, "z_mean")
    );
    assert!(
        (f(&m, "z_std") - 1.0).abs() < 6.0 * f64::sqrt(0.5 / n),
        "z std {}",
        f(&m, "z_std")
    );
    for k in ["z0_std", "z1_std"] {
        assert!(
            (f(&m, k) - 1.0).abs() < 6.0 * f64::sqrt(1.0 / n),
            "{k} {}",
            f(&m, k)
        );
    }
    // per-element sample means: max over 512 elements of |N(0, sd^2/K)| < 5 sd/sqrt(K)
    let k = 1000f64;
    assert!(
        f(&m, "mean_err") < 5.0 * f(&m, "sd0") / k.sqrt(),
        "mean err {}",
        f(&m, "mean_err")
    );
    assert!(
        f(&m, "mean_err_row1") < 5.0 * f(&m, "sd1") / k.sqrt(),
        "row 1 mean err {}",
        f(&m, "mean_err_row1")
    );
    let n_step = 1000.0 * 256.0;
    assert!(
        f(&m, "zs_mean").abs() < 6.0 / f64::sqrt(n_step),
        "step z mean {}",
        f(&m, "zs_mean")
    );
    assert!(
        (f(&m, "zs_std") - 1.0).abs() < 6.0 * f64::sqrt(0.5 / n_step),
        "step z std {}",
        f(&m, "zs_std")
    );
    assert!(f(&m, "step_mean_err") < 5.0 * f(&m, "sd0") / k.sqrt());
    assert_eq!(f(&m, "eta0"), 0.0);
    assert_eq!(f(&m, "c_eta0"), 0.0);
}

#[test]
fn seeded_draws_are_deterministic() {
    let m = eval_map(&format!(
        r#"
        let g = load_safetensors("tests/fixtures/golden/ddim_logprob.safetensors");
        let s = load_scheduler("{SD}");
        s.set_timesteps(20);
        let x = g.sample;
        let m = g.eps_model_output;
        let t = g.timesteps;
        let a = s.candidates(m, t, x, 4, 1.0, rng(11));
        let b = s.candidates(m, t, x, 4, 1.0, rng(11));
        let c = s.candidates(m, t, x, 4, 1.0, rng(12));
        let one = s.candidates(m, t, x, 1, 1.0, rng(11));
        let st = s.step(m, t, x, 1.0, rng(11));
        let r = rng(3);
        let first = s.step(m, t, x, 1.0, r);
        let second = s.step(m, t, x, 1.0, r);
        #{{
            same: max_abs_diff(a, b),
            other_seed: max_abs_diff(a, c),
            k1_is_step: max_abs_diff(one.squeeze(0), st),
            stream_advances: max_abs_diff(first, second),
        }}
    "#
    ));
    assert_eq!(f(&m, "same"), 0.0);
    assert!(f(&m, "other_seed") > 0.01);
    assert_eq!(f(&m, "k1_is_step"), 0.0);
    assert!(f(&m, "stream_advances") > 0.01);
}

/// Central finite differences of sum(log_prob) w.r.t. sampled model_output entries, in f64.
#[test]
fn log_prob_gradient_matches_finite_differences() {
    let device = Device::Cpu;
    let g = lpo::tensor::io::load_safetensors(
        std::path::Path::new("tests/fixtures/golden/ddim_logprob.safetensors"),
        &device,
    )
    .unwrap();
    for (pred, prefix) in [("epsilon", "eps_"), ("v_prediction", "v_")] {
        let mut cfg = DdimConfig::from_dir(std::path::Path::new(SD)).unwrap();
        cfg.prediction_type = if pred == "epsilon" {
            lpo::diffusion::PredictionType::Epsilon
        } else {
            lpo::diffusion::PredictionType::VPrediction
        };
        let s = DdimScheduler::new(cfg, &device).unwrap();
        s.set_timesteps(20).unwrap();
        let t = &g["timesteps"];
        let x = g["sample"].to_dtype(DType::F64).unwrap();
        let prev = g[&format!("{prefix}prev_sample")]
            .to_dtype(DType::F64)
            .unwrap();
        let m0 = g[&format!("{prefix}model_output")]
            .to_dtype(DType::F64)
            .unwrap();
        let var = Var::from_tensor(&m0).unwrap();
        let lp = s.log_prob(var.as_tensor(), t, &x, &prev, 1.0).unwrap();
        let grads = lp.sum_all().unwrap().backward().unwrap();
        let grad = grads
            .get(var.as_tensor())
            .expect("model_output has a gradient");
        let grad_flat = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(
            grad_flat.iter().any(|v| v.abs() > 1e-6),
            "gradient is all zero"
        );
        let base = m0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-5;
        for idx in [0usize, 77, 300, 511, 640, 1023] {
            let eval = |delta: f64| -> f64 {
                let mut v = base.clone();
                v[idx] += delta;
                let mo = Tensor::from_vec(v, m0.shape().clone(), &device).unwrap();
                s.log_prob(&mo, t, &x, &prev, 1.0)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            let an = grad_flat[idx];
            assert!(
                (fd - an).abs() <= 1e-6 + 1e-5 * an.abs(),
                "{pred} idx {idx}: fd {fd} vs autograd {an}"
            );
        }
    }
}

#[test]
fn spacings_and_add_noise_through_script() {
    let trailing = config_dir(&[
        ("timestep_spacing", "trailing".into()),
        ("steps_offset", 0.into()),
    ]);
    let linspace = config_dir(&[("timestep_spacing", "linspace".into())]);
    let m = eval_map(&format!(
        r#"
        let tr = load_scheduler("{}");
        let li = load_scheduler("{}/scheduler");
        let s = load_scheduler("{SD}/scheduler/scheduler_config.json");
        s.set_timesteps(20);
        let x0 = rng(1).randn([3, 4, 2, 2]);
        let n = rng(2).randn([3, 4, 2, 2]);
        let t = tensor([999, 500, 0]);
        let a = s.alphas_cumprod.index_select(0, t).reshape([3, 1, 1, 1]);
        let want = a.sqrt() * x0 + (1.0 - a).sqrt() * n;
        let xt = s.add_noise(x0, n, t);
        #{{
            trailing: tr.set_timesteps(20).to_array(),
            linspace: li.set_timesteps(4).to_array(),
            add_noise: max_abs_diff(xt, want),
            // epsilon prediction of the true noise recovers x0
            x0: max_abs_diff(s.pred_original_sample(n, t, xt), x0),
            velocity: max_abs_diff(s.velocity(x0, n, t), a.sqrt() * n - (1.0 - a).sqrt() * x0),
            last_step_prev: tr.prev_timestep(49).to_array(),
        }}
    "#,
        trailing.path().display(),
        linspace.path().display()
    ));
    let ints = |k: &str| -> Vec<i64> {
        m[k].clone()
            .into_array()
            .unwrap()
            .iter()
            .map(|v| v.as_int().unwrap())
            .collect()
    };
    let tr = ints("trailing");
    assert_eq!(tr.len(), 20);
    assert_eq!((tr[0], tr[1], tr[19]), (999, 949, 49));
    assert_eq!(ints("linspace"), vec![999, 666, 333, 0]);
    assert!(f(&m, "add_noise") < 1e-6);
    assert!(f(&m, "x0") < 1e-3, "x0 {}", f(&m, "x0"));
    assert!(f(&m, "velocity") < 1e-6);
    assert_eq!(ints("last_step_prev"), vec![0]);
}

#[test]
fn bad_input_gives_clear_errors() {
    let bad = config_dir(&[("beta_schedule", "squaredcos_cap_v2".into())]);
    let err = eval_err(&format!(r#"load_scheduler("{}")"#, bad.path().display()));
    assert!(
        err.contains("squaredcos_cap_v2") && err.contains("scheduler_config.json"),
        "{err}"
    );
    let err = eval_err(r#"load_scheduler("tests/fixtures/nowhere")"#);
    assert!(err.contains("nowhere"), "{err}");
    let bad_pred = config_dir(&[("prediction_type", "flow".into())]);
    let err = eval_err(&format!(
        r#"load_scheduler("{}")"#,
        bad_pred.path().display()
    ));
    assert!(
        err.contains("prediction_type") && err.contains("flow"),
        "{err}"
    );

    let pre = format!(r#"let s = load_scheduler("{SD}"); let x = zeros([2, 4, 8, 8]); "#);
    let err = eval_err(&format!("{pre} s.std_dev(tensor([951, 1]), 1.0)"));
    assert!(err.contains("set_timesteps"), "{err}");
    let pre = format!("{pre} s.set_timesteps(20); ");
    let err = eval_err(&format!(
        "{pre} s.log_prob(x, tensor([951, 1]), x, zeros([2, 4, 8, 4]), 1.0)"
    ));
    assert!(err.contains("[2, 4, 8, 4]"), "{err}");
    let err = eval_err(&format!(
        "{pre} s.step(zeros([2, 4, 4, 4]), tensor([951, 1]), x, 1.0, rng(1))"
    ));
    assert!(err.contains("[2, 4, 4, 4]"), "{err}");
    let err = eval_err(&format!(
        "{pre} s.step(x, tensor([951, 1, 1]), x, 1.0, rng(1))"
    ));
    assert!(err.contains("3 entries") && err.contains("2 rows"), "{err}");
    let err = eval_err(&format!(
        "{pre} s.step(x, tensor([951, 1000]), x, 1.0, rng(1))"
    ));
    assert!(
        err.contains("1000") && err.contains("out of range"),
        "{err}"
    );
    let err = eval_err(&format!(
        "{pre} s.step(x, tensor([951.0, 1.0]), x, 1.0, rng(1))"
    ));
    assert!(err.contains("int tensor"), "{err}");
    let err = eval_err(&format!("{pre} s.candidates(x, 951, x, 0, 1.0, rng(1))"));
    assert!(err.contains("k must be"), "{err}");
    let err = eval_err(&format!("{pre} s.step(x, 951, x, -1.0, rng(1))"));
    assert!(err.contains("eta"), "{err}");
    let err = eval_err(&format!("{pre} s.log_prob(x, 951, x, x, 0)"));
    assert!(err.contains("eta > 0"), "{err}");
    let err = eval_err(&format!("{pre} s.log_prob(x, 951, x, [x, 1], 1.0)"));
    assert!(err.contains("prev_samples[1]"), "{err}");
    let err = eval_err(&format!("{pre} s.timestep_rank(tensor([950]))"));
    assert!(err.contains("950"), "{err}");
    let err = eval_err(&format!("{pre} s.set_timesteps(0)"));
    assert!(err.contains("1..=1000"), "{err}");
}

/// The three prediction types agree when each model predicts its own target exactly.
#[test]
fn prediction_types_agree_on_exact_predictions() {
    let v_dir = config_dir(&[("prediction_type", "v_prediction".into())]);
    let x_dir = config_dir(&[("prediction_type", "sample".into())]);
    let m = eval_map(&format!(
        r#"
        let se = load_scheduler("{SD}");
        let sv = load_scheduler("{}");
        let sx = load_scheduler("{}");
        for s in [se, sv, sx] {{ s.set_timesteps(20); }}
        let x0 = rng(1).randn([3, 4, 4, 4]);
        let n = rng(2).randn([3, 4, 4, 4]);
        let t = tensor([951, 501, 1]);
        let xt = se.add_noise(x0, n, t);
        let v = se.velocity(x0, n, t);
        let me = se.prev_sample_mean(n, t, xt, 1.0);
        #{{
            v_x0: max_abs_diff(sv.pred_original_sample(v, t, xt), x0),
            v_eps: max_abs_diff(sv.pred_epsilon(v, t, xt), n),
            x_eps: max_abs_diff(sx.pred_epsilon(x0, t, xt), n),
            v_mean: max_abs_diff(sv.prev_sample_mean(v, t, xt, 1.0), me),
            x_mean: max_abs_diff(sx.prev_sample_mean(x0, t, xt, 1.0), me),
            types: [sv.prediction_type, sx.prediction_type],
        }}
    "#,
        v_dir.path().display(),
        x_dir.path().display()
    ));
    for k in ["v_x0", "v_eps", "x_mean", "v_mean"] {
        assert!(f(&m, k) < 1e-4, "{k}: {}", f(&m, k));
    }
    // eps from an x0 prediction divides by sqrt(1 - a_t), tiny at t = 1
    assert!(f(&m, "x_eps") < 1e-2, "x_eps: {}", f(&m, "x_eps"));
    assert_eq!(m["types"].to_string(), r#"["v_prediction", "sample"]"#);
}

/// With `set_alpha_to_one` the last step (t = 1, prev clamped to 0) must use one rule
/// everywhere, LPO's: alpha_prev = alphas_cumprod[0], not diffusers' final_alpha_cumprod = 1
/// (which made variance, std_dev and so log_prob's sigma 0 there). variance / std_dev, the
/// step's mean and noise, and log_prob all agree with that one Gaussian.
#[test]
fn last_step_follows_lpo_rule_with_set_alpha_to_one() {
    let device = Device::Cpu;
    let cfg = DdimConfig {
        set_alpha_to_one: true,
        ..DdimConfig::default()
    };
    let ac = cfg.alphas_cumprod();
    let s = DdimScheduler::new(cfg, &device).unwrap();
    s.set_timesteps(20).unwrap();
    assert_eq!(s.timesteps_vec().unwrap().last(), Some(&1));
    assert_eq!(s.final_alpha_cumprod(), 1.0);
    let t = Tensor::new(&[1i64], &device).unwrap();
    assert_eq!(s.prev_timestep(&t).unwrap().to_vec1::<i64>().unwrap(), [0]);
    let (a_t, a_prev) = (ac[1] as f64, ac[0] as f64);
    let want_var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
    let scalar = |x: Tensor| x.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0];
    let var = scalar(s.variance(&t).unwrap());
    let std = scalar(s.std_dev(&t, 1.0).unwrap());
    // f32 tables: 1 - a_t/a_prev loses digits near t = 0
    assert!(want_var > 1e-5, "{want_var}");
    assert!(
        (var - want_var).abs() < 1e-3 * want_var,
        "variance {var} vs {want_var}"
    );
    assert!(
        (std - var.sqrt()).abs() < 1e-6 * std,
        "std_dev {std} vs variance {var}"
    );
    assert!((scalar(s.alpha_prev(&t).unwrap()) - a_prev).abs() < 1e-9);

    // the step's Gaussian in f64 from alpha_prev and the variance std_dev reports
    let mut rng = lpo::tensor::SeededRng::new(21);
    let shape = (1usize, 4usize, 2usize, 2usize);
    let randn = |rng: &mut lpo::tensor::SeededRng| {
        rng.randn(shape, &device)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (x, eps, prev) = (randn(&mut rng), randn(&mut rng), randn(&mut rng));
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let want_mean: Vec<f64> = flat(&x)
        .iter()
        .zip(flat(&eps))
        .map(|(x, e)| {
            let x0 = (x - (1.0 - a_t).sqrt() * e) / a_t.sqrt();
            a_prev.sqrt() * x0 + (1.0 - a_prev - var).sqrt() * e
        })
        .collect();
    let mean = flat(&s.prev_sample_mean(&eps, &t, &x, 1.0).unwrap());
    for (m, w) in mean.iter().zip(&want_mean) {
        assert!((m - w).abs() < 1e-6, "mean {m} vs {w}");
    }
    let want_lp = flat(&prev)
        .iter()
        .zip(&want_mean)
        .map(|(p, m)| {
            -(p - m).powi(2) / (2.0 * var)
                - 0.5 * var.ln()
                - 0.5 * (2.0 * std::f64::consts::PI).ln()
        })
        .sum::<f64>()
        / want_mean.len() as f64;
    let lp = scalar(s.log_prob(&eps, &t, &x, &prev, 1.0).unwrap());
    assert!(
        (lp - want_lp).abs() < 1e-6 * want_lp.abs(),
        "log_prob {lp} vs {want_lp}"
    );
    // step = mean + std_dev * the rng's noise
    let step = flat(
        &s.step(&eps, &t, &x, 1.0, &mut lpo::tensor::SeededRng::new(5))
            .unwrap(),
    );
    let noise = flat(&randn(&mut lpo::tensor::SeededRng::new(5)));
    for ((st, m), z) in step.iter().zip(&mean).zip(&noise) {
        assert!(
            (st - (m + std * z)).abs() < 1e-6,
            "step {st} vs {m} + {std} * {z}"
        );
    }
}
