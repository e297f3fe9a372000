//! LPO: step-level preference optimization. The step loss, the policy (LoRA or full
//! fine-tuning with its reference), the multi-candidate sampler with its compare step and
//! statistics, and the training step.

pub mod comparison;
pub mod loss;
pub mod policy;
pub mod record;
pub mod records_io;
pub mod sampler;
pub mod stats;
pub mod train;

pub use comparison::Comparison;
pub use loss::{lpo_loss, LpoLossConfig, LpoLossOutput};
pub use policy::{Policy, PolicyKind, PolicyOptions, PromptCond};
pub use record::{Record, RecordSummary};
pub use sampler::{sample, SampleOutput, SamplerConfig, SamplerInputs, StepLog};
pub use stats::{BucketCounts, SampleStats};
pub use train::{train_step, RecordBatch, TrainConfig, TrainMetrics};
