//! A diffusers model folder: component subfolders (`unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`, ...) and, when the components make a pipeline diffusers has,
//! `model_index.json` listing each present one with its class, as `save_pretrained` writes it.
//!
//! A folder without `vae/` (the pixel-space shapes models) is no diffusers pipeline (every
//! Stable Diffusion pipeline needs a VAE) and gets no `model_index.json`: it is a set of
//! components, each loading on its own (`UNet2DConditionModel.from_pretrained(dir,
//! subfolder="unet")`, `CLIPTextModel.from_pretrained(dir, subfolder="text_encoder")`, ...).

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use crate::fsutil::atomic_write;

pub const MODEL_INDEX: &str = "model_index.json";

/// Files that make a subfolder a component (a model, tokenizer, scheduler or processor).
const COMPONENT_FILES: [&str; 6] = [
    "config.json",
    "scheduler_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.json",
    "preprocessor_config.json",
];

/// A pipeline `model_index.json` is written for: the components it needs and those diffusers
/// accepts as `[null, null]` (`_optional_components`).
struct Pipeline {
    class: &'static str,
    required: &'static [&'static str],
    optional: &'static [&'static str],
}

const STABLE_DIFFUSION: Pipeline = Pipeline {
    class: "StableDiffusionPipeline",
    required: &["scheduler", "text_encoder", "tokenizer", "unet", "vae"],
    optional: &["feature_extractor", "image_encoder", "safety_checker"],
};

const STABLE_DIFFUSION_XL: Pipeline = Pipeline {
    class: "StableDiffusionXLPipeline",
    required: &["scheduler", "unet", "vae"],
    optional: &[
        "feature_extractor",
        "image_encoder",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
    ],
};

/// Whether `dir` holds a component (one of `COMPONENT_FILES`).
pub fn is_component(dir: &Path) -> bool {
    dir.is_dir() && COMPONENT_FILES.iter().any(|f| dir.join(f).is_file())
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    Ok(Some(value))
}

/// `[library, class]` of the component in `dir/name`, from its own config, or None when the
/// config does not say (diffusers writes `_class_name`, transformers `architectures`,
/// `tokenizer_class` and `image_processor_type`).
fn component_entry(dir: &Path, name: &str) -> Result<Option<Value>> {
    let sub = dir.join(name);
    let string_at = |file: &str, pointer: &str| -> Result<Option<String>> {
        Ok(read_json(&sub.join(file))?
            .and_then(|v| v.pointer(pointer).and_then(Value::as_str).map(String::from)))
    };
    for (file, pointer, library) in [
        ("config.json", "/_class_name", "diffusers"),
        ("scheduler_config.json", "/_class_name", "diffusers"),
        ("config.json", "/architectures/0", "transformers"),
        ("tokenizer_config.json", "/tokenizer_class", "transformers"),
        (
            "preprocessor_config.json",
            "/image_processor_type",
            "transformers",
        ),
    ] {
        if let Some(class) = string_at(file, pointer)? {
            return Ok(Some(json!([library, class])));
        }
    }
    // A bare `tokenizer.json` is what transformers' fast tokenizer class reads.
    let fast_tokenizer = sub.join("tokenizer.json").is_file();
    Ok(fast_tokenizer.then(|| json!(["transformers", "PreTrainedTokenizerFast"])))
}

fn is_listed(entry: &Value) -> bool {
    entry
        .as_array()
        .is_some_and(|e| e.len() == 2 && e.iter().all(Value::is_string))
}

