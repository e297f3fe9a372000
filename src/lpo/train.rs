//! One LPO optimizer step on a batch of sampler records.
//!
//! Per micro-batch: the policy's prediction on (x_t, t) is computed ONCE and scores both the
//! winner and the loser (`DdimScheduler::log_probs`); the reference prediction likewise,
//! detached (adapters off, or the frozen copy); [`lpo_loss`] with beta and eps; backward
//! scaled by the micro-batch's share of the batch; then one AdamW step (clipping as the
//! optimizer is configured).

use anyhow::{bail, Result};
use candle_core::Tensor;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::loss::{lpo_loss, LpoLossConfig};
use super::policy::{Policy, PromptCond};
use super::record::Record;
use crate::diffusion::DdimScheduler;
use crate::models::unet::AddedCond;
use crate::optim::AdamW;
use crate::runtime::control::RunControl;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct TrainConfig {
    #[serde(flatten)]
    pub loss: LpoLossConfig,
    /// eta of the sampling steps whose log-probs are trained (1 in the paper).
    pub eta: f64,
    /// Guide the log-prob predictions like sampling (policy and reference alike).
    pub train_cfg: bool,
    /// Guidance scale of those predictions (as sampling).
    pub guidance_scale: f64,
    /// At most this many records per backward pass (`()`: the whole batch); the batch is split
    /// into equal micro-batches, gradients accumulate, and the call makes one optimizer step.
    pub micro_batch: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            loss: LpoLossConfig::default(),
            eta: 1.0,
            train_cfg: true,
            guidance_scale: 5.0,
            micro_batch: None,
        }
    }
}

/// Logged numbers of one step (means over the batch's pairs).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainMetrics {
    pub loss: f64,
    pub ratio_win: f64,
    pub ratio_lose: f64,
    pub lp_win: f64,
    pub lp_lose: f64,
    pub lp_win_ref: f64,
    pub lp_lose_ref: f64,
    pub implicit_acc: f64,
    pub margin: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub step: u64,
    pub pairs: usize,
}

/// Stacked tensors of some records.
pub struct RecordBatch {
    pub t: Tensor,
    pub x_t: Tensor,
    pub x_win: Tensor,
    pub x_lose: Tensor,
    pub cond: PromptCond,
}

fn cat_added(parts: Vec<&AddedCond>) -> Result<AddedCond> {
    let te: Vec<&Tensor> = parts.iter().map(|a| &a.text_embeds).collect();
    let ti: Vec<&Tensor> = parts.iter().map(|a| &a.time_ids).collect();
    Ok(AddedCond {
        text_embeds: Tensor::cat(&te, 0)?,
        time_ids: Tensor::cat(&ti, 0)?,
    })
}

impl RecordBatch {
    pub fn stack(records: &[&Record]) -> Result<Self> {
        let Some(first) = records.first() else {
            bail!("lpo_train_step: the batch holds no records");
        };
        let dev = first.x_t.device();
        let st = |f: &dyn Fn(&Record) -> &Tensor| -> Result<Tensor> {
            let v: Vec<&Tensor> = records.iter().map(|r| f(r)).collect();
            Ok(Tensor::stack(&v, 0)?)
        };
        let hidden: Vec<&Tensor> = records.iter().map(|r| &r.cond.hidden).collect();
        let added = if first.cond.added.is_some() {
            let parts = records
                .iter()
                .map(|r| {
                    r.cond
                        .added
                        .as_ref()
                        .ok_or_else(|| anyhow::anyhow!("records mix SD and SDXL conditioning"))
                })
                .collect::<Result<Vec<_>>>()?;
            Some(cat_added(parts)?)
        } else {
            None
        };
        Ok(Self {
            t: Tensor::from_vec(
                records.iter().map(|r| r.t).collect::<Vec<_>>(),
                records.len(),
                dev,
            )?,
            x_t: st(&|r| &r.x_t)?,
            x_win: st(&|r| &r.x_win)?,
            x_lose: st(&|r| &r.x_lose)?,
            cond: PromptCond {
                hidden: Tensor::cat(&hidden, 0)?,
                uncond: first.cond.uncond.clone(),
                added,
                uncond_added: first.cond.uncond_added.clone(),
            },
        })
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?)
}

