//! stdlib `compare.rhai` / `thresholds.rhai` through the engine against
//! tests/fixtures/golden/compare.safetensors (all four modes), thresholds derived from the
//! scheduler (not LPO's rounded tables), the embedded stdlib fallback, and bad input.

use std::path::PathBuf;

use candle_core::Device;
use lpo::diffusion::DdimConfig;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use rhai::{Dynamic, Map};

fn eval_with<T: Clone + Send + Sync + 'static>(
    opts: &EngineOptions,
    script: &str,
) -> Result<T, String> {
    build_engine(Host::new(RunControl::new(), Device::Cpu, 0), opts)
        .engine
        .eval::<T>(script)
        .map_err(|e| e.to_string())
}

fn eval<T: Clone + Send + Sync + 'static>(script: &str) -> Result<T, String> {
    eval_with(&EngineOptions::default(), script)
}

fn f(m: &Map, k: &str) -> f64 {
    let v = &m[k];
    v.as_float()
        .or_else(|_| v.as_int().map(|i| i as f64))
        .unwrap_or_else(|_| panic!("{k} = {v}"))
}

fn compare_script(mode: &str) -> String {
    format!(
        r#"
        import "compare" as cmp;
        let g = load_safetensors("tests/fixtures/golden/compare.safetensors");
        let s = load_scheduler("tests/fixtures/tiny-sd");
        s.set_timesteps(20);
        let out = cmp::preference_compare(g.scores, g.timesteps,
            #{{mode: "{mode}", min: 0.35, max: 0.5, threshold: 0.3, scheduler: s}});
        #{{
            indices: max_abs_diff(out.indices, g["{mode}_indices"]),
            indices_dtype: out.indices.dtype,
            indices_shape: out.indices.shape,
            valid: max_abs_diff(out.valid, g["{mode}_valid"]),
            valid_shape: out.valid.shape,
            threshold: max_abs_diff(out.threshold, g["{mode}_threshold"]),
            probs: max_abs_diff(out.probs, g["{mode}_probs"]),
        }}
    "#
    )
}

fn check_mode(opts: &EngineOptions, mode: &str) {
    let m: Map = eval_with(opts, &compare_script(mode)).unwrap_or_else(|e| panic!("{mode}: {e}"));
    assert_eq!(f(&m, "indices"), 0.0, "{mode} indices");
    assert_eq!(m["indices_dtype"].clone().into_string().unwrap(), "i64");
    assert_eq!(m["indices_shape"].to_string(), "[2, 5]");
    assert_eq!(f(&m, "valid"), 0.0, "{mode} valid");
    assert_eq!(m["valid_shape"].to_string(), "[5]");
    assert!(
        f(&m, "threshold") < 1e-3,
        "{mode} threshold {}",
        f(&m, "threshold")
    );
    assert!(f(&m, "probs") < 1e-5, "{mode} probs {}", f(&m, "probs"));
}

#[test]
fn all_modes_match_golden() {
    for mode in ["static", "sigma", "variance", "linear"] {
        check_mode(&EngineOptions::default(), mode);
    }
}

#[test]
fn embedded_stdlib_is_used_without_a_stdlib_folder() {
    let opts = EngineOptions {
        stdlib_dir: PathBuf::from("tests/fixtures/no-stdlib-here"),
        ..EngineOptions::default()
    };
    check_mode(&opts, "sigma");
}

