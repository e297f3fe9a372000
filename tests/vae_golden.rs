//! AutoencoderKL against the PyTorch reference (tests/fixtures/golden/vae.safetensors) through
//! the script API, the seeded sample, gradients (decode w.r.t. latents by central finite
//! differences in f64; every trainable tensor reached) and bad input.

mod common;
use common::{assert_close, engine, fixtures, get};

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use lpo::models::loading::WeightMode;
use lpo::models::vae::AutoencoderKL;
use lpo::tensor::SeededRng;

fn vae_dir() -> PathBuf {
    fixtures().join("tiny-sd/vae")
}

fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden/vae.safetensors"), &Device::Cpu).unwrap()
}

fn variant(edit: impl Fn(&mut serde_json::Value), truncate: bool) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vae_dir().join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(vae_dir().join("diffusion_pytorch_model.safetensors")).unwrap();
    let bytes = if truncate {
        &bytes[..bytes.len() * 2 / 3]
    } else {
        &bytes[..]
    };
    std::fs::write(
        tmp.path().join("diffusion_pytorch_model.safetensors"),
        bytes,
    )
    .unwrap();
    tmp
}

#[test]
fn golden_encode_decode_via_script() {
    let g = golden();
    let mut scope = rhai::Scope::new();
    scope.push("image", g["image"].clone());
    scope.push("mean_ref", g["posterior_mean"].clone());
    let dir = vae_dir().display().to_string();
    let out: rhai::Map = engine()
        .eval_with_scope(
            &mut scope,
            &format!(
                r#"let vae = load_vae({dir:?});
                   let d = vae.encode_dist(image);
                   #{{ mean: vae.encode(image), dmean: d.mean, logvar: d.logvar, std: d.std,
                      decoded: vae.decode(mean_ref), sf: vae.scaling_factor }}"#
            ),
        )
        .unwrap();
    assert_close(
        &get(&out, "mean"),
        &g["posterior_mean"],
        1e-4,
        1e-4,
        "posterior_mean",
    );
    assert_close(
        &get(&out, "dmean"),
        &g["posterior_mean"],
        1e-4,
        1e-4,
        "encode_dist mean",
    );
    assert_close(
        &get(&out, "logvar"),
        &g["posterior_logvar"],
        1e-4,
        1e-4,
        "posterior_logvar",
    );
    assert_close(
        &get(&out, "std"),
        &g["posterior_std"],
        1e-4,
        1e-4,
        "posterior_std",
    );
    assert_close(&get(&out, "decoded"), &g["decoded"], 1e-4, 1e-4, "decoded");
    assert!((out["sf"].as_float().unwrap() - 0.18215).abs() < 1e-12);
}

#[test]
fn seeded_sample_is_mean_plus_std_times_rng_draw() {
    let g = golden();
    let mut scope = rhai::Scope::new();
    scope.push("image", g["image"].clone());
    let dir = vae_dir().display().to_string();
    let out: rhai::Map = engine()
        .eval_with_scope(
            &mut scope,
            &format!(
                r#"let vae = load_vae({dir:?});
                   let a = vae.sample(image, rng(7));
                   let b = vae.sample(image, rng(7));
                   let c = vae.sample(image, rng(8));
                   let d = vae.encode_dist(image);
                   let manual = d.mean + d.std * rng(7).randn([1, 4, 8, 8]);
                   #{{ a: a, b: b, c: c, manual: manual }}"#
            ),
        )
        .unwrap();
    let (a, b, c) = (get(&out, "a"), get(&out, "b"), get(&out, "c"));
    assert_close(
        &a,
        &get(&out, "manual"),
        1e-6,
        0.0,
        "sample = mean + std * eps",
    );
    assert_close(&a, &b, 0.0, 0.0, "same seed");
    let diff = (&a - &c)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-6, "different seeds give different samples");
    // Rust API agrees.
    let vae =
        AutoencoderKL::load(&vae_dir(), DType::F32, &Device::Cpu, WeightMode::Frozen).unwrap();
    let s = vae
        .encode(&g["image"])
        .unwrap()
        .sample(&mut SeededRng::new(7))
        .unwrap();
    assert_close(&s, &a, 0.0, 0.0, "Rust sample");
}

fn probe_loss(vae: &AutoencoderKL, z: &Tensor, probe: &Tensor) -> Tensor {
    (vae.decode(z).unwrap() * probe).unwrap().sum_all().unwrap()
}

