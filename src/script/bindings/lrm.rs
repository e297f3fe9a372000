//! The latent reward model in scripts: `let lrm = load_lrm(dir, #{multi_scale: true,
//! guidance_scale: 7.5}); lrm.score(latents, ["a cat", "a dog"], t)`, the pair loss for
//! training, saving, and a fresh LRM initialised from a base diffusion model.

use std::sync::Arc;

use rhai::plugin::*;

use crate::reward::lrm::LatentRewardModel;
use crate::reward::lrm_options::{LrmInitOptions, LrmOptions};
use crate::reward::pair_loss::PairLossOptions;
use crate::script::declared::{option_docs, OptionDoc};

/// A shared handle on one LRM.
pub type ScriptLrm = Arc<LatentRewardModel>;

/// The options of this module's functions, for `lpo fns`.
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    vec![
        ("load_lrm", option_docs::<LrmOptions>()),
        ("init_lrm", option_docs::<LrmInitOptions>()),
        ("pair_loss", option_docs::<PairLossOptions>()),
    ]
}

mod helpers {
    use candle_core::{DType, Tensor};
    use rhai::{Array, Dynamic, Map, NativeCallContext};

    use crate::reward::lrm::{LatentRewardModel, PromptIds};
    use crate::reward::lrm_options::LrmInitOptions;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// A fresh LRM from `base` with `init_lrm`'s options (seed default: the run's).
    pub(super) fn init(
        host: &Host,
        base: &str,
        o: LrmInitOptions,
    ) -> anyhow::Result<LatentRewardModel> {
        let clip = o
            .clip_projection
            .as_deref()
            .map(|c| host.readable(c))
            .transpose()?;
        LatentRewardModel::init_from_base(
            &host.readable(base)?,
            o.projection_dim,
            clip.as_deref(),
            o.seed.unwrap_or(host.seed as i64) as u64,
            o.logit_scale,
            o.model,
            &host.device,
        )
    }

    /// The tensors of `pair_loss` on the LRM's device (timesteps as i64), labels checked.
    pub(super) fn pair_inputs(
        lrm: &LatentRewardModel,
        tensors: [&Tensor; 6],
    ) -> candle_core::Result<[Tensor; 6]> {
        let [l0, l1] = [tensors[3], tensors[4]]
            .map(|l| l.to_dtype(DType::F32).and_then(|t| t.to_vec1::<f32>()));
        crate::reward::pair_loss::validate_labels(&l0?, &l1?).map_err(candle_core::Error::msg)?;
        let on = |t: &Tensor| t.to_device(lrm.device());
        Ok([
            on(tensors[0])?,
            on(tensors[1])?,
            on(tensors[2])?.to_dtype(DType::I64)?,
            on(tensors[3])?,
            on(tensors[4])?,
            on(tensors[5])?,
        ])
    }

    /// ids as a tensor, `[ids, ids_2]`, or prompt strings (tokenized by the LRM's tokenizers).
    pub(super) fn prompt_ids(
        ctx: &NativeCallContext,
        lrm: &LatentRewardModel,
        ids: &Dynamic,
    ) -> ScriptResult<PromptIds> {
        if let Some(t) = ids.clone().try_cast::<Tensor>() {
            return Ok(PromptIds::Single(t.to_device(lrm.device()).or_script(ctx)?));
        }
        if let Ok(s) = ids.clone().into_string() {
            return lrm.tokenize(&[s.as_str()]).or_script(ctx);
        }
        if let Some(arr) = ids.read_lock::<Array>() {
            return ids_of_array(lrm, &arr).or_script(ctx);
        }
        Err(format!(
            "ids must be an int tensor [B, 77], [ids, ids_2], or prompt strings; got {}",
            ids.type_name()
        ))
        .or_script(ctx)
    }

    /// `[ids, ids_2]` (SDXL's two tokenizations), or prompt strings.
    fn ids_of_array(lrm: &LatentRewardModel, arr: &Array) -> anyhow::Result<PromptIds> {
        if arr.len() == 2 && arr.iter().all(|v| v.is::<Tensor>()) {
            let on = |v: &Dynamic| v.clone().cast::<Tensor>().to_device(lrm.device());
            return Ok(PromptIds::Pair(on(&arr[0])?, on(&arr[1])?));
        }
        let prompts: Vec<String> = arr
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.clone()
                    .into_string()
                    .map_err(|t| anyhow::anyhow!("prompt {i} is a {t}, not a string"))
            })
            .collect::<anyhow::Result<_>>()?;
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        lrm.tokenize(&refs)
    }

    pub(super) fn timesteps(
        ctx: &NativeCallContext,
        lrm: &LatentRewardModel,
        t: &Dynamic,
        n: usize,
    ) -> ScriptResult<Tensor> {
        let t = match t.as_int() {
            Ok(v) => Tensor::full(v, n, lrm.device()).or_script(ctx)?,
            Err(_) => {
                crate::script::convert::tensor_from_dynamic(t, lrm.device()).or_script(ctx)?
            }
        };
        t.to_dtype(DType::I64).or_script(ctx)
    }

    pub(super) fn to_map(entries: Vec<(&str, Tensor)>) -> Map {
        entries
            .into_iter()
            .map(|(k, v)| (k.into(), Dynamic::from(v)))
            .collect()
    }
}

