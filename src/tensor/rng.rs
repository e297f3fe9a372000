//! The one seeded generator behind every random draw (candle's CPU RNG cannot be seeded).
//!
//! Draws are made on the host and moved to the target device, so a seeded script gives the
//! same numbers on every device and every run. The state serializes, so checkpoints resume
//! the exact stream.

use candle_core::{Device, Result, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// A u64 seed written in configs as a signed int (the only ints scripts have): a negative one
/// wraps, as `SeededRng::new(seed as u64)` does for `rng(seed)`, so both give the same stream.
/// Use with `#[serde(with = "crate::tensor::rng::int_seed")]` (and `#[schemars(with = "i64")]`).
pub mod int_seed {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(seed: &u64, s: S) -> Result<S::Ok, S::Error> {
        (*seed as i64).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        i64::deserialize(d).map(|seed| seed as u64)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeededRng {
    seed: u64,
    inner: ChaCha8Rng,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            inner: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// An independent generator derived from this one (e.g. one per data loader).
    pub fn fork(&mut self) -> Self {
        Self::new(self.inner.random())
    }

    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| StandardNormal.sample(&mut self.inner))
            .collect()
    }

    pub fn uniform_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.inner.random::<f32>()).collect()
    }

    /// Standard normal draws of `shape` as f32 on `device`.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let values = self.normal_vec(shape.elem_count());
        Tensor::from_vec(values, shape, device)
    }

    /// Uniform [0, 1) draws of `shape` as f32 on `device`.
    pub fn rand<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let values = self.uniform_vec(shape.elem_count());
        Tensor::from_vec(values, shape, device)
    }

    /// Integers uniform in [low, high) as i64 on `device`.
    pub fn randint<S: Into<Shape>>(
        &mut self,
        low: i64,
        high: i64,
        shape: S,
        device: &Device,
    ) -> Result<Tensor> {
        if high <= low {
            candle_core::bail!("randint: empty range [{low}, {high})");
        }
        let shape = shape.into();
        let values: Vec<i64> = (0..shape.elem_count())
            .map(|_| self.inner.random_range(low..high))
            .collect();
        Tensor::from_vec(values, shape, device)
    }

    /// One integer uniform in [low, high).
    pub fn int_in(&mut self, low: i64, high: i64) -> i64 {
        self.inner.random_range(low..high)
    }

    pub fn uniform(&mut self) -> f64 {
        self.inner.random::<f64>()
    }

    /// Fisher-Yates permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.inner.random_range(0..=i);
            order.swap(i, j);
        }
        order
    }

    /// The full generator state as JSON, for checkpoints.
    pub fn state_json(&self) -> String {
        serde_json::to_string(self).expect("rng state serializes")
    }

    pub fn from_state_json(json: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_draws_and_state_round_trips() {
        let mut a = SeededRng::new(7);
        let mut b = SeededRng::new(7);
        assert_eq!(a.normal_vec(16), b.normal_vec(16));
        let saved = a.state_json();
        let next = a.normal_vec(4);
        let mut restored = SeededRng::from_state_json(&saved).unwrap();
        assert_eq!(restored.normal_vec(4), next);
        assert_ne!(
            SeededRng::new(8).normal_vec(4),
            SeededRng::new(7).normal_vec(4)
        );
    }

    #[test]
    fn normal_moments() {
        let v = SeededRng::new(1).normal_vec(100_000);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = SeededRng::new(3).permutation(50);
        p.sort();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
    }
}
