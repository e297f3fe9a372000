//! LoRA on every layer users train (LoCon style): a PEFT LoRA made by diffusers with conv,
//! feed-forward, proj and time-embedding targets reproduces diffusers' UNet output; adapters on
//! every kind of layer export (PEFT and kohya, with 4-D conv shapes) and re-import to the same
//! output; linear-projection models adapt proj_in/proj_out as linear layers.

mod common;
use common::{assert_close, engine, get, max_diff};

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lpo::models::loading::WeightMode;
use lpo::models::lora::LoraConfig;
use lpo::models::lora_file::Accept;
use lpo::models::unet::{UNet2DConditionModel, UNetConfig};
use lpo::tensor::SeededRng;
use rhai::Map;

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// tests/fixtures/interop/locon_*.safetensors come from tests/interop/make_locon_fixtures.py.
#[test]
fn diffusers_locon_lora_reproduces_diffusers_output() {
    let script = r#"
        let g = load_safetensors("tests/fixtures/interop/locon_expected.safetensors");
        let u = load_unet("tests/fixtures/tiny-sd/unet");
        let n = u.load_lora("tests/fixtures/interop/locon_peft.safetensors");
        let out = u.forward(g.sample, g.timesteps, g.encoder_hidden_states);
        u.lora_enabled = false;
        let off = u.forward(g.sample, g.timesteps, g.encoder_hidden_states);
        #{n: n, out: out, off: off, want: g.out, base: g.base}
    "#;
    let out: Map = engine().eval(script).unwrap();
    // every linear and conv of the tiny UNet: 33 convs, 50 linears
    assert_eq!(out["n"].as_int().unwrap(), 83);
    assert!(max_diff(&get(&out, "want"), &get(&out, "base")) > 0.5);
    assert_close(&get(&out, "out"), &get(&out, "want"), 1e-4, 1e-4, "LoRA on");
    assert_close(
        &get(&out, "off"),
        &get(&out, "base"),
        1e-4,
        1e-4,
        "LoRA off",
    );
}

#[test]
fn adapters_on_every_layer_export_and_reimport() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let script = format!(
        r#"
        let model = "tests/fixtures/tiny-sd";
        let u = load_unet(model);
        let policy = lpo_policy(u, #{{lora: #{{rank: 2, alpha: 3.0, seed: 1,
            targets: ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "proj_in", "proj_out",
                      "ff.net.0.proj", "ff.net.2", "to_q", "to_k", "to_v", "to_out.0",
                      "linear_1", "linear_2", "conv_in", "conv_out", "downsamplers.0.conv",
                      "upsamplers.0.conv"]}}}});
        let m = policy.params.to_map();
        let r = rng(5);
        for k in m.keys() {{ m[k] = r.randn(m[k].shape) * 0.05; }}
        policy.params.load_map(m);
        let x = r.randn([2, 4, 8, 8]);
        let t = tensor([10, 700]);
        let ehs = r.randn([2, 8, 32]);
        let y_lora = u.forward(x, t, ehs);
        u.export_lora("{d}/peft.safetensors", #{{format: "peft"}});
        u.export_lora("{d}/kohya.safetensors", #{{format: "kohya"}});
        u.save_lora("{d}/ours.safetensors");
        u.save_merged("{d}/merged");
        let u2 = load_unet(model);
        let n_k = u2.import_kohya("{d}/kohya.safetensors");
        let u3 = load_unet(model);
        let n_p = u3.load_lora("{d}/peft.safetensors");
        let u4 = load_unet(model);
        let n_o = u4.load_lora("{d}/ours.safetensors");
        #{{n_layers: m.len() / 2, n_k: n_k, n_p: n_p, n_o: n_o, y_lora: y_lora,
          y_kohya: u2.forward(x, t, ehs), y_peft: u3.forward(x, t, ehs),
          y_ours: u4.forward(x, t, ehs), y_merged: load_unet("{d}/merged").forward(x, t, ehs),
          base: load_unet(model).forward(x, t, ehs)}}
    "#
    );
    let out: Map = engine().eval(&script).unwrap();
    let n_layers = out["n_layers"].as_int().unwrap();
    assert_eq!(n_layers, 83);
    for k in ["n_k", "n_p", "n_o"] {
        assert_eq!(out[k].as_int().unwrap(), n_layers, "{k}");
    }
    let y_lora = get(&out, "y_lora");
    assert!(max_diff(&y_lora, &get(&out, "base")) > 1e-2);
    for k in ["y_kohya", "y_peft", "y_ours", "y_merged"] {
        assert!(max_diff(&y_lora, &get(&out, k)) < 1e-5, "{k}");
    }

    // conv adapters as PEFT and kohya LoCon store them: down [r, in, kh, kw], up [out, r, 1, 1]
    let peft = load(&dir.path().join("peft.safetensors"));
    let kohya = load(&dir.path().join("kohya.safetensors"));
    for (module, a_dims, b_dims) in [
        (
            "down_blocks.1.resnets.0.conv1",
            vec![2, 32, 3, 3],
            vec![64, 2, 1, 1],
        ),
        (
            "down_blocks.1.resnets.0.conv_shortcut",
            vec![2, 32, 1, 1],
            vec![64, 2, 1, 1],
        ),
        (
            "down_blocks.0.downsamplers.0.conv",
            vec![2, 32, 3, 3],
            vec![32, 2, 1, 1],
        ),
        (
            "down_blocks.0.attentions.0.proj_in",
            vec![2, 32, 1, 1],
            vec![32, 2, 1, 1],
        ),
        ("time_embedding.linear_1", vec![2, 32], vec![128, 2]),
        (
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
            vec![2, 32],
            vec![256, 2],
        ),
    ] {
        let a = &peft[&format!("unet.{module}.lora_A.weight")];
        let b = &peft[&format!("unet.{module}.lora_B.weight")];
        assert_eq!((a.dims(), b.dims()), (&a_dims[..], &b_dims[..]), "{module}");
        let k = format!("lora_unet_{}", module.replace('.', "_"));
        let down = &kohya[&format!("{k}.lora_down.weight")];
        let up = &kohya[&format!("{k}.lora_up.weight")];
        assert_eq!((down.dims(), up.dims()), (&a_dims[..], &b_dims[..]), "{k}");
        // PEFT folds alpha / rank = 1.5 into B
        assert!(max_diff(b, &(up * 1.5).unwrap()) < 1e-6, "{module}");
    }
}

