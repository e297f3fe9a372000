//! The Latent Reward Model (LRM): a diffusion UNet's encoder (conv_in, down and mid blocks)
//! runs on a noisy latent x_t at timestep t with the prompt's hidden states; global average
//! pools of the last residual of each down stage and of the mid output (multi-scale), or the
//! mid output alone, are projected and scored against the projected text feature:
//! score = exp(logit_scale) · cos(image, text).
//!
//! Visual feature enhancement: with `guidance_scale` > 1 the UNet also runs on the empty
//! prompt and the pooled mid feature becomes u + g·(c − u) (stage features too with
//! `multi_scale_cfg`). The doubled batch is [text rows; uncond rows].
//!
//! SD1.5/2.1 style: one CLIP text encoder, pooled output → `text_projection`.
//! SDXL style: two encoders (penultimate states concatenated), the second encoder's projected
//! embedding is the text feature and also feeds the UNet's added embedding with `time_ids`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};

pub use super::lrm_options::LrmOptions;
use super::pair_loss::{pair_loss, PairLoss, PairLossOptions};
use super::projections::{Projections, INITIAL_LOGIT_SCALE};
use crate::models::clip_text::ClipTextModel;
use crate::models::sdxl_conditioning;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{AddedCond, UNet2DConditionModel};
use crate::tensor::SeededRng;

/// The text side of an LRM (one per model, so the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
pub enum TextSide {
    Sd {
        encoder: ClipTextModel,
        tokenizer: ClipTokenizer,
    },
    Sdxl(Box<SdxlText>),
}

/// SDXL's two text encoders and the added time ids.
pub struct SdxlText {
    pub encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    pub encoder_2: ClipTextModel,
    pub tokenizer_2: ClipTokenizer,
    /// [6]: original size, crop top-left, target size.
    pub time_ids: Tensor,
}

/// Token ids for one batch of prompts (SDXL: one tensor per tokenizer).
#[derive(Debug, Clone)]
pub enum PromptIds {
    Single(Tensor),
    Pair(Tensor, Tensor),
}

impl PromptIds {
    pub fn batch(&self) -> Result<usize> {
        Ok(match self {
            PromptIds::Single(t) | PromptIds::Pair(t, _) => t.dim(0)?,
        })
    }
}

/// What the UNet is conditioned on, and the text feature scored against.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// [B, L, H] encoder hidden states of the prompts.
    pub hidden: Tensor,
    /// [B, L, H] of the empty prompt, present when guidance is on.
    pub uncond_hidden: Option<Tensor>,
    /// [B, D] projected (unnormalised) text features.
    pub features: Tensor,
    /// SDXL: added conditioning of the prompts and of the empty prompt.
    pub added: Option<AddedCond>,
    pub uncond_added: Option<AddedCond>,
}

pub struct LatentRewardModel {
    pub unet: UNet2DConditionModel,
    pub text: TextSide,
    visual_projection: Tensor,
    text_projection: Option<Tensor>,
    logit_scale: Tensor,
    projection_vars: Vec<(String, Var)>,
    stage_indices: Vec<usize>,
    pub options: LrmOptions,
    pub dir: PathBuf,
}

/// Index in `UNetFeatures::down` of the last residual of each down stage before its
/// downsampler: stage s of L layers sits at s·(L+1) + L (SD1.5: 2, 5, 8, 11).
pub fn stage_indices(num_down_blocks: usize, layers_per_block: usize) -> Vec<usize> {
    (0..num_down_blocks)
        .map(|s| s * (layers_per_block + 1) + layers_per_block)
        .collect()
}

fn global_pool(x: &Tensor) -> candle_core::Result<Tensor> {
    x.mean(D::Minus1)?.mean(D::Minus1)
}

fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

fn repeat_rows(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if x.dim(0)? == n {
        return Ok(x.clone());
    }
    let mut reps = vec![1; x.rank()];
    reps[0] = n / x.dim(0)?;
    x.repeat(reps)
}

