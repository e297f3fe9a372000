//! DDIM noise schedule: the scheduler config (`scheduler_config.json`), betas and
//! `alphas_cumprod` computed like diffusers/torch in f32, and inference timestep spacing.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    pub fn as_str(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// The raw `scheduler_config.json` fields DDIM uses (defaults as diffusers' DDIMScheduler).
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default = "d_train")]
    num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    beta_start: f64,
    #[serde(default = "d_beta_end")]
    beta_end: f64,
    #[serde(default = "d_schedule")]
    beta_schedule: String,
    #[serde(default)]
    trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_true")]
    clip_sample: bool,
    #[serde(default = "d_one")]
    clip_sample_range: f64,
    #[serde(default = "d_true")]
    set_alpha_to_one: bool,
    #[serde(default)]
    steps_offset: i64,
    #[serde(default = "d_pred")]
    prediction_type: String,
    #[serde(default = "d_spacing")]
    timestep_spacing: String,
    #[serde(default)]
    thresholding: bool,
    #[serde(default)]
    rescale_betas_zero_snr: bool,
}

fn d_train() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_schedule() -> String {
    "linear".into()
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_pred() -> String {
    "epsilon".into()
}
fn d_spacing() -> String {
    "leading".into()
}

/// A validated DDIM configuration.
#[derive(Debug, Clone)]
pub struct DdimConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas (`trained_betas`), overriding the schedule.
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    /// The file the config came from (for error messages), if any.
    pub source: Option<PathBuf>,
}

impl Default for DdimConfig {
    /// Stable Diffusion 1.5's DDIM settings.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: false,
            steps_offset: 1,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            source: None,
        }
    }
}

