//! The options of a labelled image grid figure as scripts write them (`save_grid(images, path,
//! nrow, #{...})`); the defaults are [`GridOptions::default`]'s.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::image_grid::{GridLabels, GridOptions};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct GridFigureOptions {
    /// Pixels between images (before upscaling).
    pub padding: usize,
    /// Integer nearest-neighbour magnification of the whole grid.
    pub upscale: usize,
    /// One caption per image (e.g. its prompt; "" for none); numbers are written as text.
    #[serde(deserialize_with = "texts")]
    pub labels: Vec<String>,
    /// One label per row (e.g. "before" / "after").
    #[serde(deserialize_with = "texts")]
    pub row_labels: Vec<String>,
}

impl Default for GridFigureOptions {
    fn default() -> Self {
        let d = GridOptions::default();
        Self {
            padding: d.padding,
            upscale: d.upscale,
            labels: Vec::new(),
            row_labels: Vec::new(),
        }
    }
}

impl GridFigureOptions {
    /// The grid layout with `nrow` images per row.
    pub fn grid(&self, nrow: usize) -> GridOptions {
        GridOptions {
            nrow,
            padding: self.padding,
            upscale: self.upscale,
            ..Default::default()
        }
    }

    pub fn labels(&self) -> GridLabels {
        GridLabels {
            captions: self.labels.clone(),
            rows: self.row_labels.clone(),
        }
    }
}

/// Strings, or other plain values as their text (indices, numbers).
fn texts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<Value>::deserialize(d)?
        .into_iter()
        .map(|v| match v {
            Value::String(s) => s,
            other => other.to_string(),
        })
        .collect())
}
