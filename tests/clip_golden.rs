//! CLIP text encoder against the PyTorch reference (tests/fixtures/golden/clip_text.safetensors,
//! lrm.safetensors `text_features`), the penultimate/pooled/projection semantics, gradients
//! (every trainable tensor, central finite differences in f64) and bad input.

mod common;
use common::{assert_close, engine, fixtures, get};

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, D};
use lpo::models::clip_text::ClipTextModel;
use lpo::models::loading::WeightMode;
use lpo::tensor::SeededRng;

fn te_dir() -> PathBuf {
    fixtures().join("tiny-sd/text_encoder")
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden").join(name), &Device::Cpu).unwrap()
}

/// A copy of the text encoder folder with an edited config and optionally other weights.
fn variant(
    edit: impl Fn(&mut serde_json::Value),
    weights: Option<HashMap<String, Tensor>>,
) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(te_dir().join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    match weights {
        Some(w) => {
            candle_core::safetensors::save(&w, tmp.path().join("model.safetensors")).unwrap()
        }
        None => {
            std::fs::copy(
                te_dir().join("model.safetensors"),
                tmp.path().join("model.safetensors"),
            )
            .unwrap();
        }
    }
    tmp
}

#[test]
fn golden_hidden_and_pooled_via_script() {
    let g = golden("clip_text.safetensors");
    let mut scope = rhai::Scope::new();
    scope.push("ids", g["input_ids"].clone());
    let dir = te_dir().display().to_string();
    let out: rhai::Map = engine()
        .eval_with_scope(
            &mut scope,
            &format!("let te = load_text_encoder({dir:?}); te.encode(ids)"),
        )
        .unwrap();
    assert!(
        !out.contains_key("text_embeds"),
        "CLIPTextModel has no projection"
    );
    let hidden = get(&out, "hidden");
    assert_close(
        &hidden,
        &g["last_hidden_state"],
        1e-4,
        1e-4,
        "last_hidden_state",
    );
    assert_close(&get(&out, "pooled"), &g["pooled"], 1e-4, 1e-4, "pooled");
    let pen = get(&out, "penultimate");
    assert_eq!(pen.dims(), &[7, 77, 32]);
    let diff = (&pen - &hidden)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-2, "penultimate must differ from hidden");

    // Prompt strings -> tokenizer -> encoder, all in script, give the same hidden states.
    let tok = fixtures().join("tiny-sd/tokenizer").display().to_string();
    let out2: rhai::Map = engine()
        .eval(&format!(
            r#"let tok = load_tokenizer({tok:?}); let te = load_text_encoder({dir:?}, #{{dtype: "f64"}});
               te.encode(tok.encode(["a photo of a cat", "A majestic lion, standing on a rock at sunset; highly detailed, 8k!"]))"#
        ))
        .unwrap();
    let h2 = get(&out2, "hidden");
    assert_eq!(h2.dtype(), DType::F64);
    assert_close(
        &h2,
        &g["last_hidden_state"].narrow(0, 0, 2).unwrap(),
        1e-4,
        1e-4,
        "f64 hidden from prompts",
    );
}

