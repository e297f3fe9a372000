//! `unet/config.json` of a diffusers `UNet2DConditionModel`, typed. Unknown keys are ignored;
//! values this implementation does not support are rejected with an error naming the file.

use std::path::Path;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// A config value that is either one int for every block or a per-block list.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum IntOrList {
    Int(usize),
    List(Vec<usize>),
}

impl IntOrList {
    /// Expand to `n` values (an int repeated; a list must have `n` entries).
    pub fn expand(&self, n: usize, key: &str) -> Result<Vec<usize>> {
        match self {
            IntOrList::Int(v) => Ok(vec![*v; n]),
            IntOrList::List(v) if v.len() == n => Ok(v.clone()),
            IntOrList::List(v) => bail!(
                "`{key}` has {} entries, expected {n} (one per down block)",
                v.len()
            ),
        }
    }
}

/// `null` in a config reads as the default (real SDXL configs say `"upcast_attention": null`).
fn null_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// diffusers types `freq_shift` as an int: write 0, not 0.0, when the value is whole.
fn integral_as_int<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn default_in_channels() -> usize {
    4
}
fn default_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_true() -> bool {
    true
}
fn default_two() -> usize {
    2
}
fn default_one() -> usize {
    1
}
fn default_one_f() -> f64 {
    1.0
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_cross() -> IntOrList {
    IntOrList::Int(1280)
}
fn default_head() -> IntOrList {
    IntOrList::Int(8)
}
fn default_layers() -> IntOrList {
    IntOrList::Int(1)
}
fn default_act() -> String {
    "silu".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_time_shift() -> String {
    "default".into()
}
fn default_attention_type() -> String {
    "default".into()
}
fn default_three() -> usize {
    3
}

/// The fields of diffusers' `UNet2DConditionModel` config that matter here (defaults as diffusers').
/// Serialized, it is a config diffusers loads: an unset optional key is left out (diffusers'
/// default is `None` for each), never written as a `null` diffusers would not accept.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct UNetConfig {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_in_channels")]
    pub out_channels: usize,
    #[serde(default, deserialize_with = "null_default")]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(
        default,
        deserialize_with = "null_default",
        serialize_with = "integral_as_int"
    )]
    pub freq_shift: f64,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    /// `null` (or absent) reads as false; it is not written back (diffusers needs a bool or list).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub only_cross_attention: serde_json::Value,
    #[serde(default = "default_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_two")]
    pub layers_per_block: usize,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default = "default_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross")]
    pub cross_attention_dim: IntOrList,
    #[serde(default = "default_layers")]
    pub transformer_layers_per_block: IntOrList,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    /// Legacy diffusers naming: for SD1.5/2.x/SDXL this is the number of HEADS per block.
    #[serde(default = "default_head")]
    pub attention_head_dim: IntOrList,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_attention_heads: Option<IntOrList>,
    #[serde(default, deserialize_with = "null_default")]
    pub dual_cross_attention: bool,
    #[serde(default, deserialize_with = "null_default")]
    pub use_linear_projection: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_embed_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addition_embed_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_class_embeds: Option<usize>,
    #[serde(default, deserialize_with = "null_default")]
    pub upcast_attention: bool,
    #[serde(default = "default_time_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default, deserialize_with = "null_default")]
    pub resnet_skip_time_act: bool,
    #[serde(default = "default_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_embedding_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_post_act: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_three")]
    pub conv_out_kernel: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_attention_norm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_size: Option<serde_json::Value>,
}

/// Per-block values derived from the config (down-block order).
#[derive(Debug, Clone)]
pub struct BlockPlan {
    pub heads: Vec<usize>,
    pub cross_dims: Vec<usize>,
    pub layers: Vec<usize>,
    pub up_layers: Vec<usize>,
}

pub const DOWN_TYPES: [&str; 2] = ["CrossAttnDownBlock2D", "DownBlock2D"];
pub const UP_TYPES: [&str; 2] = ["CrossAttnUpBlock2D", "UpBlock2D"];

