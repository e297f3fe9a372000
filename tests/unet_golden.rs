//! The UNet reproduces the PyTorch/diffusers golden tensors (through the script API).

use candle_core::{DType, Device, Tensor};
use lpo::control::RunControl;
use lpo::models::loading::WeightMode;
use lpo::models::unet::UNet2DConditionModel;
use lpo::script::{build_engine, EngineOptions, Host};
use rhai::Map;

fn engine() -> lpo::script::ScriptEngine {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
}

fn allclose(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let g: Vec<f32> = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let mut worst = 0f32;
    for (a, b) in g.iter().zip(&w) {
        let excess = (a - b).abs() - (1e-4 + 1e-4 * b.abs());
        worst = worst.max(excess);
        assert!(a.is_finite(), "{name}: non-finite output");
    }
    assert!(worst <= 0.0, "{name}: exceeds atol/rtol 1e-4 by {worst}");
}

fn check_model(model: &str, golden: &str, n_down: usize) {
    let script = format!(
        r#"
        let g = load_safetensors("tests/fixtures/golden/{golden}");
        let unet = load_unet("tests/fixtures/{model}/unet");
        let out = unet.forward(g.latents, g.timesteps, g.encoder_hidden_states);
        let f = unet.features(g.latents, g.timesteps, g.encoder_hidden_states);
        #{{ noise_pred: out, mid: f.mid, down: f.down, golden: g }}
        "#
    );
    let se = engine();
    let result: Map = se
        .engine
        .eval(&script)
        .unwrap_or_else(|e| panic!("script failed: {e}"));
    let golden_map: Map = result["golden"].clone().cast();
    let want = |k: &str| golden_map[k].clone().cast::<Tensor>();
    allclose(
        "noise_pred",
        &result["noise_pred"].clone().cast(),
        &want("noise_pred"),
    );
    allclose("mid", &result["mid"].clone().cast(), &want("mid"));
    let down: rhai::Array = result["down"].clone().cast();
    assert_eq!(down.len(), n_down, "number of down residuals");
    for (i, d) in down.into_iter().enumerate() {
        let name = format!("down_res_{i:02}");
        allclose(&name, &d.cast(), &want(&name));
    }
}

#[test]
fn tiny_sd_matches_golden() {
    check_model("tiny-sd", "unet_tiny_sd.safetensors", 4);
}

#[test]
fn tiny_lrm_matches_golden() {
    check_model("tiny-lrm", "unet_tiny_lrm.safetensors", 12);
}

#[test]
fn time_embeddings_match_golden() {
    for (model, golden) in [
        ("tiny-sd", "unet_tiny_sd.safetensors"),
        ("tiny-lrm", "unet_tiny_lrm.safetensors"),
    ] {
        let g =
            candle_core::safetensors::load(format!("tests/fixtures/golden/{golden}"), &Device::Cpu)
                .unwrap();
        let unet = UNet2DConditionModel::load(
            std::path::Path::new(&format!("tests/fixtures/{model}/unet")),
            DType::F32,
            &Device::Cpu,
            WeightMode::Frozen,
        )
        .unwrap();
        let (t_emb, emb) = unet.time_embeddings(&g["timesteps"], 2, None).unwrap();
        allclose("t_emb", &t_emb, &g["t_emb"]);
        allclose("emb", &emb, &g["emb"]);
    }
}

#[test]
fn one_timestep_broadcasts_to_the_batch() {
    let se = engine();
    let diff: f64 = se
        .engine
        .eval(
            r#"
        let g = load_safetensors("tests/fixtures/golden/unet_tiny_sd.safetensors");
        let unet = load_unet("tests/fixtures/tiny-sd/unet");
        let t0 = g.timesteps.narrow(0, 0, 1);
        let tt = cat([t0, t0], 0);
        let a = unet.forward(g.latents, tensor(t0.item()), g.encoder_hidden_states);
        let b = unet.forward(g.latents, tt, g.encoder_hidden_states);
        max_abs_diff(a, b)
        "#,
        )
        .unwrap();
    assert_eq!(diff, 0.0);
}
