//! The Latent Reward Model: a diffusion UNet's down and mid blocks score a noisy latent x_t
//! against a prompt at timestep t.

pub mod batch_settings;
pub mod batches;
pub mod data;
pub mod lrm;
pub mod lrm_options;
pub mod pair_loss;
pub mod parquet_pairs;
pub mod projections;
