//! A tiny text-to-image model for the shapes world, in the diffusers folder layout, with seeded
//! random weights: `unet/` (pixel space: 3 -> 3 channels at 16x16, no VAE), `text_encoder/`
//! (a small `CLIPTextModel`), `tokenizer/` (a word-level tokenizer over the shapes vocabulary,
//! built with the tokenizers crate) and `scheduler/` (SD1.5's DDIM settings). Everything loads
//! with the same loaders as Stable Diffusion checkpoints (`load_unet`, `load_text_encoder`,
//! `load_tokenizer`, `load_scheduler`), and each loads in diffusers / transformers with
//! `from_pretrained(dir, subfolder=...)`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::Lowercase;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::fsutil::atomic_write;
use crate::models::loading::WeightMode;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::shapes::{COLOURS, SHAPES};
use crate::tensor::SeededRng;

pub const BOS: &str = "<bos>";
pub const EOS: &str = "<eos>";
pub const PAD: &str = "<pad>";
pub const UNK: &str = "<unk>";
/// Token ids of the special tokens (eos is not 2, so pooling finds the first eos, not argmax).
pub const BOS_ID: u32 = 0;
pub const EOS_ID: u32 = 1;
pub const PAD_ID: u32 = 2;
pub const UNK_ID: u32 = 3;

/// Sizes of the generated model.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ShapesModelSpec {
    /// Seed of the random weights.
    #[serde(with = "crate::tensor::rng::int_seed")]
    #[schemars(with = "i64")]
    pub seed: u64,
    /// Tokens per prompt, bos and eos included ("a red triangle" takes 5); fixed by the
    /// vocabulary, not an option.
    #[serde(skip)]
    pub max_length: usize,
    /// Width of the text encoder.
    pub text_hidden: usize,
    /// Transformer layers of the text encoder.
    pub text_layers: usize,
    /// Attention heads of the text encoder.
    pub text_heads: usize,
    /// UNet channels per resolution (at least 2 entries, each > 0).
    pub block_out_channels: Vec<usize>,
    /// Resnet layers per UNet block.
    pub layers_per_block: usize,
}

impl Default for ShapesModelSpec {
    fn default() -> Self {
        Self {
            seed: 0,
            max_length: 8,
            text_hidden: 64,
            text_layers: 2,
            text_heads: 4,
            block_out_channels: vec![32, 64, 64],
            layers_per_block: 1,
        }
    }
}

/// The shapes vocabulary: special tokens, "a", the colours and the shapes.
pub fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = [BOS, EOS, PAD, UNK].iter().map(|s| s.to_string()).collect();
    v.push("a".into());
    v.extend(COLOURS.iter().map(|(c, _)| c.to_string()));
    v.extend(SHAPES.iter().map(|s| s.to_string()));
    v
}

/// The UNet config of the shapes model.
pub fn unet_config(spec: &ShapesModelSpec) -> Result<UNetConfig> {
    let n = spec.block_out_channels.len();
    if n < 2 {
        anyhow::bail!("block_out_channels needs at least 2 entries");
    }
    if spec.block_out_channels.contains(&0) {
        anyhow::bail!("block_out_channels must be positive ints");
    }
    // Cross-attention below the full resolution only: attention over 256 pixels is most of
    // the CPU cost and the conditioning (one shape, one colour) is global.
    let mut down = vec!["DownBlock2D"];
    down.extend(vec!["CrossAttnDownBlock2D"; n - 1]);
    let mut up = vec!["CrossAttnUpBlock2D"; n - 1];
    up.push("UpBlock2D");
    let value = json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": 3,
        "out_channels": 3,
        "sample_size": crate::shapes::IMAGE_SIZE,
        "block_out_channels": spec.block_out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": spec.layers_per_block,
        "attention_head_dim": 8,
        "cross_attention_dim": spec.text_hidden,
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "downsample_padding": 1,
        "use_linear_projection": false,
        "upcast_attention": false
    });
    let cfg: UNetConfig = serde_json::from_value(value).context("shapes UNet config")?;
    cfg.validate()?;
    Ok(cfg)
}

/// The word-level tokenizer: lowercase, whitespace split, `<bos> ... <eos>`, truncation and
/// padding to `max_length`.
pub fn build_tokenizer(max_length: usize) -> Result<Tokenizer> {
    let vocab: HashMap<String, u32> = vocabulary()
        .into_iter()
        .enumerate()
        .map(|(i, w)| (w, i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token(UNK.into())
        .build()
        .map_err(|e| anyhow!("word-level model: {e}"))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(Lowercase));
    tok.with_pre_tokenizer(Some(WhitespaceSplit));
    let post = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A {EOS}"))
        .map_err(|e| anyhow!("post-processor: {e}"))?
        .special_tokens(vec![(BOS, BOS_ID), (EOS, EOS_ID)])
        .build()
        .map_err(|e| anyhow!("post-processor: {e}"))?;
    tok.with_post_processor(Some(post));
    tok.with_truncation(Some(TruncationParams {
        direction: TruncationDirection::Right,
        max_length,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    }))
    .map_err(|e| anyhow!("truncation: {e}"))?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(max_length),
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id: PAD_ID,
        pad_type_id: 0,
        pad_token: PAD.into(),
    }));
    let specials: Vec<AddedToken> = [BOS, EOS, PAD, UNK]
        .iter()
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}

