//! The LPO policy in scripts: the trained UNet (LoRA adapters or every weight) and its frozen
//! reference.
//!
//! ```text
//! let policy = lpo_policy(load_unet(dir), #{lora: #{rank: 4, alpha: 4.0, seed: 0}});
//! let opt = adamw(policy.params, #{lr: 6e-5});
//! ```

use std::sync::Arc;

use rhai::plugin::*;

use crate::lpo::{Policy, PolicyOptions};
use crate::script::declared::{option_docs, OptionDoc};

/// A shared handle on one policy.
pub type ScriptPolicy = Arc<Policy>;

/// Options set aside from [`PolicyOptions`]: the LoRA settings map and the reference model.
const HOST_KEYS: [&str; 2] = ["lora", "reference"];

/// The declared options of this module's functions, for the docs.
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    vec![("lpo_policy", option_docs::<PolicyOptions>())]
}

mod helpers {
    use rhai::{Map, NativeCallContext};

    use crate::lpo::policy::load_reference;
    use crate::models::lora::LoraConfig;
    use crate::models::unet::UNet2DConditionModel;
    use crate::script::bindings::unet::{lora_config_from_map, ScriptUNet};
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// The frozen reference of full fine-tuning: a UNet, or a model or UNet folder to load.
    pub(super) fn reference(
        ctx: &NativeCallContext,
        host_opts: &Map,
        like: &UNet2DConditionModel,
    ) -> ScriptResult<ScriptUNet> {
        match host_opts.get("reference").filter(|r| !r.is_unit()) {
            Some(r) if r.is::<ScriptUNet>() => Ok(r.clone().cast::<ScriptUNet>()),
            Some(r) if r.is_string() => {
                let host = Host::of(ctx);
                let dir = host
                    .readable(&r.clone().into_string().unwrap_or_default())
                    .or_script(ctx)?;
                load_reference(&dir, like, &host.device).or_script(ctx)
            }
            _ => Err("lpo_policy: full fine-tuning needs `reference`: the base model folder or a frozen UNet")
                .or_script(ctx),
        }
    }

    /// The `lora` settings map, when given.
    pub(super) fn lora(
        ctx: &NativeCallContext,
        host_opts: &Map,
    ) -> ScriptResult<Option<LoraConfig>> {
        let Some(v) = host_opts.get("lora").filter(|v| !v.is_unit()) else {
            return Ok(None);
        };
        let map = v
            .clone()
            .try_cast::<Map>()
            .ok_or_else(|| {
                format!(
                    "lpo_policy: option `lora` must be a map #{{rank, alpha, targets, seed}}, got {} ({v})",
                    v.type_name()
                )
            })
            .or_script(ctx)?;
        lora_config_from_map(ctx, &map, "lpo_policy lora").map(Some)
    }
}

#[export_module]
pub mod policy_api {
    use std::sync::Arc;

    use rhai::Map;

    use super::{helpers, ScriptPolicy, HOST_KEYS};
    use crate::lpo::{Policy, PolicyOptions};
    use crate::optim::Params;
    use crate::script::bindings::unet::ScriptUNet;
    use crate::script::declared::from_map_with;
    use crate::script::error::{OrScriptError, ScriptResult};

    /// The LPO policy over a UNet. `#{lora: #{rank: 4, alpha: 4.0, targets: [..], seed}}`:
    /// LoRA adapters (added unless the UNet already has some, e.g. from `load_lora`; `targets`
    /// as in `add_lora`: module-name suffixes of any linear or conv, `"all-linear"`, `"all-conv"`); the
    /// reference is the same UNet with adapters off. `#{full: true, reference: dir | unet}`:
    /// full fine-tuning of a UNet loaded `trainable: true` against a frozen reference UNet.
    /// `gradient_checkpointing: true` recomputes the UNet's blocks in backward (less memory).
    #[rhai_fn(return_raw, volatile)]
    pub fn lpo_policy(
        ctx: NativeCallContext,
        unet: ScriptUNet,
        opts: Map,
    ) -> ScriptResult<ScriptPolicy> {
        let (o, host_opts): (PolicyOptions, Map) =
            from_map_with(&opts, "lpo_policy", &HOST_KEYS).or_script(&ctx)?;
        if let Some(on) = o.gradient_checkpointing {
            unet.set_gradient_checkpointing(on);
        }
        let policy = if o.full {
            let reference = helpers::reference(&ctx, &host_opts, &unet)?;
            Policy::full(unet, reference)
        } else {
            let lora = helpers::lora(&ctx, &host_opts)?;
            Policy::lora(unet, lora.as_ref())
        };
        policy.map(Arc::new).or_script(&ctx)
    }

    /// The trainable tensors (LoRA adapters or every UNet weight): `adamw(policy.params, ..)`,
    /// `policy.params.to_map()` for checkpoints, `.load_map(m)` to restore.
    #[rhai_fn(get = "params", pure, return_raw)]
    pub fn policy_params(ctx: NativeCallContext, p: &mut ScriptPolicy) -> ScriptResult<Params> {
        p.params().or_script(&ctx)
    }

    /// The policy's UNet (for `save_lora`, `merge_lora`, sampling by hand).
    #[rhai_fn(get = "unet", pure)]
    pub fn policy_unet(p: &mut ScriptPolicy) -> ScriptUNet {
        p.unet.clone()
    }

    /// The UNet to sample the policy with: a frozen view of the trained weights for full
    /// fine-tuning (no backward graph), the adapted UNet itself with LoRA.
    #[rhai_fn(get = "sampling_unet", pure, return_raw)]
    pub fn policy_sampling_unet(
        ctx: NativeCallContext,
        p: &mut ScriptPolicy,
    ) -> ScriptResult<ScriptUNet> {
        p.sampling_unet().or_script(&ctx)
    }

    /// True for a LoRA policy, false for full fine-tuning.
    #[rhai_fn(get = "is_lora", pure)]
    pub fn policy_is_lora(p: &mut ScriptPolicy) -> bool {
        p.is_lora()
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn policy_to_string(p: &mut ScriptPolicy) -> String {
        format!(
            "LpoPolicy({}, {} trainable elements)",
            if p.is_lora() { "LoRA" } else { "full" },
            p.unet
                .trainable_vars()
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum::<usize>()
        )
    }
}
