//! Means of a metric per group (e.g. per prompt), for reports.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;

/// The mean of one group and its size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GroupMean {
    pub mean: f64,
    pub n: usize,
}

/// Mean of `values` per key of the parallel `keys`, by key in sorted order.
pub fn group_mean(values: &[f64], keys: &[String]) -> Result<BTreeMap<String, GroupMean>> {
    if values.len() != keys.len() {
        bail!(
            "group_mean: {} values but {} keys",
            values.len(),
            keys.len()
        );
    }
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (x, k) in values.iter().zip(keys) {
        let e = sums.entry(k.clone()).or_default();
        e.0 += x;
        e.1 += 1;
    }
    Ok(sums
        .into_iter()
        .map(|(k, (sum, n))| {
            (
                k,
                GroupMean {
                    mean: sum / n as f64,
                    n,
                },
            )
        })
        .collect())
}
