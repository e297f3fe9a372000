//! What the compare step decides for the K candidate scores of B prompts: per prompt the best
//! and the worst candidate and whether the pair is kept. Checked once, when it is built.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// A checked comparison of K candidates for B prompts (every index in `0..K`).
#[derive(Debug, Clone)]
pub struct Comparison {
    k: usize,
    best: Vec<usize>,
    worst: Vec<usize>,
    valid: Vec<bool>,
}

impl Comparison {
    /// One entry per prompt in each list; indices are candidates `0..k`.
    pub fn new(best: Vec<usize>, worst: Vec<usize>, valid: Vec<bool>, k: usize) -> Result<Self> {
        if best.len() != valid.len() || worst.len() != valid.len() {
            bail!(
                "{}/{}/{} best/worst/valid entries; expected one per prompt",
                best.len(),
                worst.len(),
                valid.len()
            );
        }
        if let Some(bad) = best.iter().chain(&worst).find(|&&i| i >= k) {
            bail!("candidate index {bad}, outside 0..{k}");
        }
        Ok(Self {
            k,
            best,
            worst,
            valid,
        })
    }

    /// From a compare function's tensors for scores [K, B] = [`k`, `b`]: `indices` [2, B]
    /// ints (row 0 best, row 1 worst candidate) and `valid` [B] (nonzero = keep the pair).
    /// Errors say what was returned and what was expected.
    pub fn from_tensors(indices: &Tensor, valid: &Tensor, k: usize, b: usize) -> Result<Self> {
        if indices.dims() != [2, b] || indices.dtype().is_float() {
            bail!(
                "indices of shape {:?} ({}); expected [2, {b}] ints (row 0 best, row 1 worst candidate of K = {k})",
                indices.dims(),
                indices.dtype().as_str()
            );
        }
        if valid.dims() != [b] {
            bail!(
                "valid of shape {:?}; expected [{b}] (one flag per prompt)",
                valid.dims()
            );
        }
        let rows: Vec<Vec<i64>> = indices.to_dtype(DType::I64)?.to_vec2()?;
        if let Some(bad) = rows.iter().flatten().find(|&&i| i < 0 || i >= k as i64) {
            bail!("candidate index {bad}, outside 0..{k}");
        }
        let index = |row: &[i64]| row.iter().map(|&i| i as usize).collect();
        let valid: Vec<f64> = valid.to_dtype(DType::F64)?.to_vec1()?;
        Self::new(
            index(&rows[0]),
            index(&rows[1]),
            valid.into_iter().map(|v| v != 0.0).collect(),
            k,
        )
    }

    /// (K, B): the candidates and prompts it was built for.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.valid.len())
    }

    /// (best, worst) of prompt `row` when its pair is kept.
    pub fn pair(&self, row: usize) -> Option<(usize, usize)> {
        self.valid
            .get(row)
            .copied()
            .filter(|&keep| keep)
            .map(|_| (self.best[row], self.worst[row]))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn tensors_are_checked_against_k_and_b() {
        let dev = Device::Cpu;
        let idx = Tensor::new(&[[1i64, 0], [0, 1]], &dev).unwrap();
        let valid = Tensor::new(&[1u8, 0], &dev).unwrap();
        let c = Comparison::from_tensors(&idx, &valid, 2, 2).unwrap();
        assert_eq!(c.shape(), (2, 2));
        assert_eq!((c.pair(0), c.pair(1)), (Some((1, 0)), None));
        let err = |i: &Tensor, v: &Tensor, k| {
            Comparison::from_tensors(i, v, k, 2)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&idx, &valid, 1).contains("candidate index 1, outside 0..1"));
        let wide = Tensor::zeros((3, 2), DType::I64, &dev).unwrap();
        assert!(err(&wide, &valid, 2).contains("expected [2, 2] ints"));
        let floats = idx.to_dtype(DType::F32).unwrap();
        assert!(err(&floats, &valid, 2).contains("(f32)"));
        let short = Tensor::new(&[1u8], &dev).unwrap();
        assert!(err(&idx, &short, 2).contains("valid of shape [1]; expected [2]"));
    }
}
