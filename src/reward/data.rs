//! Preference pairs: Pick-a-Pic parquet shards (`parquet_pairs`), or a JSONL manifest
//! `{prompt, image_0, image_1, label_0, label_1[, num_examples_per_prompt]}` with image paths.
//!
//! Bad rows are never dropped silently: each is counted with its reason and reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::pair_loss::validate_labels;
pub use super::parquet_pairs::{read_pickapic_parquet, PICKAPIC_COLUMNS};

#[derive(Debug, Clone)]
pub enum ImageSource {
    Path(PathBuf),
    /// Encoded image bytes (JPEG/PNG) as stored in parquet shards.
    Bytes(Arc<Vec<u8>>),
}

#[derive(Debug, Clone)]
pub struct PreferencePair {
    pub prompt: String,
    pub image_0: ImageSource,
    pub image_1: ImageSource,
    pub label_0: f32,
    pub label_1: f32,
    pub num_examples_per_prompt: f32,
    /// Pairs with the same group were made from one sampling draw and share images; a held-out
    /// split keeps a group on one side. `None` where the source has no such field.
    pub group: Option<i64>,
}

/// A row that was not used, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub location: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct PreferenceSet {
    pub pairs: Vec<PreferencePair>,
    pub skipped: Vec<Skipped>,
}

impl PreferenceSet {
    /// One line per reason with its count, for the end-of-run report.
    pub fn skip_summary(&self) -> String {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for s in &self.skipped {
            *counts.entry(s.reason.as_str()).or_default() += 1;
        }
        let mut lines: Vec<String> = counts
            .iter()
            .map(|(r, n)| format!("{n} skipped: {r}"))
            .collect();
        lines.sort();
        lines.join("\n")
    }

    pub(super) fn fill_missing_counts(&mut self) {
        let mut per_prompt: HashMap<String, usize> = HashMap::new();
        for p in &self.pairs {
            *per_prompt.entry(p.prompt.clone()).or_default() += 1;
        }
        for p in &mut self.pairs {
            if p.num_examples_per_prompt <= 0.0 {
                p.num_examples_per_prompt = per_prompt[&p.prompt] as f32;
            }
        }
    }

    pub fn extend(&mut self, other: PreferenceSet) {
        self.pairs.extend(other.pairs);
        self.skipped.extend(other.skipped);
    }
}

/// Read a JSONL manifest; image paths are relative to the manifest's folder.
pub fn read_manifest(path: &Path) -> Result<PreferenceSet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read preference manifest {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut set = PreferenceSet::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let location = format!("{}:{}", path.display(), i + 1);
        let row: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => bail!("{location}: invalid JSON: {e}"),
        };
        let get_str = |k: &str| -> Result<String> {
            row.get(k)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .with_context(|| format!("{location}: missing string field `{k}`"))
        };
        let get_num = |k: &str| -> Result<f32> {
            row.get(k)
                .and_then(|v| v.as_f64())
                .map(|v| v as f32)
                .with_context(|| format!("{location}: missing number field `{k}`"))
        };
        let (label_0, label_1) = (get_num("label_0")?, get_num("label_1")?);
        if let Err(reason) = validate_labels(&[label_0], &[label_1]) {
            set.skipped.push(Skipped {
                location,
                reason: reason.replace("pair 0", "pair"),
            });
            continue;
        }
        let resolve = |p: String| -> ImageSource {
            let p = PathBuf::from(p);
            ImageSource::Path(if p.is_absolute() { p } else { base.join(p) })
        };
        set.pairs.push(PreferencePair {
            prompt: get_str("prompt")?,
            image_0: resolve(get_str("image_0")?),
            image_1: resolve(get_str("image_1")?),
            label_0,
            label_1,
            num_examples_per_prompt: row
                .get("num_examples_per_prompt")
                .and_then(|v| v.as_f64())
                .map(|v| v as f32)
                .unwrap_or(0.0),
            group: row.get("group").and_then(|v| v.as_i64()),
        });
    }
    set.fill_missing_counts();
    Ok(set)
}

/// A manifest (`.jsonl`) or a parquet shard (`.parquet`), or every shard in a folder.
pub fn read_preferences(path: &Path) -> Result<PreferenceSet> {
    if path.is_dir() {
        let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "parquet" || e == "jsonl")
            })
            .collect();
        shards.sort();
        if shards.is_empty() {
            bail!("{}: no .parquet or .jsonl preference files", path.display());
        }
        let mut set = PreferenceSet::default();
        for s in shards {
            set.extend(read_preferences(&s)?);
        }
        return Ok(set);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => read_pickapic_parquet(path),
        Some("jsonl") | Some("json") => read_manifest(path),
        _ => bail!(
            "{}: expected a .jsonl manifest or a .parquet shard",
            path.display()
        ),
    }
}