#[export_module]
pub mod lrm_api {
    use std::sync::Arc;

    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use super::helpers::*;
    use super::ScriptLrm;
    use crate::reward::lrm::LatentRewardModel;
    use crate::reward::lrm_options::{LrmInitOptions, LrmOptions};
    use crate::reward::pair_loss::PairLossOptions;
    use crate::script::declared::from_map;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// Load an LRM folder (`unet/`, `text_encoder/`, `tokenizer/`, projections; SDXL also
    /// `text_encoder_2/`, `tokenizer_2/`, `vae/`), with the default options.
    #[rhai_fn(return_raw, volatile)]
    pub fn load_lrm(ctx: NativeCallContext, dir: &str) -> ScriptResult<ScriptLrm> {
        load_lrm_with(ctx, dir, Map::new())
    }

    /// Load an LRM with options `#{multi_scale, guidance_scale, multi_scale_cfg, dtype,
    /// trainable, train_text, gradient_checkpointing}`.
    #[rhai_fn(name = "load_lrm", return_raw, volatile)]
    pub fn load_lrm_with(ctx: NativeCallContext, dir: &str, opts: Map) -> ScriptResult<ScriptLrm> {
        let options: LrmOptions = from_map(&opts, "load_lrm").or_script(&ctx)?;
        let host = Host::of(&ctx);
        host.check().or_script(&ctx)?;
        LatentRewardModel::load(&host.readable(dir).or_script(&ctx)?, options, &host.device)
            .map(Arc::new)
            .or_script(&ctx)
    }

    /// A fresh LRM from a base diffusion model folder: visual projection N(0, 0.02), text
    /// projection from `clip_projection` (safetensors with `text_projection.weight`) or N(0, 0.02),
    /// logit_scale 2.6592 (CLIP's initial value; `logit_scale` sets another, e.g. 4.6052 = ln 100,
    /// CLIP's trained one). Options: the `load_lrm` ones plus `projection_dim`, `clip_projection`,
    /// `seed`, `logit_scale`.
    #[rhai_fn(return_raw, volatile)]
    pub fn init_lrm(ctx: NativeCallContext, base: &str, opts: Map) -> ScriptResult<ScriptLrm> {
        let options: LrmInitOptions = from_map(&opts, "init_lrm").or_script(&ctx)?;
        init(&Host::of(&ctx), base, options)
            .map(Arc::new)
            .or_script(&ctx)
    }

    /// Scores [B] = exp(logit_scale) · cos(image, text) of noisy latents x_t [B, C, H, W] at
    /// timesteps t ([B] ints, or one int for all) for prompts: ids [B, 77], `[ids, ids_2]`
    /// (SDXL), or an array of prompt strings.
    #[rhai_fn(return_raw, pure)]
    pub fn score(
        ctx: NativeCallContext,
        lrm: &mut ScriptLrm,
        latents: Tensor,
        ids: Dynamic,
        t: Dynamic,
    ) -> ScriptResult<Tensor> {
        Host::of(&ctx).check().or_script(&ctx)?;
        let ids = prompt_ids(&ctx, lrm, &ids)?;
        let t = timesteps(&ctx, lrm, &t, latents.dim(0).or_script(&ctx)?)?;
        let latents = latents.to_device(lrm.device()).or_script(&ctx)?;
        lrm.score(&latents, &ids, &t).or_script(&ctx)
    }

    /// Projected (unnormalised) image features [B, D].
    #[rhai_fn(return_raw, pure)]
    pub fn image_features(
        ctx: NativeCallContext,
        lrm: &mut ScriptLrm,
        latents: Tensor,
        ids: Dynamic,
        t: Dynamic,
    ) -> ScriptResult<Tensor> {
        let ids = prompt_ids(&ctx, lrm, &ids)?;
        let t = timesteps(&ctx, lrm, &t, latents.dim(0).or_script(&ctx)?)?;
        let cond = lrm.encode_text(&ids).or_script(&ctx)?;
        lrm.image_features(&latents, &t, &cond).or_script(&ctx)
    }

    /// Projected (unnormalised) text features [B, D].
    #[rhai_fn(return_raw, pure)]
    pub fn text_features(
        ctx: NativeCallContext,
        lrm: &mut ScriptLrm,
        ids: Dynamic,
    ) -> ScriptResult<Tensor> {
        let ids = prompt_ids(&ctx, lrm, &ids)?;
        Ok(lrm.encode_text(&ids).or_script(&ctx)?.features)
    }

