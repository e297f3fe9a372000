//! The UNet in scripts: `let unet = load_unet(dir); unet.forward(x, t, ehs)`,
//! `unet.features(...)`, LoRA (`add_lora`, `lora_enabled`, `save_lora`, `load_lora`, `merge_lora`).

use std::sync::Arc;

use rhai::plugin::*;

use crate::models::lora::LoraOptions;
use crate::models::lora_export::ExportLoraOptions;
use crate::models::lora_file::LoadLoraOptions;
use crate::models::unet::{RandomUNetOptions, UNet2DConditionModel, UNetLoadOptions};

/// A shared handle on one UNet (clones are the same model).
pub type ScriptUNet = Arc<UNet2DConditionModel>;

/// A LoRA config from a script map (`add_lora`, `lpo_policy`'s `lora`; options as
/// [`LoraOptions`] declares them, the seed defaulting to the run's); `what` names the caller in
/// errors.
pub(crate) fn lora_config_from_map(
    ctx: &NativeCallContext,
    opts: &rhai::Map,
    what: &str,
) -> crate::script::error::ScriptResult<crate::models::lora::LoraConfig> {
    use crate::script::error::OrScriptError;
    let options: LoraOptions = crate::script::declared::from_map(opts, what).or_script(ctx)?;
    Ok(options.config(crate::script::Host::of(ctx).seed))
}

/// The options each function here declares (for `lpo fns` and docs/API.md).
pub fn declared_options() -> Vec<(&'static str, Vec<crate::script::declared::OptionDoc>)> {
    use crate::script::declared::option_docs;
    vec![
        ("load_unet", option_docs::<UNetLoadOptions>()),
        ("random_unet", option_docs::<RandomUNetOptions>()),
        ("add_lora", option_docs::<LoraOptions>()),
        ("load_lora", option_docs::<LoadLoraOptions>()),
        ("export_lora", option_docs::<ExportLoraOptions>()),
    ]
}

mod helpers {
    use std::sync::Arc;

    use candle_core::Tensor;
    use rhai::{Dynamic, Map, NativeCallContext};
    use schemars::JsonSchema;
    use serde::Deserialize;

    use super::ScriptUNet;
    use crate::models::lora_file::{LoadLoraOptions, LoadedLora};
    use crate::models::unet::{
        AddedCond, RandomUNetOptions, UNet2DConditionModel, UNetConfig, UNetFeatures,
        UNetLoadOptions,
    };
    use crate::script::declared::{from_map, from_map_with};
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// `load_lora(path[, #{format}])`: the file (and a PEFT `adapter_config.json` beside an
    /// `adapter_model.safetensors`) through the confinement gate, format auto-detected.
    pub(super) fn load_lora(
        ctx: &NativeCallContext,
        unet: &UNet2DConditionModel,
        path: &str,
        opts: &Map,
    ) -> ScriptResult<LoadedLora> {
        let options: LoadLoraOptions = from_map(opts, "load_lora").or_script(ctx)?;
        let host = Host::of(ctx);
        let path = host.readable(path).or_script(ctx)?;
        let config = match crate::models::lora_file::peft_config_beside(&path) {
            Some(c) => Some(host.readable(&c.to_string_lossy()).or_script(ctx)?),
            None => None,
        };
        unet.load_lora(&path, options.format, config.as_deref())
            .or_script(ctx)
    }

    pub(super) fn load(ctx: &NativeCallContext, dir: &str, opts: &Map) -> ScriptResult<ScriptUNet> {
        let o: UNetLoadOptions = from_map(opts, "load_unet").or_script(ctx)?;
        let host = Host::of(ctx);
        host.check().or_script(ctx)?;
        let path = host.readable(dir).or_script(ctx)?;
        let path = if path.join("unet").join("config.json").is_file() {
            path.join("unet")
        } else {
            path
        };
        let unet =
            UNet2DConditionModel::load(&path, o.dtype.0, &host.device, o.mode()).or_script(ctx)?;
        unet.set_gradient_checkpointing(o.gradient_checkpointing);
        Ok(Arc::new(unet))
    }

