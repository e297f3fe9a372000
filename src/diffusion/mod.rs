//! The diffusion process: the noise schedule (betas, alphas_cumprod, inference timesteps) and
//! the DDIM scheduler over it, with per-row timesteps, seeded noise, K-candidate draws and step
//! log-probs (what LPO trains on).

pub mod ddim;
pub mod noise_schedule;

pub use ddim::{DdimScheduler, StepDist};
pub use noise_schedule::{BetaSchedule, DdimConfig, PredictionType, TimestepSpacing};
