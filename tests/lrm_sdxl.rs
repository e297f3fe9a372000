//! An SDXL-style LRM (two text encoders, added time/text embeddings, three stages plus mid)
//! built in a temp folder from tiny parts, scored through `load_lrm` and checked against the
//! same computation spelled out step by step with the model-level script API.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lpo::models::loading::WeightMode;
use lpo::models::unet::{UNet2DConditionModel, UNetConfig};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use lpo::tensor::SeededRng;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// unet/ (SDXL-shaped, random), text_encoder/ + text_encoder_2/ (the tiny CLIP; the second
/// with a text projection), tokenizer/ + tokenizer_2/, vae/config.json (image size 64) and
/// projections.safetensors (visual projection only: SDXL's text feature is encoder 2's).
fn make_sdxl_lrm(dir: &Path) {
    let fx = Path::new("tests/fixtures");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("configs/sdxl_tiny.json")).unwrap())
            .unwrap();
    cfg["cross_attention_dim"] = 64.into(); // 32 + 32: both encoders' penultimate states
    cfg["projection_class_embeddings_input_dim"] = (24 + 6 * 8).into(); // text_embeds + time ids
    let config = UNetConfig::from_json(&cfg.to_string(), "sdxl test config").unwrap();
    let unet =
        UNet2DConditionModel::random(config, 3, DType::F32, &Device::Cpu, WeightMode::Frozen)
            .unwrap();
    unet.save(&dir.join("unet"), DType::F32).unwrap();
    copy_dir(&fx.join("tiny-sd/text_encoder"), &dir.join("text_encoder"));
    copy_dir(
        &fx.join("tiny-sd/text_encoder"),
        &dir.join("text_encoder_2"),
    );
    let te2 = dir.join("text_encoder_2/model.safetensors");
    let mut weights = candle_core::safetensors::load(&te2, &Device::Cpu).unwrap();
    let mut rng = SeededRng::new(4);
    weights.insert(
        "text_projection.weight".into(),
        (rng.randn((24, 32), &Device::Cpu).unwrap() * 0.2).unwrap(),
    );
    candle_core::safetensors::save(&weights, &te2).unwrap();
    let cfg2 = dir.join("text_encoder_2/config.json");
    let text = std::fs::read_to_string(&cfg2)
        .unwrap()
        .replace("\"CLIPTextModel\"", "\"CLIPTextModelWithProjection\"");
    std::fs::write(&cfg2, text).unwrap();
    copy_dir(&fx.join("tiny-sd/tokenizer"), &dir.join("tokenizer"));
    copy_dir(&fx.join("tiny-sd/tokenizer"), &dir.join("tokenizer_2"));
    std::fs::create_dir_all(dir.join("vae")).unwrap();
    std::fs::write(dir.join("vae/config.json"), r#"{"sample_size": 64}"#).unwrap();
    let mut proj: HashMap<String, Tensor> = HashMap::new();
    proj.insert(
        "visual_projection.weight".into(),
        (rng.randn((24, 16 + 32 + 64 + 64), &Device::Cpu).unwrap() * 0.02).unwrap(),
    );
    proj.insert(
        "logit_scale".into(),
        Tensor::new(2.6592f32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&proj, dir.join("projections.safetensors")).unwrap();
}

#[test]
fn sdxl_style_lrm_matches_the_spelled_out_computation() {
    let tmp = tempfile::tempdir().unwrap();
    make_sdxl_lrm(tmp.path());
    let se = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    );
    let script = format!(
        r#"
        let dir = "{dir}";
        let prompts = ["a red circle", "a photo of a cat"];
        let x = rng(1).randn([2, 4, 16, 16]);
        let t = tensor([951, 201]);
        let lrm = load_lrm(dir, #{{multi_scale: true, guidance_scale: 7.5, multi_scale_cfg: false}});
        if !lrm.is_sdxl {{ throw "not recognised as SDXL-style"; }}
        let got = lrm.score(x, prompts, t);

        // The same by hand: penultimate states of both encoders concatenated; the second
        // encoder's projected embedding is the text feature and the added text embedding;
        // time ids (64, 64, 0, 0, 64, 64) from vae/config.json; [text rows; uncond rows].
        let tok = load_tokenizer(`${{dir}}/tokenizer`);
        let tok2 = load_tokenizer(`${{dir}}/tokenizer_2`);
        let te = load_text_encoder(`${{dir}}/text_encoder`);
        let te2 = load_text_encoder(`${{dir}}/text_encoder_2`);
        let enc = |p| {{
            let a = te.encode(tok.encode(p));
            let b = te2.encode(tok2.encode(p));
            #{{hidden: cat([a.penultimate, b.penultimate], 2), embeds: b.text_embeds}}
        }};
        let c = enc.call(prompts);
        let u = enc.call(["", ""]);
        let time_ids = tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat([4, 1]);
        let unet = load_unet(`${{dir}}/unet`);
        let f = unet.features(cat([x, x], 0), cat([t, t], 0), cat([c.hidden, u.hidden], 0),
                              #{{text_embeds: cat([c.embeds, u.embeds], 0), time_ids: time_ids}});
        let pool = |r| r.mean(3).mean(2);
        let text_half = |r| r.narrow(0, 0, 2);
        let guided = |r| r.narrow(0, 2, 2) + (r.narrow(0, 0, 2) - r.narrow(0, 2, 2)) * 7.5;
        let feats = cat([text_half.call(pool.call(f.down[2])), text_half.call(pool.call(f.down[5])),
                         text_half.call(pool.call(f.down[8])), guided.call(pool.call(f.mid))], 1);
        let p = load_safetensors(`${{dir}}/projections.safetensors`);
        let img = feats.matmul(p["visual_projection.weight"].transpose(0, 1));
        let norm = |v| v / v.square().sum(1).sqrt().unsqueeze(1);
        let want = (norm.call(img) * norm.call(c.embeds)).sum(1) * p.logit_scale.exp();
        max_abs_diff(got, want)
        "#,
        dir = tmp.path().display()
    );
    let diff = se
        .engine
        .eval::<f64>(&script)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        diff < 1e-5,
        "SDXL LRM score differs from the spelled-out computation by {diff}"
    );
}
