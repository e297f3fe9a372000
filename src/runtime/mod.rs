//! What a running script lives in, below the script layer: the run control (stop requests),
//! the run folder (checkpoints, metrics, lock), its log, signal handling and file confinement.

pub mod confinement;
pub mod control;
pub mod log;
pub mod run_dir;
pub mod signals;
