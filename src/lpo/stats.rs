//! Sampling statistics: preference pairs per noise bucket (the paper's table) and the scores
//! the compare step saw.

use serde::Serialize;

use super::record::Record;
use super::sampler::StepLog;

/// Noise buckets of the paper's statistics: t > 751, 501 < t <= 751, 251 < t <= 501, t <= 251.
pub const BUCKETS: [&str; 4] = [
    "pairs_t751_1000",
    "pairs_t501_751",
    "pairs_t251_501",
    "pairs_t0_251",
];

/// Which of [`BUCKETS`] timestep `t` falls in.
pub fn bucket(t: i64) -> usize {
    if t > 751 {
        0
    } else if t > 501 {
        1
    } else if t > 251 {
        2
    } else {
        3
    }
}

/// Records per noise bucket (the field names are [`BUCKETS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct BucketCounts {
    pub pairs_t751_1000: usize,
    pub pairs_t501_751: usize,
    pub pairs_t251_501: usize,
    pub pairs_t0_251: usize,
}

impl BucketCounts {
    pub fn of(records: &[Record]) -> Self {
        let mut c = [0usize; 4];
        for r in records {
            c[bucket(r.t)] += 1;
        }
        Self {
            pairs_t751_1000: c[0],
            pairs_t501_751: c[1],
            pairs_t251_501: c[2],
            pairs_t0_251: c[3],
        }
    }

    /// The counts in [`BUCKETS`] order.
    pub fn as_array(&self) -> [usize; 4] {
        [
            self.pairs_t751_1000,
            self.pairs_t501_751,
            self.pairs_t251_501,
            self.pairs_t0_251,
        ]
    }
}

/// Statistics of one sampling call, ready for `log_metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct SampleStats {
    /// Recorded (valid) pairs.
    pub valid_pairs: usize,
    /// Prompt rows compared: diverting steps × prompts.
    pub comparisons: usize,
    /// Mean and standard deviation of every candidate score.
    pub score_mean: f64,
    pub score_std: f64,
    #[serde(flatten)]
    pub buckets: BucketCounts,
}

impl SampleStats {
    /// Over `records` and the `log` of a call that sampled `prompts` prompts.
    pub fn of(records: &[Record], log: &[StepLog], prompts: usize) -> Self {
        let all: Vec<f64> = log
            .iter()
            .flat_map(|l| l.scores.iter().flatten().map(|&s| s as f64))
            .collect();
        let n = all.len().max(1) as f64;
        let mean = all.iter().sum::<f64>() / n;
        let std = (all.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
        Self {
            valid_pairs: records.len(),
            comparisons: log.len() * prompts,
            score_mean: mean,
            score_std: std,
            buckets: BucketCounts::of(records),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds() {
        assert_eq!(
            [999, 752, 751, 502, 501, 252, 251, 0].map(bucket),
            [0, 0, 1, 1, 2, 2, 3, 3]
        );
    }
}
