//! LoRA alpha (the scale is `alpha / rank`) as diffusers / PEFT store it.
//!
//! Read, per module, from the first of:
//! 1. a `<module>.alpha` tensor (kohya, and converted files);
//! 2. diffusers' `lora_adapter_metadata` header: the JSON of the UNet's PEFT `LoraConfig`, its keys
//!    prefixed `unet.` when written by `save_lora_weights` (unprefixed from `save_lora_adapter`):
//!    `lora_alpha`, `alpha_pattern` (regex -> alpha, matched as PEFT's `get_pattern_key` does),
//!    `r` / `rank_pattern` (checked against the tensors), `use_rslora` (scale `alpha / sqrt(r)`);
//!    missing fields take `LoraConfig`'s defaults (r = alpha = 8), as in diffusers;
//! 3. PEFT's `adapter_config.json` beside an `adapter_model.safetensors` (`PeftModel.save_pretrained`
//!    keeps alpha there, not in the weights file), read the same way;
//! 4. our older files' `lora_alpha` header entry;
//! 5. nothing: alpha = rank (scale 1), diffusers' default.
//!
//! Written ([`adapter_metadata`]) as `save_lora_weights(..., unet_lora_adapter_metadata=...)` does,
//! so diffusers' `load_lora_weights` applies the adapters at our scale.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// The safetensors header entry diffusers keeps the adapter config in.
pub const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";
/// Our own header entries (kept for files written before `lora_adapter_metadata`).
pub const OUR_ALPHA_KEY: &str = "lora_alpha";
pub const OUR_RANK_KEY: &str = "lora_rank";

/// PEFT's `LoraConfig` defaults for fields the metadata leaves out.
const PEFT_DEFAULT_R: usize = 8;
const PEFT_DEFAULT_ALPHA: f64 = 8.0;

/// The UNet part of a `lora_adapter_metadata` header (or of a PEFT `adapter_config.json`).
#[derive(Debug, Clone)]
pub struct PeftAlphas {
    r: usize,
    lora_alpha: f64,
    rank_pattern: Vec<(regex::Regex, usize)>,
    alpha_pattern: Vec<(regex::Regex, f64)>,
    use_rslora: bool,
}

/// Where a module's alpha came from (reported to the user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlphaSource {
    Tensor,
    AdapterMetadata,
    AdapterConfig,
    OurMetadata,
    Default,
}

impl AlphaSource {
    pub fn describe(self) -> &'static str {
        match self {
            AlphaSource::Tensor => ".alpha tensors",
            AlphaSource::AdapterMetadata => "lora_adapter_metadata",
            AlphaSource::AdapterConfig => "adapter_config.json",
            AlphaSource::OurMetadata => "lora_alpha metadata",
            AlphaSource::Default => "none (alpha = rank)",
        }
    }
}

/// Everything a file says about alpha, module by module.
#[derive(Debug, Clone, Default)]
pub struct FileAlphas {
    pub tensors: HashMap<String, f64>,
    pub peft: Option<PeftAlphas>,
    pub peft_config: Option<PeftAlphas>,
    pub ours: Option<f64>,
}

impl FileAlphas {
    /// Read the header entries (`tensors` are filled in by the caller as it meets `.alpha` keys).
    pub fn from_header(header: &HashMap<String, String>) -> Result<Self> {
        let peft = match header.get(ADAPTER_METADATA_KEY) {
            Some(raw) => PeftAlphas::parse(raw)
                .with_context(|| format!("bad `{ADAPTER_METADATA_KEY}` header"))?,
            None => None,
        };
        let ours = match header.get(OUR_ALPHA_KEY) {
            Some(v) => Some(
                v.trim()
                    .parse::<f64>()
                    .with_context(|| format!("bad `{OUR_ALPHA_KEY}` header `{v}`"))?,
            ),
            None => None,
        };
        Ok(Self {
            tensors: HashMap::new(),
            peft,
            peft_config: None,
            ours,
        })
    }

    /// Also honour a PEFT `adapter_config.json` (its text `json`).
    pub fn with_peft_config(mut self, json: &str) -> Result<Self> {
        self.peft_config = PeftAlphas::parse(json)?;
        Ok(self)
    }

