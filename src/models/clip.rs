//! The dual-encoder CLIP (`CLIPModel`): image tower ([`super::clip_vision`]), text tower
//! ([`super::clip_text`]), both projections and `logit_scale`. Loaded from a transformers folder
//! (`config.json` with `text_config` / `vision_config` / `projection_dim`, and
//! `model.safetensors`, sharded or fp16 variants included) or from an open_clip checkpoint
//! converted by `scripts/convert_scorer_weights.py` ([`super::open_clip`]). Frozen, inference only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;
use serde_json::Value;

use super::checked_vb::ParamSource;
use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::clip_vision::{ClipVisionConfig, ClipVisionModel};
use super::loading::{WeightMode, Weights};

fn d_projection() -> usize {
    512
}

/// The top level of a transformers `CLIPConfig`.
#[derive(Debug, Clone, Deserialize)]
struct RawClipConfig {
    #[serde(default)]
    text_config: Option<Value>,
    #[serde(default)]
    vision_config: Option<Value>,
    #[serde(default = "d_projection")]
    projection_dim: usize,
}

/// Both towers' configs and the shared embedding size.
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
}

impl ClipConfig {
    /// Parse a transformers `CLIPConfig` JSON (`path` only names the file in errors). Fields that
    /// `save_pretrained` leaves out take transformers' defaults; the text tower's projection
    /// size is the top-level `projection_dim`.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawClipConfig = serde_json::from_str(text)
            .with_context(|| format!("invalid CLIP config {}", path.display()))?;
        let (Some(t), Some(v)) = (raw.text_config, raw.vision_config) else {
            bail!(
                "{}: not a CLIPModel config (needs `text_config` and `vision_config`; a \
                 CLIPTextModel or CLIPVisionModel folder alone cannot score)",
                path.display()
            );
        };
        let mut t = t;
        if let Value::Object(m) = &mut t {
            for (k, d) in [
                ("vocab_size", 49408),
                ("hidden_size", 512),
                ("intermediate_size", 2048),
                ("num_hidden_layers", 12),
                ("num_attention_heads", 8),
            ] {
                m.entry(k).or_insert(Value::from(d));
            }
            m.insert("projection_dim".into(), Value::from(raw.projection_dim));
            m.remove("architectures");
        }
        let text: ClipTextConfig = serde_json::from_value(t)
            .with_context(|| format!("{}: invalid `text_config`", path.display()))?;
        let vision: ClipVisionConfig = serde_json::from_value(v)
            .with_context(|| format!("{}: invalid `vision_config`", path.display()))?;
        vision
            .validate()
            .with_context(|| format!("CLIP config {}", path.display()))?;
        Ok(Self {
            text,
            vision,
            projection_dim: raw.projection_dim,
        })
    }
}

/// `CLIPModel` for scoring: unit-free embeddings of images and prompts and the logit scale.
pub struct ClipModel {
    cfg: ClipConfig,
    vision: ClipVisionModel,
    text: ClipTextModel,
    /// The raw parameter (scores use `exp(logit_scale)`).
    logit_scale: f64,
    vision_params: usize,
    files: Vec<PathBuf>,
    device: Device,
}