/// Image size (height, width) the SDXL added time ids describe: the VAE's sample_size, as
/// the official code derives it, else the UNet's sample size times 8.
fn sdxl_image_size(dir: &Path, unet: &UNet2DConditionModel) -> usize {
    let from_vae = std::fs::read_to_string(dir.join("vae/config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("sample_size").and_then(|s| s.as_u64()));
    if let Some(s) = from_vae {
        return s as usize;
    }
    sdxl_conditioning::default_image_size(&unet.config)
}

impl LatentRewardModel {
    /// Load an LRM folder: `unet/`, `text_encoder/`, `tokenizer/` (SDXL: also
    /// `text_encoder_2/`, `tokenizer_2/`, and `vae/` for the image size), and the projections
    /// (`projections.safetensors` or the official `state_dict.pt`).
    pub fn load(dir: &Path, options: LrmOptions, device: &Device) -> Result<Self> {
        let dtype = options.dtype;
        let (unet_mode, text_mode) = options.weight_modes();
        let unet = UNet2DConditionModel::load(&dir.join("unet"), dtype, device, unet_mode)
            .with_context(|| format!("LRM {}: UNet", dir.display()))?;
        let encoder = ClipTextModel::load(&dir.join("text_encoder"), dtype, device, text_mode)
            .with_context(|| format!("LRM {}: text encoder", dir.display()))?;
        let tokenizer = ClipTokenizer::load(&dir.join("tokenizer"))
            .with_context(|| format!("LRM {}: tokenizer", dir.display()))?;
        let text = if dir.join("text_encoder_2").is_dir() {
            let encoder_2 =
                ClipTextModel::load(&dir.join("text_encoder_2"), dtype, device, text_mode)
                    .with_context(|| format!("LRM {}: text encoder 2", dir.display()))?;
            if !encoder_2.has_projection() {
                bail!("LRM {}: text_encoder_2 has no text_projection (SDXL's second encoder is CLIPTextModelWithProjection)", dir.display());
            }
            let tokenizer_2 = ClipTokenizer::load(&dir.join("tokenizer_2"))
                .with_context(|| format!("LRM {}: tokenizer 2", dir.display()))?;
            let size = sdxl_image_size(dir, &unet);
            let time_ids = sdxl_conditioning::time_ids_tensor(
                sdxl_conditioning::default_time_ids(size, size),
                device,
            )?
            .to_dtype(dtype)?;
            TextSide::Sdxl(Box::new(SdxlText {
                encoder,
                tokenizer,
                encoder_2,
                tokenizer_2,
                time_ids,
            }))
        } else {
            TextSide::Sd { encoder, tokenizer }
        };
        let visual_key = if options.multi_scale || !dir.join("projections.safetensors").is_file() {
            "visual_projection.weight"
        } else {
            "visual_projection_single_scale.weight"
        };
        let visual_key = if visual_key == "visual_projection_single_scale.weight" {
            let has_single = crate::tensor::io::load_safetensors(
                &dir.join("projections.safetensors"),
                &Device::Cpu,
            )
            .map(|m| m.contains_key(visual_key))
            .unwrap_or(false);
            if has_single {
                visual_key
            } else {
                "visual_projection.weight"
            }
        } else {
            visual_key
        };
        let projections = Projections::load(dir, visual_key, dtype, device)?;
        Self::assemble(unet, text, projections, options, dir)
    }

    /// A fresh LRM from a base diffusion model folder (unet/, text_encoder/, tokenizer/):
    /// visual projection N(0, 0.02), text projection from `clip_projection` (a safetensors file
    /// holding `text_projection.weight`) when given, else N(0, 0.02); logit_scale
    /// `logit_scale` (None: CLIP's initial 2.6592).
    #[allow(clippy::too_many_arguments)]
    pub fn init_from_base(
        base: &Path,
        projection_dim: Option<usize>,
        clip_projection: Option<&Path>,
        seed: u64,
        logit_scale: Option<f64>,
        options: LrmOptions,
        device: &Device,
    ) -> Result<Self> {
        let dtype = options.dtype;
        let (unet_mode, text_mode) = options.weight_modes();
        let unet = UNet2DConditionModel::load(&base.join("unet"), dtype, device, unet_mode)?;
        let encoder = ClipTextModel::load(&base.join("text_encoder"), dtype, device, text_mode)?;
        let tokenizer = ClipTokenizer::load(&base.join("tokenizer"))?;
        if base.join("text_encoder_2").is_dir() {
            bail!("init_from_base: SDXL bases are not supported yet for a fresh LRM; load an LRM folder instead");
        }
        let hidden = encoder.hidden_size();
        let dim = projection_dim.unwrap_or(hidden);
        let feat = Self::feature_dim(&unet, options.multi_scale);
        let mut rng = SeededRng::new(seed);
        let visual = (rng.randn((dim, feat), device)? * 0.02)?.to_dtype(dtype)?;
        let text_proj = match clip_projection {
            Some(p) => {
                let m = crate::tensor::io::load_safetensors(p, device)?;
                let t = m
                    .get("text_projection.weight")
                    .with_context(|| format!("{}: no `text_projection.weight`", p.display()))?
                    .to_dtype(dtype)?;
                if t.dims() != [dim, hidden] {
                    bail!(
                        "{}: text_projection.weight is {:?}, expected [{dim}, {hidden}]",
                        p.display(),
                        t.dims()
                    );
                }
                t
            }
            None => (rng.randn((dim, hidden), device)? * 0.02)?.to_dtype(dtype)?,
        };
        let projections = Projections {
            visual,
            text: Some(text_proj),
            logit_scale: Tensor::new(logit_scale.unwrap_or(INITIAL_LOGIT_SCALE) as f32, device)?,
        };
        Self::assemble(
            unet,
            TextSide::Sd { encoder, tokenizer },
            projections,
            options,
            base,
        )
    }

    /// An LRM around a UNet and text side already built (e.g. `UNet2DConditionModel::random`
    /// for benchmarks), with random projections: visual N(0, 0.02) [dim, features], text
    /// N(0, 0.02) [dim, hidden] (SD style), logit_scale 2.6592.
    pub fn with_random_projections(
        unet: UNet2DConditionModel,
        text: TextSide,
        projection_dim: usize,
        seed: u64,
        options: LrmOptions,
        dir: &Path,
    ) -> Result<Self> {
        let device = unet.device().clone();
        let dtype = options.dtype;
        let feat = Self::feature_dim(&unet, options.multi_scale);
        let mut rng = SeededRng::new(seed);
        let visual = (rng.randn((projection_dim, feat), &device)? * 0.02)?.to_dtype(dtype)?;
        let text_proj = match &text {
            TextSide::Sd { encoder, .. } => Some(
                (rng.randn((projection_dim, encoder.hidden_size()), &device)? * 0.02)?
                    .to_dtype(dtype)?,
            ),
            TextSide::Sdxl(_) => None,
        };
        let projections = Projections {
            visual,
            text: text_proj,
            logit_scale: Tensor::new(INITIAL_LOGIT_SCALE as f32, &device)?,
        };
        Self::assemble(unet, text, projections, options, dir)
    }

    /// Width of the concatenated pooled feature.
    pub fn feature_dim(unet: &UNet2DConditionModel, multi_scale: bool) -> usize {
        let channels = &unet.config.block_out_channels;
        let mid = *channels.last().unwrap_or(&0);
        if multi_scale {
            channels.iter().sum::<usize>() + mid
        } else {
            mid
        }
    }

    fn assemble(
        unet: UNet2DConditionModel,
        text: TextSide,
        projections: Projections,
        options: LrmOptions,
        dir: &Path,
    ) -> Result<Self> {
        let feat = Self::feature_dim(&unet, options.multi_scale);
        if projections.visual.dim(1)? != feat {
            bail!(
                "LRM {}: visual_projection takes {} features but the UNet gives {feat} ({}); multi_scale = {}",
                dir.display(),
                projections.visual.dim(1)?,
                if options.multi_scale { "pooled stages + mid" } else { "pooled mid" },
                options.multi_scale
            );
        }
        let stage_indices = stage_indices(
            unet.config.block_out_channels.len(),
            unet.config.layers_per_block,
        );
        let mut projection_vars = Vec::new();
        let wrap = |name: &str, t: Tensor, vars: &mut Vec<(String, Var)>| -> Result<Tensor> {
            if options.trainable {
                let v = Var::from_tensor(&t)?;
                let out = v.as_tensor().clone();
                vars.push((name.to_string(), v));
                Ok(out)
            } else {
                Ok(t)
            }
        };
        // f32 (scores are f32), except in an f64 model (gradient checks) where it follows.
        let logit_scale = if options.dtype == DType::F64 {
            projections.logit_scale.to_dtype(DType::F64)?
        } else {
            projections.logit_scale
        };
        let logit_scale = wrap("logit_scale", logit_scale, &mut projection_vars)?;
        let text_projection = match projections.text {
            Some(t) => Some(wrap("text_projection.weight", t, &mut projection_vars)?),
            None => None,
        };
        let visual_projection = wrap(
            "visual_projection.weight",
            projections.visual,
            &mut projection_vars,
        )?;
        if let (TextSide::Sd { encoder, .. }, Some(tp)) = (&text, &text_projection) {
            if tp.dim(1)? != encoder.hidden_size() {
                bail!(
                    "LRM {}: text_projection takes {} features but the text encoder's hidden size is {}",
                    dir.display(),
                    tp.dim(1)?,
                    encoder.hidden_size()
                );
            }
        }
        if matches!(text, TextSide::Sd { .. }) && text_projection.is_none() {
            bail!(
                "LRM {}: text_projection.weight is required for an SD1.5/2.1-style LRM",
                dir.display()
            );
        }
        let checkpointing = options.gradient_checkpointing;
        let lrm = Self {
            unet,
            text,
            visual_projection,
            text_projection,
            logit_scale,
            projection_vars,
            stage_indices,
            options,
            dir: dir.to_path_buf(),
        };
        lrm.set_gradient_checkpointing(checkpointing);
        Ok(lrm)
    }

    /// Gradient checkpointing for the UNet's blocks and the text encoders' layers.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.unet.set_gradient_checkpointing(on);
        match &self.text {
            TextSide::Sd { encoder, .. } => encoder.set_gradient_checkpointing(on),
            TextSide::Sdxl(x) => {
                x.encoder.set_gradient_checkpointing(on);
                x.encoder_2.set_gradient_checkpointing(on);
            }
        }
    }

    pub fn device(&self) -> &Device {
        self.unet.device()
    }

    pub fn is_sdxl(&self) -> bool {
        matches!(self.text, TextSide::Sdxl(_))
    }

    /// Tokenize prompts with the folder's tokenizer(s).
    pub fn tokenize(&self, prompts: &[&str]) -> Result<PromptIds> {
        let device = self.device();
        Ok(match &self.text {
            TextSide::Sd { tokenizer, .. } => {
                PromptIds::Single(tokenizer.encode_on(prompts, device)?)
            }
            TextSide::Sdxl(x) => PromptIds::Pair(
                x.tokenizer.encode_on(prompts, device)?,
                x.tokenizer_2.encode_on(prompts, device)?,
            ),
        })
    }

    /// Hidden states, pooled text feature and added embeddings for `ids` (and, with guidance,
    /// for the empty prompt repeated to the same batch).
    pub fn encode_text(&self, ids: &PromptIds) -> Result<TextConditioning> {
        let b = ids.batch()?;
        let guided = self.options.guidance_scale > 1.0;
        let empty = if guided {
            Some(self.tokenize(&[""])?)
        } else {
            None
        };
        match (&self.text, ids) {
            (TextSide::Sd { encoder, .. }, PromptIds::Single(ids)) => {
                let out = encoder.encode(ids)?;
                let tp = self.text_projection.as_ref().expect("checked at load");
                let features = out.pooled.matmul(&tp.t()?)?;
                let uncond_hidden = match &empty {
                    Some(PromptIds::Single(e)) => Some(repeat_rows(&encoder.encode(e)?.hidden, b)?),
                    _ => None,
                };
                Ok(TextConditioning {
                    hidden: out.hidden,
                    uncond_hidden,
                    features,
                    added: None,
                    uncond_added: None,
                })
            }
            (TextSide::Sdxl(x), PromptIds::Pair(ids, ids_2)) => {
                let (encoder, encoder_2, time_ids) = (&x.encoder, &x.encoder_2, &x.time_ids);
                let encode = |a: &Tensor, b2: &Tensor| -> Result<(Tensor, Tensor)> {
                    let o1 = encoder.encode(a)?;
                    let o2 = encoder_2.encode(b2)?;
                    let hidden = Tensor::cat(&[&o1.penultimate, &o2.penultimate], D::Minus1)?;
                    let embeds = o2.text_embeds.context("text_encoder_2 has no projection")?;
                    Ok((hidden, embeds))
                };
                let (hidden, embeds) = encode(ids, ids_2)?;
                let time = time_ids.unsqueeze(0)?.repeat((b, 1))?;
                let added = AddedCond {
                    text_embeds: embeds.clone(),
                    time_ids: time.clone(),
                };
                let (uncond_hidden, uncond_added) = match &empty {
                    Some(PromptIds::Pair(e1, e2)) => {
                        let (h, e) = encode(e1, e2)?;
                        (
                            Some(repeat_rows(&h, b)?),
                            Some(AddedCond {
                                text_embeds: repeat_rows(&e, b)?,
                                time_ids: time,
                            }),
                        )
                    }
                    _ => (None, None),
                };
                let features = match &self.text_projection {
                    Some(tp) => embeds.matmul(&tp.t()?)?,
                    None => embeds,
                };
                Ok(TextConditioning {
                    hidden,
                    uncond_hidden,
                    features,
                    added: Some(added),
                    uncond_added,
                })
            }
            (TextSide::Sd { .. }, PromptIds::Pair(..)) => {
                bail!("this LRM has one text encoder: pass one ids tensor, not a pair")
            }
            (TextSide::Sdxl(_), PromptIds::Single(_)) => {
                bail!("this SDXL-style LRM has two text encoders: pass [ids, ids_2] or prompt strings")
            }
        }
    }

    /// Projected image features [N, D] of latents [N, C, H, W] at timesteps [N], conditioned on
    /// rows of `cond` (already one row per latent).
    pub fn image_features(
        &self,
        latents: &Tensor,
        t: &Tensor,
        cond: &TextConditioning,
    ) -> Result<Tensor> {
        let n = latents.dim(0)?;
        if cond.hidden.dim(0)? != n {
            bail!("LRM: {} latents but {} prompt rows", n, cond.hidden.dim(0)?);
        }
        let t = if t.rank() == 0 || t.elem_count() == 1 {
            t.flatten_all()?.repeat(n)?
        } else {
            t.clone()
        };
        if t.dims() != [n] {
            bail!(
                "LRM: timesteps have shape {:?}, expected [{n}] (one per latent)",
                t.dims()
            );
        }
        let latents = latents.to_dtype(self.options.dtype)?;
        let g = self.options.guidance_scale;
        let (feats, doubled) = match &cond.uncond_hidden {
            Some(uncond) if g > 1.0 => {
                let x = Tensor::cat(&[&latents, &latents], 0)?;
                let tt = Tensor::cat(&[&t, &t], 0)?;
                let ehs = Tensor::cat(&[&cond.hidden, uncond], 0)?;
                let added = match (&cond.added, &cond.uncond_added) {
                    (Some(a), Some(u)) => Some(a.cat_rows(u)?),
                    _ => None,
                };
                (self.unet.features(&x, &tt, &ehs, added.as_ref())?, true)
            }
            _ => (
                self.unet
                    .features(&latents, &t, &cond.hidden, cond.added.as_ref())?,
                false,
            ),
        };
        let pick = |x: Tensor, guide: bool| -> candle_core::Result<Tensor> {
            if !doubled {
                Ok(x)
            } else if guide {
                crate::tensor::ops::cfg_guided(&x, g)
            } else {
                x.narrow(0, 0, n)
            }
        };
        let mid = pick(global_pool(&feats.mid)?, true)?;
        let pooled = if self.options.multi_scale {
            let mut parts = Vec::with_capacity(self.stage_indices.len() + 1);
            for &i in &self.stage_indices {
                let r = feats.down.get(i).with_context(|| {
                    format!(
                        "LRM: UNet gave {} down residuals, stage index {i} is missing",
                        feats.down.len()
                    )
                })?;
                parts.push(pick(global_pool(r)?, self.options.multi_scale_cfg)?);
            }
            parts.push(mid);
            Tensor::cat(&parts, 1)?
        } else {
            mid
        };
        Ok(pooled.matmul(&self.visual_projection.t()?)?)
    }

    /// exp(logit_scale) as a scalar tensor.
    pub fn scale(&self) -> Result<Tensor> {
        Ok(self.logit_scale.exp()?)
    }

    /// Scores [B] of latents x_t [B, ...] at timesteps t [B] for prompts `ids`.
    pub fn score(&self, latents: &Tensor, ids: &PromptIds, t: &Tensor) -> Result<Tensor> {
        let cond = self.encode_text(ids)?;
        self.score_with(latents, &cond, t)
    }

    /// Scores with text already encoded (the sampler encodes once and scores K·B candidates).
    pub fn score_with(
        &self,
        latents: &Tensor,
        cond: &TextConditioning,
        t: &Tensor,
    ) -> Result<Tensor> {
        let image = l2_normalize(&self.image_features(latents, t, cond)?)?;
        let text = l2_normalize(&cond.features)?;
        let cos = (image * text)?.sum(1)?.to_dtype(DType::F32)?;
        Ok(cos.broadcast_mul(&self.scale()?.to_dtype(DType::F32)?)?)
    }

    /// Repeat every row of a conditioning `k` times as blocks: [c; c; ...] (K·B rows, candidate-major).
    pub fn repeat_conditioning(cond: &TextConditioning, k: usize) -> Result<TextConditioning> {
        let rep = |t: &Tensor| -> candle_core::Result<Tensor> {
            let mut reps = vec![1; t.rank()];
            reps[0] = k;
            t.repeat(reps)
        };
        let rep_added = |a: &Option<AddedCond>| -> candle_core::Result<Option<AddedCond>> {
            a.as_ref()
                .map(|a| {
                    Ok(AddedCond {
                        text_embeds: rep(&a.text_embeds)?,
                        time_ids: rep(&a.time_ids)?,
                    })
                })
                .transpose()
        };
        Ok(TextConditioning {
            hidden: rep(&cond.hidden)?,
            uncond_hidden: cond.uncond_hidden.as_ref().map(rep).transpose()?,
            features: rep(&cond.features)?,
            added: rep_added(&cond.added)?,
            uncond_added: rep_added(&cond.uncond_added)?,
        })
    }

    /// The pair loss for N prompts with two latents each; `t` is [N, 2].
    #[allow(clippy::too_many_arguments)]
    pub fn pair_loss(
        &self,
        ids: &PromptIds,
        latents_0: &Tensor,
        latents_1: &Tensor,
        t: &Tensor,
        label_0: &Tensor,
        label_1: &Tensor,
        num_examples: &Tensor,
        opts: PairLossOptions,
    ) -> Result<PairLoss> {
        let n = ids.batch()?;
        if latents_0.dims() != latents_1.dims() || latents_0.dim(0)? != n {
            bail!(
                "pair_loss: latents_0 {:?} and latents_1 {:?} must both have {n} rows (one per prompt)",
                latents_0.dims(),
                latents_1.dims()
            );
        }
        if t.dims() != [n, 2] {
            bail!(
                "pair_loss: timesteps have shape {:?}, expected [{n}, 2]",
                t.dims()
            );
        }
        let cond = Self::repeat_conditioning(&self.encode_text(ids)?, 2)?;
        let latents = Tensor::cat(&[latents_0, latents_1], 0)?;
        let tt = Tensor::cat(
            &[
                &t.narrow(1, 0, 1)?.squeeze(1)?,
                &t.narrow(1, 1, 1)?.squeeze(1)?,
            ],
            0,
        )?;
        let image = self.image_features(&latents, &tt, &cond)?;
        let text = cond.features.narrow(0, 0, n)?;
        Ok(pair_loss(
            &text,
            &image.narrow(0, 0, n)?,
            &image.narrow(0, n, n)?,
            &self.logit_scale,
            label_0,
            label_1,
            num_examples,
            t,
            opts,
        )?)
    }

    /// True for UNet tensors the LRM never runs (the decoder half: up blocks, conv_norm_out,
    /// conv_out); `name` is the UNet-relative path, optionally prefixed `unet.`.
    pub fn unused_unet_tensor(name: &str) -> bool {
        let n = name.strip_prefix("unet.").unwrap_or(name);
        n.starts_with("up_blocks.") || n.starts_with("conv_norm_out.") || n.starts_with("conv_out.")
    }

    /// What the optimizer steps, sorted by name: projections (and the UNet's encoder half /
    /// text encoders when loaded trainable). Only tensors the score depends on: the UNet's up
    /// blocks, conv_norm_out and conv_out are left out (they never get a gradient).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut vars = self.projection_vars.clone();
        vars.extend(
            self.unet
                .trainable_vars()
                .into_iter()
                .filter(|(n, _)| !Self::unused_unet_tensor(n))
                .map(|(n, v)| (format!("unet.{n}"), v)),
        );
        let text_vars = match &self.text {
            TextSide::Sd { encoder, .. } => encoder.trainable_vars(),
            TextSide::Sdxl(x) => {
                let mut v = x.encoder.trainable_vars();
                v.extend(
                    x.encoder_2
                        .trainable_vars()
                        .into_iter()
                        .map(|(n, v)| (format!("2.{n}"), v)),
                );
                v
            }
        };
        vars.extend(
            text_vars
                .into_iter()
                .map(|(n, v)| (format!("text_encoder.{n}"), v)),
        );
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// The projections as they are now (for saving).
    pub fn projections(&self) -> Projections {
        Projections {
            visual: self.visual_projection.detach(),
            text: self.text_projection.as_ref().map(|t| t.detach()),
            logit_scale: self.logit_scale.detach(),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))?
    {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            let bytes = std::fs::read(entry.path())?;
            crate::fsutil::atomic_write(&target, &bytes)?;
        }
    }
    Ok(())
}

