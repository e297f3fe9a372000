//! stdlib `compare.rhai` / `thresholds.rhai` through the engine against
//! tests/fixtures/golden/compare.safetensors (all four modes), thresholds derived from the
//! scheduler (not LPO's rounded tables), the embedded stdlib fallback, and bad input.

use std::path::PathBuf;

use candle_core::Device;
use lpo::control::RunControl;
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
    let err = eval::<Dynamic>(&format!(
        r#"{pre} th::threshold("sigma", tensor([950]), #{{scheduler: s}})"#
    ))
    .unwrap_err();
    assert!(err.contains("950"), "{err}");
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