    pub(super) fn random(
        ctx: &NativeCallContext,
        config: &str,
        opts: &Map,
    ) -> ScriptResult<ScriptUNet> {
        let o: RandomUNetOptions = from_map(opts, "random_unet").or_script(ctx)?;
        let host = Host::of(ctx);
        let seed = o.seed.map_or(host.seed, |s| s as u64);
        let file = if host.readable(config).or_script(ctx)?.is_dir() {
            format!("{}/config.json", config.trim_end_matches('/'))
        } else {
            config.to_string()
        };
        let text = host
            .read_text(&file)
            .map_err(|e| format!("random_unet: {e}"))
            .or_script(ctx)?;
        let cfg = UNetConfig::from_json(&text, &file).or_script(ctx)?;
        let (dtype, mode) = (o.load.dtype.0, o.load.mode());
        let unet =
            UNet2DConditionModel::random(cfg, seed, dtype, &host.device, mode).or_script(ctx)?;
        unet.set_gradient_checkpointing(o.load.gradient_checkpointing);
        Ok(Arc::new(unet))
    }

    /// A map whose keys are all host objects (tensors): nothing to declare.
    #[derive(Deserialize, JsonSchema)]
    struct HostKeysOnly {}

    /// SDXL's added conditioning `#{text_embeds, time_ids}`, both tensors.
    pub(super) fn added(ctx: &NativeCallContext, map: &Map) -> ScriptResult<AddedCond> {
        const WHAT: &str = "UNet added conditioning";
        let (HostKeysOnly {}, tensors) =
            from_map_with::<HostKeysOnly>(map, WHAT, &["text_embeds", "time_ids"])
                .or_script(ctx)?;
        let tensor = |key: &str| -> Result<Option<Tensor>, String> {
            match tensors.get(key).filter(|v| !v.is_unit()) {
                None => Ok(None),
                Some(v) => v.clone().try_cast::<Tensor>().map(Some).ok_or_else(|| {
                    format!(
                        "{WHAT}: option `{key}` must be a tensor, got {} ({v})",
                        v.type_name()
                    )
                }),
            }
        };
        match (tensor("text_embeds"), tensor("time_ids")) {
            (Ok(Some(text_embeds)), Ok(Some(time_ids))) => Ok(AddedCond {
                text_embeds,
                time_ids,
            }),
            (Err(e), _) | (_, Err(e)) => Err(e).or_script(ctx),
            _ => Err(format!("{WHAT} needs both `text_embeds` and `time_ids`")).or_script(ctx),
        }
    }

    pub(super) fn forward(
        ctx: &NativeCallContext,
        u: &ScriptUNet,
        x: &Tensor,
        t: &Tensor,
        ehs: &Tensor,
        add: Option<&Map>,
    ) -> ScriptResult<Tensor> {
        Host::of(ctx).check().or_script(ctx)?;
        let add = add.map(|m| added(ctx, m)).transpose()?;
        u.forward(x, t, ehs, add.as_ref()).or_script(ctx)
    }

    pub(super) fn features(
        ctx: &NativeCallContext,
        u: &ScriptUNet,
        x: &Tensor,
        t: &Tensor,
        ehs: &Tensor,
        add: Option<&Map>,
    ) -> ScriptResult<Map> {
        Host::of(ctx).check().or_script(ctx)?;
        let add = add.map(|m| added(ctx, m)).transpose()?;
        let UNetFeatures { mid, down } = u.features(x, t, ehs, add.as_ref()).or_script(ctx)?;
        let mut out = Map::new();
        out.insert("mid".into(), Dynamic::from(mid));
        out.insert(
            "down".into(),
            Dynamic::from_array(down.into_iter().map(Dynamic::from).collect()),
        );
        Ok(out)
    }
}

#[export_module]
pub mod unet_api {
    use super::helpers;
    use super::ScriptUNet;
    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use crate::script::Host;

    use crate::script::declared::{from_map, to_map};
    use crate::script::error::{OrScriptError, ScriptResult};

