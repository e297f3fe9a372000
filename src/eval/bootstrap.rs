//! Paired bootstrap confidence interval of a change in a per-item metric (binary or graded):
//! the same items (prompts x seeds) measured before and after.

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tensor::SeededRng;

/// Mean before/after, their difference and its percentile-bootstrap 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairedBootstrap {
    pub n: usize,
    pub before: f64,
    pub after: f64,
    /// mean(after) - mean(before).
    pub delta: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    pub samples: usize,
    /// The caller's own; results leave it out (summaries and reports show what they did).
    #[serde(skip_serializing)]
    pub seed: u64,
}

impl PairedBootstrap {
    /// The interval excludes 0.
    pub fn significant(&self) -> bool {
        self.ci95_low > 0.0 || self.ci95_high < 0.0
    }
}

/// Default number of bootstrap resamples.
pub const DEFAULT_SAMPLES: usize = 2000;

/// How to resample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct BootstrapOptions {
    /// Number of bootstrap resamples.
    pub samples: usize,
    /// Seed of the resampling; () = the run's seed.
    pub seed: Option<i64>,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        Self {
            samples: DEFAULT_SAMPLES,
            seed: None,
        }
    }
}

/// Linear-interpolated quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// Resample item indices with replacement `samples` times (with [`SeededRng`] seeded by
/// `seed`), take the mean paired difference each time, and report the 2.5% and 97.5%
/// quantiles. Identical inputs give the interval [0, 0].
pub fn paired_bootstrap(
    before: &[f64],
    after: &[f64],
    samples: usize,
    seed: u64,
) -> Result<PairedBootstrap> {
    if before.len() != after.len() {
        bail!(
            "paired_bootstrap: before has {} values but after has {} (they must be paired)",
            before.len(),
            after.len()
        );
    }
    let n = before.len();
    if n == 0 {
        bail!("paired_bootstrap: no values");
    }
    if samples == 0 {
        bail!("paired_bootstrap: samples must be >= 1");
    }
    if let Some(i) = before.iter().chain(after).position(|v| !v.is_finite()) {
        let (which, idx) = if i < n {
            ("before", i)
        } else {
            ("after", i - n)
        };
        bail!("paired_bootstrap: {which}[{idx}] is not finite");
    }
    let diffs: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut rng = SeededRng::new(seed);
    let mut means: Vec<f64> = (0..samples)
        .map(|_| {
            let mut s = 0.0;
            for _ in 0..n {
                s += diffs[rng.int_in(0, n as i64) as usize];
            }
            s / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    Ok(PairedBootstrap {
        n,
        before: mean(before),
        after: mean(after),
        delta: mean(&diffs),
        ci95_low: quantile(&means, 0.025),
        ci95_high: quantile(&means, 0.975),
        samples,
        seed,
    })
}