/// Thresholds over all 20 timesteps follow from the schedule: sigma reproduces LPO's 4-decimal
/// table, variance uses std^2 of the schedule (LPO's table squared the rounded sigmas), and
/// other step counts work.
#[test]
fn thresholds_come_from_the_scheduler() {
    let m: Map = eval(
        r#"
        import "thresholds" as th;
        let g = load_safetensors("tests/fixtures/golden/ddim.safetensors");
        let s = load_scheduler("tests/fixtures/tiny-sd");
        let ts = s.set_timesteps(20);
        let o = #{min: 0.35, max: 0.5, scheduler: s};
        let asc = g.lpo_sigma_table;
        let lpo = (asc - asc[0]) / (asc[19] - asc[0]) * 0.15 + 0.35;
        let idx = s.timestep_rank(ts);
        let sigma = th::threshold("sigma", ts, o);
        let sd = s.std_dev(ts, 1.0);
        let lo = s.std_dev(1, 1.0);
        let hi = s.std_dev(951, 1.0);
        let direct = (sd - lo) / (hi - lo) * 0.15 + 0.35;
        let v = sd * sd;
        let direct_var = (v - lo * lo) / (hi * hi - lo * lo) * 0.15 + 0.35;
        let s10 = load_scheduler("tests/fixtures/tiny-sd");
        let t10 = s10.set_timesteps(10);
        let sig10 = th::threshold("sigma", t10, #{min: 0.35, max: 0.5, scheduler: s10});
        let lin10 = th::threshold("linear", t10, #{min: 0.35, max: 0.5, scheduler: s10});
        #{
            vs_lpo_table: max_abs_diff(sigma, lpo.index_select(0, idx)),
            vs_direct: max_abs_diff(sigma, direct),
            variance: max_abs_diff(th::threshold("variance", ts, o), direct_var),
            sig_first: sigma[0].item(),
            sig_last: sigma[19].item(),
            static_int: th::threshold("static", ts, #{threshold: 1}).to_array(),
            sig10_first: sig10[0].item(),
            sig10_last: sig10[9].item(),
            lin10_mid: max_abs_diff(lin10, (t10 - 1) / 900 * 0.15 + 0.35),
        }
    "#,
    )
    .unwrap();
    assert!(f(&m, "vs_lpo_table") < 1e-3, "{}", f(&m, "vs_lpo_table"));
    assert!(f(&m, "vs_direct") < 1e-6, "{}", f(&m, "vs_direct"));
    assert!(f(&m, "variance") < 1e-6, "{}", f(&m, "variance"));
    assert!((f(&m, "sig_first") - 0.5).abs() < 1e-6 && (f(&m, "sig_last") - 0.35).abs() < 1e-6);
    assert!((f(&m, "sig10_first") - 0.5).abs() < 1e-6 && (f(&m, "sig10_last") - 0.35).abs() < 1e-6);
    assert!(f(&m, "lin10_mid") < 1e-6);
    let st: Vec<f64> = m["static_int"]
        .clone()
        .into_array()
        .unwrap()
        .iter()
        .map(|v| v.as_float().unwrap())
        .collect();
    assert_eq!(st, vec![1.0; 20]);
}

/// Off-grid timesteps (and the grid's own) get the sigma / variance / linear thresholds of the
/// same formula: sigma(t) = sqrt((1 - a[p]) / (1 - a[t]) * (1 - a[t] / a[p])) with
/// p = clamp(t - 1000 / 20, 0, 999), mapped so sigma(1) -> min and sigma(951) -> max; computed
/// here in f64 from the schedule's alphas_cumprod.
#[test]
fn off_grid_timesteps_get_thresholds_from_the_same_formula() {
    let ts: [i64; 8] = [950, 0, 500, 999, 37, 951, 1, 26];
    let m: Map = eval(&format!(
        r#"
        import "compare" as cmp;
        import "thresholds" as th;
        let s = load_scheduler("tests/fixtures/tiny-sd");
        s.set_timesteps(20);
        let t = tensor({ts:?});
        let o = #{{min: 0.35, max: 0.5, scheduler: s}};
        let scores = rng(1).randn([3, {n}]);
        let out = cmp::preference_compare(scores, t, #{{mode: "sigma", min: 0.35, max: 0.5, scheduler: s}});
        #{{
            sigma: th::threshold("sigma", t, o).to_array(),
            variance: th::threshold("variance", t, o).to_array(),
            linear: th::threshold("linear", t, o).to_array(),
            compare: out.threshold.to_array(),
        }}
    "#,
        n = ts.len()
    ))
    .unwrap();
    let ac: Vec<f64> = DdimConfig::from_dir(std::path::Path::new("tests/fixtures/tiny-sd"))
        .unwrap()
        .alphas_cumprod()
        .into_iter()
        .map(f64::from)
        .collect();
    let variance = |t: i64| {
        let p = (t - 50).clamp(0, 999) as usize;
        let t = t as usize;
        (1.0 - ac[p]) / (1.0 - ac[t]) * (1.0 - ac[t] / ac[p])
    };
    let sigma = |t: i64| variance(t).sqrt();
    let map = |v: f64, first: f64, last: f64| (v - first) / (last - first) * 0.15 + 0.35;
    let got = |k: &str| -> Vec<f64> {
        m[k].clone()
            .into_array()
            .unwrap()
            .iter()
            .map(|v| v.as_float().unwrap())
            .collect()
    };
    for (i, &t) in ts.iter().enumerate() {
        let want = [
            ("sigma", map(sigma(t), sigma(1), sigma(951))),
            ("compare", map(sigma(t), sigma(1), sigma(951))),
            ("variance", map(variance(t), variance(1), variance(951))),
            ("linear", map(t as f64, 1.0, 951.0)),
        ];
        for (k, w) in want {
            let g = got(k)[i];
            assert!((g - w).abs() < 1e-4, "{k} at t = {t}: {g} vs formula {w}");
        }
    }
    // the grid's ends give min and max; t = 0 (no noise to remove) lies below min
    let sig = got("sigma");
    assert!((sig[5] - 0.5).abs() < 1e-6 && (sig[6] - 0.35).abs() < 1e-6);
    assert!(sig[1] < 0.35);
}

#[test]
fn bad_input_gives_clear_errors() {
    let pre = r#"import "compare" as cmp; import "thresholds" as th;
        let s = load_scheduler("tests/fixtures/tiny-sd"); s.set_timesteps(20);
        let scores = tensor([[1.0, 2.0], [0.5, 0.1], [0.2, 0.3]]); let t = tensor([951, 1]);"#;
    let err = eval::<Dynamic>(&format!(
        r#"{pre} th::threshold("cosine", t, #{{scheduler: s}})"#
    ))
    .unwrap_err();
    assert!(
        err.contains("unknown mode") && err.contains("cosine"),
        "{err}"
    );
    let err = eval::<Dynamic>(&format!(
        r#"{pre} th::threshold("sigma", t, #{{min: 0.3}})"#
    ))
    .unwrap_err();
    assert!(err.contains("scheduler"), "{err}");
    let err = eval::<Dynamic>(&format!(
        r#"{pre} th::threshold("sigma", t, #{{scheduler: s, maximum: 1}})"#
    ))
    .unwrap_err();
    assert!(err.contains("maximum"), "{err}");
    for (mode, t) in [("sigma", 1000), ("variance", -1), ("linear", 1000)] {
        let err = eval::<Dynamic>(&format!(
            r#"{pre} th::threshold("{mode}", tensor([951, {t}]), #{{scheduler: s}})"#
        ))
        .unwrap_err();
        assert!(
            err.contains(&format!("timestep {t} is outside [0, 1000)")) && err.contains(mode),
            "{err}"
        );
    }
    let err = eval::<Dynamic>(&format!(
        r#"{pre} cmp::preference_compare(scores, tensor([951, 1, 1]), #{{}})"#
    ))
    .unwrap_err();
    assert!(err.contains("shape"), "{err}");
    let err = eval::<Dynamic>(&format!(
        r#"{pre} cmp::preference_compare(scores.narrow(0, 0, 1), t, #{{}})"#
    ))
    .unwrap_err();
    assert!(err.contains("at least 2"), "{err}");
    let m: Map = eval(&format!(
        r#"{pre} cmp::preference_compare(scores, t, #{{mode: "static", threshold: 0.1}})"#
    ))
    .unwrap();
    assert_eq!(
        m["indices"]
            .clone()
            .cast::<candle_core::Tensor>()
            .to_vec2::<i64>()
            .unwrap(),
        vec![vec![0, 0], vec![2, 1]]
    );
}