    /// Load a diffusers UNet2DConditionModel folder (`config.json` + `diffusion_pytorch_model*.safetensors`;
    /// a pipeline folder with `unet/` also works), frozen, f32.
    #[rhai_fn(return_raw, volatile)]
    pub fn load_unet(ctx: NativeCallContext, dir: &str) -> ScriptResult<ScriptUNet> {
        helpers::load(&ctx, dir, &Map::new())
    }

    /// `load_unet(dir)` with options: `dtype`, `trainable` (every base weight a trainable
    /// variable), `gradient_checkpointing`.
    #[rhai_fn(name = "load_unet", return_raw, volatile)]
    pub fn load_unet_opts(
        ctx: NativeCallContext,
        dir: &str,
        opts: Map,
    ) -> ScriptResult<ScriptUNet> {
        helpers::load(&ctx, dir, &opts)
    }

    /// A UNet with seeded random weights from a config.json (file or folder); options as
    /// `load_unet`'s, plus `seed`.
    #[rhai_fn(return_raw, volatile)]
    pub fn random_unet(
        ctx: NativeCallContext,
        config: &str,
        opts: Map,
    ) -> ScriptResult<ScriptUNet> {
        helpers::random(&ctx, config, &opts)
    }

    /// Noise prediction for sample `x` [B, C, H, W], int timesteps `t` [B] (or one value), and
    /// encoder hidden states `ehs` [B, tokens, dim].
    #[rhai_fn(return_raw)]
    pub fn forward(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        x: Tensor,
        t: Tensor,
        ehs: Tensor,
    ) -> ScriptResult<Tensor> {
        helpers::forward(&ctx, unet, &x, &t, &ehs, None)
    }

    /// Noise prediction with SDXL's added conditioning `#{text_embeds, time_ids}`.
    #[rhai_fn(name = "forward", return_raw)]
    pub fn forward_added(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        x: Tensor,
        t: Tensor,
        ehs: Tensor,
        added: Map,
    ) -> ScriptResult<Tensor> {
        helpers::forward(&ctx, unet, &x, &t, &ehs, Some(&added))
    }

    /// Encoder-only pass: `#{mid, down}` = mid-block output and every down-block residual
    /// (conv_in output first), without running the up blocks.
    #[rhai_fn(return_raw)]
    pub fn features(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        x: Tensor,
        t: Tensor,
        ehs: Tensor,
    ) -> ScriptResult<Map> {
        helpers::features(&ctx, unet, &x, &t, &ehs, None)
    }

    /// Encoder-only pass with SDXL's added conditioning `#{text_embeds, time_ids}`.
    #[rhai_fn(name = "features", return_raw)]
    pub fn features_added(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        x: Tensor,
        t: Tensor,
        ehs: Tensor,
        added: Map,
    ) -> ScriptResult<Map> {
        helpers::features(&ctx, unet, &x, &t, &ehs, Some(&added))
    }

    /// Attach LoRA adapters, options `rank`, `alpha`, `targets`, `seed` (A ~ N(0, 1/rank^2)
    /// from the seeded rng, B = 0; the model must be loaded frozen). Conv adapters are
    /// LoCon-style (A [r, in, kh, kw], B [out, r, 1, 1]). Returns the number of adapted layers.
    #[rhai_fn(return_raw, volatile)]
    pub fn add_lora(ctx: NativeCallContext, unet: &mut ScriptUNet, opts: Map) -> ScriptResult<i64> {
        let cfg = super::lora_config_from_map(&ctx, &opts, "add_lora")?;
        let n = unet.add_lora(&cfg).or_script(&ctx)?;
        Ok(n as i64)
    }

    /// Whether blocks recompute their activations in backward instead of keeping them.
    #[rhai_fn(get = "gradient_checkpointing", pure)]
    pub fn get_gradient_checkpointing(unet: &mut ScriptUNet) -> bool {
        unet.gradient_checkpointing()
    }

    /// Gradient checkpointing on/off (same gradients, less memory, one more forward per block).
    #[rhai_fn(set = "gradient_checkpointing")]
    pub fn set_gradient_checkpointing(unet: &mut ScriptUNet, on: bool) {
        unet.set_gradient_checkpointing(on)
    }