    /// The preference loss of N pairs (LPO's step criterion): `t` is [N, 2] (one timestep per
    /// image); labels [N] sum to 1 per pair (0.5/0.5 is a tie); options `#{loss_type:
    /// "pair"|"batch"|"both", batch_coeff, aux_loss_coeff}` ("batch": mean of image→prompts
    /// and prompt→images cross entropies over the batch; "both": pair + batch_coeff · batch).
    /// Returns `#{loss, logits, per_pair, weight}`: loss = sum(per_pair · weight · aux), with
    /// logits [N, 2], per_pair [N] before weighting, weight [N] the normalised
    /// 1/num_examples.
    #[rhai_fn(return_raw, pure)]
    #[allow(clippy::too_many_arguments)]
    pub fn pair_loss(
        ctx: NativeCallContext,
        lrm: &mut ScriptLrm,
        ids: Dynamic,
        latents_0: Tensor,
        latents_1: Tensor,
        t: Tensor,
        label_0: Tensor,
        label_1: Tensor,
        num_examples: Tensor,
        opts: Map,
    ) -> ScriptResult<Map> {
        Host::of(&ctx).check().or_script(&ctx)?;
        let options: PairLossOptions = from_map(&opts, "pair_loss").or_script(&ctx)?;
        let [l0, l1, t, a, b, n] = pair_inputs(
            lrm,
            [
                &latents_0,
                &latents_1,
                &t,
                &label_0,
                &label_1,
                &num_examples,
            ],
        )
        .or_script(&ctx)?;
        let ids = prompt_ids(&ctx, lrm, &ids)?;
        let out = lrm
            .pair_loss(&ids, &l0, &l1, &t, &a, &b, &n, options)
            .or_script(&ctx)?;
        Ok(to_map(vec![
            ("loss", out.loss),
            ("logits", out.logits),
            ("per_pair", out.per_pair),
            ("weight", out.weight),
        ]))
    }

    /// The raw logit_scale parameter (scores use its exp).
    #[rhai_fn(get = "logit_scale", pure)]
    pub fn logit_scale(lrm: &mut ScriptLrm) -> f64 {
        lrm.projections()
            .logit_scale
            .to_dtype(candle_core::DType::F64)
            .and_then(|t| t.to_scalar::<f64>())
            .unwrap_or(f64::NAN)
    }

    /// Names of the trainable tensors (projections, and the UNet when loaded trainable).
    #[rhai_fn(pure)]
    pub fn trainable_names(lrm: &mut ScriptLrm) -> Array {
        lrm.trainable_vars()
            .into_iter()
            .map(|(n, _)| Dynamic::from(n))
            .collect()
    }

    /// The trainable tensors as `Params` for `adamw(lrm.params(), #{...})`: the projections,
    /// and when loaded `trainable` the UNet's encoder half (`unet.*`; up blocks, conv_norm_out
    /// and conv_out are left out, the LRM never runs them), plus the text encoder(s)
    /// (`text_encoder.*`) with `train_text`. Pick parts with `p.select(prefix)`.
    #[rhai_fn(return_raw, pure)]
    pub fn params(
        ctx: NativeCallContext,
        lrm: &mut ScriptLrm,
    ) -> ScriptResult<crate::optim::Params> {
        crate::optim::Params::from_vars(lrm.trainable_vars()).or_script(&ctx)
    }

    /// Number of trainable elements.
    #[rhai_fn(get = "trainable_count", pure)]
    pub fn trainable_count(lrm: &mut ScriptLrm) -> i64 {
        lrm.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count() as i64)
            .sum()
    }

    /// True for an SDXL-style LRM (two text encoders).
    #[rhai_fn(get = "is_sdxl", pure)]
    pub fn is_sdxl(lrm: &mut ScriptLrm) -> bool {
        lrm.is_sdxl()
    }

    /// Write the LRM as a folder `load_lrm` reads (projections.safetensors and the models).
    #[rhai_fn(return_raw, pure)]
    pub fn save(ctx: NativeCallContext, lrm: &mut ScriptLrm, dir: &str) -> ScriptResult<()> {
        lrm.save(&Host::of(&ctx).writable(dir).or_script(&ctx)?)
            .or_script(&ctx)
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn to_string(lrm: &mut ScriptLrm) -> String {
        let o = &lrm.options;
        format!(
            "LRM({}; {}; multi_scale={}, guidance_scale={}, multi_scale_cfg={})",
            lrm.dir.display(),
            if lrm.is_sdxl() { "SDXL" } else { "SD" },
            o.multi_scale,
            o.guidance_scale,
            o.multi_scale_cfg
        )
    }
}

#[cfg(test)]
mod tests {
    use super::declared_options;

    #[test]
    fn lrm_options_show_the_core_defaults() {
        let all = declared_options();
        let init = &all[1].1;
        let get = |n: &str| init.iter().find(|d| d.name == n).unwrap();
        assert_eq!(get("dtype").default.as_deref(), Some("\"f32\""));
        assert_eq!(get("guidance_scale").default.as_deref(), Some("7.5"));
        assert_eq!(get("multi_scale").default.as_deref(), Some("true"));
        assert_eq!(get("seed").default, None);
        assert_eq!(
            all[0].1.len() + 4,
            init.len(),
            "init_lrm takes load_lrm's options"
        );
        let loss = &all[2].1;
        assert_eq!(loss[2].name, "loss_type");
        assert_eq!(loss[2].kind, "\"pair\" | \"batch\" | \"both\"");
    }
}
