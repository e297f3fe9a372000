//! Tokenizers and CLIP text encoders in scripts:
//! `let tok = load_tokenizer(dir); let ids = tok.encode(["a cat"]);`
//! `let te = load_text_encoder(dir); let out = te.encode(ids); out.hidden`.

use std::sync::Arc;

use rhai::plugin::*;

use crate::models::clip_text::ClipTextModel;
use crate::models::tokenizer::ClipTokenizer;

/// Script value of `load_tokenizer`.
pub type Tokenizer = Arc<ClipTokenizer>;
/// Script value of `load_text_encoder`.
pub type TextEncoder = Arc<ClipTextModel>;

pub(crate) mod helpers {
    use candle_core::{DType, Device};
    use rhai::{Array, Dynamic, Map};

    use crate::models::loading::{LoadOptions, WeightMode};

    /// One string or an array of strings.
    pub(super) fn prompt_list(value: &Dynamic) -> Result<Vec<String>, String> {
        if let Ok(s) = value.clone().into_string() {
            return Ok(vec![s]);
        }
        if value.is_array() {
            let arr = value.read_lock::<Array>().expect("checked is_array");
            return arr
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.clone()
                        .into_string()
                        .map_err(|t| format!("encode: prompt {i} is a {t}, not a string"))
                })
                .collect();
        }
        Err(format!(
            "encode: expected a string or an array of strings, got {}",
            value.type_name()
        ))
    }

    /// `#{dtype, trainable, device}` of a model loader ([`LoadOptions`]): the dtype, the
    /// device (`default_device` when unset) and the weight mode.
    pub(crate) fn load_options(
        map: &Map,
        func: &str,
        default_device: &Device,
    ) -> Result<(DType, Device, WeightMode), String> {
        let options: LoadOptions = crate::script::declared::from_map(map, func)?;
        options
            .resolve(default_device)
            .map_err(|e| format!("{func}: {e:#}"))
    }
}

/// The options each function here declares (for `lpo fns` and docs/API.md).
pub fn declared_options() -> Vec<(&'static str, Vec<crate::script::declared::OptionDoc>)> {
    use crate::script::declared::option_docs;
    vec![(
        "load_text_encoder",
        option_docs::<crate::models::loading::LoadOptions>(),
    )]
}

#[export_module]
pub mod text_api {
    use std::sync::Arc;

    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use super::helpers::{load_options, prompt_list};
    use super::{TextEncoder, Tokenizer};
    use crate::models::clip_text::ClipTextModel;
    use crate::models::tokenizer::{ClipTokenizer, TokenizerSource};
    use crate::script::convert::tensor_from_dynamic;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    // ---- tokenizer ----

    /// A CLIP tokenizer from a diffusers `tokenizer/` folder (`tokenizer.json`, or `vocab.json`
    /// + `merges.txt`), padding and truncating to its `model_max_length` (77).
    #[rhai_fn(return_raw, volatile)]
    pub fn load_tokenizer(ctx: NativeCallContext, dir: &str) -> ScriptResult<Tokenizer> {
        ClipTokenizer::load(&Host::of(&ctx).readable(dir).or_script(&ctx)?)
            .map(Arc::new)
            .or_script(&ctx)
    }