impl DdimConfig {
    /// Read `dir/scheduler/scheduler_config.json`, or `dir/scheduler_config.json`, or `dir`
    /// itself when it is the json file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let candidates = [
            dir.join("scheduler").join("scheduler_config.json"),
            dir.join("scheduler_config.json"),
        ];
        let path = if dir.is_file() {
            dir.to_path_buf()
        } else if let Some(p) = candidates.iter().find(|p| p.is_file()) {
            p.clone()
        } else {
            bail!(
                "no scheduler config in {}: expected {} or {}",
                dir.display(),
                candidates[0].display(),
                candidates[1].display()
            );
        };
        Self::from_file(&path)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scheduler config {}", path.display()))?;
        Self::from_json(&text, Some(path))
    }

    /// Parse and validate a `scheduler_config.json` text; `source` names the file in errors.
    pub fn from_json(text: &str, source: Option<&Path>) -> Result<Self> {
        let file = source
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<scheduler config>".into());
        let raw: RawConfig = serde_json::from_str(text)
            .with_context(|| format!("invalid scheduler config {file}"))?;
        let bad = |key: &str, value: &str, accepted: &str| -> anyhow::Error {
            anyhow::anyhow!(
                "scheduler config {file}: unsupported {key} `{value}` (supported: {accepted})"
            )
        };
        let beta_schedule = match raw.beta_schedule.as_str() {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            other => return Err(bad("beta_schedule", other, "scaled_linear, linear")),
        };
        let prediction_type = match raw.prediction_type.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            "sample" => PredictionType::Sample,
            other => {
                return Err(bad(
                    "prediction_type",
                    other,
                    "epsilon, v_prediction, sample",
                ))
            }
        };
        let timestep_spacing = match raw.timestep_spacing.as_str() {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            "linspace" => TimestepSpacing::Linspace,
            other => {
                return Err(bad(
                    "timestep_spacing",
                    other,
                    "leading, trailing, linspace",
                ))
            }
        };
        if raw.thresholding {
            return Err(bad("thresholding", "true", "false"));
        }
        if raw.rescale_betas_zero_snr {
            return Err(bad("rescale_betas_zero_snr", "true", "false"));
        }
        if raw.num_train_timesteps < 2 {
            bail!(
                "scheduler config {file}: num_train_timesteps must be >= 2, got {}",
                raw.num_train_timesteps
            );
        }
        if let Some(b) = &raw.trained_betas {
            if b.len() != raw.num_train_timesteps {
                bail!(
                    "scheduler config {file}: trained_betas has {} entries but num_train_timesteps is {}",
                    b.len(),
                    raw.num_train_timesteps
                );
            }
        }
        let cfg = Self {
            num_train_timesteps: raw.num_train_timesteps,
            beta_start: raw.beta_start,
            beta_end: raw.beta_end,
            beta_schedule,
            trained_betas: raw.trained_betas,
            clip_sample: raw.clip_sample,
            clip_sample_range: raw.clip_sample_range,
            set_alpha_to_one: raw.set_alpha_to_one,
            steps_offset: raw.steps_offset,
            prediction_type,
            timestep_spacing,
            source: source.map(Path::to_path_buf),
        };
        let betas = cfg.betas();
        if let Some(i) = betas.iter().position(|b| !(*b > 0.0 && *b < 1.0)) {
            bail!(
                "scheduler config {file}: beta[{i}] = {} is outside (0, 1) (beta_start {}, beta_end {})",
                betas[i],
                cfg.beta_start,
                cfg.beta_end
            );
        }
        Ok(cfg)
    }

    /// Betas in f32 exactly as torch builds them.
    pub fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        if let Some(b) = &self.trained_betas {
            return b.iter().map(|&v| v as f32).collect();
        }
        match self.beta_schedule {
            BetaSchedule::Linear => {
                torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, n)
            }
            BetaSchedule::ScaledLinear => torch_linspace_f32(
                self.beta_start.sqrt() as f32,
                self.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|v| v * v)
            .collect(),
        }
    }

    /// `cumprod(1 - betas)` as torch computes it for f32 on the CPU (f64 accumulator, each
    /// partial product rounded to f32).
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let mut acc = 1.0f64;
        self.betas()
            .into_iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect()
    }

    /// `alphas_cumprod` in f64 throughout (for reference).
    pub fn alphas_cumprod_f64(&self) -> Vec<f64> {
        let mut acc = 1.0f64;
        self.betas()
            .into_iter()
            .map(|b| {
                acc *= 1.0 - b as f64;
                acc
            })
            .collect()
    }

    /// Inference timesteps, first (noisiest) to last, as diffusers' `set_timesteps(n)`.
    pub fn timesteps(&self, n: usize) -> Result<Vec<i64>> {
        let big = self.num_train_timesteps;
        if n == 0 || n > big {
            bail!("set_timesteps: number of inference steps must be in 1..={big}, got {n}");
        }
        let ts: Vec<i64> = match self.timestep_spacing {
            TimestepSpacing::Leading => {
                let ratio = (big / n) as i64;
                (0..n as i64)
                    .rev()
                    .map(|i| i * ratio + self.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = big as f64 / n as f64;
                // np.round(np.arange(N, 0, -ratio)) - 1, n entries
                (0..n)
                    .map(|i| round_half_even(big as f64 - i as f64 * ratio) as i64 - 1)
                    .collect()
            }
            TimestepSpacing::Linspace => {
                let last = (big - 1) as f64;
                let mut v: Vec<i64> = (0..n)
                    .map(|i| {
                        // np.linspace: i * step, the last entry exactly `last`
                        let x = if n == 1 {
                            0.0
                        } else if i == n - 1 {
                            last
                        } else {
                            i as f64 * (last / (n - 1) as f64)
                        };
                        round_half_even(x) as i64
                    })
                    .collect();
                v.reverse();
                v
            }
        };
        if let Some(bad) = ts.iter().find(|&&t| t < 0 || t >= big as i64) {
            bail!(
                "set_timesteps({n}): timestep {bad} falls outside 0..{big} (steps_offset {} with {:?} spacing)",
                self.steps_offset,
                self.timestep_spacing
            );
        }
        Ok(ts)
    }
}

/// numpy's round (half to even).
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: an f32 step, the first half
/// counted up from `start`, the second half down from `end`.
pub fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers() {
        let mut cfg = DdimConfig::default();
        let ts = cfg.timesteps(20).unwrap();
        assert_eq!(ts.first(), Some(&951));
        assert_eq!(ts.last(), Some(&1));
        cfg.timestep_spacing = TimestepSpacing::Trailing;
        let ts = cfg.timesteps(20).unwrap();
        assert_eq!((ts[0], ts[19], ts.len()), (999, 49, 20));
        let ts = cfg.timesteps(3).unwrap();
        // np.round(np.arange(1000, 0, -333.33)) - 1 = [999, 666, 332]
        assert_eq!(ts, vec![999, 666, 332]);
        cfg.timestep_spacing = TimestepSpacing::Linspace;
        let ts = cfg.timesteps(4).unwrap();
        // np.linspace(0, 999, 4).round()[::-1] = [999, 666, 333, 0]
        assert_eq!(ts, vec![999, 666, 333, 0]);
        assert!(cfg.timesteps(0).is_err() && cfg.timesteps(1001).is_err());
    }

    #[test]
    fn unknown_schedule_names_file_and_value() {
        let err = DdimConfig::from_json(
            r#"{"beta_schedule": "squaredcos_cap_v2"}"#,
            Some(Path::new("/x/scheduler_config.json")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/x/scheduler_config.json") && err.contains("squaredcos_cap_v2"),
            "{err}"
        );
    }
}
