//! The VAE in scripts: `let vae = load_vae(dir); let z = vae.encode(images);`
//! `let x = vae.decode(z);` Latents are unscaled (multiply by `vae.scaling_factor` for a UNet).

use std::sync::Arc;

use rhai::plugin::*;

use crate::models::vae::AutoencoderKL;

/// Script value of `load_vae`.
pub type Vae = Arc<AutoencoderKL>;

/// The options each function here declares (for `lpo fns` and docs/API.md).
pub fn declared_options() -> Vec<(&'static str, Vec<crate::script::declared::OptionDoc>)> {
    use crate::script::declared::option_docs;
    vec![(
        "load_vae",
        option_docs::<crate::models::loading::LoadOptions>(),
    )]
}

#[export_module]
pub mod vae_api {
    use std::sync::Arc;

    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use super::Vae;
    use crate::models::vae::AutoencoderKL;
    use crate::script::bindings::rng::ScriptRng;
    use crate::script::bindings::text::helpers::load_options;
    use crate::script::convert::tensor_from_dynamic;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// An `AutoencoderKL` from a diffusers `vae/` folder, frozen, f32, on the run's device.
    #[rhai_fn(return_raw, volatile)]
    pub fn load_vae(ctx: NativeCallContext, dir: &str) -> ScriptResult<Vae> {
        load_vae_with(ctx, dir, Map::new())
    }

    /// `load_vae(dir)` with options `dtype`, `trainable`, `device`.
    #[rhai_fn(name = "load_vae", return_raw, volatile)]
    pub fn load_vae_with(ctx: NativeCallContext, dir: &str, options: Map) -> ScriptResult<Vae> {
        let host = Host::of(&ctx);
        let (dtype, device, mode) =
            load_options(&options, "load_vae", &host.device).or_script(&ctx)?;
        AutoencoderKL::load(&host.readable(dir).or_script(&ctx)?, dtype, &device, mode)
            .map(Arc::new)
            .or_script(&ctx)
    }

    /// Images [B, 3, H, W] in [-1, 1] -> the posterior mean latents (unscaled).
    #[rhai_fn(name = "encode", return_raw)]
    pub fn vae_encode(
        ctx: NativeCallContext,
        vae: &mut Vae,
        images: Dynamic,
    ) -> ScriptResult<Tensor> {
        Host::of(&ctx).check().or_script(&ctx)?;
        let x = tensor_from_dynamic(&images, vae.device()).or_script(&ctx)?;
        vae.encode(&x).map(|d| d.mean).or_script(&ctx)
    }

    /// Images -> the posterior as map `#{mean, logvar, std}` (logvar clamped to [-30, 20]).
    #[rhai_fn(return_raw)]
    pub fn encode_dist(
        ctx: NativeCallContext,
        vae: &mut Vae,
        images: Dynamic,
    ) -> ScriptResult<Map> {
        Host::of(&ctx).check().or_script(&ctx)?;
        let x = tensor_from_dynamic(&images, vae.device()).or_script(&ctx)?;
        let d = vae.encode(&x).or_script(&ctx)?;
        let std = d.std().or_script(&ctx)?;
        let mut m = Map::new();
        m.insert("mean".into(), Dynamic::from(d.mean));
        m.insert("logvar".into(), Dynamic::from(d.logvar));
        m.insert("std".into(), Dynamic::from(std));
        Ok(m)
    }

    /// Images -> a latent sample mean + std * eps, eps drawn from `rng` (unscaled).
    #[rhai_fn(name = "sample", return_raw, volatile)]
    pub fn vae_sample(
        ctx: NativeCallContext,
        vae: &mut Vae,
        images: Dynamic,
        rng: ScriptRng,
    ) -> ScriptResult<Tensor> {
        Host::of(&ctx).check().or_script(&ctx)?;
        let x = tensor_from_dynamic(&images, vae.device()).or_script(&ctx)?;
        let d = vae.encode(&x).or_script(&ctx)?;
        let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
        d.sample(&mut r).or_script(&ctx)
    }

    /// Latents [B, C, h, w] (unscaled) -> images [B, 3, h*f, w*f], roughly in [-1, 1].
    #[rhai_fn(name = "decode", return_raw)]
    pub fn vae_decode(
        ctx: NativeCallContext,
        vae: &mut Vae,
        latents: Dynamic,
    ) -> ScriptResult<Tensor> {
        Host::of(&ctx).check().or_script(&ctx)?;
        let z = tensor_from_dynamic(&latents, vae.device()).or_script(&ctx)?;
        vae.decode(&z).or_script(&ctx)
    }

    /// The config's `scaling_factor` (0.18215 for SD1.5/2.1, 0.13025 for SDXL).
    #[rhai_fn(get = "scaling_factor", pure)]
    pub fn scaling_factor(vae: &mut Vae) -> f64 {
        vae.scaling_factor()
    }

    /// Latent channels (4 for SD).
    #[rhai_fn(get = "latent_channels", pure)]
    pub fn latent_channels(vae: &mut Vae) -> i64 {
        vae.latent_channels() as i64
    }

    /// Spatial factor image size / latent size (8 for SD).
    #[rhai_fn(get = "downscale", pure)]
    pub fn downscale(vae: &mut Vae) -> i64 {
        vae.downscale() as i64
    }

    /// Number of scalar parameters.
    #[rhai_fn(get = "param_count", pure)]
    pub fn vae_param_count(vae: &mut Vae) -> i64 {
        vae.param_count() as i64
    }

    /// Names of the trainable tensors, sorted (empty when loaded frozen).
    #[rhai_fn(name = "trainable_names", pure)]
    pub fn vae_trainable_names(vae: &mut Vae) -> Array {
        vae.trainable_names()
            .into_iter()
            .map(Dynamic::from)
            .collect()
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn vae_to_string(vae: &mut Vae) -> String {
        let c = vae.config();
        format!(
            "Vae(block_out_channels={:?}, latent_channels={}, scaling_factor={}, dtype={}, params={})",
            c.block_out_channels,
            c.latent_channels,
            c.scaling_factor,
            vae.dtype().as_str(),
            vae.param_count()
        )
    }
}
