//! Model folders lpo writes load in diffusers: every `config.json` key a UNet save writes is
//! one diffusers' `UNet2DConditionModel` accepts with that JSON type, and `model_index.json`
//! lists only the components present, each with its class, and is written only where the
//! components make a pipeline. What diffusers accepts is read from diffusers itself by
//! tests/interop/make_diffusers_config_spec.py (tests/fixtures/interop/diffusers_config_spec.json).

use std::path::{Path, PathBuf};

use candle_core::Device;
use lpo::models::model_folder::{copy_model_folder, model_index, MODEL_INDEX};
use lpo::models::unet::UNetConfig;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny_sd() -> PathBuf {
    repo().join("tests/fixtures/tiny-sd")
}

fn spec() -> Value {
    let path = repo().join("tests/fixtures/interop/diffusers_config_spec.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn eval(script: &str) {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
    .engine
    .run(script)
    .unwrap_or_else(|e| panic!("{e}\n{script}"));
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every key of `config` is a parameter of diffusers' `model` whose annotation allows the
/// value's JSON type (an integer also passes as a float).
fn assert_diffusers_accepts(config: &Value, model: &str, what: &str) {
    let spec = spec();
    let params = spec["models"][model].as_object().unwrap();
    for (key, value) in config.as_object().unwrap() {
        if key.starts_with('_') {
            continue;
        }
        let param = params
            .get(key)
            .unwrap_or_else(|| panic!("{what}: `{key}` is no {model} parameter"));
        let allowed: Vec<&str> = param["types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        let ty = json_type(value);
        let ok = allowed.contains(&ty) || (ty == "integer" && allowed.contains(&"number"));
        assert!(
            ok,
            "{what}: `{key}` = {value} is {ty}; diffusers' {model} takes {allowed:?}"
        );
    }
}

/// Real SD configs lack `only_cross_attention` (and many optional keys): the written config
/// must not turn them into nulls diffusers cannot take.
#[test]
fn unet_configs_are_written_as_diffusers_accepts_them() {
    let sources = [
        repo().join("tests/fixtures/configs/sd15.json"),
        repo().join("tests/fixtures/configs/sd21_tiny.json"),
        repo().join("tests/fixtures/configs/sdxl_tiny.json"),
        tiny_sd().join("unet/config.json"),
        repo().join("tests/fixtures/tiny-lrm/unet/config.json"),
        repo().join("checkpoints/shapes/base/unet/config.json"),
    ];
    for source in sources {
        let what = source.display().to_string();
        let text = std::fs::read_to_string(&source).unwrap();
        let cfg = UNetConfig::from_json(&text, &what).unwrap();
        let written = cfg.to_diffusers_json().unwrap();
        assert_eq!(written["_class_name"], "UNet2DConditionModel");
        assert_diffusers_accepts(&written, "UNet2DConditionModel", &what);
        // and it reads back as the same model
        let again = UNetConfig::from_json(&written.to_string(), &what).unwrap();
        assert_eq!(again.to_diffusers_json().unwrap(), written, "{what}");
    }
}

#[test]
fn unet_save_of_a_config_without_optional_keys_writes_no_nulls() {
    let dir = tempfile::tempdir().unwrap();
    // tiny-sd's config as SD1.5 ships it: no only_cross_attention, no optional keys
    let mut config = read_json(&tiny_sd().join("unet/config.json"));
    let obj = config.as_object_mut().unwrap();
    obj.retain(|k, v| !v.is_null() && k != "only_cross_attention");
    let source = dir.path().join("source.json");
    std::fs::write(&source, config.to_string()).unwrap();
    let out = dir.path().join("saved");
    eval(&format!(
        r#"let u = random_unet("{}", #{{seed: 1}}); u.save("{}");"#,
        source.display(),
        out.display()
    ));
    let saved = read_json(&out.join("config.json"));
    assert_diffusers_accepts(&saved, "UNet2DConditionModel", "saved config.json");
    assert!(
        saved.as_object().unwrap().values().all(|v| !v.is_null()),
        "{saved:#}"
    );
    assert_eq!(
        saved["freq_shift"],
        json!(0),
        "diffusers types freq_shift as int"
    );
}

/// The index `model_index` writes for `dir`, checked against diffusers' pipeline: every
/// component it names, `[null, null]` only where diffusers allows it, a real folder otherwise.
fn assert_valid_pipeline_index(index: &Value, dir: &Path) {
    let spec = spec();
    let class = index["_class_name"].as_str().unwrap();
    let pipeline = &spec["pipelines"][class];
    let names = |k: &str| -> Vec<String> {
        pipeline[k]
            .as_array()
            .unwrap_or_else(|| panic!("no pipeline {class} in the spec"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (components, optional) = (names("components"), names("optional_components"));
    for name in &components {
        let entry = &index[name.as_str()];
        if entry == &json!([null, null]) {
            assert!(optional.contains(name), "{class}: `{name}` cannot be null");
            assert!(
                !dir.join(name).exists(),
                "`{name}` is present but not listed"
            );
        } else {
            let pair = entry
                .as_array()
                .unwrap_or_else(|| panic!("`{name}`: {entry}"));
            assert!(
                pair.len() == 2 && pair.iter().all(Value::is_string),
                "{entry}"
            );
            assert!(dir.join(name).is_dir(), "`{name}` is listed but absent");
        }
    }
    for (key, value) in index.as_object().unwrap() {
        let known = key.starts_with('_')
            || components.contains(key)
            || pipeline["config"].get(key).is_some();
        assert!(known, "{class} has no `{key}` ({value})");
    }
}

#[test]
fn a_copied_pipeline_folder_gets_an_index_of_its_components() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let copied = copy_model_folder(&tiny_sd(), &model).unwrap();
    assert_eq!(
        copied,
        ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    );
    let index = read_json(&model.join(MODEL_INDEX));
    assert_valid_pipeline_index(&index, &model);
    assert_eq!(
        index,
        json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
        "as diffusers' save_pretrained writes it"
    );
    // Each required component diffusers names is needed: without it there is no pipeline.
    let spec = spec();
    let sd = &spec["pipelines"]["StableDiffusionPipeline"];
    for name in sd["components"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        if sd["optional_components"]
            .as_array()
            .unwrap()
            .contains(&json!(name))
        {
            continue;
        }
        let partial = dir.path().join(format!("without-{name}"));
        copy_model_folder(&model, &partial).unwrap();
        std::fs::remove_dir_all(partial.join(name)).unwrap();
        assert_eq!(model_index(&partial, None).unwrap(), None, "without {name}");
    }
}

#[test]
fn a_source_index_keeps_its_classes_and_nulls_absent_optional_parts() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("sd");
    copy_model_folder(&tiny_sd(), &source).unwrap();
    let sd15_index = json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.6.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "requires_safety_checker": true
    });
    std::fs::write(source.join(MODEL_INDEX), sd15_index.to_string()).unwrap();
    let model = dir.path().join("model");
    copy_model_folder(&source, &model).unwrap();
    let index = read_json(&model.join(MODEL_INDEX));
    assert_valid_pipeline_index(&index, &model);
    assert_eq!(index["scheduler"], json!(["diffusers", "PNDMScheduler"]));
    assert_eq!(index["safety_checker"], json!([null, null]));
    assert_eq!(index["feature_extractor"], json!([null, null]));
    assert_eq!(index["requires_safety_checker"], json!(false));
}

#[test]
fn an_sdxl_folder_gets_an_sdxl_index() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("sdxl");
    copy_model_folder(&tiny_sd(), &model).unwrap();
    std::fs::copy(
        repo().join("tests/fixtures/configs/sdxl_tiny.json"),
        model.join("unet/config.json"),
    )
    .unwrap();
    for (from, to) in [
        ("text_encoder", "text_encoder_2"),
        ("tokenizer", "tokenizer_2"),
    ] {
        copy_model_folder(&tiny_sd(), &dir.path().join("scratch")).unwrap();
        std::fs::rename(dir.path().join("scratch").join(from), model.join(to)).unwrap();
    }
    let index = model_index(&model, None)
        .unwrap()
        .expect("an SDXL pipeline");
    assert_eq!(index["_class_name"], "StableDiffusionXLPipeline");
    assert_valid_pipeline_index(&index, &model);
    assert_eq!(
        index["text_encoder_2"],
        json!(["transformers", "CLIPTextModel"])
    );
}

/// The shapes models have no VAE: no pipeline, so no model_index.json; the run's model/
/// folder gets the components only, not the base's evaluation cache or logs.
#[test]
fn a_folder_without_vae_gets_no_index_and_copies_only_components() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    eval(&format!(r#"new_shapes_model("{}");"#, base.display()));
    assert!(
        !base.join(MODEL_INDEX).exists(),
        "no pipeline without a VAE"
    );
    // a base as older versions wrote it, with a cache and logs beside the model
    std::fs::write(
        base.join(MODEL_INDEX),
        json!({"_class_name": "StableDiffusionPipeline", "vae": [null, null],
               "unet": ["diffusers", "UNet2DConditionModel"]})
        .to_string(),
    )
    .unwrap();
    std::fs::create_dir(base.join("eval_cache")).unwrap();
    std::fs::write(base.join("eval_cache/abc-train.safetensors"), b"cache").unwrap();
    std::fs::write(base.join("pretrain_metrics.jsonl"), b"{}\n").unwrap();
    let model = dir.path().join("run/model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join(MODEL_INDEX), b"{\"stale\": true}").unwrap();
    let copied = copy_model_folder(&base, &model).unwrap();
    assert_eq!(copied, ["scheduler", "text_encoder", "tokenizer", "unet"]);
    let mut left: Vec<String> = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, copied, "no eval_cache, logs or model_index.json");
    // the copy is a model the loaders read
    eval(&format!(
        r#"let u = load_unet("{m}"); let te = load_text_encoder("{m}/text_encoder");"#,
        m = model.display()
    ));
}

#[test]
fn copying_a_folder_without_components_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
    let err = format!(
        "{:#}",
        copy_model_folder(dir.path(), &dir.path().join("out")).unwrap_err()
    );
    assert!(
        err.contains(&dir.path().display().to_string()) && err.contains("no model components"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_json_alone_is_listed_as_a_fast_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_model_folder(&tiny_sd(), &model).unwrap();
    for f in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    ] {
        std::fs::remove_file(model.join("tokenizer").join(f)).unwrap();
    }
    let index = model_index(&model, None).unwrap().unwrap();
    assert_eq!(
        index["tokenizer"],
        json!(["transformers", "PreTrainedTokenizerFast"])
    );
}

/// A pipeline lpo has no table for keeps its source index while every listed part is there.
#[test]
fn another_pipelines_index_is_kept_only_when_complete() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_model_folder(&tiny_sd(), &model).unwrap();
    let source = json!({
        "_class_name": "StableDiffusionInpaintPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [null, null]
    });
    let kept = model_index(&model, source.as_object()).unwrap();
    assert_eq!(kept.as_ref(), Some(&source));
    std::fs::remove_dir_all(model.join("vae")).unwrap();
    assert_eq!(model_index(&model, source.as_object()).unwrap(), None);
}
