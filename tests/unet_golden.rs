//! The UNet reproduces the PyTorch/diffusers golden tensors (through the script API).

use candle_core::{DType, Device, Tensor};
use lpo::models::loading::WeightMode;
use lpo::models::unet::UNet2DConditionModel;
use lpo::runtime::control::RunControl;
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

fn eval_err(script: &str) -> String {
    let se = engine();
    match se.engine.eval::<rhai::Dynamic>(script) {
        Ok(v) => panic!("expected an error, got {v}"),
        Err(e) => e.to_string(),
    }
}

fn shapes(v: &rhai::Dynamic) -> Vec<Vec<usize>> {
    v.clone()
        .cast::<rhai::Array>()
        .into_iter()
        .map(|t| t.cast::<Tensor>().dims().to_vec())
        .collect()
}

#[test]
fn sd21_shaped_config_builds_and_runs() {
    let se = engine();
    let r: Map = se
        .engine
        .eval(
            r#"
        let unet = random_unet("tests/fixtures/configs/sd21_tiny.json", #{seed: 1});
        let r = rng(0);
        let x = r.randn([2, 4, 10, 10]);
        let e = r.randn([2, 7, 48]);
        let t = tensor([10, 900]);
        let f = unet.features(x, t, e);
        #{ out: unet.forward(x, t, e), mid: f.mid, down: f.down, cfg: unet.config, params: unet.param_count }
        "#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let out: Tensor = r["out"].clone().cast();
    assert_eq!(out.dims(), &[2, 4, 10, 10]);
    let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    assert_eq!(r["mid"].clone().cast::<Tensor>().dims(), &[2, 32, 3, 3]);
    let expect = vec![
        vec![2, 16, 10, 10],
        vec![2, 16, 10, 10],
        vec![2, 16, 5, 5],
        vec![2, 32, 5, 5],
        vec![2, 32, 3, 3],
        vec![2, 32, 3, 3],
    ];
    assert_eq!(shapes(&r["down"]), expect);
    let cfg: Map = r["cfg"].clone().cast();
    assert!(cfg["use_linear_projection"].as_bool().unwrap());
    assert!(r["params"].as_int().unwrap() > 10_000);
}

#[test]
fn sdxl_shaped_config_needs_added_cond_and_runs() {
    let prelude = r#"
        let unet = random_unet("tests/fixtures/configs/sdxl_tiny.json", #{seed: 2});
        let r = rng(0);
        let x = r.randn([2, 4, 8, 8]);
        let e = r.randn([2, 5, 40]);
        let t = tensor([999]);
        let added = #{ text_embeds: r.randn([2, 16]), time_ids: tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]) };
    "#;
    let se = engine();
    let r: Map = se
        .engine
        .eval(&format!(
            "{prelude} let f = unet.features(x, t, e, added); #{{ out: unet.forward(x, t, e, added), mid: f.mid, down: f.down, cfg: unet.config }}"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r["out"].clone().cast::<Tensor>().dims(), &[2, 4, 8, 8]);
    assert_eq!(r["mid"].clone().cast::<Tensor>().dims(), &[2, 64, 2, 2]);
    let expect = vec![
        vec![2, 16, 8, 8],
        vec![2, 16, 8, 8],
        vec![2, 16, 8, 8],
        vec![2, 16, 4, 4],
        vec![2, 32, 4, 4],
        vec![2, 32, 4, 4],
        vec![2, 32, 2, 2],
        vec![2, 64, 2, 2],
        vec![2, 64, 2, 2],
    ];
    assert_eq!(shapes(&r["down"]), expect);
    let err = eval_err(&format!("{prelude} unet.forward(x, t, e)"));
    assert!(
        err.contains("text_embeds") && err.contains("time_ids"),
        "{err}"
    );
    let err = eval_err(&format!(
        "{prelude} unet.features(x, t, e, #{{ text_embeds: added.text_embeds }})"
    ));
    assert!(err.contains("time_ids"), "{err}");
}

#[test]
fn unknown_block_type_is_a_clear_error() {
    let err = eval_err(r#"random_unet("tests/fixtures/configs/bad_block_type.json", #{})"#);
    assert!(
        err.contains("SimpleCrossAttnDownBlock2D") && err.contains("bad_block_type.json"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        "tests/fixtures/configs/bad_block_type.json",
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = eval_err(&format!(r#"load_unet("{}")"#, dir.path().display()));
    assert!(
        err.contains("SimpleCrossAttnDownBlock2D") && err.contains("config.json"),
        "{err}"
    );
}

fn tampered_dir(
    edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        "tests/fixtures/tiny-sd/unet/config.json",
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut w = candle_core::safetensors::load(
        "tests/fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors",
        &Device::Cpu,
    )
    .unwrap();
    edit(&mut w);
    candle_core::safetensors::save(&w, dir.path().join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    dir
}

#[test]
fn bad_weights_are_clear_errors() {
    let key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let dir = tampered_dir(|w| {
        w.insert(
            key.into(),
            Tensor::zeros((32, 31), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = eval_err(&format!(r#"load_unet("{}")"#, dir.path().display()));
    assert!(
        err.contains(key)
            && err.contains("[32, 31]")
            && err.contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );

    let missing = "mid_block.resnets.1.conv2.bias";
    let dir = tampered_dir(|w| {
        w.remove(missing);
    });
    let err = eval_err(&format!(
        r#"load_unet("{}", #{{trainable: true}})"#,
        dir.path().display()
    ));
    assert!(err.contains(missing) && err.contains("missing"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        "tests/fixtures/tiny-sd/unet/config.json",
        dir.path().join("config.json"),
    )
    .unwrap();
    let bytes =
        std::fs::read("tests/fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors").unwrap();
    std::fs::write(
        dir.path().join("diffusion_pytorch_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = eval_err(&format!(r#"load_unet("{}")"#, dir.path().display()));
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    let err =
        eval_err(r#"load_unet("tests/fixtures/tiny-sd/unet", #{dtype: "f32", trainabel: true})"#);
    assert!(err.contains("trainabel"), "{err}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let prelude = r#"
        let unet = load_unet("tests/fixtures/tiny-sd/unet");
        let r = rng(0);
    "#;
    let err = eval_err(&format!(
        "{prelude} unet.forward(r.randn([2, 4, 8, 8]), tensor([1, 2, 3]), r.randn([2, 77, 32]))"
    ));
    assert!(err.contains("timesteps") && err.contains("[3]"), "{err}");
    let err = eval_err(&format!(
        "{prelude} unet.forward(r.randn([2, 3, 8, 8]), tensor([1, 2]), r.randn([2, 77, 32]))"
    ));
    assert!(err.contains("channels"), "{err}");
    let err = eval_err(&format!(
        "{prelude} unet.forward(r.randn([2, 4, 8, 8]), tensor([1, 2]), r.randn([2, 77, 16]))"
    ));
    assert!(err.contains("cross_attention_dim"), "{err}");
}
