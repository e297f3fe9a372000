//! LPO: step-level preference optimization. The step loss, the policy (LoRA or full
//! fine-tuning with its reference), the multi-candidate sampler and the training step.

pub mod loss;
pub mod policy;
pub mod records_io;
pub mod sampler;
pub mod train;

pub use loss::{lpo_loss, LpoLossConfig, LpoLossOutput};
pub use policy::{Policy, PolicyKind, PromptCond};
pub use sampler::{
    sample, Comparison, Record, SampleOutput, SamplerConfig, SamplerInputs, StepLog,
};
pub use train::{train_step, RecordBatch, TrainConfig, TrainMetrics};
