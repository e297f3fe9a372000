//! The trained model of LPO and its frozen reference.
//!
//! * LoRA: the policy is the base UNet with adapters on; the reference is the SAME UNet with
//!   adapters off (one network in memory, bit-exact base outputs).
//! * Full fine-tuning: a trainable UNet plus a frozen reference UNet loaded separately.
//!
//! Noise predictions use classifier-free guidance in one doubled batch `[cond; uncond]`:
//! `pred = u + g·(c − u)`; without guidance only the cond rows run. SD2.1's v-prediction needs
//! nothing here: the scheduler interprets the output by its `prediction_type`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::models::clip_text::ClipTextModel;
use crate::models::loading::WeightMode;
use crate::models::lora::LoraConfig;
use crate::models::sdxl_conditioning;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{AddedCond, UNet2DConditionModel};
use crate::optim::Params;

/// How `lpo_policy` builds the policy (besides its LoRA settings and reference model).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct PolicyOptions {
    /// Full fine-tuning of a UNet loaded `trainable: true` against a frozen `reference`
    /// (false: LoRA adapters, the reference being the same UNet with adapters off).
    pub full: bool,
    /// Recompute the UNet's blocks in backward (less memory); unset keeps the UNet's setting.
    pub gradient_checkpointing: Option<bool>,
}

/// A frozen reference UNet for full fine-tuning from a model folder (its `unet/`) or a UNet
/// folder, in the policy's dtype.
pub fn load_reference(
    dir: &Path,
    like: &UNet2DConditionModel,
    device: &Device,
) -> Result<Arc<UNet2DConditionModel>> {
    let dir = if dir.join("unet/config.json").is_file() {
        dir.join("unet")
    } else {
        dir.to_path_buf()
    };
    let unet = UNet2DConditionModel::load(&dir, like.dtype(), device, WeightMode::Frozen)?;
    Ok(Arc::new(unet))
}

/// Pair text encoders with their tokenizers (one each, or SDXL's two), checking that each
/// tokenizer fits its encoder's vocabulary.
pub fn text_side<'a>(
    encoders: &'a [Arc<ClipTextModel>],
    tokenizers: &'a [Arc<ClipTokenizer>],
) -> Result<Vec<(&'a ClipTextModel, &'a ClipTokenizer)>> {
    if encoders.len() != tokenizers.len() {
        bail!(
            "lpo_sample: {} text encoder(s) but {} tokenizer(s)",
            encoders.len(),
            tokenizers.len()
        );
    }
    for (i, (te, tok)) in encoders.iter().zip(tokenizers).enumerate() {
        let v = te.config().vocab_size;
        if tok.vocab_size() > v {
            bail!(
                "lpo_sample: tokenizer {i} ({}) has {} tokens but text encoder {i} has a vocabulary of {v}: they do not belong together",
                tok.dir().display(),
                tok.vocab_size()
            );
        }
    }
    Ok(encoders
        .iter()
        .map(|e| e.as_ref())
        .zip(tokenizers.iter().map(|t| t.as_ref()))
        .collect())
}

/// Which model the policy trains.
#[derive(Clone)]
pub enum PolicyKind {
    /// Adapters on = policy, adapters off = reference.
    Lora,
    /// A trainable UNet and a separate frozen reference.
    Full {
        reference: Arc<UNet2DConditionModel>,
    },
}

/// The policy UNet and the way to get its reference predictions.
#[derive(Clone)]
pub struct Policy {
    pub unet: Arc<UNet2DConditionModel>,
    pub kind: PolicyKind,
}

/// Prompt conditioning of the policy: hidden states per row and the empty prompt's.
#[derive(Debug, Clone)]
pub struct PromptCond {
    /// [B, L, H] encoder hidden states of the prompts.
    pub hidden: Tensor,
    /// [1, L, H] hidden states of the empty prompt (the CFG negative).
    pub uncond: Tensor,
    /// SDXL: added conditioning of the prompts ([B, ..]) and of the empty prompt ([1, ..]).
    pub added: Option<AddedCond>,
    pub uncond_added: Option<AddedCond>,
}

fn repeat_to(x: &Tensor, b: usize) -> Result<Tensor> {
    if x.dim(0)? == b {
        return Ok(x.clone());
    }
    if x.dim(0)? != 1 {
        bail!("cannot repeat {:?} to {b} rows", x.dims());
    }
    let mut reps = vec![1; x.rank()];
    reps[0] = b;
    Ok(x.repeat(reps)?)
}

impl PromptCond {
    pub fn batch(&self) -> Result<usize> {
        Ok(self.hidden.dim(0)?)
    }

