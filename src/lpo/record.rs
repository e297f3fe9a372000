//! One preference pair of the sampler, and its plain-data part.

use candle_core::Tensor;
use serde::Serialize;

use super::policy::PromptCond;

/// One preference pair: from x_t at timestep t, x_win was preferred over x_lose.
#[derive(Debug, Clone)]
pub struct Record {
    pub t: i64,
    /// [C, H, W] each.
    pub x_t: Tensor,
    pub x_win: Tensor,
    pub x_lose: Tensor,
    /// Row of the prompt in its sampling batch and the prompt text.
    pub prompt_index: usize,
    pub prompt: String,
    /// The prompt's conditioning for the policy (one row; the empty prompt shared).
    pub cond: PromptCond,
    /// LRM scores of the winner and the loser.
    pub score_win: f32,
    pub score_lose: f32,
}

/// The numbers and text of a [`Record`] (its tensors left out).
#[derive(Debug, Clone, Serialize)]
pub struct RecordSummary {
    pub t: i64,
    pub prompt: String,
    pub prompt_index: usize,
    pub score_win: f32,
    pub score_lose: f32,
}

impl Record {
    pub fn summary(&self) -> RecordSummary {
        RecordSummary {
            t: self.t,
            prompt: self.prompt.clone(),
            prompt_index: self.prompt_index,
            score_win: self.score_win,
            score_lose: self.score_lose,
        }
    }
}
