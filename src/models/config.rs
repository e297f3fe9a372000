//! Reading a model folder's `config.json` into a typed config, with errors naming the file.

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;

/// Parse `dir/name` (e.g. `unet/config.json`) as `T`.
pub fn read_config<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read model config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid model config {}", path.display()))
}
