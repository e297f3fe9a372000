//! LPO's multi-candidate sampler.
//!
//! For a batch of prompts: x_T ~ N(0, I) from the seeded rng; at step i of the DDIM schedule
//! (t = timesteps[i]) the policy predicts noise with CFG (no graph is kept); before
//! `divert_start` (and from `divert_end` on, when > 0) one plain DDIM step is taken; inside
//! the window K candidates x_{t-1} are drawn from the same x_t, all K·B are scored by the LRM
//! at timestep t (as the official code does), a compare callback picks (best, worst, valid)
//! per row, every valid row is recorded as (t, x_t, x_win, x_lose, prompt), and sampling
//! continues from a uniformly random candidate per row (seeded).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::comparison::Comparison;
use super::policy::{Policy, PromptCond};
use super::record::Record;
use crate::diffusion::DdimScheduler;
use crate::reward::lrm::{LatentRewardModel, TextConditioning};
use crate::runtime::control::RunControl;
use crate::tensor::SeededRng;

/// Sampler settings (defaults: the paper's K 4, 20 steps, eta 1, guidance 5).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct SamplerConfig {
    /// Candidates drawn from the same x_t at each diverting step (>= 2: a best and a worst).
    pub k: usize,
    /// DDIM steps.
    #[serde(rename = "steps")]
    pub num_steps: usize,
    /// DDIM eta of every step (> 0: the candidates of a deterministic step are identical).
    pub eta: f64,
    /// Classifier-free guidance scale (the empty prompt is the negative; 1 = no guidance).
    pub guidance_scale: f64,
    /// First step index (0-based) that draws candidates.
    pub divert_start: usize,
    /// Step index where candidate drawing ends (exclusive); 0 = until the last step.
    pub divert_end: usize,
    /// Latent [C, H, W]; unset = the UNet's in_channels and sample_size.
    pub latent_shape: Option<[usize; 3]>,
    /// Seed of the generator when the caller does not share one (unset: the run's seed).
    /// The sampler itself draws from the generator it is given.
    pub seed: Option<i64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            k: 4,
            num_steps: 20,
            eta: 1.0,
            guidance_scale: 5.0,
            divert_start: 0,
            divert_end: 0,
            latent_shape: None,
            seed: None,
        }
    }
}

impl SamplerConfig {
    pub fn validate(&self) -> Result<()> {
        if self.k < 2 {
            bail!(
                "lpo_sample: k must be >= 2 (a best and a worst candidate), got {}",
                self.k
            );
        }
        if self.num_steps == 0 {
            bail!("lpo_sample: steps must be >= 1");
        }
        if !(self.eta > 0.0 && self.eta.is_finite()) {
            bail!("lpo_sample: eta must be > 0 (candidates of a deterministic step are identical), got {}", self.eta);
        }
        if !self.guidance_scale.is_finite() {
            bail!("lpo_sample: guidance_scale must be finite");
        }
        if self.divert_start >= self.num_steps {
            bail!(
                "lpo_sample: divert_start {} is past the last step index {}",
                self.divert_start,
                self.num_steps - 1
            );
        }
        if self.divert_end > 0 && self.divert_end <= self.divert_start {
            bail!(
                "lpo_sample: divert_end {} must be 0 (until the end) or > divert_start {}",
                self.divert_end,
                self.divert_start
            );
        }
        if let Some(shape) = self.latent_shape.filter(|s| s.contains(&0)) {
            bail!("lpo_sample: latent_shape must be [C, H, W] positive ints, got {shape:?}");
        }
        Ok(())
    }

    /// Whether step index `i` draws candidates.
    pub fn diverts(&self, i: usize) -> bool {
        i >= self.divert_start && (self.divert_end == 0 || i < self.divert_end)
    }

    fn guidance(&self) -> Option<f64> {
        (self.guidance_scale != 1.0).then_some(self.guidance_scale)
    }
}

/// What one diverting step saw.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub t: i64,
    pub score_mean: f64,
    pub score_std: f64,
    /// Pairs kept at this step.
    pub valid: usize,
    /// Every score, [K][B] (row k = candidate k); scripts see it as a tensor.
    #[serde(skip)]
    pub scores: Vec<Vec<f32>>,
    /// The candidate each row continued from.
    pub chosen: Vec<usize>,
}

pub struct SampleOutput {
    pub records: Vec<Record>,
    pub log: Vec<StepLog>,
    /// Final x_0 latents [B, C, H, W].
    pub latents: Tensor,
}

/// Everything the sampler needs besides the settings.
pub struct SamplerInputs<'a> {
    pub policy: &'a Policy,
    pub scheduler: &'a DdimScheduler,
    pub lrm: &'a LatentRewardModel,
    pub prompts: &'a [String],
    /// The policy's conditioning of `prompts` (see [`PromptCond::encode`]).
    pub cond: &'a PromptCond,
    pub control: Option<&'a RunControl>,
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Check that the LRM can score the policy's latents.
pub fn check_lrm(policy: &Policy, lrm: &LatentRewardModel) -> Result<()> {
    let c = policy.unet.config.out_channels;
    let lc = lrm.unet.config.in_channels;
    if c != lc {
        bail!(
            "the LRM ({}) takes {lc}-channel latents but the policy UNet makes {c}-channel latents",
            lrm.dir.display()
        );
    }
    Ok(())
}

/// The compare step: scores [K, B] (f32) and t [B] (i64) -> the pairs to keep.
pub type CompareFn<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<Comparison> + 'a;