    /// Whether the LoRA adapters are applied.
    #[rhai_fn(get = "lora_enabled", pure)]
    pub fn get_lora_enabled(unet: &mut ScriptUNet) -> bool {
        unet.lora_enabled()
    }

    /// Turn every LoRA adapter on/off (off = the base model, bit for bit).
    #[rhai_fn(set = "lora_enabled")]
    pub fn set_lora_enabled_prop(unet: &mut ScriptUNet, on: bool) {
        unet.set_lora_enabled(on)
    }

    /// Turn every LoRA adapter on/off (off = the base model, bit for bit).
    pub fn set_lora_enabled(unet: &mut ScriptUNet, on: bool) {
        unet.set_lora_enabled(on)
    }

    /// Save the adapters for diffusers and `load_lora`: keys `unet.<module>.lora_A.weight` /
    /// `lora_B.weight` (B as trained) with alpha in diffusers' `lora_adapter_metadata` header,
    /// so `pipe.load_lora_weights(file)` applies them at scale alpha / rank.
    #[rhai_fn(return_raw)]
    pub fn save_lora(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        path: &str,
    ) -> ScriptResult<()> {
        unet.save_lora(&Host::of(&ctx).writable(path).or_script(&ctx)?)
            .or_script(&ctx)
    }

    /// Load a LoRA file in any UNet convention diffusers reads, detected from its keys: PEFT
    /// `<module>.lora_A.weight` (also under `unet.` / `base_model.model.`), the training scripts'
    /// `unet.<module>.lora.down.weight`, old `processor.to_q_lora.down.weight`, kohya
    /// `lora_unet_*`. Alpha from `.alpha` tensors, diffusers' `lora_adapter_metadata`, PEFT's
    /// `adapter_config.json` beside an `adapter_model.safetensors`, or alpha = rank.
    /// Text-encoder LoRA in the file is not applied (logged as a warning).
    /// Returns the number of layers.
    #[rhai_fn(return_raw, volatile)]
    pub fn load_lora(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        path: &str,
    ) -> ScriptResult<i64> {
        helpers::load_lora(&ctx, unet, path, &Map::new()).map(|l| l.layers as i64)
    }

    /// `load_lora` with options (`format`); returns `#{layers, format, alpha_from, warnings}`
    /// (`warnings`: parts of the file not applied, e.g. its text-encoder LoRA).
    #[rhai_fn(name = "load_lora", return_raw, volatile)]
    pub fn load_lora_opts(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        path: &str,
        opts: Map,
    ) -> ScriptResult<Map> {
        let loaded = helpers::load_lora(&ctx, unet, path, &opts)?;
        to_map(&loaded).or_script(&ctx)
    }

    /// Export the adapters for other tools in the option `format`: "peft" (diffusers) or
    /// "kohya" (webui).
    #[rhai_fn(return_raw)]
    pub fn export_lora(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        path: &str,
        opts: Map,
    ) -> ScriptResult<()> {
        let options: super::ExportLoraOptions = from_map(&opts, "export_lora").or_script(&ctx)?;
        let path = &Host::of(&ctx).writable(path).or_script(&ctx)?;
        crate::models::lora_export::export(unet.lora(), path, options.format).or_script(&ctx)
    }

    /// Load adapters from a kohya/webui LoRA file (`lora_unet_*.lora_down.weight`, `.lora_up.weight`,
    /// `.alpha`); returns the number of layers. `load_lora` reads these too (auto-detected).
    #[rhai_fn(return_raw, volatile)]
    pub fn import_kohya(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        path: &str,
    ) -> ScriptResult<i64> {
        crate::models::lora_export::import_kohya(
            unet.lora(),
            &Host::of(&ctx).readable(path).or_script(&ctx)?,
        )
        .map(|n| n as i64)
        .or_script(&ctx)
    }

    /// Write a diffusers UNet folder (`config.json` + `diffusion_pytorch_model.safetensors`) with
    /// the LoRA adapters merged into the base weights (the model itself is unchanged).
    #[rhai_fn(return_raw)]
    pub fn save_merged(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        dir: &str,
    ) -> ScriptResult<()> {
        crate::models::lora_export::save_merged(
            unet,
            &Host::of(&ctx).writable(dir).or_script(&ctx)?,
        )
        .or_script(&ctx)
    }