/// The `model_index.json` for the components in `dir`, or None when they make no pipeline.
/// `source` is the index of the folder the components came from: its classes and pipeline
/// settings are kept for the components present.
pub fn model_index(dir: &Path, source: Option<&Map<String, Value>>) -> Result<Option<Value>> {
    let source_class = source
        .and_then(|s| s.get("_class_name"))
        .and_then(Value::as_str);
    let pipeline = match source_class {
        Some(c) if c == STABLE_DIFFUSION.class => &STABLE_DIFFUSION,
        Some(c) if c == STABLE_DIFFUSION_XL.class => &STABLE_DIFFUSION_XL,
        Some(_) => return Ok(source.and_then(|s| unknown_pipeline_index(dir, s))),
        None if is_component(&dir.join("text_encoder_2")) => &STABLE_DIFFUSION_XL,
        None => &STABLE_DIFFUSION,
    };
    let mut index = Map::new();
    index.insert("_class_name".into(), pipeline.class.into());
    for &name in pipeline.required.iter().chain(pipeline.optional) {
        let from_source = source
            .and_then(|s| s.get(name))
            .filter(|e| is_listed(e))
            .cloned();
        let entry = if is_component(&dir.join(name)) {
            match from_source {
                Some(e) => Some(e),
                None => component_entry(dir, name)?,
            }
        } else {
            None
        };
        match entry {
            Some(e) => index.insert(name.into(), e),
            None if pipeline.required.contains(&name) => return Ok(None),
            None => index.insert(name.into(), json!([null, null])),
        };
    }
    // The pipeline's own settings (e.g. SDXL's force_zeros_for_empty_prompt) as the source had them.
    if let Some(source) = source {
        for (key, value) in source {
            if !key.starts_with('_') && !index.contains_key(key) && !value.is_array() {
                index.insert(key.clone(), value.clone());
            }
        }
    }
    if pipeline.class == STABLE_DIFFUSION.class && !is_listed(&index["safety_checker"]) {
        // Without a safety checker diffusers warns unless the pipeline says it needs none.
        index.insert("requires_safety_checker".into(), false.into());
    }
    Ok(Some(Value::Object(index)))
}

/// A pipeline lpo does not know: its source index, kept when every component it lists is here.
fn unknown_pipeline_index(dir: &Path, source: &Map<String, Value>) -> Option<Value> {
    let complete = source
        .iter()
        .filter(|(_, entry)| is_listed(entry))
        .all(|(name, _)| is_component(&dir.join(name)));
    complete.then(|| Value::Object(source.clone()))
}

/// Write `dir/model_index.json` for the components in `dir`, or remove a stale one when they
/// make no pipeline. Returns the index written.
pub fn write_model_index(dir: &Path, source: Option<&Map<String, Value>>) -> Result<Option<Value>> {
    let path = dir.join(MODEL_INDEX);
    match model_index(dir, source)? {
        Some(index) => {
            atomic_write(&path, serde_json::to_string_pretty(&index)?.as_bytes())?;
            Ok(Some(index))
        }
        None => {
            if path.is_file() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
            Ok(None)
        }
    }
}

/// Copy the components of the model folder `src` into `dst` (each file atomically) and write
/// `dst/model_index.json` for them. Everything else in `src` (evaluation caches, metrics,
/// notes) stays behind. Returns the names of the components copied.
pub fn copy_model_folder(src: &Path, dst: &Path) -> Result<Vec<String>> {
    if !src.is_dir() {
        anyhow::bail!("copy: {} is not a folder", src.display());
    }
    let mut components = Vec::new();
    let entries = std::fs::read_dir(src)
        .with_context(|| format!("cannot read {}", src.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("cannot read {}", src.display()))?;
    for entry in entries {
        let from = entry.path();
        if !is_component(&from) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        copy_files(&from, &dst.join(&name))?;
        components.push(name);
    }
    if components.is_empty() {
        anyhow::bail!(
            "copy: {} holds no model components (subfolders with one of {})",
            src.display(),
            COMPONENT_FILES.join(", ")
        );
    }
    components.sort();
    let source = read_json(&src.join(MODEL_INDEX))?;
    write_model_index(dst, source.as_ref().and_then(Value::as_object))?;
    Ok(components)
}

/// The files of one component folder (and its subfolders), hidden temporaries left out.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let path = entry?.path();
        let Some(name) = path.file_name() else {
            continue;
        };
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            copy_files(&path, &to.join(name))?;
        } else if path.is_file() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            atomic_write(&to.join(name), &bytes)?;
        }
    }
    Ok(())
}
