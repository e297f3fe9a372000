//! Diffusion schedules and samplers: DDIM with per-row timesteps, seeded noise, K-candidate
//! draws and step log-probs (what LPO trains on).

pub mod ddim;
pub mod schedule;

pub use ddim::{DdimScheduler, StepDist};
pub use schedule::{BetaSchedule, DdimConfig, PredictionType, TimestepSpacing};
