//! `lpo bench`: the cost of LPO's two hot loops on full-size Stable Diffusion shapes with
//! random weights, on any device and dtype.
//!
//! * Sampling step: the policy's classifier-free-guided noise prediction for B prompts
//!   (2B rows), K DDIM candidates per prompt, and the LRM's encoder pass over the K·B
//!   candidates (doubled for its own guidance: 2·K·B rows), pooled and projected.
//! * Training step: for B records, the policy's guided prediction with LoRA on and the
//!   gradient kept, the reference prediction (adapters off on the same UNet, or a second
//!   frozen UNet with `--reference copy`), win and lose log-probs from one mean each, the
//!   LPO loss, backward and an AdamW step on the LoRA parameters (f32 master weights).
//!
//! Peak device memory is measured from outside (nvidia-smi) by `scripts/gpu_check.sh`, one
//! process per configuration, so the numbers are the process's own. On a CPU (Linux) the report
//! carries the RSS once the weights are in and the RSS peak over the timed steps ([`rss`]);
//! `benches/side_by_side.sh` sets them against the same step in diffusers + peft.

pub mod rss;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

use crate::diffusion::ddim::DdimScheduler;
use crate::diffusion::DdimConfig;
use crate::lpo::loss::{lpo_loss, LpoLossConfig};
use crate::models::loading::WeightMode;
use crate::models::lora::LoraConfig;
use crate::models::unet::{AddedCond, UNet2DConditionModel, UNetConfig};
use crate::optim::{AdamW, AdamWConfig, Params};
use crate::reward::lrm::stage_indices;
use crate::tensor::SeededRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchModel {
    /// SD1.5 UNet at 512 px (64x64 latents), sampling batch 5, training batch 10, LoRA rank 4.
    Sd15,
    /// SDXL UNet at 1024 px (128x128 latents), sampling batch 4, training batch 4, LoRA rank 64.
    Sdxl,
    /// The tiny-lrm test UNet (16x16 latents), for a quick check on a CPU.
    Tiny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reference {
    /// The reference is the policy's UNet with adapters off (one UNet in memory).
    LoraOff,
    /// A second frozen UNet (what the official code keeps).
    Copy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Sample,
    Train,
    All,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchOptions {
    pub model: BenchModel,
    pub dtype: String,
    pub reference: Reference,
    pub phase: Phase,
    pub k: usize,
    pub repeats: usize,
    pub sample_batch: Option<usize>,
    pub train_batch: Option<usize>,
    /// Rows per backward pass in the training step; the batch's gradients are accumulated
    /// over micro-batches of this size (default: the whole batch at once).
    pub micro_batch: Option<usize>,
    /// Latent height = width (default: the model's, e.g. 64 for SD1.5).
    pub latent_size: Option<usize>,
    /// Recompute block activations in backward instead of keeping them.
    pub gradient_checkpointing: bool,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub options: BenchOptions,
    pub unet_params: usize,
    pub latent: [usize; 3],
    pub sample_batch: usize,
    pub train_batch: usize,
    pub micro_batch: usize,
    pub lora_rank: usize,
    pub ms_per_sampling_step: Option<f64>,
    pub ms_per_training_step: Option<f64>,
    pub load_seconds: f64,
    /// Threads candle's CPU kernels use.
    pub threads: usize,
    pub gradient_checkpointing: bool,
    /// RSS (MiB) after the weights are loaded and LoRA attached, before the timed phase
    /// (the training step; the sampling step with `--phase sample`). None off Linux.
    pub rss_after_load_mb: Option<f64>,
    /// RSS high-water mark (MiB) over the warm-up and timed steps of that phase.
    pub peak_rss_mb: Option<f64>,
    /// peak_rss_mb - rss_after_load_mb: the step's activations, gradients and optimizer state.
    pub activation_mb: Option<f64>,
}

struct Shapes {
    config: &'static str,
    latent: [usize; 3],
    text_len: usize,
    text_dim: usize,
    sample_batch: usize,
    train_batch: usize,
    lora_rank: usize,
}

fn shapes(model: BenchModel) -> Shapes {
    match model {
        BenchModel::Sd15 => Shapes {
            config: include_str!("../../benches/configs/sd15_unet.json"),
            latent: [4, 64, 64],
            text_len: 77,
            text_dim: 768,
            sample_batch: 5,
            train_batch: 10,
            lora_rank: 4,
        },
        BenchModel::Sdxl => Shapes {
            config: include_str!("../../benches/configs/sdxl_unet.json"),
            latent: [4, 128, 128],
            text_len: 77,
            text_dim: 2048,
            sample_batch: 4,
            train_batch: 4,
            lora_rank: 64,
        },
        BenchModel::Tiny => Shapes {
            config: include_str!("../../benches/configs/tiny_unet.json"),
            latent: [4, 16, 16],
            text_len: 77,
            text_dim: 32,
            sample_batch: 5,
            train_batch: 10,
            lora_rank: 4,
        },
    }
}

fn added_cond(
    model: BenchModel,
    rows: usize,
    dtype: DType,
    device: &Device,
) -> Result<Option<AddedCond>> {
    if model != BenchModel::Sdxl {
        return Ok(None);
    }
    let mut rng = SeededRng::new(7);
    Ok(Some(AddedCond {
        text_embeds: rng.randn((rows, 1280), device)?.to_dtype(dtype)?,
        time_ids: Tensor::new(&[1024f32, 1024., 0., 0., 1024., 1024.], device)?
            .to_dtype(dtype)?
            .unsqueeze(0)?
            .repeat((rows, 1))?,
    }))
}

fn cfg_guided(pred: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(crate::tensor::ops::cfg_guided(pred, scale)?)
}

/// Mean milliseconds of `repeats` calls of `f` after one warm-up call (device synchronised).
pub fn timed<T>(device: &Device, repeats: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?; // warm-up: kernels, allocator
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..repeats {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() * 1000.0 / repeats as f64)
}

/// The latent [C, H, W]: the model's, or `--latent-size` squared, which the UNet's
/// downsamplings must divide (each halves H and W, and the up path must meet the skips).
fn latent_shape(
    default: [usize; 3],
    size: Option<usize>,
    config: &UNetConfig,
) -> Result<[usize; 3]> {
    let Some(n) = size else {
        return Ok(default);
    };
    let factor = 1usize << config.block_out_channels.len().saturating_sub(1);
    if n == 0 || n % factor != 0 {
        bail!("--latent-size {n}: must be a positive multiple of {factor} for this UNet");
    }
    Ok([default[0], n, n])
}

pub fn run(opts: BenchOptions, device: &Device) -> Result<BenchReport> {
    let dtype = crate::tensor::parse_dtype(&opts.dtype)?;
    let s = shapes(opts.model);
    let config = UNetConfig::from_json(s.config, "bench config")?;
    let latent = latent_shape(s.latent, opts.latent_size, &config)?;
    let t_load = Instant::now();
    let policy = UNet2DConditionModel::random(config.clone(), 1, dtype, device, WeightMode::Frozen)
        .context("policy UNet")?;
    policy.set_gradient_checkpointing(opts.gradient_checkpointing);
    let unet_params = policy.param_count();
    let [c, h, w] = latent;
    let scheduler = DdimScheduler::new(DdimConfig::default(), device)?;
    scheduler.set_timesteps(20)?;
    let mut rng = SeededRng::new(0);
    let guidance = 5.0;
    let mut report = BenchReport {
        device: crate::tensor::device::device_name(device),
        options: opts.clone(),
        unet_params,
        latent,
        sample_batch: opts.sample_batch.unwrap_or(s.sample_batch),
        train_batch: opts.train_batch.unwrap_or(s.train_batch),
        micro_batch: 0,
        lora_rank: s.lora_rank,
        ms_per_sampling_step: None,
        ms_per_training_step: None,
        load_seconds: 0.0,
        threads: candle_core::utils::get_num_threads(),
        gradient_checkpointing: policy.gradient_checkpointing(),
        rss_after_load_mb: None,
        peak_rss_mb: None,
        activation_mb: None,
    };
    let mut rss_usage = rss::RssUsage::default();

    if matches!(opts.phase, Phase::Sample | Phase::All) {
        let lrm_unet =
            UNet2DConditionModel::random(config.clone(), 2, dtype, device, WeightMode::Frozen)
                .context("LRM UNet")?;
        report.load_seconds = t_load.elapsed().as_secs_f64();
        let b = report.sample_batch;
        let k = opts.k;
        let x = rng.randn((b, c, h, w), device)?.to_dtype(dtype)?;
        let ehs = rng
            .randn((2 * b, s.text_len, s.text_dim), device)?
            .to_dtype(dtype)?;
        let lrm_ehs = rng
            .randn((2 * k * b, s.text_len, s.text_dim), device)?
            .to_dtype(dtype)?;
        let added = added_cond(opts.model, 2 * b, dtype, device)?;
        let lrm_added = added_cond(opts.model, 2 * k * b, dtype, device)?;
        let t = Tensor::full(501i64, b, device)?;
        let t_lrm = Tensor::full(501i64, 2 * k * b, device)?;
        let stages = stage_indices(config.block_out_channels.len(), config.layers_per_block);
        let feat: usize = config.block_out_channels.iter().sum::<usize>()
            + config.block_out_channels.last().unwrap();
        let visual = (rng.randn((s.text_dim, feat), device)? * 0.02)?.to_dtype(dtype)?;
        let mut step_rng = SeededRng::new(3);
        let window = rss::RssWindow::open();
        report.ms_per_sampling_step = Some(timed(device, opts.repeats, || {
            let x2 = Tensor::cat(&[&x, &x], 0)?;
            let t2 = Tensor::cat(&[&t, &t], 0)?;
            let pred = cfg_guided(&policy.forward(&x2, &t2, &ehs, added.as_ref())?, guidance)?;
            let cands = scheduler.candidates(&pred, &t, &x, k, 1.0, &mut step_rng)?;
            let flat = cands.reshape((k * b, c, h, w))?;
            let doubled = Tensor::cat(&[&flat, &flat], 0)?;
            let f = lrm_unet.features(&doubled, &t_lrm, &lrm_ehs, lrm_added.as_ref())?;
            let pool =
                |x: &Tensor| -> candle_core::Result<Tensor> { x.mean(D::Minus1)?.mean(D::Minus1) };
            let mut parts = Vec::new();
            for &i in &stages {
                parts.push(pool(&f.down[i])?.narrow(0, 0, k * b)?);
            }
            parts.push(cfg_guided(&pool(&f.mid)?, 7.5)?);
            let scores = Tensor::cat(&parts, 1)?.matmul(&visual.t()?)?.sum(1)?;
            Ok(scores.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        })?);
        rss_usage = window.close();
        drop(lrm_unet);
    }

    if matches!(opts.phase, Phase::Train | Phase::All) {
        let reference = match opts.reference {
            Reference::Copy => Some(
                UNet2DConditionModel::random(config.clone(), 1, dtype, device, WeightMode::Frozen)
                    .context("reference UNet copy")?,
            ),
            Reference::LoraOff => None,
        };
        policy.add_lora(&LoraConfig {
            rank: s.lora_rank,
            alpha: s.lora_rank as f64,
            targets: LoraConfig::default_targets(),
            seed: 5,
        })?;
        if report.load_seconds == 0.0 {
            report.load_seconds = t_load.elapsed().as_secs_f64();
        }
        let params = Params::from_vars(policy.trainable_vars())?;
        let mut opt = AdamW::new(
            params,
            AdamWConfig {
                lr: 5e-5,
                ..AdamWConfig::default()
            },
        )?;
        let b = report.train_batch;
        let micro = opts.micro_batch.unwrap_or(b).clamp(1, b.max(1));
        report.micro_batch = micro;
        let x_t = rng.randn((b, c, h, w), device)?.to_dtype(dtype)?;
        let x_w = rng.randn((b, c, h, w), device)?.to_dtype(dtype)?;
        let x_l = rng.randn((b, c, h, w), device)?.to_dtype(dtype)?;
        let ehs = rng
            .randn((2 * b, s.text_len, s.text_dim), device)?
            .to_dtype(dtype)?;
        let added = added_cond(opts.model, 2 * b, dtype, device)?;
        let t = Tensor::full(501i64, b, device)?;
        // One micro-batch: rows [start, start + n) of the batch; its loss is weighted n / b so
        // the accumulated gradient is the whole batch's mean.
        let micro_step = |opt: &mut AdamW, start: usize, n: usize| -> Result<()> {
            let rows = |x: &Tensor| x.narrow(0, start, n);
            let (x_t, x_w, x_l, t) = (rows(&x_t)?, rows(&x_w)?, rows(&x_l)?, rows(&t)?);
            let x2 = Tensor::cat(&[&x_t, &x_t], 0)?;
            let t2 = Tensor::cat(&[&t, &t], 0)?;
            let ehs = Tensor::cat(&[ehs.narrow(0, start, n)?, ehs.narrow(0, b + start, n)?], 0)?;
            let added = match &added {
                Some(a) => Some(AddedCond {
                    text_embeds: a.text_embeds.narrow(0, 0, 2 * n)?,
                    time_ids: a.time_ids.narrow(0, 0, 2 * n)?,
                }),
                None => None,
            };
            policy.set_lora_enabled(true);
            let pred = cfg_guided(&policy.forward(&x2, &t2, &ehs, added.as_ref())?, guidance)?;
            let lp = scheduler.log_probs(&pred, &t, &x_t, &[x_w.clone(), x_l.clone()], 1.0)?;
            let ref_pred = match &reference {
                Some(r) => r.forward(&x2, &t2, &ehs, added.as_ref())?,
                None => {
                    policy.set_lora_enabled(false);
                    let p = policy.forward(&x2, &t2, &ehs, added.as_ref())?.detach();
                    policy.set_lora_enabled(true);
                    p
                }
            };
            let ref_pred = cfg_guided(&ref_pred, guidance)?;
            let lp_ref =
                scheduler.log_probs(&ref_pred, &t, &x_t, &[x_w.clone(), x_l.clone()], 1.0)?;
            let out = lpo_loss(
                &lp[0],
                &lp_ref[0].detach(),
                &lp[1],
                &lp_ref[1].detach(),
                LpoLossConfig::default(),
            )?;
            opt.backward(&out.loss, n as f64 / b as f64)
        };
        let window = rss::RssWindow::open();
        report.ms_per_training_step = Some(timed(device, opts.repeats, || {
            let mut start = 0;
            while start < b {
                let n = micro.min(b - start);
                micro_step(&mut opt, start, n)?;
                start += n;
            }
            opt.step()
        })?);
        rss_usage = window.close();
    }
    report.rss_after_load_mb = rss_usage.rss_after_load_mb;
    report.peak_rss_mb = rss_usage.peak_rss_mb;
    report.activation_mb = rss_usage.activation_mb;
    Ok(report)
}