/// Run the sampler.
pub fn sample(
    inputs: &SamplerInputs,
    cfg: &SamplerConfig,
    rng: &mut SeededRng,
    compare: &mut CompareFn,
) -> Result<SampleOutput> {
    sample_with_reward(inputs, cfg, rng, compare, None)
}

/// A reward that replaces the LRM's scores: candidates [K, B, C, H, W] and t [B] (the step
/// they were drawn at) -> scores [K, B]. For controls (a random reward, a judge on the
/// predicted x0) and for rewards that are not a latent reward model.
pub type RewardFn<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<Tensor> + 'a;

/// [`sample`] with the candidates scored by `reward` instead of the LRM when it is given.
pub fn sample_with_reward(
    inputs: &SamplerInputs,
    cfg: &SamplerConfig,
    rng: &mut SeededRng,
    compare: &mut CompareFn,
    mut reward: Option<&mut RewardFn>,
) -> Result<SampleOutput> {
    cfg.validate()?;
    let SamplerInputs {
        policy,
        scheduler,
        lrm,
        prompts,
        cond,
        control,
    } = inputs;
    let b = prompts.len();
    if b == 0 {
        bail!("lpo_sample: the prompt list is empty");
    }
    if cond.batch()? != b {
        bail!(
            "lpo_sample: {} conditioning rows for {b} prompts",
            cond.batch()?
        );
    }
    check_lrm(policy, lrm)?;
    let ucfg = &policy.unet.config;
    let [c, h, w] = match cfg.latent_shape {
        Some(s) => s,
        None => {
            let size = ucfg
                .sample_size
                .as_ref()
                .and_then(|s| s.as_u64().or_else(|| s.get(0).and_then(|v| v.as_u64())))
                .unwrap_or(64) as usize;
            [ucfg.in_channels, size, size]
        }
    };
    let device = policy.unet.device().clone();
    let dtype = policy.unet.dtype();
    let timesteps = scheduler.timesteps_vec().ok();
    let timesteps = match timesteps {
        Some(ts) if ts.len() == cfg.num_steps => ts,
        _ => {
            scheduler.set_timesteps(cfg.num_steps)?;
            scheduler.timesteps_vec()?
        }
    };
    let k = cfg.k;
    // The LRM's own text side, encoded once, repeated for the K·B candidates.
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let lrm_cond: TextConditioning = lrm.encode_text(&lrm.tokenize(&refs)?)?;
    let lrm_cond_k = LatentRewardModel::repeat_conditioning(&lrm_cond, k)?;

    let sampling_unet = policy.sampling_unet()?;
    let mut x = rng.randn((b, c, h, w), &device)?.to_dtype(dtype)?;
    let mut records = Vec::new();
    let mut log = Vec::new();
    for (i, &t) in timesteps.iter().enumerate() {
        if let Some(ctl) = control {
            ctl.check()?;
        }
        let tt = Tensor::full(t, b, &device)?;
        let eps = Policy::predict_detached(&sampling_unet, &x, &tt, cond, cfg.guidance())?;
        if !cfg.diverts(i) {
            x = scheduler.step(&eps, &tt, &x, cfg.eta, rng)?.detach();
            continue;
        }
        let cands = scheduler
            .candidates(&eps, &tt, &x, k, cfg.eta, rng)?
            .detach(); // [K, B, C, H, W]
        let scores = match reward.as_mut() {
            Some(f) => {
                let s = f(&cands, &tt)?.detach().to_dtype(DType::F32)?;
                if s.dims() != [k, b] {
                    bail!(
                        "reward function returned scores of shape {:?}; expected [K, B] = [{k}, {b}]",
                        s.dims()
                    );
                }
                s.to_device(&device)?
            }
            None => {
                let flat = cands.reshape((k * b, c, h, w))?;
                let tk = Tensor::full(t, k * b, lrm.device())?;
                lrm.score_with(&flat.to_device(lrm.device())?, &lrm_cond_k, &tk)?
                    .detach()
                    .to_dtype(DType::F32)?
                    .reshape((k, b))?
                    .to_device(&device)?
            }
        };
        let cmp = compare(&scores, &tt)?;
        if cmp.shape() != (k, b) {
            bail!(
                "compare: a comparison of [K, B] = {:?} for scores [{k}, {b}]",
                cmp.shape()
            );
        }
        let score_rows: Vec<Vec<f32>> = scores.to_vec2()?;
        let mut valid = 0;
        for row in 0..b {
            let Some((bi, wi)) = cmp.pair(row) else {
                continue;
            };
            valid += 1;
            records.push(Record {
                t,
                x_t: x.get(row)?,
                x_win: cands.get(bi)?.get(row)?,
                x_lose: cands.get(wi)?.get(row)?,
                prompt_index: row,
                prompt: prompts[row].clone(),
                cond: cond.select(&[row])?,
                score_win: score_rows[bi][row],
                score_lose: score_rows[wi][row],
            });
        }
        let chosen: Vec<usize> = (0..b).map(|_| rng.int_in(0, k as i64) as usize).collect();
        let rows = chosen
            .iter()
            .enumerate()
            .map(|(row, &j)| cands.get(j)?.get(row))
            .collect::<candle_core::Result<Vec<_>>>()?;
        x = Tensor::stack(&rows, 0)?;
        let all: Vec<f32> = score_rows.iter().flatten().copied().collect();
        let (score_mean, score_std) = mean_std(&all);
        log.push(StepLog {
            step: i,
            t,
            score_mean,
            score_std,
            valid,
            scores: score_rows,
            chosen,
        });
    }
    Ok(SampleOutput {
        records,
        log,
        latents: x,
    })
}