#[test]
fn script_introspection() {
    let dir = te_dir().display().to_string();
    let file =
        candle_core::safetensors::load(te_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let float_params: usize = file
        .values()
        .filter(|t| t.dtype().is_float())
        .map(|t| t.elem_count())
        .sum();
    let n_float = file.values().filter(|t| t.dtype().is_float()).count();
    let r: rhai::Array = engine()
        .eval(&format!(
            r#"let te = load_text_encoder({dir:?}); let tt = load_text_encoder({dir:?}, #{{trainable: true}});
               [te.param_count, te.trainable_names().len(), tt.trainable_names().len(), te.hidden_size, tt.trainable]"#
        ))
        .unwrap();
    assert_eq!(r[0].as_int().unwrap() as usize, float_params);
    assert_eq!(r[1].as_int().unwrap(), 0);
    assert_eq!(r[2].as_int().unwrap() as usize, n_float);
    assert_eq!(r[3].as_int().unwrap(), 32);
    assert!(r[4].as_bool().unwrap());
    let err = engine()
        .eval::<rhai::Dynamic>(&format!(r#"load_text_encoder({dir:?}, #{{dtipe: "f32"}})"#))
        .err()
        .unwrap();
    assert!(err.to_string().contains("dtipe"), "{err}");
}

/// LayerNorm with the model's final_layer_norm weights, computed here independently.
fn final_ln(x: &Tensor, w: &HashMap<String, Tensor>) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let c = x.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let n = c
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap();
    n.broadcast_mul(&w["text_model.final_layer_norm.weight"])
        .unwrap()
        .broadcast_add(&w["text_model.final_layer_norm.bias"])
        .unwrap()
}

/// penultimate = hidden_states[-2] = output of layer 0 for this 2-layer model: a 1-layer model
/// (same weights) gives final_layer_norm(layer-0 output) as its `hidden`.
#[test]
fn penultimate_is_second_to_last_layer_output() {
    let g = golden("clip_text.safetensors");
    let ids = g["input_ids"].narrow(0, 0, 3).unwrap();
    let two = ClipTextModel::load(&te_dir(), DType::F32, &Device::Cpu, WeightMode::Frozen).unwrap();
    let one_dir = variant(|c| c["num_hidden_layers"] = 1.into(), None);
    let one =
        ClipTextModel::load(one_dir.path(), DType::F32, &Device::Cpu, WeightMode::Frozen).unwrap();
    let w =
        candle_core::safetensors::load(te_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let out2 = two.encode(&ids).unwrap();
    let out1 = one.encode(&ids).unwrap();
    assert_close(
        &final_ln(&out2.penultimate, &w),
        &out1.hidden,
        1e-5,
        1e-5,
        "LN(penultimate) vs 1-layer hidden",
    );
    // For the 1-layer model, penultimate is the embedding output (token + position embeddings).
    let tok = w["text_model.embeddings.token_embedding.weight"]
        .index_select(&ids.flatten_all().unwrap().to_dtype(DType::U32).unwrap(), 0)
        .unwrap()
        .reshape((3, 77, 32))
        .unwrap();
    let emb = tok
        .broadcast_add(&w["text_model.embeddings.position_embedding.weight"])
        .unwrap();
    assert_close(
        &out1.penultimate,
        &emb,
        1e-6,
        1e-6,
        "1-layer penultimate = embeddings",
    );
}

/// Pooled at the FIRST eos_token_id position when eos_token_id != 2.
#[test]
fn pooled_at_first_eos_for_new_configs() {
    let dir = variant(|c| c["eos_token_id"] = 320.into(), None);
    let m = ClipTextModel::load(dir.path(), DType::F32, &Device::Cpu, WeightMode::Frozen).unwrap();
    let g = golden("clip_text.safetensors");
    let ids = g["input_ids"].narrow(0, 0, 1).unwrap(); // "a photo of a cat": 320 at 1 and 4
    let out = m.encode(&ids).unwrap();
    assert_close(
        &out.pooled.squeeze(0).unwrap(),
        &out.hidden.get(0).unwrap().get(1).unwrap(),
        0.0,
        0.0,
        "first eos",
    );
    assert_eq!(m.eos_positions(&[vec![5, 7, 7, 1]]), vec![3]); // no 320: last position
    let legacy =
        ClipTextModel::load(&te_dir(), DType::F32, &Device::Cpu, WeightMode::Frozen).unwrap();
    assert_eq!(legacy.eos_positions(&[vec![5, 9, 9, 1]]), vec![1]); // argmax: first maximum
}

/// CLIPTextModelWithProjection, transformers-5 key layout (no `text_model.` prefix), checked
/// against the reference `text_features` = pooled @ text_projection.T (lrm.safetensors).
#[test]
fn projection_model_text_embeds_match_reference() {
    let src =
        candle_core::safetensors::load(te_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut w: HashMap<String, Tensor> = src
        .into_iter()
        .filter(|(k, _)| !k.ends_with("position_ids"))
        .map(|(k, v)| (k.trim_start_matches("text_model.").to_string(), v))
        .collect();
    let proj = candle_core::safetensors::load(
        fixtures().join("tiny-lrm/projections.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    w.insert(
        "text_projection.weight".into(),
        proj["text_projection.weight"].clone(),
    );
    let dir = variant(
        |c| c["architectures"] = serde_json::json!(["CLIPTextModelWithProjection"]),
        Some(w),
    );
    let g = golden("lrm.safetensors");
    let mut scope = rhai::Scope::new();
    scope.push("ids", g["input_ids"].clone());
    let d = dir.path().display().to_string();
    let out: rhai::Map = engine()
        .eval_with_scope(
            &mut scope,
            &format!("let te = load_text_encoder({d:?}); te.encode(ids)"),
        )
        .unwrap();
    assert_close(
        &get(&out, "text_embeds"),
        &g["text_features"],
        1e-4,
        1e-4,
        "text_embeds",
    );
    assert_close(
        &get(&out, "pooled"),
        &g["text_pooled"].narrow(0, 0, 2).unwrap(),
        1e-4,
        1e-4,
        "pooled",
    );

    // The projection model's config without the weight is a clear error naming the key.
    let dir2 = variant(
        |c| c["architectures"] = serde_json::json!(["CLIPTextModelWithProjection"]),
        None,
    );
    let msg = format!(
        "{:#}",
        ClipTextModel::load(dir2.path(), DType::F32, &Device::Cpu, WeightMode::Frozen)
            .err()
            .unwrap()
    );
    assert!(msg.contains("text_projection.weight"), "{msg}");
}

fn loss_of(m: &ClipTextModel, ids: &Tensor, probes: &[Tensor; 3]) -> Tensor {
    let o = m.encode(ids).unwrap();
    let a = (o.hidden * &probes[0]).unwrap().sum_all().unwrap();
    let b = (o.pooled * &probes[1]).unwrap().sum_all().unwrap();
    let c = (o.penultimate * &probes[2]).unwrap().sum_all().unwrap();
    ((a + b).unwrap() + c).unwrap()
}

#[test]
fn gradients_reach_every_parameter_and_match_finite_differences() {
    let m =
        ClipTextModel::load(&te_dir(), DType::F64, &Device::Cpu, WeightMode::Trainable).unwrap();
    let vars = m.trainable_vars();
    assert_eq!(
        vars.len(),
        2 + 2 * 16 + 2,
        "embeddings, 2 layers x 16, final LN"
    );
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "trainable_vars sorted");

    let g = golden("clip_text.safetensors");
    let ids = g["input_ids"].narrow(0, 0, 2).unwrap();
    let mut rng = SeededRng::new(11);
    let probes = [
        rng.randn((2, 77, 32), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
        rng.randn((2, 32), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
        rng.randn((2, 77, 32), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
    ];
    let loss = loss_of(&m, &ids, &probes);
    let grads = loss.backward().unwrap();

    let used_ids: Vec<u32> = {
        let mut v: Vec<u32> = ids
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&i| i as u32)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    for (name, var) in &vars {
        let gr = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(gr.dims(), var.dims(), "{name}");
        let gr = if name == "embeddings.token_embedding.weight" {
            // Only the rows of ids present in the batch can receive a gradient.
            let rows = gr
                .index_select(&Tensor::new(used_ids.as_slice(), &Device::Cpu).unwrap(), 0)
                .unwrap();
            for (r, id) in used_ids.iter().enumerate() {
                let n = rows
                    .get(r)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(n > 0.0, "token row {} has no gradient", id);
            }
            rows
        } else {
            gr.clone()
        };
        let v = gr.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(v.iter().any(|&x| x != 0.0), "{name}: zero gradient");
    }

    // Central finite differences on sampled entries of a spread of tensors.
    let picks: &[(&str, usize)] = &[
        ("embeddings.token_embedding.weight", 320 * 32 + 5),
        ("embeddings.position_embedding.weight", 3 * 32 + 7),
        ("encoder.layers.0.self_attn.q_proj.weight", 17),
        ("encoder.layers.0.self_attn.k_proj.bias", 3),
        ("encoder.layers.0.self_attn.v_proj.weight", 200),
        ("encoder.layers.0.layer_norm1.weight", 9),
        ("encoder.layers.1.mlp.fc1.weight", 1000),
        ("encoder.layers.1.mlp.fc2.bias", 30),
        ("encoder.layers.1.self_attn.out_proj.weight", 511),
        ("encoder.layers.1.layer_norm2.bias", 4),
        ("final_layer_norm.weight", 12),
        ("final_layer_norm.bias", 20),
    ];
    let eps = 1e-5;
    for &(name, idx) in picks {
        let var = &vars
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name}"))
            .1;
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[idx];
        let orig = var.as_tensor().copy().unwrap();
        let base = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss_of(&m, &ids, &probes).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        var.set(&orig).unwrap();
        let tol = 1e-6 + 1e-5 * fd.abs().max(analytic.abs());
        assert!(
            (fd - analytic).abs() <= tol,
            "{name}[{idx}]: analytic {analytic} vs finite difference {fd}"
        );
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    // Unknown activation.
    let dir = variant(|c| c["hidden_act"] = "swishy".into(), None);
    let msg = format!(
        "{:#}",
        ClipTextModel::load(dir.path(), DType::F32, &Device::Cpu, WeightMode::Frozen)
            .err()
            .unwrap()
    );
    assert!(
        msg.contains("swishy") && msg.contains("hidden_act") && msg.contains("config.json"),
        "{msg}"
    );

    // Truncated weights file, via the script API (a catchable error, not a panic).
    let dir = variant(|_| {}, None);
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = engine()
        .eval::<rhai::Dynamic>(&format!(
            "load_text_encoder({:?})",
            dir.path().display().to_string()
        ))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    // Wrong shape, naming the key and the file.
    let mut w =
        candle_core::safetensors::load(te_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    w.insert(
        "text_model.final_layer_norm.bias".into(),
        Tensor::zeros(31, DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = variant(|_| {}, Some(w));
    let msg = format!(
        "{:#}",
        ClipTextModel::load(dir.path(), DType::F32, &Device::Cpu, WeightMode::Trainable)
            .err()
            .unwrap()
    );
    assert!(
        msg.contains("final_layer_norm.bias") && msg.contains("model.safetensors"),
        "{msg}"
    );

    // Missing tensor in trainable mode is an error, not a silent random init.
    let mut w =
        candle_core::safetensors::load(te_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    w.remove("text_model.encoder.layers.1.mlp.fc2.weight");
    let dir = variant(|_| {}, Some(w));
    let msg = format!(
        "{:#}",
        ClipTextModel::load(dir.path(), DType::F32, &Device::Cpu, WeightMode::Trainable)
            .err()
            .unwrap()
    );
    assert!(msg.contains("encoder.layers.1.mlp.fc2.weight"), "{msg}");

    // Bad ids: out of vocabulary, too long, wrong rank.
    let m = ClipTextModel::load(&te_dir(), DType::F32, &Device::Cpu, WeightMode::Frozen).unwrap();
    let e = m
        .encode(&Tensor::new(&[[49406i64, 60000]], &Device::Cpu).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("60000"), "{e}");
    assert!(m
        .encode(&Tensor::zeros((1, 78), DType::I64, &Device::Cpu).unwrap())
        .is_err());
    assert!(m
        .encode(&Tensor::zeros(5, DType::I64, &Device::Cpu).unwrap())
        .is_err());
}

/// Weights loaded in f16 / bf16 (the dtype option) run and stay near the f32 reference.
#[test]
fn half_precision_load_runs_close_to_reference() {
    let g = golden("clip_text.safetensors");
    let ids = g["input_ids"].narrow(0, 0, 2).unwrap();
    let reference = g["last_hidden_state"].narrow(0, 0, 2).unwrap();
    for (dtype, tol) in [(DType::F16, 2e-2), (DType::BF16, 1e-1)] {
        let m = ClipTextModel::load(&te_dir(), dtype, &Device::Cpu, WeightMode::Frozen).unwrap();
        let out = m.encode(&ids).unwrap();
        assert_eq!(out.hidden.dtype(), dtype);
        assert_close(
            &out.hidden,
            &reference,
            tol,
            tol,
            &format!("{dtype:?} hidden"),
        );
    }
}
