//! LoRA files from diffusers / PEFT / kohya load with `load_lora` (format auto-detected) and our
//! UNet then matches diffusers' own output with that file loaded; `save_lora` writes alpha the
//! way diffusers reads it. Fixtures: tests/interop/make_lora_fixtures.py (diffusers 0.42.1,
//! peft 0.21.2), committed under tests/fixtures/interop/lora/.

mod common;
use common::{assert_close, engine, max_diff};

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rhai::{Array, Map};

const DIR: &str = "tests/fixtures/interop/lora";
const SD: &str = "tests/fixtures/tiny-sd";

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{DIR}/expected.safetensors"), &Device::Cpu).unwrap()
}

/// `load_lora(file, #{})` on a fresh tiny UNet, then the forward of the fixture's input.
fn load_and_forward(file: &str) -> (Map, Tensor) {
    let script = format!(
        r#"
        let g = load_safetensors("{DIR}/expected.safetensors");
        let u = load_unet("{SD}");
        let info = u.load_lora("{file}", #{{}});
        info.out = u.forward(g.x, g.t, g.ehs);
        info
    "#
    );
    let mut m: Map = engine()
        .eval(&script)
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    let out = m.remove("out").unwrap().cast::<Tensor>();
    (m, out)
}

fn warnings(info: &Map) -> Vec<String> {
    info["warnings"]
        .clone()
        .cast::<Array>()
        .into_iter()
        .map(|w| w.into_string().unwrap())
        .collect()
}

#[test]
fn every_diffusers_convention_loads_and_matches_diffusers() {
    let exp = expected();
    let base = &exp["base"];
    // (fixture, detected format, alpha source)
    let cases = [
        ("peft_meta", "peft", "lora_adapter_metadata"),
        ("diffusers_meta", "diffusers", "lora_adapter_metadata"),
        ("diffusers_nometa", "diffusers", "none (alpha = rank)"),
        ("unet_te", "diffusers", "lora_adapter_metadata"),
        ("kohya", "kohya", ".alpha tensors"),
        ("attn_processor", "attn-processor", "none (alpha = rank)"),
        ("peft_plain", "peft", "none (alpha = rank)"),
        ("peft_base_model", "peft", "none (alpha = rank)"),
        // PeftModel.save_pretrained: alpha 8 only in the adapter_config.json beside the weights
        ("peft_model", "peft", "adapter_config.json"),
    ];
    for (name, format, alpha_from) in cases {
        let file = match name {
            "peft_model" => format!("{DIR}/peft_model/adapter_model.safetensors"),
            _ => format!("{DIR}/{name}.safetensors"),
        };
        let (info, out) = load_and_forward(&file);
        let want = &exp[&format!("out.{name}")];
        assert!(
            max_diff(want, base) > 1e-2,
            "{name}: the LoRA has an effect"
        );
        assert_close(&out, want, 1e-4, 1e-4, name);
        eprintln!(
            "{name}: max |ours - diffusers| = {:.2e}",
            max_diff(&out, want)
        );
        assert_eq!(info["layers"].as_int().unwrap(), 32, "{name}");
        assert_eq!(info["format"].clone().into_string().unwrap(), format);
        assert_eq!(
            info["alpha_from"].clone().into_string().unwrap(),
            alpha_from,
            "{name}"
        );
        let w = warnings(&info);
        match name {
            "unet_te" | "kohya" => {
                let prefix = if name == "kohya" {
                    "`lora_te1_*`"
                } else {
                    "`text_encoder.*`"
                };
                assert_eq!(w.len(), 1, "{name}: {w:?}");
                assert!(
                    w[0].contains(prefix) && w[0].contains("not applied"),
                    "{name}: {w:?}"
                );
            }
            _ => assert!(w.is_empty(), "{name}: {w:?}"),
        }
    }
    // the metadata's alpha 8 (scale 2) is honoured, not the default alpha = rank
    assert!(max_diff(&exp["out.diffusers_meta"], &exp["out.diffusers_nometa"]) > 1e-2);
}

#[test]
fn plain_load_lora_and_import_kohya_still_return_the_layer_count() {
    let script = format!(
        r#"
        let u = load_unet("{SD}");
        let a = u.load_lora("{DIR}/unet_te.safetensors");
        let b = load_unet("{SD}").import_kohya("{DIR}/kohya.safetensors");
        let c = load_unet("{SD}").load_lora("{DIR}/kohya.safetensors", #{{format: "kohya"}});
        let errs = [];
        for f in [#{{format: "kohya"}}, #{{format: "ckpt"}}, #{{fmt: "peft"}}] {{
            try {{ load_unet("{SD}").load_lora("{DIR}/peft_meta.safetensors", f); errs.push(""); }}
            catch (e) {{ errs.push(`${{e}}`); }}
        }}
        try {{ load_unet("{SD}").import_kohya("{DIR}/peft_meta.safetensors"); errs.push(""); }}
        catch (e) {{ errs.push(`${{e}}`); }}
        #{{a: a, b: b, c: c.layers, errs: errs}}
    "#
    );
    let m: Map = engine().eval(&script).unwrap();
    assert_eq!(m["a"].as_int().unwrap(), 32);
    assert_eq!(m["b"].as_int().unwrap(), 32);
    assert_eq!(m["c"].as_int().unwrap(), 32);
    let errs: Vec<String> = m["errs"]
        .clone()
        .cast::<Array>()
        .into_iter()
        .map(|e| e.into_string().unwrap())
        .collect();
    assert!(
        errs[0].contains("is a peft key") && errs[0].contains("\"kohya\" was asked for"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].contains("unknown LoRA format `ckpt`"),
        "{}",
        errs[1]
    );
    assert!(errs[2].contains("fmt"), "{}", errs[2]);
    assert!(errs[3].contains("is a peft key"), "{}", errs[3]);
}

#[test]
fn text_encoder_only_files_and_stray_keys_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let all: HashMap<String, Tensor> =
        candle_core::safetensors::load(format!("{DIR}/unet_te.safetensors"), &Device::Cpu).unwrap();
    let te: HashMap<String, Tensor> = all
        .iter()
        .filter(|(k, _)| k.starts_with("text_encoder."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let te_only = dir.path().join("te.safetensors");
    candle_core::safetensors::save(&te, &te_only).unwrap();
    let mut stray = all.clone();
    stray.insert(
        "unet.down_blocks.0.attentions.0.norm.weight".into(),
        Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let stray_file = dir.path().join("stray.safetensors");
    candle_core::safetensors::save(&stray, &stray_file).unwrap();
    let script = format!(
        r#"
        let errs = [];
        for f in ["{}", "{}"] {{
            try {{ load_unet("{SD}").load_lora(f); errs.push(""); }} catch (e) {{ errs.push(`${{e}}`); }}
        }}
        errs
    "#,
        te_only.display(),
        stray_file.display()
    );
    let errs: Array = engine().eval(&script).unwrap();
    let e0 = errs[0].to_string();
    assert!(
        e0.contains("only text-encoder LoRA (text_encoder.)") && e0.contains("te.safetensors"),
        "{e0}"
    );
    let e1 = errs[1].to_string();
    assert!(
        e1.contains("unexpected key `unet.down_blocks.0.attentions.0.norm.weight`"),
        "{e1}"
    );
}

/// The header diffusers reads: `lora_adapter_metadata` with `unet.`-prefixed LoraConfig keys.
fn adapter_metadata(file: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(file).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    serde_json::from_str(&meta["lora_adapter_metadata"]).unwrap()
}

#[test]
fn save_lora_writes_alpha_as_diffusers_reads_it_and_reloads_at_the_same_scale() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    // rank 2, alpha 3 (scale 1.5); the kohya fixture gives per-module alphas after one is changed
    let kohya: HashMap<String, Tensor> =
        candle_core::safetensors::load(format!("{DIR}/kohya.safetensors"), &Device::Cpu).unwrap();
    let odd = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v";
    let mut mixed = kohya.clone();
    mixed.insert(
        format!("{odd}.alpha"),
        Tensor::new(2.0f32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&mixed, dir.path().join("mixed.safetensors")).unwrap();
    let script = format!(
        r#"
        let g = load_safetensors("{DIR}/expected.safetensors");
        let u = load_unet("{SD}");
        let policy = lpo_policy(u, #{{lora: #{{rank: 2, alpha: 3.0, seed: 1}}}});
        let m = policy.params.to_map();
        let r = rng(5);
        for k in m.keys() {{ m[k] = r.randn(m[k].shape) * 0.2; }}
        policy.params.load_map(m);
        let y = u.forward(g.x, g.t, g.ehs);
        u.save_lora("{d}/ours.safetensors");
        // diffusers reads only the tensors and lora_adapter_metadata: drop our own header
        let t = load_safetensors("{d}/ours.safetensors");
        let u2 = load_unet("{SD}");
        let info = u2.load_lora("{d}/ours.safetensors", #{{}});
        let y2 = u2.forward(g.x, g.t, g.ehs);

        let v = load_unet("{SD}");
        v.load_lora("{d}/mixed.safetensors");
        let z = v.forward(g.x, g.t, g.ehs);
        v.save_lora("{d}/mixed_ours.safetensors");
        let v2 = load_unet("{SD}");
        v2.load_lora("{d}/mixed_ours.safetensors");
        let z2 = v2.forward(g.x, g.t, g.ehs);
        #{{y: y, y2: y2, z: z, z2: z2, info: info, nkeys: t.len(),
          base: load_unet("{SD}").forward(g.x, g.t, g.ehs)}}
    "#
    );
    let m: Map = engine().eval(&script).unwrap_or_else(|e| panic!("{e}"));
    let get = |k: &str| m[k].clone().cast::<Tensor>();
    assert!(max_diff(&get("y"), &get("base")) > 1e-2);
    assert_eq!(max_diff(&get("y"), &get("y2")), 0.0, "save -> load");
    let info = m["info"].clone().cast::<Map>();
    assert_eq!(
        info["alpha_from"].clone().into_string().unwrap(),
        "lora_adapter_metadata"
    );
    assert_eq!(m["nkeys"].as_int().unwrap(), 64);
    let meta = adapter_metadata(&dir.path().join("ours.safetensors"));
    assert_eq!(meta["unet.r"], serde_json::json!(2));
    assert_eq!(meta["unet.lora_alpha"], serde_json::json!(3.0));
    assert_eq!(meta["unet.alpha_pattern"], serde_json::json!({}));
    assert_eq!(meta["unet.target_modules"].as_array().unwrap().len(), 32);

    // per-module alpha survives save_lora as an alpha_pattern entry
    assert_eq!(max_diff(&get("z"), &get("z2")), 0.0, "mixed alphas reload");
    let meta = adapter_metadata(&dir.path().join("mixed_ours.safetensors"));
    assert_eq!(meta["unet.lora_alpha"], serde_json::json!(8.0));
    let pattern = meta["unet.alpha_pattern"].as_object().unwrap();
    assert_eq!(pattern.len(), 1, "{pattern:?}");
    let (k, v) = pattern.iter().next().unwrap();
    assert!(k.starts_with('^') && k.ends_with(r"attn2\.to_v"), "{k}");
    assert_eq!(v, &serde_json::json!(2.0));
}

#[test]
fn a_file_without_our_header_still_loads_at_its_metadata_scale() {
    // regression: before lora_adapter_metadata was read, alpha came only from our `lora_alpha`
    // header; strip it and the scale must still be alpha / rank from diffusers' header
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let script = format!(
        r#"
        let g = load_safetensors("{DIR}/expected.safetensors");
        let u = load_unet("{SD}");
        u.add_lora(#{{rank: 2, alpha: 6.0, seed: 3}});
        let p = u.params();
        let m = p.to_map();
        let r = rng(2);
        for k in m.keys() {{ m[k] = r.randn(m[k].shape) * 0.2; }}
        p.load_map(m);
        u.save_lora("{d}/a.safetensors");
        u.forward(g.x, g.t, g.ehs)
    "#
    );
    let y: Tensor = engine().eval(&script).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.path().join("a.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut header = meta.metadata().clone().unwrap();
    assert!(header.remove("lora_alpha").is_some());
    header.remove("lora_rank");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let stripped = dir.path().join("b.safetensors");
    std::fs::write(
        &stripped,
        safetensors::serialize(&tensors, Some(header)).unwrap(),
    )
    .unwrap();
    let script = format!(
        r#"
        let g = load_safetensors("{DIR}/expected.safetensors");
        let u = load_unet("{SD}");
        u.load_lora("{}");
        u.forward(g.x, g.t, g.ehs)
    "#,
        stripped.display()
    );
    let y2: Tensor = engine().eval(&script).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(max_diff(&y, &y2), 0.0);
}

#[test]
fn a_file_with_one_bad_module_changes_nothing() {
    // every module is checked before any adapter is installed
    let dir = tempfile::tempdir().unwrap();
    let mut t: HashMap<String, Tensor> =
        candle_core::safetensors::load(format!("{DIR}/peft_plain.safetensors"), &Device::Cpu)
            .unwrap();
    let last = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight";
    assert!(t.contains_key(last));
    t.insert(
        last.into(),
        Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&t, &bad).unwrap();
    let script = format!(
        r#"
        let u = load_unet("{SD}");
        let err = "";
        try {{ u.load_lora("{}"); }} catch (e) {{ err = `${{e}}`; }}
        #{{err: err, params: u.lora_param_count}}
    "#,
        bad.display()
    );
    let m: Map = engine().eval(&script).unwrap();
    let err = m["err"].clone().into_string().unwrap();
    assert!(
        err.contains("attn2.to_v") && err.contains("[3, 4]"),
        "{err}"
    );
    assert_eq!(m["params"].as_int().unwrap(), 0, "no adapter was installed");
}