    /// The alpha of `module`, whose tensors have rank `rank`, as our `alpha / rank` scale wants it.
    pub fn alpha(&self, module: &str, rank: usize) -> Result<(f64, AlphaSource)> {
        if let Some(&a) = self.tensors.get(module) {
            return Ok((a, AlphaSource::Tensor));
        }
        if let Some(p) = &self.peft {
            return Ok((p.alpha(module, rank)?, AlphaSource::AdapterMetadata));
        }
        if let Some(p) = &self.peft_config {
            return Ok((p.alpha(module, rank)?, AlphaSource::AdapterConfig));
        }
        if let Some(a) = self.ours {
            return Ok((a, AlphaSource::OurMetadata));
        }
        Ok((rank as f64, AlphaSource::Default))
    }
}

fn pattern(key: &str) -> Result<regex::Regex> {
    // PEFT: re.match(rf"(.*\.)?({key})$", module)
    regex::Regex::new(&format!(r"^(.*\.)?({key})$"))
        .with_context(|| format!("pattern `{key}` is not a valid regex"))
}

fn matching<T: Copy>(patterns: &[(regex::Regex, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(re, _)| re.is_match(module))
        .map(|(_, v)| *v)
}

impl PeftAlphas {
    /// `raw` is the header's JSON. Returns `None` when it holds no UNet config.
    fn parse(raw: &str) -> Result<Option<Self>> {
        let all: Map<String, Value> = serde_json::from_str(raw).context("not a JSON object")?;
        let prefixed: Map<String, Value> = all
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("unet.").map(|k| (k.to_string(), v.clone())))
            .collect();
        let cfg = if !prefixed.is_empty() {
            prefixed
        } else if all.contains_key("r") || all.contains_key("lora_alpha") {
            all
        } else {
            return Ok(None);
        };
        if cfg.get("use_dora").and_then(Value::as_bool) == Some(true) {
            bail!("use_dora is set: DoRA adapters are not supported (plain LoRA only)");
        }
        let number = |key: &str| -> Result<Option<f64>> {
            match cfg.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .with_context(|| format!("`{key}` must be a number, got {v}")),
            }
        };
        let table = |key: &str| -> Result<Vec<(regex::Regex, f64)>> {
            match cfg.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(p, v)| {
                        let v = v
                            .as_f64()
                            .with_context(|| format!("`{key}` entry `{p}` must be a number"))?;
                        Ok((pattern(p)?, v))
                    })
                    .collect(),
                Some(v) => bail!("`{key}` must be an object, got {v}"),
            }
        };
        let r = number("r")?.map_or(PEFT_DEFAULT_R, |r| r as usize);
        Ok(Some(Self {
            r,
            lora_alpha: number("lora_alpha")?.unwrap_or(PEFT_DEFAULT_ALPHA),
            rank_pattern: table("rank_pattern")?
                .into_iter()
                .map(|(re, v)| (re, v as usize))
                .collect(),
            alpha_pattern: table("alpha_pattern")?,
            use_rslora: cfg.get("use_rslora").and_then(Value::as_bool) == Some(true),
        }))
    }

    fn alpha(&self, module: &str, rank: usize) -> Result<f64> {
        let r = matching(&self.rank_pattern, module).unwrap_or(self.r);
        if r != rank {
            bail!(
                "`{ADAPTER_METADATA_KEY}` gives `{module}` rank {r} but its tensors have rank {rank}"
            );
        }
        let alpha = matching(&self.alpha_pattern, module).unwrap_or(self.lora_alpha);
        // rsLoRA scales by alpha / sqrt(r); our scale is alpha / r
        Ok(if self.use_rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        })
    }
}

fn most_common<T: Copy + PartialEq>(values: &[T]) -> T {
    let mut best = (values[0], 0);
    for &v in values {
        let n = values.iter().filter(|&&w| w == v).count();
        if n > best.1 {
            best = (v, n);
        }
    }
    best.0
}

