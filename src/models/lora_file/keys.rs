//! The key conventions of UNet LoRA files, as diffusers' `load_lora_weights` reads them.
//!
//! | convention | keys (`<m>` = module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`) |
//! |---|---|
//! | PEFT | `<m>.lora_A.weight` / `.lora_B.weight`, optionally under `unet.` or `base_model.model.` |
//! | diffusers training scripts | `unet.<m>.lora.down.weight` / `.lora.up.weight` |
//! | old attention processors | `unet.<attn>.processor.to_q_lora.down.weight` (`to_k`, `to_v`, `to_out` = `to_out.0`) |
//! | kohya / webui | `lora_unet_<m with . -> _>.lora_down.weight` / `.lora_up.weight` / `.alpha` |
//!
//! Any key may also come as `<m>.alpha` (a kohya-style per-module alpha). Text-encoder keys
//! (`text_encoder.`, `text_encoder_2.`, `lora_te_`, `lora_te1_`, `lora_te2_`) are recognised so
//! the caller can skip them. The module path is whatever the key names; the caller checks it
//! against the model's LoRA-capable layers, so new layer types need no change here.

use std::collections::HashMap;

use anyhow::{bail, Result};

/// The naming family of a key (a file may mix PEFT and diffusers keys: diffusers'
/// `convert_state_dict_to_diffusers` only renames the attention projections).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyFormat {
    Peft,
    Diffusers,
    AttnProcessor,
    Kohya,
}

impl KeyFormat {
    pub fn name(self) -> &'static str {
        match self {
            KeyFormat::Peft => "peft",
            KeyFormat::Diffusers => "diffusers",
            KeyFormat::AttnProcessor => "attn-processor",
            KeyFormat::Kohya => "kohya",
        }
    }
}

/// Which tensor of an adapter a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// `A` / down: `[rank, in]`
    Down,
    /// `B` / up: `[out, rank]`
    Up,
    /// 0-d (or 1-element) alpha
    Alpha,
}

/// What one key of a LoRA file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraKey {
    Unet {
        module: String,
        factor: Factor,
        format: KeyFormat,
    },
    /// A text-encoder tensor; `prefix` names its family (`text_encoder.`, `lora_te1_`, ...).
    TextEncoder { prefix: &'static str },
}

const TEXT_ENCODER_PREFIXES: [&str; 5] = [
    "text_encoder.",
    "text_encoder_2.",
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
];

const ATTN_PROCESSOR_PROJECTIONS: [(&str, &str); 4] = [
    ("to_q_lora", "to_q"),
    ("to_k_lora", "to_k"),
    ("to_v_lora", "to_v"),
    ("to_out_lora", "to_out.0"),
];

/// Classify `key`. `kohya_modules` maps flattened kohya names (`lora_unet_down_blocks_0_...`) to
/// module paths; a kohya key whose name is not in it is an error naming the key.
pub fn parse(key: &str, kohya_modules: &HashMap<String, String>) -> Result<LoraKey> {
    if let Some(prefix) = TEXT_ENCODER_PREFIXES.iter().find(|p| key.starts_with(*p)) {
        return Ok(LoraKey::TextEncoder { prefix });
    }
    if key.contains("lora_magnitude_vector") || key.contains("dora_scale") {
        bail!("`{key}` is a DoRA tensor; DoRA adapters are not supported (plain LoRA only)");
    }
    if key.starts_with("lora_unet_") {
        return parse_kohya(key, kohya_modules);
    }
    let k = key
        .strip_prefix("unet.")
        .or_else(|| key.strip_prefix("base_model.model."))
        .unwrap_or(key);
    let unet = |module: &str, factor, format| {
        Ok(LoraKey::Unet {
            module: module.to_string(),
            factor,
            format,
        })
    };
    for (suffix, factor, format) in [
        (".lora_A.weight", Factor::Down, KeyFormat::Peft),
        (".lora_B.weight", Factor::Up, KeyFormat::Peft),
        (".lora.down.weight", Factor::Down, KeyFormat::Diffusers),
        (".lora.up.weight", Factor::Up, KeyFormat::Diffusers),
    ] {
        if let Some(module) = k.strip_suffix(suffix) {
            return unet(module, factor, format);
        }
    }
    if let Some(module) = k.strip_suffix(".alpha") {
        return unet(module, Factor::Alpha, KeyFormat::Peft);
    }
    if k.ends_with(".lora_B.bias") {
        bail!("`{key}` is a LoRA bias (PEFT lora_bias=True), which is not supported");
    }
    for (factor, suffix) in [(Factor::Down, ".down.weight"), (Factor::Up, ".up.weight")] {
        let Some(head) = k.strip_suffix(suffix) else {
            continue;
        };
        for (old, proj) in ATTN_PROCESSOR_PROJECTIONS {
            if let Some(attn) = head.strip_suffix(old).and_then(|h| h.strip_suffix('.')) {
                let attn = attn.strip_suffix(".processor").unwrap_or(attn);
                return unet(&format!("{attn}.{proj}"), factor, KeyFormat::AttnProcessor);
            }
        }
    }
    bail!(
        "unexpected key `{key}` (expected `<module>.lora_A.weight` / `.lora_B.weight`, \
         `<module>.lora.down.weight` / `.lora.up.weight`, `<attn>.processor.to_q_lora.down.weight` \
         or kohya `lora_unet_*.lora_down.weight`)"
    )
}