impl LatentRewardModel {
    /// Write this LRM as a folder `load` reads back: projections.safetensors, the UNet (its
    /// trained weights, or a copy of the source), text encoder(s), tokenizer(s) and vae/ config.
    /// Every file is written atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        self.projections().save(dir)?;
        let same = dir.canonicalize().ok() == self.dir.canonicalize().ok();
        let unet_vars = self.unet.trainable_vars();
        if self.options.trainable && !unet_vars.is_empty() && !self.unet.lora().has_adapters() {
            let unet_dir = dir.join("unet");
            std::fs::create_dir_all(&unet_dir)?;
            let map: std::collections::HashMap<String, Tensor> = unet_vars
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().detach()))
                .collect();
            crate::tensor::io::save_safetensors(
                &map,
                &unet_dir.join("diffusion_pytorch_model.safetensors"),
            )?;
            let config = std::fs::read(self.dir.join("unet/config.json"))
                .with_context(|| format!("cannot read {}/unet/config.json", self.dir.display()))?;
            crate::fsutil::atomic_write(&unet_dir.join("config.json"), &config)?;
        } else if !same {
            copy_dir(&self.dir.join("unet"), &dir.join("unet"))?;
        }
        if !same {
            for sub in [
                "text_encoder",
                "tokenizer",
                "text_encoder_2",
                "tokenizer_2",
                "vae",
            ] {
                let from = self.dir.join(sub);
                if from.is_dir() {
                    copy_dir(&from, &dir.join(sub))?;
                }
            }
        }
        Ok(())
    }
}