/// The `lora_adapter_metadata` JSON for adapters `(module, rank, alpha)` (non-empty), in the
/// form `save_lora_weights` writes: a PEFT `LoraConfig` with every key prefixed `unet.`; the most
/// common rank / alpha are `r` / `lora_alpha`, other modules go to `rank_pattern` /
/// `alpha_pattern` as anchored, escaped module paths.
pub fn adapter_metadata(adapters: &[(String, usize, f64)]) -> String {
    let ranks: Vec<usize> = adapters.iter().map(|a| a.1).collect();
    let alphas: Vec<f64> = adapters.iter().map(|a| a.2).collect();
    let (r, alpha) = (most_common(&ranks), most_common(&alphas));
    let anchored = |m: &str| format!("^{}", regex::escape(m));
    let rank_pattern: BTreeMap<String, Value> = adapters
        .iter()
        .filter(|a| a.1 != r)
        .map(|a| (anchored(&a.0), json!(a.1)))
        .collect();
    let alpha_pattern: BTreeMap<String, Value> = adapters
        .iter()
        .filter(|a| a.2 != alpha)
        .map(|a| (anchored(&a.0), json!(a.2)))
        .collect();
    let targets: Vec<&str> = adapters.iter().map(|a| a.0.as_str()).collect();
    let config = json!({
        "unet.r": r,
        "unet.lora_alpha": alpha,
        "unet.rank_pattern": rank_pattern,
        "unet.alpha_pattern": alpha_pattern,
        "unet.target_modules": targets,
        "unet.use_rslora": false,
        "unet.use_dora": false,
        "unet.bias": "none",
        "unet.peft_type": "LORA",
    });
    serde_json::to_string_pretty(&config).expect("JSON of plain values")
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    const K: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";
    const V: &str = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v";

    fn header(meta: &str) -> HashMap<String, String> {
        [(ADAPTER_METADATA_KEY.to_string(), meta.to_string())].into()
    }

    #[test]
    fn written_metadata_reads_back_per_module() {
        let adapters = vec![
            (Q.to_string(), 4, 8.0),
            (K.to_string(), 4, 8.0),
            (V.to_string(), 2, 3.0),
        ];
        let text = adapter_metadata(&adapters);
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["unet.r"], json!(4));
        assert_eq!(json["unet.lora_alpha"], json!(8.0));
        let alphas = FileAlphas::from_header(&header(&text)).unwrap();
        for (m, rank, alpha) in adapters {
            assert_eq!(
                alphas.alpha(&m, rank).unwrap(),
                (alpha, AlphaSource::AdapterMetadata),
                "{m}"
            );
        }
        // the pattern is anchored: a module that merely ends like V keeps the common values
        let err = alphas.alpha(
            "x.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
            2,
        );
        assert!(format!("{:#}", err.unwrap_err()).contains("rank 4"));
    }

    #[test]
    fn diffusers_metadata_defaults_rslora_and_precedence() {
        // unprefixed (save_lora_adapter), PEFT-style unanchored pattern, rsLoRA
        let h = header(
            r#"{"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn1.to_k": 2}, "use_rslora": true}"#,
        );
        let a = FileAlphas::from_header(&h).unwrap();
        assert_eq!(a.alpha(Q, 4).unwrap().0, 16.0); // 8 * sqrt(4)
        assert_eq!(a.alpha(K, 4).unwrap().0, 4.0);
        // missing lora_alpha / r: LoraConfig's defaults (8, 8), so rank 4 is a mismatch
        let a = FileAlphas::from_header(&header(r#"{"unet.target_modules": ["to_q"]}"#)).unwrap();
        assert!(a.alpha(Q, 4).is_err());
        assert_eq!(a.alpha(Q, 8).unwrap().0, 8.0);
        // text-encoder-only metadata says nothing about the UNet
        let mut h = header(r#"{"text_encoder.r": 4, "text_encoder.lora_alpha": 1}"#);
        h.insert(OUR_ALPHA_KEY.into(), "6".into());
        let mut a = FileAlphas::from_header(&h).unwrap();
        assert_eq!(a.alpha(Q, 4).unwrap(), (6.0, AlphaSource::OurMetadata));
        a.tensors.insert(Q.into(), 1.5);
        assert_eq!(a.alpha(Q, 4).unwrap(), (1.5, AlphaSource::Tensor));
        assert_eq!(
            FileAlphas::default().alpha(Q, 4).unwrap(),
            (4.0, AlphaSource::Default)
        );
        // a PEFT adapter_config.json counts after the header, before our own entry
        let a = FileAlphas::from_header(&h)
            .unwrap()
            .with_peft_config(r#"{"r": 4, "lora_alpha": 12, "peft_type": "LORA"}"#)
            .unwrap();
        assert_eq!(a.alpha(Q, 4).unwrap(), (12.0, AlphaSource::AdapterConfig));
        for bad in [
            r#"{"unet.r": "x"}"#,
            "[1]",
            r#"{"unet.use_dora": true, "unet.r": 4}"#,
        ] {
            let err = format!("{:#}", FileAlphas::from_header(&header(bad)).unwrap_err());
            assert!(err.contains(ADAPTER_METADATA_KEY), "{bad}: {err}");
        }
    }
}