/// Sums of per-pair statistics, for weighted means over micro-batches.
#[derive(Default)]
struct Sums {
    loss: f64,
    ratio_w: f64,
    ratio_l: f64,
    lp_w: f64,
    lp_l: f64,
    lp_w_ref: f64,
    lp_l_ref: f64,
    acc: f64,
    margin: f64,
}

/// The log-probs (policy with graph, reference detached) of winners and losers of `batch`.
pub fn batch_log_probs(
    policy: &Policy,
    scheduler: &DdimScheduler,
    batch: &RecordBatch,
    cfg: &TrainConfig,
) -> Result<[Tensor; 4]> {
    let g = (cfg.train_cfg && cfg.guidance_scale != 1.0).then_some(cfg.guidance_scale);
    let pred = policy.predict(&batch.x_t, &batch.t, &batch.cond, g)?;
    let pred_ref = policy.predict_reference(&batch.x_t, &batch.t, &batch.cond, g)?;
    let pair = [batch.x_win.clone(), batch.x_lose.clone()];
    let lp = scheduler.log_probs(&pred, &batch.t, &batch.x_t, &pair, cfg.eta)?;
    let lp_ref = scheduler.log_probs(&pred_ref, &batch.t, &batch.x_t, &pair, cfg.eta)?;
    Ok([
        lp[0].clone(),
        lp_ref[0].detach(),
        lp[1].clone(),
        lp_ref[1].detach(),
    ])
}

/// One optimizer step on `records` (split into micro-batches of at most `cfg.micro_batch`).
pub fn train_step(
    policy: &Policy,
    scheduler: &DdimScheduler,
    records: &[&Record],
    opt: &mut AdamW,
    cfg: &TrainConfig,
    control: Option<&RunControl>,
) -> Result<TrainMetrics> {
    if scheduler.num_inference_steps().is_none() {
        bail!("lpo_train_step: the scheduler has no timesteps: use the scheduler the sampler ran with (or call set_timesteps)");
    }
    let n = records.len();
    if n == 0 {
        bail!("lpo_train_step: the batch holds no records");
    }
    if cfg.micro_batch == Some(0) {
        bail!("lpo_train_step: micro_batch must be >= 1");
    }
    if policy.is_lora() && !policy.unet.lora_enabled() {
        bail!("lpo_train_step: the policy's LoRA adapters are switched off (set unet.lora_enabled = true)");
    }
    let parts = cfg.micro_batch.map_or(1, |rows| n.div_ceil(rows));
    let micro = n.div_ceil(parts);
    let mut s = Sums::default();
    opt.zero_grad();
    for chunk in records.chunks(micro) {
        if let Some(c) = control {
            c.check()?;
        }
        let batch = RecordBatch::stack(chunk)?;
        let [lp_w, lp_w_ref, lp_l, lp_l_ref] = batch_log_probs(policy, scheduler, &batch, cfg)?;
        let out = lpo_loss(&lp_w, &lp_w_ref, &lp_l, &lp_l_ref, cfg.loss)?;
        let m = chunk.len() as f64;
        opt.backward(&out.loss, m / n as f64)?;
        s.loss += scalar(&out.loss)? * m;
        s.ratio_w += scalar(&out.ratio_w)? * m;
        s.ratio_l += scalar(&out.ratio_l)? * m;
        s.lp_w += scalar(&lp_w)? * m;
        s.lp_l += scalar(&lp_l)? * m;
        s.lp_w_ref += scalar(&lp_w_ref)? * m;
        s.lp_l_ref += scalar(&lp_l_ref)? * m;
        s.acc += scalar(&out.implicit_acc)? * m;
        s.margin += scalar(&out.margin)? * m;
    }
    let info = opt.step()?;
    let nf = n as f64;
    Ok(TrainMetrics {
        loss: s.loss / nf,
        ratio_win: s.ratio_w / nf,
        ratio_lose: s.ratio_l / nf,
        lp_win: s.lp_w / nf,
        lp_lose: s.lp_l / nf,
        lp_win_ref: s.lp_w_ref / nf,
        lp_lose_ref: s.lp_l_ref / nf,
        implicit_acc: s.acc / nf,
        margin: s.margin / nf,
        grad_norm: info.grad_norm,
        lr: info.lr,
        step: info.step,
        pairs: n,
    })
}