    /// The rows `idx` of the prompt side (the empty prompt is shared).
    pub fn select(&self, idx: &[usize]) -> Result<PromptCond> {
        let dev = self.hidden.device();
        let ids = Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            dev,
        )?;
        let sel_added = |a: &Option<AddedCond>| -> Result<Option<AddedCond>> {
            a.as_ref()
                .map(|a| {
                    Ok(AddedCond {
                        text_embeds: a.text_embeds.index_select(&ids, 0)?,
                        time_ids: a.time_ids.index_select(&ids, 0)?,
                    })
                })
                .transpose()
        };
        Ok(PromptCond {
            hidden: self.hidden.index_select(&ids, 0)?,
            uncond: self.uncond.clone(),
            added: sel_added(&self.added)?,
            uncond_added: self.uncond_added.clone(),
        })
    }

    /// Encode prompts with one CLIP encoder (SD1.5/2.1: `last_hidden_state`) or two (SDXL:
    /// penultimate states concatenated; the second encoder's projected embedding and
    /// `time_ids` [6] form the added conditioning). The empty prompt is encoded alongside.
    pub fn encode(
        encoders: &[(&ClipTextModel, &ClipTokenizer)],
        prompts: &[&str],
        time_ids: Option<&Tensor>,
    ) -> Result<PromptCond> {
        if prompts.is_empty() {
            bail!("no prompts to encode (the prompt list is empty)");
        }
        let mut all: Vec<&str> = prompts.to_vec();
        all.push("");
        let b = prompts.len();
        match encoders {
            [(enc, tok)] => {
                let ids = tok.encode_on(&all, enc.device())?;
                let out = enc.encode(&ids)?;
                let h = out.hidden.detach();
                Ok(PromptCond {
                    hidden: h.narrow(0, 0, b)?,
                    uncond: h.narrow(0, b, 1)?,
                    added: None,
                    uncond_added: None,
                })
            }
            [(e1, t1), (e2, t2)] => {
                let o1 = e1.encode(&t1.encode_on(&all, e1.device())?)?;
                let o2 = e2.encode(&t2.encode_on(&all, e2.device())?)?;
                let h = Tensor::cat(&[&o1.penultimate, &o2.penultimate], D::Minus1)?.detach();
                let embeds = o2
                    .text_embeds
                    .context("the second text encoder has no text_projection (SDXL needs CLIPTextModelWithProjection)")?
                    .detach();
                let time_ids = time_ids.context("two text encoders (SDXL) need time_ids")?;
                let ti = time_ids
                    .flatten_all()?
                    .unsqueeze(0)?
                    .to_dtype(embeds.dtype())?;
                let added = |rows: Tensor| -> Result<AddedCond> {
                    let n = rows.dim(0)?;
                    Ok(AddedCond {
                        text_embeds: rows,
                        time_ids: ti.repeat((n, 1))?,
                    })
                };
                Ok(PromptCond {
                    hidden: h.narrow(0, 0, b)?,
                    uncond: h.narrow(0, b, 1)?,
                    added: Some(added(embeds.narrow(0, 0, b)?)?),
                    uncond_added: Some(added(embeds.narrow(0, b, 1)?)?),
                })
            }
            _ => bail!(
                "expected one text encoder (SD1.5/2.1) or two (SDXL), got {}",
                encoders.len()
            ),
        }
    }
}

/// Restores the LoRA switch when dropped (the reference pass turns adapters off).
struct LoraSwitch<'a> {
    unet: &'a UNet2DConditionModel,
    was: bool,
}

impl Drop for LoraSwitch<'_> {
    fn drop(&mut self) {
        self.unet.set_lora_enabled(self.was);
    }
}

impl Policy {
    /// LoRA policy: attaches adapters per `cfg` unless the UNet already has some (e.g. from
    /// `load_lora`). The UNet must be loaded frozen.
    pub fn lora(unet: Arc<UNet2DConditionModel>, cfg: Option<&LoraConfig>) -> Result<Self> {
        if !unet.lora().has_adapters() {
            let cfg = cfg.context(
                "lpo_policy: the UNet has no LoRA adapters; give #{lora: #{rank, alpha, targets, seed}}",
            )?;
            unet.add_lora(cfg)?;
        }
        unet.set_lora_enabled(true);
        Ok(Self {
            unet,
            kind: PolicyKind::Lora,
        })
    }

    /// Full fine-tuning: `unet` must be loaded trainable, `reference` frozen, same config.
    pub fn full(
        unet: Arc<UNet2DConditionModel>,
        reference: Arc<UNet2DConditionModel>,
    ) -> Result<Self> {
        if unet.trainable_vars().is_empty() {
            bail!("lpo_policy: full fine-tuning needs a trainable UNet (load_unet(dir, #{{trainable: true}}))");
        }
        if !reference.trainable_vars().is_empty() {
            bail!("lpo_policy: the reference UNet must be frozen (load it without trainable)");
        }
        let a = serde_json::to_value(&unet.config)?;
        let b = serde_json::to_value(&reference.config)?;
        if a != b {
            bail!("lpo_policy: the reference UNet's config differs from the policy's");
        }
        Ok(Self {
            unet,
            kind: PolicyKind::Full { reference },
        })
    }

    /// The tensors the optimizer trains (LoRA adapters, or every UNet weight).
    pub fn params(&self) -> Result<Params> {
        Params::from_vars(self.unet.trainable_vars())
    }

    pub fn is_lora(&self) -> bool {
        matches!(self.kind, PolicyKind::Lora)
    }

