//! open_clip CLIP checkpoints (HPSv2's ViT-H/14) as converted by
//! `scripts/convert_scorer_weights.py open_clip`: `open_clip_config.json` (open_clip's model
//! config: `embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`) and
//! `open_clip_model.safetensors` (open_clip's own key names). The tensors are renamed to the
//! transformers `CLIPModel` layout (fused `in_proj` split into q/k/v, `proj` matrices transposed)
//! and built as a [`ClipModel`]: the two architectures compute the same function (pre-LN blocks,
//! class-token pooling after `ln_post`, argmax (end-of-text) pooling after `ln_final`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::clip::{ClipConfig, ClipModel};
use super::clip_text::ClipTextConfig;
use super::clip_vision::ClipVisionConfig;
use super::config::read_config;
use super::loading::Weights;

pub const CONFIG_FILE: &str = "open_clip_config.json";
pub const WEIGHTS_STEM: &str = "open_clip_model";

fn d_head_width() -> usize {
    64
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_context() -> usize {
    77
}
fn d_vocab() -> usize {
    49408
}

#[derive(Debug, Clone, Deserialize)]
struct VisionCfg {
    layers: Value,
    width: usize,
    #[serde(default = "d_head_width")]
    head_width: usize,
    #[serde(default = "d_mlp_ratio")]
    mlp_ratio: f64,
    patch_size: usize,
    image_size: Value,
    #[serde(flatten)]
    rest: HashMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct TextCfg {
    #[serde(default = "d_context")]
    context_length: usize,
    #[serde(default = "d_vocab")]
    vocab_size: usize,
    width: usize,
    heads: usize,
    layers: usize,
    #[serde(default = "d_mlp_ratio")]
    mlp_ratio: f64,
    #[serde(flatten)]
    rest: HashMap<String, Value>,
}

/// `open_clip_config.json` (open_clip's `model_configs/<name>.json`).
#[derive(Debug, Clone, Deserialize)]
struct OpenClipConfig {
    embed_dim: usize,
    vision_cfg: VisionCfg,
    text_cfg: TextCfg,
    #[serde(default)]
    quick_gelu: bool,
}

/// Options that change the architecture away from the plain ViT + text transformer: refused.
fn check_plain(rest: &HashMap<String, Value>, tower: &str, pool: &str, path: &Path) -> Result<()> {
    let truthy = |v: &Value| !(v.is_null() || *v == Value::Bool(false));
    for key in [
        "timm_model_name",
        "hf_model_name",
        "ls_init_value",
        "attentional_pool",
        "global_average_pool",
        "no_ln_pre",
        "final_ln_after_pool",
        "embed_cls",
        "no_causal_mask",
        "proj_bias",
        "qk_norm",
        "scaled_cosine_attn",
        "scale_heads",
        "scale_attn_inner",
        "scale_attn",
        "scale_fc",
        "input_patchnorm",
    ] {
        if let Some(v) = rest.get(key) {
            if truthy(v) {
                bail!(
                    "{}: {tower}.{key} = {v} is not supported (only the plain ViT / text \
                     transformer of CLIP ViT-B/L/H/g)",
                    path.display()
                );
            }
        }
    }
    for (key, ok) in [("pool_type", pool), ("proj_type", "linear")] {
        if let Some(v) = rest.get(key).and_then(|v| v.as_str()) {
            if v != ok {
                bail!(
                    "{}: {tower}.{key} = \"{v}\" is not supported (expected \"{ok}\")",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

impl OpenClipConfig {
    fn to_clip_config(&self, path: &Path) -> Result<ClipConfig> {
        check_plain(&self.vision_cfg.rest, "vision_cfg", "tok", path)?;
        check_plain(&self.text_cfg.rest, "text_cfg", "argmax", path)?;
        let v = &self.vision_cfg;
        let layers = v.layers.as_u64().with_context(|| {
            format!(
                "{}: vision_cfg.layers must be an int (ResNet towers are not supported), got {}",
                path.display(),
                v.layers
            )
        })? as usize;
        let image_size = v.image_size.as_u64().with_context(|| {
            format!(
                "{}: vision_cfg.image_size must be one int (square), got {}",
                path.display(),
                v.image_size
            )
        })? as usize;
        if v.head_width == 0 || !v.width.is_multiple_of(v.head_width) {
            bail!(
                "{}: vision_cfg.width {} is not a multiple of head_width {}",
                path.display(),
                v.width,
                v.head_width
            );
        }
        let act = if self.quick_gelu {
            "quick_gelu"
        } else {
            "gelu"
        };
        let vision = ClipVisionConfig {
            hidden_size: v.width,
            intermediate_size: (v.width as f64 * v.mlp_ratio) as usize,
            num_hidden_layers: layers,
            num_attention_heads: v.width / v.head_width,
            num_channels: 3,
            image_size,
            patch_size: v.patch_size,
            hidden_act: act.into(),
            layer_norm_eps: 1e-5,
        };
        vision
            .validate()
            .with_context(|| format!("open_clip config {}", path.display()))?;
        let t = &self.text_cfg;
        let text = ClipTextConfig {
            vocab_size: t.vocab_size,
            hidden_size: t.width,
            intermediate_size: (t.width as f64 * t.mlp_ratio) as usize,
            num_hidden_layers: t.layers,
            num_attention_heads: t.heads,
            max_position_embeddings: t.context_length,
            hidden_act: act.into(),
            layer_norm_eps: 1e-5,
            // open_clip pools at argmax(ids) (the end-of-text token has the largest id).
            eos_token_id: 2,
            projection_dim: Some(self.embed_dim),
            architectures: None,
        };
        Ok(ClipConfig {
            text,
            vision,
            projection_dim: self.embed_dim,
        })
    }
}

/// The transformers name(s) of an open_clip tensor; the fused attention input projection
/// becomes three tensors, `proj` matrices are transposed. `None`: a buffer to drop.
fn rename(key: &str, t: Tensor, out: &mut HashMap<String, Tensor>) -> Result<bool> {
    let block =
        |rest: &str, prefix: &str, out: &mut HashMap<String, Tensor>, t: Tensor| -> Result<bool> {
            // rest = "{i}.{name}"
            let (i, name) = rest.split_once('.').unwrap_or((rest, ""));
            let base = format!("{prefix}.encoder.layers.{i}");
            let simple = |n: &str| -> Option<&'static str> {
                Some(match n {
                    "ln_1.weight" => "layer_norm1.weight",
                    "ln_1.bias" => "layer_norm1.bias",
                    "ln_2.weight" => "layer_norm2.weight",
                    "ln_2.bias" => "layer_norm2.bias",
                    "attn.out_proj.weight" => "self_attn.out_proj.weight",
                    "attn.out_proj.bias" => "self_attn.out_proj.bias",
                    "mlp.c_fc.weight" => "mlp.fc1.weight",
                    "mlp.c_fc.bias" => "mlp.fc1.bias",
                    "mlp.c_proj.weight" => "mlp.fc2.weight",
                    "mlp.c_proj.bias" => "mlp.fc2.bias",
                    _ => return None,
                })
            };
            if let Some(n) = simple(name) {
                out.insert(format!("{base}.{n}"), t);
                return Ok(true);
            }
            let suffix = match name {
                "attn.in_proj_weight" => "weight",
                "attn.in_proj_bias" => "bias",
                _ => return Ok(false),
            };
            let n = t.dim(0)?;
            if n % 3 != 0 {
                bail!("`{key}` has {n} rows, not a multiple of 3 (fused q, k, v)");
            }
            for (j, which) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.insert(
                    format!("{base}.self_attn.{which}.{suffix}"),
                    t.narrow(0, j * n / 3, n / 3)?.contiguous()?,
                );
            }
            Ok(true)
        };
    let direct = |name: &str| -> Option<&'static str> {
        Some(match name {
            "visual.conv1.weight" => "vision_model.embeddings.patch_embedding.weight",
            "visual.class_embedding" => "vision_model.embeddings.class_embedding",
            "visual.positional_embedding" => "vision_model.embeddings.position_embedding.weight",
            "visual.ln_pre.weight" => "vision_model.pre_layrnorm.weight",
            "visual.ln_pre.bias" => "vision_model.pre_layrnorm.bias",
            "visual.ln_post.weight" => "vision_model.post_layernorm.weight",
            "visual.ln_post.bias" => "vision_model.post_layernorm.bias",
            "token_embedding.weight" => "text_model.embeddings.token_embedding.weight",
            "positional_embedding" => "text_model.embeddings.position_embedding.weight",
            "ln_final.weight" => "text_model.final_layer_norm.weight",
            "ln_final.bias" => "text_model.final_layer_norm.bias",
            "logit_scale" => "logit_scale",
            _ => return None,
        })
    };
    if let Some(n) = direct(key) {
        out.insert(n.to_string(), t);
        return Ok(true);
    }
    match key {
        "visual.proj" => {
            out.insert("visual_projection.weight".into(), t.t()?.contiguous()?);
            return Ok(true);
        }
        "text_projection" => {
            out.insert("text_projection.weight".into(), t.t()?.contiguous()?);
            return Ok(true);
        }
        _ => {}
    }
    if let Some(rest) = key.strip_prefix("visual.transformer.resblocks.") {
        return block(rest, "vision_model", out, t);
    }
    if let Some(rest) = key.strip_prefix("transformer.resblocks.") {
        return block(rest, "text_model", out, t);
    }
    Ok(false)
}

/// Load `dir/open_clip_config.json` + `dir/open_clip_model.safetensors` as a [`ClipModel`].
pub fn load_open_clip(dir: &Path, dtype: DType, device: &Device) -> Result<ClipModel> {
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.is_file() {
        bail!(
            "{}: no {CONFIG_FILE}; convert the open_clip checkpoint once with \
             `python scripts/convert_scorer_weights.py open_clip --checkpoint <file.pt> --model ViT-H-14 --out {}`",
            dir.display(),
            dir.display()
        );
    }
    let oc: OpenClipConfig = read_config(dir, CONFIG_FILE)?;
    let cfg = oc.to_clip_config(&cfg_path)?;
    let weights = Weights::load(dir, WEIGHTS_STEM, dtype, device)?;
    let source = weights.describe();
    let mut renamed = HashMap::new();
    let mut unknown = Vec::new();
    for (k, t) in weights.tensors {
        if k == "attn_mask" || k.ends_with(".attn_mask") || k == "logit_bias" {
            continue;
        }
        if !rename(&k, t, &mut renamed).with_context(|| source.clone())? {
            unknown.push(k);
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        bail!(
            "{source}: tensors this open_clip architecture does not have: {} (a different \
             open_clip model than {CONFIG_FILE} describes?)",
            unknown.join(", ")
        );
    }
    ClipModel::from_weights(
        cfg,
        Weights {
            files: weights.files,
            tensors: renamed,
            dtype: weights.dtype,
            device: weights.device,
        },
    )
    .with_context(|| format!("loading open_clip model from {}", dir.display()))
}