impl ClipModel {
    /// A transformers folder: `dir/config.json` + `dir/model.safetensors` (or its fp16 / sharded
    /// variants). `pytorch_model.bin` alone is refused with a hint.
    pub fn load_hf(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("cannot read CLIP config {}", cfg_path.display()))?;
        let cfg = ClipConfig::from_hf_json(&text, &cfg_path)?;
        if !dir.join("model.safetensors").is_file()
            && !dir.join("model.fp16.safetensors").is_file()
            && !dir.join("model.safetensors.index.json").is_file()
            && dir.join("pytorch_model.bin").is_file()
        {
            bail!(
                "{}: only pytorch_model.bin, which is not read (pickle); download the \
                 model.safetensors of the same repository, or convert it once with \
                 `python -c \"import torch, safetensors.torch as s; s.save_file({{k: v.contiguous() for k, v in torch.load('pytorch_model.bin', weights_only=True).items()}}, 'model.safetensors')\"`",
                dir.display()
            );
        }
        let weights = Weights::load(dir, "model", dtype, device)?;
        Self::from_weights(cfg, weights)
            .with_context(|| format!("loading CLIP model from {}", dir.display()))
    }

    /// Build from transformers-named tensors (`vision_model.*`, `text_model.*`,
    /// `visual_projection.weight`, `text_projection.weight`, `logit_scale`).
    pub fn from_weights(cfg: ClipConfig, weights: Weights) -> Result<Self> {
        let Weights {
            files,
            tensors,
            dtype,
            device,
        } = weights;
        let (mut text_t, mut rest) = (HashMap::new(), HashMap::new());
        for (k, v) in tensors {
            if let Some(t) = k.strip_prefix("text_model.") {
                text_t.insert(t.to_string(), v);
            } else if k == "text_projection.weight" {
                text_t.insert(k, v);
            } else {
                rest.insert(k, v);
            }
        }
        let source = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if !text_t.contains_key("text_projection.weight") {
            bail!("{source}: missing tensor `text_projection.weight` (a CLIPModel has both projections)");
        }
        let logit_scale = match rest.get("logit_scale") {
            Some(t) => t
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?
                .first()
                .copied()
                .with_context(|| format!("{source}: `logit_scale` is empty"))?,
            None => bail!("{source}: missing tensor `logit_scale`"),
        };
        let text = ClipTextModel::from_weights(
            cfg.text.clone(),
            Weights {
                files: files.clone(),
                tensors: text_t,
                dtype,
                device: device.clone(),
            },
            WeightMode::Frozen,
        )?;
        let src = ParamSource::new(
            Weights {
                files: files.clone(),
                tensors: rest,
                dtype,
                device: device.clone(),
            },
            WeightMode::Frozen,
        )?;
        let vision =
            ClipVisionModel::new(src.var_builder(), cfg.vision.clone(), cfg.projection_dim)?;
        let vision_params = src.finish().param_count();
        Ok(Self {
            cfg,
            vision,
            text,
            logit_scale,
            vision_params,
            files,
            device,
        })
    }

    /// Random weights (N(0, 0.02), unit norm scales, zero biases) of the shape `cfg` describes,
    /// for benchmarks of the real architectures without their files.
    pub fn random(cfg: ClipConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut rng = crate::tensor::SeededRng::new(seed);
        let mut t: HashMap<String, Tensor> = HashMap::new();
        let mut normal = |shape: &[usize]| -> Result<Tensor> {
            Ok((rng.randn(shape.to_vec(), device)? * 0.02)?.to_dtype(dtype)?)
        };
        let ones = |n: usize| Tensor::ones(n, dtype, device);
        let zeros = |n: usize| Tensor::zeros(n, dtype, device);
        let blocks = |t: &mut HashMap<String, Tensor>,
                      normal: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
                      prefix: &str,
                      layers: usize,
                      h: usize,
                      inter: usize|
         -> Result<()> {
            for i in 0..layers {
                let b = format!("{prefix}.encoder.layers.{i}");
                for ln in ["layer_norm1", "layer_norm2"] {
                    t.insert(format!("{b}.{ln}.weight"), ones(h)?);
                    t.insert(format!("{b}.{ln}.bias"), zeros(h)?);
                }
                for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    t.insert(format!("{b}.self_attn.{p}.weight"), normal(&[h, h])?);
                    t.insert(format!("{b}.self_attn.{p}.bias"), zeros(h)?);
                }
                t.insert(format!("{b}.mlp.fc1.weight"), normal(&[inter, h])?);
                t.insert(format!("{b}.mlp.fc1.bias"), zeros(inter)?);
                t.insert(format!("{b}.mlp.fc2.weight"), normal(&[h, inter])?);
                t.insert(format!("{b}.mlp.fc2.bias"), zeros(h)?);
            }
            Ok(())
        };
        let (v, x, p) = (&cfg.vision, &cfg.text, cfg.projection_dim);
        let vh = v.hidden_size;
        t.insert(
            "vision_model.embeddings.patch_embedding.weight".into(),
            normal(&[vh, 3, v.patch_size, v.patch_size])?,
        );
        t.insert(
            "vision_model.embeddings.class_embedding".into(),
            normal(&[vh])?,
        );
        t.insert(
            "vision_model.embeddings.position_embedding.weight".into(),
            normal(&[v.grid() * v.grid() + 1, vh])?,
        );
        for ln in ["pre_layrnorm", "post_layernorm"] {
            t.insert(format!("vision_model.{ln}.weight"), ones(vh)?);
            t.insert(format!("vision_model.{ln}.bias"), zeros(vh)?);
        }
        blocks(
            &mut t,
            &mut normal,
            "vision_model",
            v.num_hidden_layers,
            vh,
            v.intermediate_size,
        )?;
        t.insert("visual_projection.weight".into(), normal(&[p, vh])?);
        let th = x.hidden_size;
        t.insert(
            "text_model.embeddings.token_embedding.weight".into(),
            normal(&[x.vocab_size, th])?,
        );
        t.insert(
            "text_model.embeddings.position_embedding.weight".into(),
            normal(&[x.max_position_embeddings, th])?,
        );
        t.insert("text_model.final_layer_norm.weight".into(), ones(th)?);
        t.insert("text_model.final_layer_norm.bias".into(), zeros(th)?);
        blocks(
            &mut t,
            &mut normal,
            "text_model",
            x.num_hidden_layers,
            th,
            x.intermediate_size,
        )?;
        t.insert("text_projection.weight".into(), normal(&[p, th])?);
        t.insert(
            "logit_scale".into(),
            Tensor::new(4.6052f32, device)?.to_dtype(dtype)?,
        );
        Self::from_weights(
            cfg,
            Weights {
                files: vec![PathBuf::from(format!("<random seed {seed}>"))],
                tensors: t,
                dtype,
                device: device.clone(),
            },
        )
    }

    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Side of the square input image.
    pub fn image_size(&self) -> usize {
        self.cfg.vision.image_size
    }

    /// The raw `logit_scale` parameter (CLIP logits use its exp).
    pub fn logit_scale(&self) -> f64 {
        self.logit_scale
    }

    pub fn text_model(&self) -> &ClipTextModel {
        &self.text
    }

    /// Projected image embeddings [B, P] (not normalised) of normalised pixels [B, 3, S, S].
    pub fn image_embeds(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision.forward(pixels)?.1)
    }

    /// Projected text embeddings [B, P] (not normalised) of token ids [B, L].
    pub fn text_embeds(&self, ids: &Tensor) -> Result<Tensor> {
        self.text
            .encode(ids)?
            .text_embeds
            .context("CLIP text tower has no projection")
    }

    /// Number of scalar parameters (both towers, projections, logit scale).
    pub fn param_count(&self) -> usize {
        self.vision_params + self.text.param_count() + 1
    }
}

/// Rows of `x` [B, P] scaled to unit L2 norm (a zero row stays zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let norm = norm.maximum(1e-30)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Row-wise cosine similarity of [B, P] and [B, P] -> [B].
pub fn paired_cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        bail!(
            "paired cosine: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        );
    }
    Ok((l2_normalize(a)? * l2_normalize(b)?)?.sum(D::Minus1)?)
}
