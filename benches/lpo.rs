//! LPO timings on the tiny models (not a test): sampling seconds per DDIM step with K = 4
//! candidates (policy CFG pass + K·B LRM scores + compare), and training seconds per pair
//! (policy + reference predictions, log-probs, LPO loss, backward, AdamW), with the process's
//! peak resident memory (VmHWM). `cargo bench --bench lpo`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lpo::diffusion::DdimScheduler;
use lpo::lpo::{
    sample, train_step, Comparison, Policy, PromptCond, SamplerConfig, SamplerInputs, TrainConfig,
};
use lpo::models::clip_text::ClipTextModel;
use lpo::models::loading::WeightMode;
use lpo::models::lora::LoraConfig;
use lpo::models::tokenizer::ClipTokenizer;
use lpo::models::unet::UNet2DConditionModel;
use lpo::optim::{AdamW, AdamWConfig};
use lpo::reward::lrm::{LatentRewardModel, LrmOptions};
use lpo::tensor::SeededRng;

fn vm_hwm_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Best and worst of every column, all valid.
fn compare_all(scores: &Tensor, _t: &Tensor) -> anyhow::Result<Comparison> {
    let s: Vec<Vec<f32>> = scores.to_vec2()?;
    let b = s[0].len();
    let mut best = vec![0; b];
    let mut worst = vec![0; b];
    for col in 0..b {
        for (k, row) in s.iter().enumerate() {
            if row[col] > s[best[col]][col] {
                best[col] = k;
            }
            if row[col] < s[worst[col]][col] {
                worst[col] = k;
            }
        }
    }
    Comparison::new(best, worst, vec![true; b], s.len())
}

fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let sd = Path::new("tests/fixtures/tiny-sd");
    let unet = Arc::new(UNet2DConditionModel::load(
        &sd.join("unet"),
        DType::F32,
        &dev,
        WeightMode::Frozen,
    )?);
    let te = ClipTextModel::load(
        &sd.join("text_encoder"),
        DType::F32,
        &dev,
        WeightMode::Frozen,
    )?;
    let tok = ClipTokenizer::load(&sd.join("tokenizer"))?;
    let sched = DdimScheduler::load(sd, &dev)?;
    let lrm = LatentRewardModel::load(
        Path::new("tests/fixtures/tiny-lrm"),
        LrmOptions::default(),
        &dev,
    )?;
    let policy = Policy::lora(
        unet,
        Some(&LoraConfig {
            rank: 4,
            alpha: 4.0,
            targets: LoraConfig::default_targets(),
            seed: 0,
        }),
    )?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("lpo bench: tiny-sd policy (LoRA rank 4), tiny-lrm (multi-scale, guidance 7.5), {threads} CPUs");
    for b in [2usize, 4] {
        let prompts: Vec<String> = (0..b).map(|i| format!("prompt number {i}")).collect();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let cond = PromptCond::encode(&[(&te, &tok)], &refs, None)?;
        let cfg = SamplerConfig {
            k: 4,
            num_steps: 20,
            ..Default::default()
        };
        let inputs = SamplerInputs {
            policy: &policy,
            scheduler: &sched,
            lrm: &lrm,
            prompts: &prompts,
            cond: &cond,
            control: None,
        };
        let mut rng = SeededRng::new(0);
        sample(
            &inputs,
            &SamplerConfig {
                num_steps: 2,
                ..cfg.clone()
            },
            &mut rng,
            &mut compare_all,
        )?; // warm-up
        let start = Instant::now();
        let out = sample(&inputs, &cfg, &mut rng, &mut compare_all)?;
        let s = start.elapsed().as_secs_f64();
        println!(
            "sampling  B={b} K=4 20 steps: {:.4} s/step ({:.2} s total), {} pairs",
            s / 20.0,
            s,
            out.records.len()
        );
        let mut opt = AdamW::new(
            policy.params()?,
            AdamWConfig {
                lr: 1e-4,
                ..Default::default()
            },
        )?;
        let tcfg = TrainConfig::default();
        let recs: Vec<&lpo::lpo::Record> = out.records.iter().take(8).collect();
        train_step(&policy, &sched, &recs, &mut opt, &tcfg, None)?; // warm-up
        let reps = 3;
        let start = Instant::now();
        for _ in 0..reps {
            train_step(&policy, &sched, &recs, &mut opt, &tcfg, None)?;
        }
        let s = start.elapsed().as_secs_f64() / reps as f64;
        println!(
            "training  batch {} pairs (train_cfg): {:.4} s/pair ({:.3} s/step)",
            recs.len(),
            s / recs.len() as f64,
            s
        );
    }
    println!("peak memory (VmHWM): {:.0} MiB", vm_hwm_mb());
    Ok(())
}