    /// The conditioning of `prompts` for this policy, in its UNet's dtype: encoded with
    /// `encoders` ([`PromptCond::encode`]), whose hidden size must fit the UNet. SDXL's time ids
    /// default to an uncropped image of the UNet's default size.
    pub fn condition(
        &self,
        encoders: &[(&ClipTextModel, &ClipTokenizer)],
        prompts: &[String],
        time_ids: Option<&Tensor>,
    ) -> Result<PromptCond> {
        let hidden: usize = match encoders {
            [_, _] => encoders.iter().map(|(e, _)| e.hidden_size()).sum(),
            _ => encoders.first().map_or(0, |(e, _)| e.hidden_size()),
        };
        self.check_hidden(hidden)?;
        let default_ids = match (time_ids, encoders) {
            (None, [_, (e2, _)]) => {
                let size = sdxl_conditioning::default_image_size(&self.unet.config);
                let ids = sdxl_conditioning::default_time_ids(size, size);
                Some(sdxl_conditioning::time_ids_tensor(ids, e2.device())?)
            }
            _ => None,
        };
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let cond = PromptCond::encode(encoders, &refs, time_ids.or(default_ids.as_ref()))?;
        let dtype = self.unet.dtype();
        Ok(PromptCond {
            hidden: cond.hidden.to_dtype(dtype)?,
            uncond: cond.uncond.to_dtype(dtype)?,
            ..cond
        })
    }

    /// Check that conditioning from a text encoder of hidden size `hidden` fits this UNet.
    pub fn check_hidden(&self, hidden: usize) -> Result<()> {
        let plan = self.unet.config.plan()?;
        if !plan.cross_dims.contains(&hidden) {
            bail!(
                "the text encoder gives hidden states of size {hidden} but the policy UNet's cross_attention_dim is {:?}: use the text encoder of the policy's model",
                plan.cross_dims
            );
        }
        Ok(())
    }

    fn run(
        unet: &UNet2DConditionModel,
        x: &Tensor,
        t: &Tensor,
        cond: &PromptCond,
        guidance: Option<f64>,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        if cond.hidden.dim(0)? != b {
            bail!(
                "policy: {b} latents but {} prompt rows",
                cond.hidden.dim(0)?
            );
        }
        let t = if t.elem_count() == 1 {
            t.flatten_all()?.repeat(b)?
        } else {
            t.clone()
        };
        match guidance {
            None => unet.forward(x, &t, &cond.hidden, cond.added.as_ref()),
            Some(g) => {
                let xx = Tensor::cat(&[x, x], 0)?;
                let tt = Tensor::cat(&[&t, &t], 0)?;
                let ehs = Tensor::cat(&[&cond.hidden, &repeat_to(&cond.uncond, b)?], 0)?;
                let added = match (&cond.added, &cond.uncond_added) {
                    (Some(a), Some(u)) => Some(a.cat_rows(&AddedCond {
                        text_embeds: repeat_to(&u.text_embeds, b)?,
                        time_ids: repeat_to(&u.time_ids, b)?,
                    })?),
                    _ => None,
                };
                let out = unet.forward(&xx, &tt, &ehs, added.as_ref())?;
                Ok(crate::tensor::ops::cfg_guided(&out, g)?)
            }
        }
    }

    /// The policy's noise prediction (carries the graph to the trainable tensors).
    /// `guidance` None = cond only; Some(g) = CFG with the empty prompt.
    pub fn predict(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &PromptCond,
        guidance: Option<f64>,
    ) -> Result<Tensor> {
        Self::run(&self.unet, x, t, cond, guidance)
    }

    /// The UNet to sample the policy with: for full fine-tuning a frozen view of the current
    /// weights (no backward graph while sampling), with LoRA the UNet itself.
    pub fn sampling_unet(&self) -> Result<Arc<UNet2DConditionModel>> {
        match &self.kind {
            PolicyKind::Full { .. } => Ok(Arc::new(self.unet.frozen_view()?)),
            PolicyKind::Lora => Ok(self.unet.clone()),
        }
    }

    /// The policy's noise prediction from `sampling_unet()`, detached.
    pub fn predict_detached(
        sampling_unet: &UNet2DConditionModel,
        x: &Tensor,
        t: &Tensor,
        cond: &PromptCond,
        guidance: Option<f64>,
    ) -> Result<Tensor> {
        Ok(Self::run(sampling_unet, x, t, cond, guidance)?.detach())
    }

    /// The reference model's prediction, detached (adapters off, or the frozen copy).
    pub fn predict_reference(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &PromptCond,
        guidance: Option<f64>,
    ) -> Result<Tensor> {
        match &self.kind {
            PolicyKind::Lora => {
                let _restore = LoraSwitch {
                    unet: &self.unet,
                    was: self.unet.lora_enabled(),
                };
                self.unet.set_lora_enabled(false);
                Ok(Self::run(&self.unet, x, t, cond, guidance)?.detach())
            }
            PolicyKind::Full { reference } => {
                Ok(Self::run(reference, x, t, cond, guidance)?.detach())
            }
        }
    }
}
