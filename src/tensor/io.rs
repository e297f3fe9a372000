//! safetensors files: load with errors naming the file, save atomically.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        anyhow::bail!("safetensors file not found: {}", path.display());
    }
    candle_core::safetensors::load(path, device).with_context(|| {
        format!(
            "cannot read safetensors file {} (truncated or not safetensors?)",
            path.display()
        )
    })
}

pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let contiguous: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::serialize(&contiguous, None)
        .with_context(|| format!("cannot serialize tensors for {}", path.display()))?;
    crate::fsutil::atomic_write(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncated_file_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let mut m = HashMap::new();
        m.insert(
            "a".to_string(),
            Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap(),
        );
        m.insert(
            "ids".to_string(),
            Tensor::new(&[7i64, 8], &Device::Cpu).unwrap(),
        );
        save_safetensors(&m, &p).unwrap();
        let back = load_safetensors(&p, &Device::Cpu).unwrap();
        assert_eq!(
            back["a"].to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        assert_eq!(back["ids"].to_vec1::<i64>().unwrap(), vec![7, 8]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let err = format!("{:#}", load_safetensors(&p, &Device::Cpu).unwrap_err());
        assert!(err.contains("t.safetensors"), "{err}");
    }
}
