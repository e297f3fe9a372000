//! LoRA exports through the script API: PEFT/diffusers and kohya/webui key names, shapes and
//! alpha; a kohya file re-imported and a PEFT file re-loaded reproduce the adapter output; a
//! merged diffusers UNet folder loads with `load_unet` and equals the LoRA-on output.

mod common;
use common::max_diff;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use rhai::Map;

fn engine() -> rhai::Engine {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
    .engine
}

fn load(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

#[test]
fn peft_kohya_and_merged_exports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let script = format!(
        r#"
        let model = "tests/fixtures/tiny-sd";
        let u = load_unet(model);
        let policy = lpo_policy(u, #{{lora: #{{rank: 2, alpha: 3.0, seed: 1}}}});
        let m = policy.params.to_map();
        let r = rng(5);
        for k in m.keys() {{ m[k] = r.randn(m[k].shape) * 0.2; }}
        policy.params.load_map(m);
        let s = u.config.sample_size;
        let x = r.randn([2, 4, s, s]);
        let t = tensor([10, 700]);
        let ehs = r.randn([2, 8, 32]);
        let y_base = u.forward(x, t, ehs);
        u.lora_enabled = false;
        let y_off = u.forward(x, t, ehs);
        u.lora_enabled = true;
        let y_lora = u.forward(x, t, ehs);
        u.export_lora("{d}/peft.safetensors", #{{format: "peft"}});
        u.export_lora("{d}/kohya.safetensors", #{{format: "kohya"}});
        u.save_merged("{d}/merged");
        let u2 = load_unet(model);
        let n_k = u2.import_kohya("{d}/kohya.safetensors");
        let y_kohya = u2.forward(x, t, ehs);
        let u3 = load_unet(model);
        let n_p = u3.load_lora("{d}/peft.safetensors");
        let y_peft = u3.forward(x, t, ehs);
        let u4 = load_unet("{d}/merged");
        let y_merged = u4.forward(x, t, ehs);
        let bad = "";
        try {{ u.export_lora("{d}/x.safetensors", #{{format: "ckpt"}}); }} catch (e) {{ bad = `${{e}}`; }}
        #{{y_off: y_off, y_lora: y_lora, y_kohya: y_kohya, y_peft: y_peft, y_merged: y_merged,
          n_k: n_k, n_p: n_p, n_layers: m.len() / 2, bad: bad, base: load_unet(model).forward(x, t, ehs)}}
    "#
    );
    let out: Map = engine().eval(&script).unwrap();
    let get = |k: &str| out[k].clone().cast::<Tensor>();
    let n_layers = out["n_layers"].as_int().unwrap();
    assert!(n_layers >= 4);
    assert_eq!(out["n_k"].as_int().unwrap(), n_layers);
    assert_eq!(out["n_p"].as_int().unwrap(), n_layers);
    assert!(out["bad"]
        .clone()
        .into_string()
        .unwrap()
        .contains("unknown format"));

    let y_lora = get("y_lora");
    // the adapters really change the output, and off is the base model
    assert!(max_diff(&y_lora, &get("base")) > 1e-3);
    assert_eq!(max_diff(&get("y_off"), &get("base")), 0.0);
    assert!(max_diff(&y_lora, &get("y_kohya")) < 1e-5, "kohya re-import");
    assert!(max_diff(&y_lora, &get("y_peft")) < 1e-5, "peft re-load");
    assert!(max_diff(&y_lora, &get("y_merged")) < 1e-5, "merged folder");

    // key names, shapes and alpha
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let kohya = load(&dir.path().join("kohya.safetensors"));
    let peft = load(&dir.path().join("peft.safetensors"));
    assert_eq!(kohya.len() as i64, 3 * n_layers);
    assert_eq!(peft.len() as i64, 2 * n_layers);
    let kq = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let down = &kohya[&format!("{kq}.lora_down.weight")];
    let up = &kohya[&format!("{kq}.lora_up.weight")];
    let alpha = &kohya[&format!("{kq}.alpha")];
    assert_eq!(down.dims(), &[2, 32]);
    assert_eq!(up.dims(), &[32, 2]);
    assert_eq!(alpha.dims(), &[] as &[usize]);
    assert_eq!(alpha.to_scalar::<f32>().unwrap(), 3.0);
    assert!(kohya.contains_key(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha"
    ));
    for k in kohya.keys() {
        assert!(
            k.starts_with("lora_unet_") && !k.trim_start_matches("lora_unet_").contains("_0.0")
        );
    }
    let a = &peft[&format!("unet.{q}.lora_A.weight")];
    let b = &peft[&format!("unet.{q}.lora_B.weight")];
    assert_eq!(a.dims(), &[2, 32]);
    assert_eq!(b.dims(), &[32, 2]);
    assert_eq!(max_diff(a, down), 0.0);
    // alpha / rank = 1.5 folded into B, so diffusers' default alpha == rank gives the same scale
    assert!(max_diff(b, &(up * 1.5).unwrap()) < 1e-6);
    for k in peft.keys() {
        assert!(
            k.starts_with("unet.")
                && (k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
        );
    }

    // merged folder: diffusers layout, base weights kept where no adapter
    let merged = dir.path().join("merged");
    assert!(merged.join("config.json").is_file());
    let mw = load(&merged.join("diffusion_pytorch_model.safetensors"));
    let base = load(std::path::Path::new(
        "tests/fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors",
    ));
    assert_eq!(mw.len(), base.len());
    assert_eq!(
        max_diff(&mw["conv_in.weight"], &base["conv_in.weight"]),
        0.0
    );
    assert!(max_diff(&mw[&format!("{q}.weight")], &base[&format!("{q}.weight")]) > 1e-4);
}

#[test]
fn exports_without_adapters_or_base_fail_clearly() {
    let script = r#"
        let u = load_unet("tests/fixtures/tiny-sd");
        let e1 = ""; let e2 = "";
        try { u.export_lora("/nonexistent/x.safetensors", #{format: "kohya"}); } catch (e) { e1 = `${e}`; }
        let rnd = random_unet("tests/fixtures/tiny-sd/unet", #{seed: 1});
        try { rnd.save_merged("/tmp/never"); } catch (e) { e2 = `${e}`; }
        [e1, e2]
    "#;
    let out: rhai::Array = engine().eval(script).unwrap();
    assert!(
        out[0].to_string().contains("no LoRA adapters"),
        "{}",
        out[0]
    );
    assert!(
        out[1].to_string().contains("not loaded from a folder"),
        "{}",
        out[1]
    );
}

#[test]
fn merged_folder_of_a_fully_fine_tuned_unet_holds_the_trained_weights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let script = format!(
        r#"
        let u = load_unet("tests/fixtures/tiny-sd", #{{trainable: true}});
        let p = lpo_policy(u, #{{full: true, reference: "tests/fixtures/tiny-sd"}});
        let m = p.params.to_map();
        m["conv_in.bias"] = m["conv_in.bias"] + 0.5;
        p.params.load_map(m);
        u.save_merged("{d}/full");
        let a = load_safetensors("{d}/full/diffusion_pytorch_model.safetensors");
        let b = load_safetensors("tests/fixtures/tiny-sd/unet/diffusion_pytorch_model.safetensors");
        [max_abs_diff(a["conv_in.bias"], b["conv_in.bias"]), max_abs_diff(a["conv_out.weight"], b["conv_out.weight"])]
    "#
    );
    let out: rhai::Array = engine().eval(&script).unwrap();
    assert!((out[0].as_float().unwrap() - 0.5).abs() < 1e-6, "{:?}", out);
    assert_eq!(out[1].as_float().unwrap(), 0.0);
}
