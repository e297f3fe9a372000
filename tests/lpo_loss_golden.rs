//! The LPO step loss through the script API against tests/fixtures/golden/lpo_loss.safetensors,
//! its gradients (golden and finite differences), the extreme corner where the official f32
//! formula gives inf, and bad input.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use lpo::lpo::{lpo_loss, LpoLossConfig};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use rhai::{Dynamic, Map};

const GOLDEN: &str = "tests/fixtures/golden/lpo_loss.safetensors";

fn eval<T: Clone + Send + Sync + 'static>(script: &str) -> Result<T, String> {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
    .engine
    .eval::<T>(script)
    .map_err(|e| e.to_string())
}

fn f(m: &Map, k: &str) -> f64 {
    let v = &m[k];
    v.as_float()
        .or_else(|_| v.as_int().map(|i| i as f64))
        .unwrap_or_else(|_| panic!("{k} = {v}"))
}

fn golden() -> HashMap<String, Tensor> {
    lpo::tensor::io::load_safetensors(std::path::Path::new(GOLDEN), &Device::Cpu).unwrap()
}

#[test]
fn loss_and_statistics_match_golden() {
    let m: Map = eval(&format!(
        r#"
        let g = load_safetensors("{GOLDEN}");
        let o = lpo_loss(g.lp_w, g.lp_w_ref, g.lp_l, g.lp_l_ref, #{{beta: 500, eps: 0.1}});
        let d = lpo_loss(g.lp_w, g.lp_w_ref, g.lp_l, g.lp_l_ref);
        #{{
            keys: o.keys(),
            loss: o.loss.item(),
            loss_golden: g.loss.item(),
            loss_f64: g.loss_f64.item(),
            loss_shape: o.loss.shape,
            per_pair: max_abs_diff(o.loss_per_pair, g.loss_per_pair),
            ratio_w: max_abs_diff(o.ratio_w, g.ratio_w),
            ratio_l: max_abs_diff(o.ratio_l, g.ratio_l),
            acc: o.implicit_acc.item() - g.implicit_acc.item(),
            margin: o.margin.item() - g.margin.item(),
            defaults_same: (d.loss - o.loss).abs().item(),
            float_beta: (lpo_loss(g.lp_w, g.lp_w_ref, g.lp_l, g.lp_l_ref, #{{beta: 500.0, eps: 0.1}}).loss - o.loss).abs().item(),
        }}
    "#
    ))
    .unwrap();
    let keys: Vec<String> = m["keys"]
        .clone()
        .into_array()
        .unwrap()
        .into_iter()
        .map(|k| k.into_string().unwrap())
        .collect();
    for k in [
        "loss",
        "implicit_acc",
        "margin",
        "ratio_w",
        "ratio_l",
        "loss_per_pair",
    ] {
        assert!(keys.iter().any(|x| x == k), "missing {k} in {keys:?}");
    }
    assert!(
        m["loss_shape"].clone().into_array().unwrap().is_empty(),
        "loss must be 0-d"
    );
    // ours is closer to the f64 reference than torch's f32 (9.596491 vs f64 9.596487)
    assert!(
        (f(&m, "loss") - f(&m, "loss_f64")).abs() < 2e-5,
        "loss {} vs f64 {}",
        f(&m, "loss"),
        f(&m, "loss_f64")
    );
    assert!((f(&m, "loss") - f(&m, "loss_golden")).abs() < 2e-5);
    assert!(f(&m, "per_pair") < 1e-4, "per pair {}", f(&m, "per_pair"));
    assert!(f(&m, "ratio_w") < 1e-6 && f(&m, "ratio_l") < 1e-6);
    assert_eq!(f(&m, "acc"), 0.0);
    assert!(f(&m, "margin").abs() < 1e-6);
    assert_eq!(f(&m, "defaults_same"), 0.0);
    assert_eq!(f(&m, "float_beta"), 0.0);
}

#[test]
fn extreme_pairs_are_finite_and_equal_f64() {
    let m: Map = eval(&format!(
        r#"
        let g = load_safetensors("{GOLDEN}");
        let z = zeros([2]);
        let o = lpo_loss(g.extreme_d_w, z, g.extreme_d_l, z, #{{beta: 500, eps: 0.1}});
        #{{
            per_pair: o.loss_per_pair.to_array(),
            want: g.extreme_loss_per_pair_f64.to_array(),
            torch: g.extreme_loss_per_pair_torch_f32.to_array(),
            loss: o.loss.item(),
        }}
    "#
    ))
    .unwrap();
    let arr = |k: &str| -> Vec<f64> {
        m[k].clone()
            .into_array()
            .unwrap()
            .iter()
            .map(|v| v.as_float().unwrap())
            .collect()
    };
    let (got, want, torch) = (arr("per_pair"), arr("want"), arr("torch"));
    assert!(
        torch[0].is_infinite(),
        "the golden shows the official formula's inf"
    );
    for (g, w) in got.iter().zip(&want) {
        assert!(g.is_finite(), "{got:?}");
        assert!(
            (g - w).abs() <= 1e-6 * w.abs().max(1.0),
            "{got:?} vs f64 {want:?}"
        );
    }
    assert!(f(&m, "loss").is_finite());
}

