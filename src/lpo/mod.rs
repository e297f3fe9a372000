//! LPO: step-level preference optimization. The step loss lives here; the sampler and the
//! training loop build on it and on [`crate::diffusion`].

pub mod loss;

pub use loss::{lpo_loss, LpoLossConfig, LpoLossOutput};