    /// A frozen UNet on this one's weights (shared, not copied: optimizer updates show
    /// through): sample a trained model without recording a backward graph. Errors while LoRA
    /// adapters are unmerged.
    #[rhai_fn(return_raw, pure)]
    pub fn frozen(ctx: NativeCallContext, unet: &mut ScriptUNet) -> ScriptResult<ScriptUNet> {
        unet.frozen_view().map(std::sync::Arc::new).or_script(&ctx)
    }

    /// Fold the adapters into the base weights (adapters removed); returns the number merged.
    #[rhai_fn(return_raw)]
    pub fn merge_lora(ctx: NativeCallContext, unet: &mut ScriptUNet) -> ScriptResult<i64> {
        unet.merge_lora().map(|n| n as i64).or_script(&ctx)
    }

    /// Number of base parameters (elements; adapters excluded).
    #[rhai_fn(get = "param_count", pure)]
    pub fn param_count(unet: &mut ScriptUNet) -> i64 {
        unet.param_count() as i64
    }

    /// Number of LoRA parameters (elements).
    #[rhai_fn(get = "lora_param_count", pure)]
    pub fn lora_param_count(unet: &mut ScriptUNet) -> i64 {
        unet.lora_param_count() as i64
    }

    /// Names of the tensors an optimizer would train (LoRA vars when adapters exist), sorted.
    #[rhai_fn(pure)]
    pub fn trainable_names(unet: &mut ScriptUNet) -> Array {
        unet.trainable_vars()
            .into_iter()
            .map(|(n, _)| Dynamic::from(n))
            .collect()
    }

    /// The model's config as a map (diffusers keys, defaults filled in).
    #[rhai_fn(get = "config", pure, return_raw)]
    pub fn config(ctx: NativeCallContext, unet: &mut ScriptUNet) -> ScriptResult<Dynamic> {
        rhai::serde::to_dynamic(&unet.config).or_script(&ctx)
    }

    /// A short description: `UNet(<params> params, dtype, LoRA on/off)`.
    #[rhai_fn(global, name = "to_string", pure)]
    pub fn to_string(unet: &mut ScriptUNet) -> String {
        format!(
            "UNet({} params, {:?}, {} LoRA params, LoRA {})",
            unet.param_count(),
            unet.dtype(),
            unet.lora_param_count(),
            if unet.lora_enabled() { "on" } else { "off" }
        )
    }
}

#[cfg(test)]
mod tests {
    /// (function, option, default) as scripts have always had them.
    fn declared() -> Vec<(String, String, Option<String>)> {
        super::declared_options()
            .into_iter()
            .chain(crate::script::bindings::text::declared_options())
            .flat_map(|(f, docs)| {
                docs.into_iter()
                    .map(move |d| (f.to_string(), d.name, d.default))
            })
            .collect()
    }

    #[test]
    fn model_options_keep_their_names_and_defaults() {
        let got = declared();
        let expect = [
            ("load_unet", "dtype", Some("\"f32\"")),
            ("load_unet", "gradient_checkpointing", Some("false")),
            ("load_unet", "trainable", Some("false")),
            ("random_unet", "dtype", Some("\"f32\"")),
            ("random_unet", "gradient_checkpointing", Some("false")),
            ("random_unet", "seed", None),
            ("random_unet", "trainable", Some("false")),
            ("add_lora", "alpha", None),
            ("add_lora", "rank", Some("4")),
            ("add_lora", "seed", None),
            (
                "add_lora",
                "targets",
                Some("[\"to_q\", \"to_k\", \"to_v\", \"to_out.0\"]"),
            ),
            ("load_lora", "format", Some("\"auto\"")),
            ("export_lora", "format", Some("\"peft\"")),
            ("load_text_encoder", "device", None),
            ("load_text_encoder", "dtype", None),
            ("load_text_encoder", "trainable", Some("false")),
        ];
        let expect: Vec<_> = expect
            .iter()
            .map(|(f, n, d)| (f.to_string(), n.to_string(), d.map(String::from)))
            .collect();
        assert_eq!(got, expect);
    }
}