#[test]
fn decode_gradient_wrt_latents_matches_finite_differences() {
    let g = golden();
    let vae =
        AutoencoderKL::load(&vae_dir(), DType::F64, &Device::Cpu, WeightMode::Frozen).unwrap();
    assert!(vae.trainable_vars().is_empty());
    let z0 = g["posterior_mean"].to_dtype(DType::F64).unwrap();
    let probe = SeededRng::new(3)
        .randn((1, 3, 16, 16), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let z = Var::from_tensor(&z0).unwrap();
    let grads = probe_loss(&vae, z.as_tensor(), &probe).backward().unwrap();
    let gz = grads
        .get(z.as_tensor())
        .expect("gradient reaches the latents");
    let gv = gz.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert!(gv.iter().all(|x| x.is_finite()));
    assert!(gv.iter().filter(|&&x| x != 0.0).count() > gv.len() / 2);
    let base = z0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-5;
    for idx in [0usize, 37, 100, 141, 255] {
        let eval = |d: f64| {
            let mut v = base.clone();
            v[idx] += d;
            let zt = Tensor::from_vec(v, z0.shape(), &Device::Cpu).unwrap();
            probe_loss(&vae, &zt, &probe).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let tol = 1e-6 + 1e-5 * fd.abs().max(gv[idx].abs());
        assert!(
            (fd - gv[idx]).abs() <= tol,
            "dL/dz[{idx}]: analytic {} vs finite difference {fd}",
            gv[idx]
        );
    }
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let g = golden();
    let vae =
        AutoencoderKL::load(&vae_dir(), DType::F32, &Device::Cpu, WeightMode::Trainable).unwrap();
    let vars = vae.trainable_vars();
    let file = candle_core::safetensors::load(
        vae_dir().join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        vars.len(),
        file.len(),
        "every weight in the file is a parameter"
    );
    assert_eq!(
        vae.param_count(),
        file.values().map(|t| t.elem_count()).sum::<usize>()
    );
    let d = vae.encode(&g["image"]).unwrap();
    let z = d.sample(&mut SeededRng::new(1)).unwrap();
    let probe = SeededRng::new(2)
        .randn((1, 3, 16, 16), &Device::Cpu)
        .unwrap();
    let loss = ((vae.decode(&z).unwrap() * probe)
        .unwrap()
        .sum_all()
        .unwrap()
        + d.logvar.sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in &vars {
        let gr = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let v = gr.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(v.iter().any(|&x| x != 0.0), "{name}: zero gradient");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    // Truncated weights via the script API.
    let dir = variant(|_| {}, true);
    let err = engine()
        .eval::<rhai::Dynamic>(&format!("load_vae({:?})", dir.path().display().to_string()))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");

    // Unknown block type.
    let dir = variant(
        |c| c["down_block_types"][1] = "CrossAttnDownBlock2D".into(),
        false,
    );
    let msg = format!(
        "{:#}",
        AutoencoderKL::load(dir.path(), DType::F32, &Device::Cpu, WeightMode::Frozen)
            .err()
            .unwrap()
    );
    assert!(
        msg.contains("CrossAttnDownBlock2D") && msg.contains("config.json"),
        "{msg}"
    );

    // Config that does not fit the weights: the key and shape at fault are named.
    let dir = variant(
        |c| c["block_out_channels"] = serde_json::json!([8, 32]),
        false,
    );
    let msg = format!(
        "{:#}",
        AutoencoderKL::load(dir.path(), DType::F32, &Device::Cpu, WeightMode::Frozen)
            .err()
            .unwrap()
    );
    assert!(
        msg.contains("encoder.down_blocks.1.resnets.0.conv1.weight"),
        "{msg}"
    );

    // Wrong image shapes.
    let vae =
        AutoencoderKL::load(&vae_dir(), DType::F32, &Device::Cpu, WeightMode::Frozen).unwrap();
    let e = vae
        .encode(&Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[1, 4, 16, 16]"), "{e}");
    assert!(vae
        .encode(&Tensor::zeros((1, 3, 15, 16), DType::F32, &Device::Cpu).unwrap())
        .is_err());
    assert!(vae
        .decode(&Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap())
        .is_err());
    let mut scope = rhai::Scope::new();
    scope.push(
        "bad",
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = vae_dir().display().to_string();
    assert!(engine()
        .eval_with_scope::<rhai::Dynamic>(&mut scope, &format!("load_vae({dir:?}).decode(bad)"))
        .is_err());
}