/// Write `dir/tokenizer.json` and `dir/tokenizer_config.json`.
pub fn write_tokenizer(dir: &Path, max_length: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tok = build_tokenizer(max_length)?;
    let text = tok
        .to_string(true)
        .map_err(|e| anyhow!("cannot serialize the tokenizer: {e}"))?;
    atomic_write(&dir.join("tokenizer.json"), text.as_bytes())?;
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": false
    });
    atomic_write(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// Seeded random weights of a `CLIPTextModel` (`text_model.` keys): embeddings N(0, 1), linear
/// weights N(0, 1/fan_in), layer-norm scales 1, biases 0.
fn text_encoder_weights(
    spec: &ShapesModelSpec,
    rng: &mut SeededRng,
) -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let h = spec.text_hidden;
    let inter = 2 * h;
    let mut m = HashMap::new();
    let mut put = |name: String, t: Tensor| {
        m.insert(format!("text_model.{name}"), t);
    };
    let vocab = vocabulary().len();
    put(
        "embeddings.token_embedding.weight".into(),
        rng.randn((vocab, h), &dev)?,
    );
    put(
        "embeddings.position_embedding.weight".into(),
        rng.randn((spec.max_length, h), &dev)?,
    );
    let mut linear =
        |put: &mut dyn FnMut(String, Tensor), name: String, o: usize, i: usize| -> Result<()> {
            put(
                format!("{name}.weight"),
                (rng.randn((o, i), &dev)? * (1.0 / (i as f64).sqrt()))?,
            );
            put(format!("{name}.bias"), Tensor::zeros(o, DType::F32, &dev)?);
            Ok(())
        };
    for l in 0..spec.text_layers {
        let p = format!("encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            linear(&mut put, format!("{p}.self_attn.{proj}"), h, h)?;
        }
        linear(&mut put, format!("{p}.mlp.fc1"), inter, h)?;
        linear(&mut put, format!("{p}.mlp.fc2"), h, inter)?;
        for ln in ["layer_norm1", "layer_norm2"] {
            put(
                format!("{p}.{ln}.weight"),
                Tensor::ones(h, DType::F32, &dev)?,
            );
            put(
                format!("{p}.{ln}.bias"),
                Tensor::zeros(h, DType::F32, &dev)?,
            );
        }
    }
    put(
        "final_layer_norm.weight".into(),
        Tensor::ones(h, DType::F32, &dev)?,
    );
    put(
        "final_layer_norm.bias".into(),
        Tensor::zeros(h, DType::F32, &dev)?,
    );
    Ok(m)
}

/// Write `dir/config.json` and `dir/model.safetensors` of the text encoder.
pub fn write_text_encoder(dir: &Path, spec: &ShapesModelSpec, rng: &mut SeededRng) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocabulary().len(),
        "hidden_size": spec.text_hidden,
        "intermediate_size": 2 * spec.text_hidden,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "max_position_embeddings": spec.max_length,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "projection_dim": spec.text_hidden,
        "torch_dtype": "float32"
    });
    atomic_write(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let weights = text_encoder_weights(spec, rng)?;
    crate::tensor::io::save_safetensors(&weights, &dir.join("model.safetensors"))
}

/// SD1.5's DDIM scheduler config.
pub fn scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "clip_sample_range": 1.0,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "thresholding": false,
        "timestep_spacing": "leading",
        "trained_betas": null
    })
}

/// Write the whole model folder; returns the UNet's parameter count. It has no VAE, so no
/// `model_index.json`: diffusers has no pipeline for it (see `models::model_folder`).
pub fn make_shapes_model(out: &Path, spec: &ShapesModelSpec) -> Result<usize> {
    let cfg = unet_config(spec)?;
    let unet =
        UNet2DConditionModel::random(cfg, spec.seed, DType::F32, &Device::Cpu, WeightMode::Frozen)?;
    unet.save(&out.join("unet"), DType::F32)?;
    let mut rng = SeededRng::new(spec.seed.wrapping_add(1));
    write_text_encoder(&out.join("text_encoder"), spec, &mut rng)?;
    write_tokenizer(&out.join("tokenizer"), spec.max_length)?;
    let sched = out.join("scheduler");
    std::fs::create_dir_all(&sched)?;
    atomic_write(
        &sched.join("scheduler_config.json"),
        serde_json::to_string_pretty(&scheduler_config())?.as_bytes(),
    )?;
    Ok(unet.param_count())
}