impl UNetConfig {
    /// Read `dir/config.json` and check it is supported.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg: Self = crate::models::config::read_config(dir, "config.json")?;
        let path = dir.join("config.json");
        cfg.validate()
            .map_err(|e| e.context(format!("unsupported UNet config {}", path.display())))?;
        Ok(cfg)
    }

    /// The `config.json` of a diffusers folder for this config (`_class_name` included).
    pub fn to_diffusers_json(&self) -> Result<serde_json::Value> {
        let mut config = serde_json::to_value(self)?;
        if let Some(obj) = config.as_object_mut() {
            obj.insert("_class_name".into(), "UNet2DConditionModel".into());
        }
        Ok(config)
    }

    /// Parse a config from JSON text (`what` names the source in errors).
    pub fn from_json(text: &str, what: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("invalid UNet config {what}: {e}"))?;
        cfg.validate()
            .map_err(|e| e.context(format!("unsupported UNet config {what}")))?;
        Ok(cfg)
    }

    /// Reject what this implementation does not compute, naming the key and value.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("`block_out_channels` is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        for t in &self.down_block_types {
            if !DOWN_TYPES.contains(&t.as_str()) {
                bail!(
                    "unsupported down block type `{t}` (supported: {})",
                    DOWN_TYPES.join(", ")
                );
            }
        }
        for t in &self.up_block_types {
            if !UP_TYPES.contains(&t.as_str()) {
                bail!(
                    "unsupported up block type `{t}` (supported: {})",
                    UP_TYPES.join(", ")
                );
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => {
                bail!("unsupported mid_block_type `{other:?}` (supported: UNetMidBlock2DCrossAttn)")
            }
        }
        let checks: [(&str, bool, String); 14] = [
            ("act_fn", self.act_fn == "silu", self.act_fn.clone()),
            (
                "time_embedding_type",
                self.time_embedding_type == "positional",
                self.time_embedding_type.clone(),
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
                self.resnet_time_scale_shift.clone(),
            ),
            (
                "attention_type",
                self.attention_type == "default",
                self.attention_type.clone(),
            ),
            (
                "class_embed_type",
                self.class_embed_type.is_none(),
                format!("{:?}", self.class_embed_type),
            ),
            (
                "num_class_embeds",
                self.num_class_embeds.is_none(),
                format!("{:?}", self.num_class_embeds),
            ),
            (
                "encoder_hid_dim_type",
                self.encoder_hid_dim_type.is_none(),
                format!("{:?}", self.encoder_hid_dim_type),
            ),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.is_none(),
                format!("{:?}", self.time_cond_proj_dim),
            ),
            (
                "timestep_post_act",
                self.timestep_post_act.is_none(),
                format!("{:?}", self.timestep_post_act),
            ),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_none(),
                format!("{:?}", self.time_embedding_act_fn),
            ),
            (
                "cross_attention_norm",
                self.cross_attention_norm.is_none(),
                format!("{:?}", self.cross_attention_norm),
            ),
            (
                "dual_cross_attention",
                !self.dual_cross_attention,
                "true".into(),
            ),
            (
                "resnet_skip_time_act",
                !self.resnet_skip_time_act,
                "true".into(),
            ),
            (
                "resnet_out_scale_factor",
                self.resnet_out_scale_factor == 1.0,
                self.resnet_out_scale_factor.to_string(),
            ),
        ];
        for (key, ok, value) in checks {
            if !ok {
                bail!("unsupported `{key}` = {value}");
            }
        }
        match &self.only_cross_attention {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Array(a)
                if a.iter().all(|v| v == &serde_json::Value::Bool(false)) => {}
            v => bail!("unsupported `only_cross_attention` = {v}"),
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_none()
                    || self.projection_class_embeddings_input_dim.is_none() =>
            {
                bail!("`addition_embed_type` = text_time needs `addition_time_embed_dim` and `projection_class_embeddings_input_dim`");
            }
            Some("text_time") => {}
            Some(other) => {
                bail!("unsupported `addition_embed_type` = `{other}` (supported: text_time)")
            }
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            bail!("`conv_in_kernel`/`conv_out_kernel` must be odd");
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| c % self.norm_num_groups != 0)
        {
            bail!(
                "`block_out_channels` {:?} must be multiples of `norm_num_groups` {}",
                self.block_out_channels,
                self.norm_num_groups
            );
        }
        let plan = self.plan()?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&plan.heads).enumerate() {
            if h == 0 || c % h != 0 {
                bail!("block {i}: {c} channels do not split into {h} attention heads");
            }
        }
        Ok(())
    }

    /// Heads, cross-attention dims and transformer depths per down block.
    pub fn plan(&self) -> Result<BlockPlan> {
        let n = self.block_out_channels.len();
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        let cross_dims = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let layers = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let up_layers = match &self.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => bail!(
                "`reverse_transformer_layers_per_block` has {} entries, expected {n}",
                v.len()
            ),
            None => layers.iter().rev().copied().collect(),
        };
        Ok(BlockPlan {
            heads,
            cross_dims,
            layers,
            up_layers,
        })
    }

    /// Channels of the time embedding (`time_embedding_dim` or 4 x the first block's channels).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }

    /// Whether forward needs SDXL's `text_embeds` and `time_ids`.
    pub fn needs_added_cond(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }
}