#[test]
fn gradients_match_golden_and_finite_differences() {
    let g = golden();
    let w = Var::from_tensor(&g["lp_w"]).unwrap();
    let l = Var::from_tensor(&g["lp_l"]).unwrap();
    let out = lpo_loss(
        w.as_tensor(),
        &g["lp_w_ref"],
        l.as_tensor(),
        &g["lp_l_ref"],
        LpoLossConfig::default(),
    )
    .unwrap();
    let grads = out.loss.backward().unwrap();
    for (var, key) in [(&w, "grad_lp_w"), (&l, "grad_lp_l")] {
        let got = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = g[key].to_vec1::<f32>().unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 + 1e-4 * b.abs(),
                "{key}[{i}]: {a} vs {b} ({got:?} vs {want:?})"
            );
        }
        assert!(want.contains(&0.0), "{key}: golden has clamped entries");
    }
    // central differences in f64 at every entry
    let to64 = |k: &str| g[k].to_dtype(DType::F64).unwrap();
    let (w0, wr, l0, lr) = (
        to64("lp_w"),
        to64("lp_w_ref"),
        to64("lp_l"),
        to64("lp_l_ref"),
    );
    let wv = Var::from_tensor(&w0).unwrap();
    let lv = Var::from_tensor(&l0).unwrap();
    let loss = lpo_loss(
        wv.as_tensor(),
        &wr,
        lv.as_tensor(),
        &lr,
        LpoLossConfig::default(),
    )
    .unwrap()
    .loss;
    let grads = loss.backward().unwrap();
    let loss_at = |w: &Tensor, l: &Tensor| -> f64 {
        lpo_loss(w, &wr, l, &lr, LpoLossConfig::default())
            .unwrap()
            .loss
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-7;
    for (which, var, base) in [("w", &wv, &w0), ("l", &lv, &l0)] {
        let an = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let v = base.to_vec1::<f64>().unwrap();
        for i in 0..v.len() {
            let bump = |d: f64| {
                let mut x = v.clone();
                x[i] += d;
                Tensor::new(x.as_slice(), &Device::Cpu).unwrap()
            };
            let fd = if which == "w" {
                (loss_at(&bump(h), &l0) - loss_at(&bump(-h), &l0)) / (2.0 * h)
            } else {
                (loss_at(&w0, &bump(h)) - loss_at(&w0, &bump(-h))) / (2.0 * h)
            };
            assert!(
                (fd - an[i]).abs() <= 1e-4 + 1e-4 * an[i].abs(),
                "lp_{which}[{i}]: fd {fd} vs autograd {}",
                an[i]
            );
        }
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let pre = "let a = tensor([0.1, 0.2]); let b = tensor([0.0, 0.0]);";
    let err = eval::<Dynamic>(&format!(
        "{pre} lpo_loss(a, b, a, b, #{{beta: 500, epsilon: 0.1}})"
    ))
    .unwrap_err();
    assert!(
        err.contains("`epsilon`") && err.contains("accepted: beta, eps"),
        "{err}"
    );
    let err = eval::<Dynamic>(&format!(
        "{pre} lpo_loss(a, b, tensor([0.1, 0.2, 0.3]), b, #{{}})"
    ))
    .unwrap_err();
    assert!(err.contains("lp_l") && err.contains("[3]"), "{err}");
    let err =
        eval::<Dynamic>(&format!("{pre} lpo_loss(a, b, a, b, #{{beta: \"big\"}})")).unwrap_err();
    assert!(err.contains("beta"), "{err}");
    let err = eval::<Dynamic>(&format!("{pre} lpo_loss(a, b, a, b, #{{eps: 1.5}})")).unwrap_err();
    assert!(err.contains("eps"), "{err}");
    let err = eval::<Dynamic>(&format!("{pre} lpo_loss(a.reshape([1, 2]), b, a, b)")).unwrap_err();
    assert!(err.contains("1-D"), "{err}");
}
