//! `lpo`: step-level preference optimization (LPO) of diffusion models with a noise-aware
//! latent reward model (LRM), driven by Rhai scripts.
//!
//! The compiled core (tensors, models, sampler, losses, optimizer, checkpoints) knows nothing
//! of scripts; `script` registers thin bindings over it.

pub mod bench;
pub mod cpu_threads;
pub mod diffusion;
pub mod eval;
pub mod fsutil;
pub mod image_grid;
pub mod image_io;
pub mod image_text;
pub mod jobs;
pub mod lpo;
pub mod malloc_tuning;
pub mod models;
pub mod optim;
pub mod repl;
pub mod reward;
pub mod run;
pub mod runtime;
pub mod script;
pub mod shapes;
pub mod tensor;
