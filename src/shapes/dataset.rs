//! Pretraining batches of the shapes world: rendered images with (optionally noisy) captions.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::world::{Prompt, ShapesWorld};
use crate::tensor::SeededRng;

/// Which prompts a batch draws from; in configs by name (see [`Split::parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Split {
    Train,
    Heldout,
    All,
}

impl Split {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "train" => Split::Train,
            "heldout" | "held_out" | "held-out" => Split::Heldout,
            "all" => Split::All,
            other => bail!("unknown prompt split `{other}` (train, heldout, all)"),
        })
    }

    pub fn prompts(self, world: &ShapesWorld) -> Vec<Prompt> {
        match self {
            Split::Train => world.train_prompts(),
            Split::Heldout => world.heldout_prompts(),
            Split::All => world.prompts(),
        }
    }
}

impl TryFrom<String> for Split {
    type Error = String;
    fn try_from(name: String) -> std::result::Result<Self, String> {
        Split::parse(&name).map_err(|e| e.to_string())
    }
}

impl From<Split> for String {
    fn from(split: Split) -> String {
        match split {
            Split::Train => "train",
            Split::Heldout => "heldout",
            Split::All => "all",
        }
        .into()
    }
}

/// A batch: images [B, 3, 16, 16] in [-1, 1], the caption each image is trained with, and
/// the prompt it truly shows.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Tensor,
    pub captions: Vec<Prompt>,
    pub truth: Vec<Prompt>,
}

/// Options of [`make_batch`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct BatchOptions {
    /// The prompts drawn from: "train", "heldout" or "all".
    #[schemars(with = "String")]
    pub split: Split,
    /// Probability that a caption names a wrong colour or a wrong shape.
    pub caption_noise: f64,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            split: Split::Train,
            caption_noise: 0.0,
        }
    }
}

/// `n` images of prompts drawn uniformly from the split, each captioned with
/// [`ShapesWorld::noisy_caption`].
pub fn make_batch(
    world: &ShapesWorld,
    n: usize,
    opts: BatchOptions,
    rng: &mut SeededRng,
    device: &Device,
) -> Result<Batch> {
    if !(0.0..=1.0).contains(&opts.caption_noise) {
        bail!(
            "caption_noise must be in [0, 1], got {}",
            opts.caption_noise
        );
    }
    let pool = opts.split.prompts(world);
    let truth: Vec<Prompt> = (0..n)
        .map(|_| world.random_from(&pool, rng))
        .collect::<Result<_>>()?;
    let images = world.render_batch(&truth, rng, device)?;
    let captions = truth
        .iter()
        .map(|p| world.noisy_caption(*p, opts.caption_noise, rng))
        .collect();
    Ok(Batch {
        images,
        captions,
        truth,
    })
}