#[test]
fn linear_projection_models_adapt_proj_as_linear() {
    let path = "tests/fixtures/configs/sd21_tiny.json";
    let config = UNetConfig::from_json(&std::fs::read_to_string(path).unwrap(), path).unwrap();
    assert!(config.use_linear_projection);
    let unet =
        UNet2DConditionModel::random(config, 2, DType::F32, &Device::Cpu, WeightMode::Frozen)
            .unwrap();
    let mut rng = SeededRng::new(4);
    let x = rng.randn((1, 4, 16, 16), &Device::Cpu).unwrap();
    let t = Tensor::new(&[500i64], &Device::Cpu).unwrap();
    let ehs = rng.randn((1, 4, 48), &Device::Cpu).unwrap();
    let base = unet.forward(&x, &t, &ehs, None).unwrap();
    let n = unet
        .add_lora(&LoraConfig {
            rank: 3,
            alpha: 3.0,
            targets: vec!["proj_in".into(), "proj_out".into()],
            seed: 0,
        })
        .unwrap();
    // down 2 + mid 1 + up 2x2 transformers
    assert_eq!(n, 2 * 7);
    let vars = unet.trainable_vars();
    for (name, var) in &vars {
        let rank = if name.ends_with("lora_A.weight") {
            0
        } else {
            1
        };
        assert_eq!(var.rank(), 2, "{name}: linear adapter");
        assert_eq!(var.dims()[rank], 3, "{name}");
        if rank == 1 {
            var.set(&(rng.randn(var.dims(), &Device::Cpu).unwrap() * 0.1).unwrap())
                .unwrap();
        }
    }
    let y = unet.forward(&x, &t, &ehs, None).unwrap();
    assert!(max_diff(&y, &base) > 1e-3);
    let grads = (y * &rng.randn(base.dims(), &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).expect("gradient");
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient");
    }
    unet.set_lora_enabled(false);
    assert_eq!(
        max_diff(&unet.forward(&x, &t, &ehs, None).unwrap(), &base),
        0.0
    );
}

#[test]
fn mismatched_conv_adapters_and_unknown_targets_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    let module = "unet.down_blocks.0.resnets.0.conv1";
    let tensors: HashMap<String, Tensor> = [
        (
            format!("{module}.lora_A.weight"),
            Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            format!("{module}.lora_B.weight"),
            Tensor::zeros((32, 2), DType::F32, &Device::Cpu).unwrap(),
        ),
    ]
    .into();
    candle_core::safetensors::save(&tensors, &p).unwrap();
    let unet = UNet2DConditionModel::load(
        Path::new("tests/fixtures/tiny-sd/unet"),
        DType::F32,
        &Device::Cpu,
        WeightMode::Frozen,
    )
    .unwrap();
    let err = format!("{:#}", unet.load_lora(&p, Accept::Any, None).unwrap_err());
    assert!(
        err.contains("bad.safetensors")
            && err.contains("down_blocks.0.resnets.0.conv1")
            && err.contains("[r, 32, 3, 3] / [32, r, 1, 1]"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        unet.add_lora(&LoraConfig {
            rank: 2,
            alpha: 2.0,
            targets: vec!["all-convs".into()],
            seed: 0,
        })
        .unwrap_err()
    );
    assert!(err.contains("unknown target `all-convs`"), "{err}");
}
