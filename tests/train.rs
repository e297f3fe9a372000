//! Training core: AdamW against hand-computed math, accumulation, clipping, schedules, exact
//! resume, the finite-difference utility, non-finite gradients, and the script bindings.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use lpo::optim::{AdamW, AdamWConfig, GradClip, Params, Schedule};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use lpo::tensor::grad::{
    clip_by_global_norm, finite_difference_check, global_norm, vars_without_grad,
};

fn cpu() -> Device {
    Device::Cpu
}

fn params(items: &[(&str, Tensor)]) -> Params {
    Params::from_tensors(
        items
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect(),
    )
    .unwrap()
}

fn values(p: &Params, name: &str) -> Vec<f32> {
    p.get(name)
        .unwrap()
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn engine() -> rhai::Engine {
    build_engine(
        Host::new(RunControl::new(), cpu(), 0),
        &EngineOptions::default(),
    )
    .engine
}

/// L = sum(0.5 * a * (w - c)^2), dL/dw = a * (w - c).
fn quadratic(w: &Tensor, a: &Tensor, c: &Tensor) -> Tensor {
    ((w - c).unwrap().sqr().unwrap() * a)
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn adamw_matches_hand_computed_reference_for_three_steps() {
    let w0 = [1.0f64, -2.0, 0.5];
    let a = [1.0f64, 3.0, 0.2];
    let c = [0.0f64, 1.0, 2.0];
    let (lr, b1, b2, eps, wd) = (0.1, 0.9, 0.99, 1e-8, 0.01);
    let p = params(&[("w", Tensor::new(&[1.0f32, -2.0, 0.5], &cpu()).unwrap())]);
    let cfg = AdamWConfig {
        lr,
        beta1: b1,
        beta2: b2,
        eps,
        weight_decay: wd,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(p.clone(), cfg).unwrap();
    let at = Tensor::new(&[1.0f32, 3.0, 0.2], &cpu()).unwrap();
    let ct = Tensor::new(&[0.0f32, 1.0, 2.0], &cpu()).unwrap();

    // The reference, written out: decoupled decay, then Adam with bias correction.
    let mut w = w0;
    let mut m = [0.0f64; 3];
    let mut v = [0.0f64; 3];
    for t in 1..=3 {
        let loss = quadratic(p.get("w").unwrap().as_tensor(), &at, &ct);
        opt.backward(&loss, 1.0).unwrap();
        let info = opt.step().unwrap();
        let mut gsq = 0.0;
        for i in 0..3 {
            let g = a[i] * (w[i] - c[i]);
            gsq += g * g;
            w[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let m_hat = m[i] / (1.0 - b1.powi(t));
            let v_hat = v[i] / (1.0 - b2.powi(t));
            w[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
        assert_eq!(info.step, t as u64);
        assert_eq!(info.lr, lr);
        assert!(
            (info.grad_norm - gsq.sqrt()).abs() < 1e-5 * gsq.sqrt().max(1.0),
            "{info:?} vs {}",
            gsq.sqrt()
        );
        let got = values(&p, "w");
        for i in 0..3 {
            assert!(
                (got[i] as f64 - w[i]).abs() < 2e-6,
                "step {t} w[{i}]: {} vs {}",
                got[i],
                w[i]
            );
        }
    }
    // The first step moves each weight by ~lr against its gradient's sign (Adam's hallmark),
    // so the reference is not trivially satisfied.
    assert!((w[0] - w0[0]).abs() > 0.25);
}

#[test]
fn two_half_batches_equal_one_full_batch() {
    let x = Tensor::new(
        &[[1.0f32, 2.0], [0.5, -1.0], [-2.0, 0.3], [1.5, 1.5]],
        &cpu(),
    )
    .unwrap();
    let y = Tensor::new(&[[1.0f32], [0.0], [-1.0], [2.0]], &cpu()).unwrap();
    let init = Tensor::new(&[[0.3f32], [-0.2]], &cpu()).unwrap();
    let mse = |w: &Tensor, x: &Tensor, y: &Tensor| {
        (x.matmul(w).unwrap() - y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let cfg = AdamWConfig {
        lr: 0.05,
        ..AdamWConfig::default()
    };

    let full = params(&[("w", init.clone())]);
    let mut opt_full = AdamW::new(full.clone(), cfg.clone()).unwrap();
    let half = params(&[("w", init.clone())]);
    let mut opt_half = AdamW::new(half.clone(), cfg).unwrap();
    for _ in 0..3 {
        opt_full
            .backward(&mse(full.get("w").unwrap().as_tensor(), &x, &y), 1.0)
            .unwrap();
        for r in [0, 2] {
            let w = half.get("w").unwrap().as_tensor();
            let l = mse(w, &x.narrow(0, r, 2).unwrap(), &y.narrow(0, r, 2).unwrap());
            opt_half.backward(&l, 0.5).unwrap();
        }
        assert_eq!(opt_half.pending_micro_batches(), 2);
        let gf = opt_full.grads()[0]
            .clone()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gh = opt_half.grads()[0]
            .clone()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in gf.iter().zip(&gh) {
            assert!((a - b).abs() < 1e-6, "grads {gf:?} vs {gh:?}");
        }
        let (a, b) = (opt_full.step().unwrap(), opt_half.step().unwrap());
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-6);
        assert_eq!(opt_half.pending_micro_batches(), 0);
    }
    for (a, b) in values(&full, "w").iter().zip(values(&half, "w")) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    assert_ne!(
        values(&full, "w"),
        init.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn clipping_scales_to_the_max_norm() {
    let mut grads = vec![
        Tensor::new(&[3.0f32, 4.0], &cpu()).unwrap(),
        Tensor::new(&[12.0f32], &cpu()).unwrap(),
    ];
    let norm = clip_by_global_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 13.0).abs() < 1e-9);
    let after = global_norm(grads.iter()).unwrap();
    assert!((after - 1.0).abs() < 1e-5, "{after}");
    let g0 = grads[0].to_vec1::<f32>().unwrap();
    assert!(
        (g0[0] - 3.0 / 13.0).abs() < 1e-6 && (g0[1] - 4.0 / 13.0).abs() < 1e-6,
        "{g0:?}"
    );
    // Below the max: untouched.
    let mut small = vec![Tensor::new(&[0.3f32, 0.4], &cpu()).unwrap()];
    assert!((clip_by_global_norm(&mut small, 1.0).unwrap() - 0.5).abs() < 1e-6);
    assert_eq!(small[0].to_vec1::<f32>().unwrap(), vec![0.3, 0.4]);
    // Off: norm reported, nothing changed.
    let mut g = vec![Tensor::new(&[30.0f32, 40.0], &cpu()).unwrap()];
    assert!((GradClip::Off.apply(&mut g).unwrap() - 50.0).abs() < 1e-4);
    assert_eq!(g[0].to_vec1::<f32>().unwrap(), vec![30.0, 40.0]);
    assert!(GradClip::from_option(Some(-1.0)).is_err());

    // Inside AdamW: the first moment after one step is (1 - beta1) * the clipped gradient.
    let p = params(&[("w", Tensor::zeros(2, DType::F32, &cpu()).unwrap())]);
    let cfg = AdamWConfig {
        lr: 0.1,
        clip: GradClip::GlobalNorm(1.0),
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(p.clone(), cfg).unwrap();
    let g = Tensor::new(&[3.0f32, 4.0], &cpu()).unwrap();
    let loss = (p.get("w").unwrap().as_tensor() * &g)
        .unwrap()
        .sum_all()
        .unwrap();
    let info = opt.backward_and_step(&loss);
    assert!((info.grad_norm - 5.0).abs() < 1e-5, "{info:?}");
    let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    let m = state["exp_avg.w"].to_vec1::<f32>().unwrap();
    let coef = 1.0 / (5.0 + 1e-6);
    assert!(
        (m[0] as f64 - 0.1 * 3.0 * coef).abs() < 1e-6
            && (m[1] as f64 - 0.1 * 4.0 * coef).abs() < 1e-6,
        "{m:?}"
    );
}

trait StepBoth {
    fn backward_and_step(&mut self, loss: &Tensor) -> lpo::optim::StepInfo;
}

impl StepBoth for AdamW {
    fn backward_and_step(&mut self, loss: &Tensor) -> lpo::optim::StepInfo {
        self.backward(loss, 1.0).unwrap();
        self.step().unwrap()
    }
}

#[test]
fn warmup_and_cosine_schedule_values() {
    let constant = AdamWConfig {
        lr: 1.0,
        warmup_steps: 4,
        ..AdamWConfig::default()
    };
    let f: Vec<f64> = (0..7).map(|k| constant.lr_factor(k)).collect();
    assert_eq!(f, vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    let cosine = AdamWConfig {
        warmup_steps: 2,
        schedule: Schedule::Cosine { total_steps: 10 },
        ..AdamWConfig::default()
    };
    assert_eq!(cosine.lr_factor(1), 0.5);
    assert!((cosine.lr_factor(2) - 1.0).abs() < 1e-12);
    assert!((cosine.lr_factor(6) - 0.5).abs() < 1e-12);
    assert!(cosine.lr_factor(10).abs() < 1e-12 && cosine.lr_factor(20).abs() < 1e-12);
    let linear = AdamWConfig {
        warmup_steps: 0,
        schedule: Schedule::Linear { total_steps: 4 },
        ..AdamWConfig::default()
    };
    assert_eq!(
        (0..5).map(|k| linear.lr_factor(k)).collect::<Vec<_>>(),
        vec![1.0, 0.75, 0.5, 0.25, 0.0]
    );
    assert!(AdamWConfig {
        schedule: Schedule::Cosine { total_steps: 2 },
        warmup_steps: 2,
        ..AdamWConfig::default()
    }
    .validate()
    .is_err());

    // The optimizer reports the lr each step used; warmup's first step has lr 0 and moves nothing
    // but the decay-free moments.
    let p = params(&[("w", Tensor::new(&[1.0f32, 2.0], &cpu()).unwrap())]);
    let cfg = AdamWConfig {
        lr: 0.2,
        warmup_steps: 2,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(p.clone(), cfg).unwrap();
    let mut lrs = Vec::new();
    for k in 0..4 {
        let loss = p
            .get("w")
            .unwrap()
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        lrs.push(opt.backward_and_step(&loss).lr);
        if k == 0 {
            assert_eq!(values(&p, "w"), vec![1.0, 2.0]);
        }
    }
    assert_eq!(lrs, vec![0.0, 0.1, 0.2, 0.2]);
    assert_eq!(opt.current_lr(), 0.2);
}

fn regression_batch(step: usize) -> (Tensor, Tensor) {
    let mut rng = lpo::tensor::SeededRng::new(100 + step as u64);
    let x = rng.randn((8, 3), &cpu()).unwrap();
    let y = rng.randn((8, 2), &cpu()).unwrap();
    (x, y)
}

fn train_steps(p: &Params, opt: &mut AdamW, from: usize, n: usize) {
    for s in from..from + n {
        let (x, y) = regression_batch(s);
        let w = p.get("w").unwrap().as_tensor();
        let b = p.get("b").unwrap().as_tensor();
        let pred = x.matmul(w).unwrap().broadcast_add(b).unwrap();
        let loss = (pred - y).unwrap().sqr().unwrap().mean_all().unwrap();
        // Two micro-batches: the same loss split in halves.
        opt.backward(&loss.affine(0.5, 0.0).unwrap(), 1.0).unwrap();
        let l2 = p
            .get("w")
            .unwrap()
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        opt.backward(&l2, 0.01).unwrap();
        opt.step().unwrap();
    }
}

#[test]
fn state_round_trip_continues_bitwise_identically() {
    let mut rng = lpo::tensor::SeededRng::new(1);
    let init = vec![
        ("w".to_string(), rng.randn((3, 2), &cpu()).unwrap()),
        ("b".to_string(), rng.randn(2, &cpu()).unwrap()),
    ];
    let cfg = AdamWConfig {
        lr: 0.03,
        weight_decay: 0.1,
        clip: GradClip::GlobalNorm(0.5),
        warmup_steps: 3,
        schedule: Schedule::Cosine { total_steps: 12 },
        ..AdamWConfig::default()
    };
    let p = Params::from_tensors(init.clone()).unwrap();
    let mut opt = AdamW::new(p.clone(), cfg.clone()).unwrap();
    train_steps(&p, &mut opt, 0, 4);

    // Checkpoint through a safetensors file (0-d step tensors included).
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("opt.safetensors");
    let params_path = dir.path().join("params.safetensors");
    lpo::tensor::io::save_safetensors(&opt.state().unwrap().into_iter().collect(), &state_path)
        .unwrap();
    lpo::tensor::io::save_safetensors(&p.to_map().unwrap().into_iter().collect(), &params_path)
        .unwrap();

    train_steps(&p, &mut opt, 4, 5);
    let uninterrupted: Vec<Vec<f32>> = ["w", "b"].iter().map(|n| values(&p, n)).collect();

    // A fresh process: other initial values, then restore.
    let q = Params::from_tensors(vec![
        (
            "w".to_string(),
            Tensor::zeros((3, 2), DType::F32, &cpu()).unwrap(),
        ),
        (
            "b".to_string(),
            Tensor::zeros(2, DType::F32, &cpu()).unwrap(),
        ),
    ])
    .unwrap();
    let mut resumed = AdamW::new(q.clone(), AdamWConfig { lr: 99.0, ..cfg }).unwrap();
    q.load_map(&lpo::tensor::io::load_safetensors(&params_path, &cpu()).unwrap())
        .unwrap();
    resumed
        .load_state(&lpo::tensor::io::load_safetensors(&state_path, &cpu()).unwrap())
        .unwrap();
    assert_eq!(resumed.step_count(), 4);
    assert_eq!(resumed.lr(), 0.03);
    train_steps(&q, &mut resumed, 4, 5);
    let continued: Vec<Vec<f32>> = ["w", "b"].iter().map(|n| values(&q, n)).collect();
    for (a, b) in uninterrupted.iter().zip(&continued) {
        let (a, b): (Vec<u32>, Vec<u32>) = (
            a.iter().map(|x| x.to_bits()).collect(),
            b.iter().map(|x| x.to_bits()).collect(),
        );
        assert_eq!(a, b, "resumed run diverged");
    }
}

#[test]
fn load_state_and_load_map_name_the_bad_key() {
    let p = params(&[("w", Tensor::zeros(2, DType::F32, &cpu()).unwrap())]);
    let mut opt = AdamW::new(p.clone(), AdamWConfig::default()).unwrap();
    let mut state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    state.remove("exp_avg_sq.w");
    let err = format!("{:#}", opt.load_state(&state).unwrap_err());
    assert!(err.contains("exp_avg_sq.w"), "{err}");
    state.insert(
        "exp_avg_sq.w".into(),
        Tensor::zeros(3, DType::F32, &cpu()).unwrap(),
    );
    let err = format!("{:#}", opt.load_state(&state).unwrap_err());
    assert!(err.contains("exp_avg_sq.w") && err.contains("[3]"), "{err}");

    let mut m = HashMap::new();
    m.insert(
        "w".to_string(),
        Tensor::zeros((2, 1), DType::F32, &cpu()).unwrap(),
    );
    let err = format!("{:#}", p.load_map(&m).unwrap_err());
    assert!(err.contains("`w`") && err.contains("[2, 1]"), "{err}");
    let err = format!("{:#}", p.load_map(&HashMap::new()).unwrap_err());
    assert!(err.contains("missing key `w`"), "{err}");
}

#[test]
fn half_precision_params_keep_f32_master_weights() {
    let p = params(&[(
        "h",
        Tensor::new(&[1.0f32, -1.0], &cpu())
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap(),
    )]);
    let mut opt = AdamW::new(
        p.clone(),
        AdamWConfig {
            lr: 1e-4,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    for _ in 0..3 {
        let loss = p
            .get("h")
            .unwrap()
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap();
        opt.backward_and_step(&loss);
    }
    let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    let master = state["master.h"].to_vec1::<f32>().unwrap();
    assert_eq!(state["master.h"].dtype(), DType::F32);
    assert_eq!(state["exp_avg.h"].dtype(), DType::F32);
    // Three steps of ~lr each: visible in f32, below f16's resolution at 1.0 (~1e-3).
    assert!((master[0] - (1.0 - 3e-4)).abs() < 1e-6, "{master:?}");
    assert!((master[1] - (-1.0 - 3e-4)).abs() < 1e-6, "{master:?}");
    // The f16 parameter is the master rounded; at -1 (f16 spacing ~1e-3) the updates vanish in
    // f16 but the master keeps them, so training does not stall.
    let h = p
        .get("h")
        .unwrap()
        .as_tensor()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let rounded = state["master.h"]
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(h, rounded);
    assert_eq!(h[1], -1.0);
}

#[test]
fn parameters_without_gradient_are_named_and_skipped() {
    let p = params(&[
        ("used", Tensor::new(&[1.0f32], &cpu()).unwrap()),
        ("unused", Tensor::new(&[1.0f32], &cpu()).unwrap()),
    ]);
    let mut opt = AdamW::new(
        p.clone(),
        AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let loss = p
        .get("used")
        .unwrap()
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    opt.backward(&loss, 1.0).unwrap();
    assert_eq!(opt.missing_grads(), vec!["unused".to_string()]);
    opt.step().unwrap();
    assert_eq!(
        values(&p, "unused"),
        vec![1.0],
        "no gradient: no decay, no update"
    );
    assert_ne!(values(&p, "used"), vec![1.0]);
    // A loss that reaches no parameter at all is an error, not a silent no-op.
    let detached = p
        .get("used")
        .unwrap()
        .as_tensor()
        .detach()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let err = format!("{:#}", opt.backward(&detached, 1.0).unwrap_err());
    assert!(err.contains("no gradient path"), "{err}");
    assert!(opt.step().is_err(), "step without backward");
    let vec_loss = p.get("used").unwrap().as_tensor().sqr().unwrap();
    assert!(format!(
        "{:#}",
        opt.backward(&vec_loss.repeat(2).unwrap(), 1.0).unwrap_err()
    )
    .contains("scalar"));
}

#[test]
fn non_finite_gradient_is_rejected_with_params_unchanged() {
    let p = params(&[("w", Tensor::new(&[0.0f32, 4.0], &cpu()).unwrap())]);
    let mut opt = AdamW::new(
        p.clone(),
        AdamWConfig {
            lr: 0.1,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    // d sqrt(w)/dw = 1 / (2 sqrt(w)) is inf at 0.
    let loss = p
        .get("w")
        .unwrap()
        .as_tensor()
        .sqrt()
        .unwrap()
        .sum_all()
        .unwrap();
    let err = format!("{:#}", opt.backward(&loss, 1.0).unwrap_err());
    assert!(err.contains("non-finite") && err.contains('w'), "{err}");
    assert_eq!(values(&p, "w"), vec![0.0, 4.0]);
    assert_eq!(opt.step_count(), 0);
    assert!(opt.step().is_err(), "nothing was accumulated");
    let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
    assert_eq!(state["exp_avg.w"].to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
    // A finite loss afterwards trains normally.
    let ok = p
        .get("w")
        .unwrap()
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    opt.backward_and_step(&ok);
    assert_eq!(opt.step_count(), 1);
    assert_ne!(values(&p, "w"), vec![0.0, 4.0]);
}

#[test]
fn finite_difference_utility_on_a_known_function() {
    let x0 = [0.3f64, -1.2, 2.0, 0.7];
    let var = Var::from_tensor(&Tensor::new(&x0, &cpu()).unwrap()).unwrap();
    // f(x) = sum(sin(x) * x^2), f'(x) = cos(x) x^2 + 2 x sin(x).
    let f = || -> anyhow::Result<Tensor> {
        let x = var.as_tensor();
        Ok((x.sin()? * x.sqr()?)?.sum_all()?)
    };
    let pairs = finite_difference_check(f, &var, &[0, 1, 2, 3], 1e-5).unwrap();
    for (i, (analytic, numeric)) in pairs.iter().enumerate() {
        let x = x0[i];
        let exact = x.cos() * x * x + 2.0 * x * x.sin();
        assert!(
            (analytic - exact).abs() < 1e-10,
            "{i}: analytic {analytic} vs exact {exact}"
        );
        assert!(
            (numeric - exact).abs() < 1e-7,
            "{i}: numeric {numeric} vs exact {exact}"
        );
    }
    assert_eq!(
        var.as_tensor().to_vec1::<f64>().unwrap(),
        x0.to_vec(),
        "variable restored"
    );

    // A cut gradient (detach) is what the checker exists to catch: analytic 0, numeric not.
    let cut = || -> anyhow::Result<Tensor> { Ok(var.as_tensor().detach().sqr()?.sum_all()?) };
    let pairs = finite_difference_check(cut, &var, &[1], 1e-5).unwrap();
    assert_eq!(pairs[0].0, 0.0);
    assert!((pairs[0].1 - 2.0 * x0[1]).abs() < 1e-6);
    assert!(
        finite_difference_check(|| Ok(var.as_tensor().clone()), &var, &[0], 1e-3).is_err(),
        "non-scalar f"
    );
    assert!(
        finite_difference_check(f, &var, &[9], 1e-3).is_err(),
        "index out of range"
    );
}

#[test]
fn script_toy_regression_converges() {
    let script = r#"
        let r = rng(7);
        let x = r.randn([64, 3]);
        let w_true = tensor([[1.5], [-2.0], [0.5]]);
        let y = x.matmul(w_true) + 0.25;
        let p = params_from(#{w: zeros([3, 1]), b: [0.0]});
        if p.names() != ["b", "w"] { throw `names ${p.names()}`; }
        if p.numel != 4 { throw `numel ${p.numel}`; }
        let opt = adamw(p, #{lr: 0.05, weight_decay: 0, betas: [0.9, 0.99], max_grad_norm: 10});
        let first = ();
        let last = ();
        for i in 0..400 {
            let pred = x.matmul(p.get("w")) + p.get("b");
            let loss = (pred - y).square().mean();
            let info = opt.backward_step(loss);
            if i == 0 { first = loss.item(); if info.step != 1 || info.lr != 0.05 { throw `info ${info}`; } }
            last = loss.item();
        }
        if opt.step_count != 400 { throw `step_count ${opt.step_count}`; }
        let w = p.to_map().w;
        [first, last, max_abs_diff(w, w_true), p.get("b").item()]
    "#;
    let out: rhai::Array = engine().eval(script).unwrap();
    let v: Vec<f64> = out.iter().map(|d| d.as_float().unwrap()).collect();
    assert!(v[0] > 1.0, "initial loss {}", v[0]);
    assert!(v[1] < 1e-4, "final loss {}", v[1]);
    assert!(v[2] < 1e-2 && (v[3] - 0.25).abs() < 1e-2, "{v:?}");
}

#[test]
fn script_accumulation_state_and_lr_bindings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors").display().to_string();
    let script = format!(
        r#"
        fn loss_of(p, s) {{ (p.get("w") * s - 1.0).square().sum() }}
        let p = params_from(#{{w: [1.0, 2.0]}});
        let opt = adamw(p, #{{lr: 0.1, warmup_steps: 2}});
        if opt.current_lr != 0.0 {{ throw "warmup starts at 0"; }}
        opt.backward(loss_of(p, 1.0), 0.5);
        opt.backward(loss_of(p, 2.0), 0.5);
        let a = opt.step();
        opt.backward_step(loss_of(p, 1.0));
        save_safetensors(opt.state(), "{path}");
        let saved = p.to_map();
        let cont = opt.backward_step(loss_of(p, 3.0));
        let after = p.to_map().w;
        // Resume from the file into a fresh optimizer and redo the last step.
        let q = params_from(#{{w: [0.0, 0.0]}});
        q.load_map(saved);
        let o2 = adamw(q, #{{lr: 0.5, warmup_steps: 2}});
        o2.load_state(load_safetensors("{path}"));
        if o2.lr != 0.1 || o2.step_count != 2 {{ throw `restored ${{o2.lr}} ${{o2.step_count}}`; }}
        o2.backward_step(loss_of(q, 3.0));
        opt.lr = 1;
        opt.zero_grad();
        [a.lr, cont.lr, cont.step, max_abs_diff(after, q.to_map().w), opt.lr]
    "#
    );
    let out: rhai::Array = engine().eval(&script).unwrap();
    assert_eq!(out[0].as_float().unwrap(), 0.0);
    assert_eq!(out[1].as_float().unwrap(), 0.1);
    assert_eq!(out[2].as_int().unwrap(), 3);
    assert_eq!(
        out[3].as_float().unwrap(),
        0.0,
        "bitwise resume through the script API"
    );
    assert_eq!(out[4].as_float().unwrap(), 1.0);
}

#[test]
fn script_errors_name_the_problem() {
    let e = engine();
    let cases = [
        (
            r#"adamw(params_from(#{w: [1.0]}), #{beta: 1, bta: 2})"#,
            vec!["`beta`", "`bta`", "accepted:", "betas", "weight_decay"],
        ),
        (
            r#"adamw(params_from(#{w: [1.0]}), #{schedule: "cosine"})"#,
            vec!["total_steps"],
        ),
        (
            r#"adamw(params_from(#{w: [1.0]}), #{betas: [0.9]})"#,
            vec!["betas"],
        ),
        (
            r#"adamw(params_from(#{w: [1.0]}), #{lr: "fast"})"#,
            vec!["`lr`", "number"],
        ),
        (
            r#"params_from(#{w: [1.0]}).get("v")"#,
            vec!["`v`", "have: w"],
        ),
        (
            r#"params_from(#{w: [[1.0], [2.0, 3.0]]})"#,
            vec!["`w`", "ragged"],
        ),
        (
            r#"let p = params_from(#{w: [1.0]}); p.load_map(#{w: zeros([2])})"#,
            vec!["`w`", "[2]"],
        ),
        (
            r#"let p = params_from(#{w: [1.0]}); p.load_map(#{w: 3})"#,
            vec!["`w`", "not a tensor"],
        ),
        (
            r#"let p = params_from(#{w: [1.0]}); let o = adamw(p); o.backward(p.get("w").log() * 0.0 / 0.0)"#,
            vec!["non-finite"],
        ),
        (
            r#"let p = params_from(#{w: [1.0]}); let o = adamw(p); o.step()"#,
            vec!["no gradients accumulated"],
        ),
        (
            r#"let p = params_from(#{w: [1.0]}); let o = adamw(p); o.load_state(#{step: 1})"#,
            vec!["missing key `lr`"],
        ),
    ];
    for (script, needles) in cases {
        let err = e
            .eval::<rhai::Dynamic>(script)
            .expect_err(script)
            .to_string();
        for n in needles {
            assert!(err.contains(n), "{script}: `{n}` not in: {err}");
        }
    }
    // The error carries the line:col of the call.
    let err = e
        .eval::<rhai::Dynamic>("let p = params_from(#{w: [1.0]});\nlet o = adamw(p);\n   o.step();")
        .unwrap_err();
    assert_eq!(err.position().line(), Some(3), "{err}");
}

#[test]
fn grad_coverage_check_and_params_merge_select() {
    let a = params(&[("enc.w", Tensor::new(&[1.0f32, 2.0], &cpu()).unwrap())]);
    let b = params(&[
        ("proj.w", Tensor::new(&[3.0f32], &cpu()).unwrap()),
        ("proj.b", Tensor::new(&[0.0f32], &cpu()).unwrap()),
    ]);
    let all = Params::merge(&[a.clone(), b.clone()]).unwrap();
    assert_eq!(all.names(), vec!["enc.w", "proj.w", "proj.b"]);
    assert_eq!(all.numel(), 4);
    assert!(
        Params::merge(&[a.clone(), a.clone()]).is_err(),
        "duplicate names"
    );
    assert_eq!(all.select("proj.").names(), vec!["proj.w", "proj.b"]);
    // The same variables: a change through one is seen through the other.
    all.get("enc.w")
        .unwrap()
        .set(&Tensor::new(&[5.0f32, 6.0], &cpu()).unwrap())
        .unwrap();
    assert_eq!(values(&a, "enc.w"), vec![5.0, 6.0]);

    let enc = all.get("enc.w").unwrap().as_tensor();
    let pw = all.get("proj.w").unwrap().as_tensor();
    let pb = all.get("proj.b").unwrap().as_tensor();
    // proj.b cancels itself: an all-zero gradient; enc.w is cut by detach. (candle's `x * 0.0`
    // drops the gradient entirely rather than giving zeros, so it is not used here.)
    let pb_sum = pb.sum_all().unwrap();
    let loss = ((enc.detach().sum_all().unwrap() * pw.sum_all().unwrap()).unwrap()
        + (&pb_sum - &pb_sum).unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(
        vars_without_grad(all.vars(), &grads, false).unwrap(),
        vec!["enc.w"]
    );
    assert_eq!(
        vars_without_grad(all.vars(), &grads, true).unwrap(),
        vec!["enc.w", "proj.b"]
    );

    let out: rhai::Array = engine()
        .eval(
            r#"
            let a = params_from(#{w: [1.0]});
            let b = params_from(#{v: [2.0], u: [3.0]});
            let m = merge_params([a, b]);
            [m.names(), m.select("u").names(), m.len]
        "#,
        )
        .unwrap();
    assert_eq!(format!("{out:?}"), r#"[["w", "u", "v"], ["u"], 3]"#);
}

#[test]
fn params_from_a_varmap_train_a_candle_nn_layer() {
    use candle_nn::Module;
    let mut vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &cpu());
    let layer = candle_nn::linear(2, 1, vb.pp("fc")).unwrap();
    // candle's initializer draws from an unseeded RNG: fix the start so the loss starts high.
    vm.set_one("fc.weight", Tensor::new(&[[0.5f32, 0.5]], &cpu()).unwrap())
        .unwrap();
    vm.set_one("fc.bias", Tensor::new(&[0.0f32], &cpu()).unwrap())
        .unwrap();
    let p = Params::from_varmap(&vm).unwrap();
    assert_eq!(p.names(), vec!["fc.bias", "fc.weight"]);
    let mut opt = AdamW::new(
        p,
        AdamWConfig {
            lr: 0.05,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let x = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &cpu()).unwrap();
    let y = Tensor::new(&[[1.0f32], [-1.0], [0.0]], &cpu()).unwrap();
    let mse = |l: &candle_nn::Linear| {
        (l.forward(&x).unwrap() - &y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let first = mse(&layer).to_scalar::<f32>().unwrap();
    for _ in 0..300 {
        let loss = mse(&layer);
        opt.backward_and_step(&loss);
    }
    let last = mse(&layer).to_scalar::<f32>().unwrap();
    assert!(last < 1e-3 && first > 0.1, "{first} -> {last}");
}