fn parse_kohya(key: &str, kohya_modules: &HashMap<String, String>) -> Result<LoraKey> {
    let (name, factor) = if let Some(n) = key.strip_suffix(".lora_down.weight") {
        (n, Factor::Down)
    } else if let Some(n) = key.strip_suffix(".lora_up.weight") {
        (n, Factor::Up)
    } else if let Some(n) = key.strip_suffix(".alpha") {
        (n, Factor::Alpha)
    } else {
        bail!("unexpected kohya key `{key}` (expected `.lora_down.weight`, `.lora_up.weight` or `.alpha`)");
    };
    match kohya_modules.get(name) {
        Some(module) => Ok(LoraKey::Unet {
            module: module.clone(),
            factor,
            format: KeyFormat::Kohya,
        }),
        None if ["input_blocks", "middle_block", "output_blocks"]
            .iter()
            .any(|b| name.contains(b)) =>
        {
            bail!(
                "`{key}` uses the original (SGM/LDM) UNet block names, which are not supported; \
                 convert the file to diffusers names first"
            )
        }
        None => bail!("`{key}` names no LoRA-capable layer of this model"),
    }
}

/// The kohya name of a module path: `lora_unet_` + the path with `.` replaced by `_`.
pub fn kohya_name(path: &str) -> String {
    format!("lora_unet_{}", path.replace('.', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    const OUT: &str = "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0";

    fn kohya() -> HashMap<String, String> {
        [Q, OUT].map(|m| (kohya_name(m), m.to_string())).into()
    }

    fn unet(key: &str) -> (String, Factor, KeyFormat) {
        match parse(key, &kohya()).unwrap() {
            LoraKey::Unet {
                module,
                factor,
                format,
            } => (module, factor, format),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn every_unet_convention_names_the_module() {
        use Factor::*;
        use KeyFormat::*;
        let cases = [
            (format!("{Q}.lora_A.weight"), Q, Down, Peft),
            (format!("unet.{Q}.lora_B.weight"), Q, Up, Peft),
            (format!("base_model.model.{Q}.lora_A.weight"), Q, Down, Peft),
            (format!("unet.{Q}.lora.down.weight"), Q, Down, Diffusers),
            (format!("unet.{OUT}.lora.up.weight"), OUT, Up, Diffusers),
            (
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight".into(),
                Q,
                Down,
                AttnProcessor,
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight".into(),
                OUT,
                Up,
                AttnProcessor,
            ),
            (format!("{}.lora_down.weight", kohya_name(Q)), Q, Down, Kohya),
            (format!("{}.alpha", kohya_name(OUT)), OUT, Alpha, Kohya),
            (format!("unet.{Q}.alpha"), Q, Alpha, Peft),
            // a module type the parser has never heard of: the path is passed through
            ("unet.conv_in.lora_A.weight".into(), "conv_in", Down, Peft),
        ];
        for (key, module, factor, format) in cases {
            assert_eq!(unet(&key), (module.to_string(), factor, format), "{key}");
        }
    }

    #[test]
    fn text_encoder_keys_are_recognised_and_bad_keys_name_themselves() {
        for (key, prefix) in [
            (
                "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
                "text_encoder.",
            ),
            (
                "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
                "text_encoder_2.",
            ),
            (
                "lora_te1_encoder_layers_0_self_attn_q_proj.alpha",
                "lora_te1_",
            ),
            (
                "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                "lora_te_",
            ),
        ] {
            assert_eq!(
                parse(key, &kohya()).unwrap(),
                LoraKey::TextEncoder { prefix },
                "{key}"
            );
        }
        for (key, says) in [
            ("unet.x.weight", "unexpected key `unet.x.weight`"),
            (
                "lora_unet_nope.lora_down.weight",
                "`lora_unet_nope.lora_down.weight` names no",
            ),
            (
                "lora_unet_input_blocks_1_1_proj_in.lora_down.weight",
                "SGM/LDM",
            ),
            ("unet.a.lora_magnitude_vector", "DoRA"),
            ("unet.a.lora_B.bias", "LoRA bias"),
        ] {
            let err = format!("{:#}", parse(key, &kohya()).unwrap_err());
            assert!(err.contains(says), "{key}: {err}");
        }
    }
}
