//! AdamW's settings as scripts write them (`adamw(params, #{lr, betas, ...})`): flat options
//! that [`AdamWConfig`] is built from. The defaults are [`AdamWConfig::default`]'s.

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::clip::GradClip;
use super::optimizer::{AdamWConfig, Schedule};

/// The learning-rate schedule after warmup, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleName {
    Constant,
    Cosine,
    Linear,
}

/// AdamW options (decoupled weight decay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct AdamWOptions {
    /// Base learning rate (before warmup and schedule).
    pub lr: f64,
    /// [beta1, beta2]: decay rates of the first and second moments.
    pub betas: [f64; 2],
    /// Added to the second moment's square root.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global-norm gradient clipping; () = off (the official LPO code's clip is a no-op).
    pub max_grad_norm: Option<f64>,
    /// Linear warmup: step k uses lr * k / warmup_steps.
    pub warmup_steps: u64,
    /// After warmup: constant, or a cosine or linear decay to 0 at `total_steps`.
    pub schedule: ScheduleName,
    /// Length of a cosine or linear schedule (required by them).
    pub total_steps: Option<u64>,
}

impl Default for AdamWOptions {
    fn default() -> Self {
        AdamWConfig::default().into()
    }
}

impl From<AdamWConfig> for AdamWOptions {
    fn from(c: AdamWConfig) -> Self {
        let (schedule, total_steps) = match c.schedule {
            Schedule::Constant => (ScheduleName::Constant, None),
            Schedule::Cosine { total_steps } => (ScheduleName::Cosine, Some(total_steps)),
            Schedule::Linear { total_steps } => (ScheduleName::Linear, Some(total_steps)),
        };
        Self {
            lr: c.lr,
            betas: [c.beta1, c.beta2],
            eps: c.eps,
            weight_decay: c.weight_decay,
            max_grad_norm: c.clip.max_norm(),
            warmup_steps: c.warmup_steps,
            schedule,
            total_steps,
        }
    }
}

impl TryFrom<AdamWOptions> for AdamWConfig {
    type Error = anyhow::Error;

    /// The checked config (`validate` included).
    fn try_from(o: AdamWOptions) -> Result<Self> {
        let schedule = match (o.schedule, o.total_steps) {
            (ScheduleName::Constant, _) => Schedule::Constant,
            (name, None) => bail!(
                "adamw: schedule `{}` needs option `total_steps`",
                serde_json::to_value(name)?.as_str().unwrap_or_default()
            ),
            (ScheduleName::Cosine, Some(total_steps)) => Schedule::Cosine { total_steps },
            (ScheduleName::Linear, Some(total_steps)) => Schedule::Linear { total_steps },
        };
        let cfg = AdamWConfig {
            lr: o.lr,
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
            weight_decay: o.weight_decay,
            clip: GradClip::from_option(o.max_grad_norm)
                .map_err(|e| anyhow::anyhow!("adamw: {e}"))?,
            warmup_steps: o.warmup_steps,
            schedule,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
