//! Training core: [`Params`] (the named trainable variables a model exposes), [`AdamW`] with
//! accumulation, clipping, schedules and an exact-resume state.

pub mod clip;
pub mod optimizer;
pub mod options;
pub mod params;

pub use clip::GradClip;
pub use optimizer::{AdamW, AdamWConfig, Schedule, StepInfo};
pub use options::{AdamWOptions, ScheduleName};
pub use params::Params;