    /// Token ids [B, 77] (i64) of a string or an array of strings: bos, tokens, eos, padding.
    #[rhai_fn(name = "encode", return_raw)]
    pub fn tokenizer_encode(
        ctx: NativeCallContext,
        tok: &mut Tokenizer,
        prompts: Dynamic,
    ) -> ScriptResult<Tensor> {
        let list = prompt_list(&prompts).or_script(&ctx)?;
        let refs: Vec<&str> = list.iter().map(String::as_str).collect();
        tok.encode_on(&refs, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// The text of one row of ids (a 1-D tensor or an array of ints), special tokens skipped.
    #[rhai_fn(name = "decode", return_raw)]
    pub fn tokenizer_decode(
        ctx: NativeCallContext,
        tok: &mut Tokenizer,
        ids: Dynamic,
    ) -> ScriptResult<String> {
        let t = tensor_from_dynamic(&ids, &candle_core::Device::Cpu).or_script(&ctx)?;
        let v: Vec<u32> = t
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .or_script(&ctx)?
            .into_iter()
            .map(|x| x as u32)
            .collect();
        tok.decode(&v).or_script(&ctx)
    }

    /// Number of tokens of a prompt, bos and eos included, after truncation (before padding).
    #[rhai_fn(return_raw)]
    pub fn token_count(
        ctx: NativeCallContext,
        tok: &mut Tokenizer,
        prompt: &str,
    ) -> ScriptResult<i64> {
        tok.token_count(prompt).map(|n| n as i64).or_script(&ctx)
    }

    /// Id of the padding token (49407 `<|endoftext|>` for SD1.5, 0 `!` for SD2.1 / SDXL's second).
    #[rhai_fn(get = "pad_id", pure)]
    pub fn pad_id(tok: &mut Tokenizer) -> i64 {
        tok.pad_id() as i64
    }

    /// Id of `<|startoftext|>`.
    #[rhai_fn(get = "bos_id", pure)]
    pub fn bos_id(tok: &mut Tokenizer) -> i64 {
        tok.bos_id() as i64
    }

    /// Id of `<|endoftext|>`.
    #[rhai_fn(get = "eos_id", pure)]
    pub fn eos_id(tok: &mut Tokenizer) -> i64 {
        tok.eos_id() as i64
    }

    /// Padded length of every encoded row (`model_max_length`, 77 for CLIP).
    #[rhai_fn(get = "max_length", pure)]
    pub fn max_length(tok: &mut Tokenizer) -> i64 {
        tok.max_length() as i64
    }

    /// Vocabulary size including added tokens.
    #[rhai_fn(get = "vocab_size", pure)]
    pub fn vocab_size(tok: &mut Tokenizer) -> i64 {
        tok.vocab_size() as i64
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn tokenizer_to_string(tok: &mut Tokenizer) -> String {
        let src = match tok.source() {
            TokenizerSource::TokenizerJson(_) => "tokenizer.json",
            TokenizerSource::VocabMerges { .. } => "vocab.json+merges.txt",
        };
        format!(
            "Tokenizer({}, {src}, max_length={}, pad_id={})",
            tok.dir().display(),
            tok.max_length(),
            tok.pad_id()
        )
    }

    // ---- text encoder ----

    /// A CLIP text encoder (`CLIPTextModel` / `CLIPTextModelWithProjection`) from a diffusers
    /// `text_encoder/` folder, frozen, in f32 on the run's device.
    #[rhai_fn(return_raw, volatile)]
    pub fn load_text_encoder(ctx: NativeCallContext, dir: &str) -> ScriptResult<TextEncoder> {
        load_text_encoder_with(ctx, dir, Map::new())
    }

    /// `load_text_encoder(dir)` with options `dtype`, `trainable` (every weight an optimizer
    /// parameter), `device`.
    #[rhai_fn(name = "load_text_encoder", return_raw, volatile)]
    pub fn load_text_encoder_with(
        ctx: NativeCallContext,
        dir: &str,
        options: Map,
    ) -> ScriptResult<TextEncoder> {
        let host = Host::of(&ctx);
        let (dtype, device, mode) =
            load_options(&options, "load_text_encoder", &host.device).or_script(&ctx)?;
        ClipTextModel::load(&host.readable(dir).or_script(&ctx)?, dtype, &device, mode)
            .map(Arc::new)
            .or_script(&ctx)
    }

    /// Encode ids [B, L] (from `tok.encode`): map `#{hidden, penultimate, pooled}` plus
    /// `text_embeds` for a projection model. hidden: after the final layer norm; penultimate:
    /// the second-to-last layer's output (SDXL's conditioning); pooled: the eos position.
    #[rhai_fn(name = "encode", return_raw)]
    pub fn text_encode(
        ctx: NativeCallContext,
        te: &mut TextEncoder,
        ids: Dynamic,
    ) -> ScriptResult<Map> {
        let host = Host::of(&ctx);
        host.check().or_script(&ctx)?;
        let ids = tensor_from_dynamic(&ids, te.device()).or_script(&ctx)?;
        let out = te.encode(&ids).or_script(&ctx)?;
        let mut m = Map::new();
        m.insert("hidden".into(), Dynamic::from(out.hidden));
        m.insert("penultimate".into(), Dynamic::from(out.penultimate));
        m.insert("pooled".into(), Dynamic::from(out.pooled));
        if let Some(e) = out.text_embeds {
            m.insert("text_embeds".into(), Dynamic::from(e));
        }
        Ok(m)
    }

    /// Number of scalar parameters.
    #[rhai_fn(get = "param_count", pure)]
    pub fn te_param_count(te: &mut TextEncoder) -> i64 {
        te.param_count() as i64
    }

    /// Width of the hidden states.
    #[rhai_fn(get = "hidden_size", pure)]
    pub fn te_hidden_size(te: &mut TextEncoder) -> i64 {
        te.hidden_size() as i64
    }

    /// Whether the model has a text projection (`text_embeds`).
    #[rhai_fn(get = "has_projection", pure)]
    pub fn te_has_projection(te: &mut TextEncoder) -> bool {
        te.has_projection()
    }

    /// Whether the weights were loaded as trainable parameters.
    #[rhai_fn(get = "trainable", pure)]
    pub fn te_trainable(te: &mut TextEncoder) -> bool {
        te.is_trainable()
    }

    /// Names of the trainable tensors, sorted (empty when loaded frozen).
    #[rhai_fn(name = "trainable_names", pure)]
    pub fn te_trainable_names(te: &mut TextEncoder) -> Array {
        te.trainable_names()
            .into_iter()
            .map(Dynamic::from)
            .collect()
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn te_to_string(te: &mut TextEncoder) -> String {
        let c = te.config();
        format!(
            "TextEncoder(hidden={}, layers={}, heads={}, act={}, projection={}, dtype={}, params={})",
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.hidden_act,
            te.has_projection(),
            te.dtype().as_str(),
            te.param_count()
        )
    }
}
