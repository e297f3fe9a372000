//! Built-in image scorers for evaluation: PickScore, HPSv2, the LAION aesthetic predictor and
//! CLIP score. Each is a CLIP model ([`crate::models::clip`]) with the reference's own
//! preprocessing ([`preprocess`]) and score formula:
//!
//! | kind | folder | preprocessing | score |
//! |---|---|---|---|
//! | `pickscore` | HF `CLIPModel` (yuvalkirstain/PickScore_v1) | HF processor | `exp(logit_scale) * cos(img, txt)` |
//! | `hpsv2` | converted open_clip ViT-H/14 (`open_clip_config.json`, `open_clip_model.safetensors`, `tokenizer/`) | HPSv2 `ResizeMaxSize` (pad) | `cos(img, txt)` |
//! | `aesthetic` | HF `CLIPModel` ViT-L/14 + `aesthetic_mlp.safetensors` | OpenAI clip (`Resize + CenterCrop`) | `mlp(img / |img|)` |
//! | `clip_score` | any HF `CLIPModel` (openai/clip-vit-large-patch14) | HF processor | `100 * max(cos(img, txt), 0)` |
//!
//! Images arrive as u8 RGB (decoded PNGs, or tensors quantised as `save_png` does, so scoring a
//! tensor equals scoring its saved PNG).

pub mod aesthetic;
pub mod preprocess;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use self::aesthetic::AestheticHead;
use self::preprocess::{normalize, to_square, Geometry, CLIP_MEAN, CLIP_STD};
use crate::models::clip::{paired_cosine, ClipModel};
use crate::models::open_clip::load_open_clip;
use crate::models::tokenizer::ClipTokenizer;

/// Which scorer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScorerKind {
    PickScore,
    HpsV2,
    Aesthetic,
    ClipScore,
}

pub const KINDS: [&str; 4] = ["pickscore", "hpsv2", "aesthetic", "clip_score"];

impl ScorerKind {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().replace('-', "_").as_str() {
            "pickscore" | "pick_score" => Self::PickScore,
            "hpsv2" | "hps_v2" | "hps" => Self::HpsV2,
            "aesthetic" | "laion_aesthetic" => Self::Aesthetic,
            "clip_score" | "clipscore" | "clip" => Self::ClipScore,
            "imagereward" | "image_reward" => bail!(
                "scorer kind `{name}` is not built in yet (ImageReward is BLIP-based: a ViT-L \
                 image encoder plus a BERT text encoder with cross-attention and an MLP head); \
                 available kinds: {}",
                KINDS.join(", ")
            ),
            _ => bail!(
                "unknown scorer kind `{name}`: expected one of {}",
                KINDS.join(", ")
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::PickScore => "pickscore",
            Self::HpsV2 => "hpsv2",
            Self::Aesthetic => "aesthetic",
            Self::ClipScore => "clip_score",
        }
    }

    /// The preprocessing of the kind's reference implementation.
    pub fn geometry(self) -> Geometry {
        match self {
            Self::PickScore | Self::ClipScore => Geometry::HfCrop,
            Self::Aesthetic => Geometry::TorchvisionCrop,
            Self::HpsV2 => Geometry::LongestPad,
        }
    }

    /// Whether the score depends on the prompt.
    pub fn uses_prompts(self) -> bool {
        !matches!(self, Self::Aesthetic)
    }
}

/// The aesthetic head's file inside the CLIP folder.
pub const AESTHETIC_FILE: &str = "aesthetic_mlp.safetensors";

/// Mean/std from the folder's `preprocessor_config.json` where present (HF folders).
#[derive(Debug, Deserialize)]
struct PreprocessorConfig {
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

/// A loaded scorer.
pub struct Scorer {
    kind: ScorerKind,
    dir: PathBuf,
    clip: ClipModel,
    tokenizer: Option<ClipTokenizer>,
    head: Option<AestheticHead>,
    mean: [f32; 3],
    std: [f32; 3],
}

/// Default images per forward pass.
pub const DEFAULT_BATCH: usize = 8;

/// How to score (`s.score(images, prompts, #{...})`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct ScoreOptions {
    /// Images per forward pass (>= 1).
    pub batch_size: usize,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            batch_size: DEFAULT_BATCH,
        }
    }
}

fn load_tokenizer(dir: &Path, kind: ScorerKind) -> Result<ClipTokenizer> {
    let sub = dir.join("tokenizer");
    let tok_dir = if sub.is_dir() { sub } else { dir.to_path_buf() };
    let has = |n: &str| tok_dir.join(n).is_file();
    let found = has("tokenizer.json") || (has("vocab.json") && has("merges.txt"));
    if !found {
        bail!(
            "{} scorer: no tokenizer in {} (expected tokenizer.json, or vocab.json + merges.txt, \
             there or in tokenizer/)",
            kind.name(),
            dir.display()
        );
    }
    ClipTokenizer::load(&tok_dir)
}

impl Scorer {
    /// Load scorer `kind` from `dir` (see the module table for the expected files).
    pub fn load(kind: ScorerKind, dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{} scorer: folder {} does not exist",
                kind.name(),
                dir.display()
            );
        }
        let ctx = || format!("loading {} scorer from {}", kind.name(), dir.display());
        let clip = match kind {
            ScorerKind::HpsV2 => load_open_clip(dir, dtype, device),
            _ => {
                if !dir.join("config.json").is_file() {
                    bail!(
                        "{} scorer: {} has no config.json (expected a transformers CLIPModel \
                         folder: config.json + model.safetensors)",
                        kind.name(),
                        dir.display()
                    );
                }
                ClipModel::load_hf(dir, dtype, device)
            }
        }
        .with_context(ctx)?;
        let tokenizer = if kind.uses_prompts() {
            Some(load_tokenizer(dir, kind).with_context(ctx)?)
        } else {
            None
        };
        if let Some(tok) = &tokenizer {
            let max = clip.config().text.max_position_embeddings;
            if tok.max_length() > max {
                bail!(
                    "{}: tokenizer pads to {} tokens but the text tower has {max} positions",
                    ctx(),
                    tok.max_length()
                );
            }
        }
        let head = if kind == ScorerKind::Aesthetic {
            let file = dir.join(AESTHETIC_FILE);
            if !file.is_file() {
                bail!(
                    "aesthetic scorer: {} is missing; convert the improved-aesthetic-predictor \
                     weights once with `python scripts/convert_scorer_weights.py aesthetic \
                     --checkpoint sac+logos+ava1-l14-linearMSE.pth --out {}`",
                    file.display(),
                    dir.display()
                );
            }
            Some(AestheticHead::load(
                &file,
                clip.config().projection_dim,
                dtype,
                device,
            )?)
        } else {
            None
        };
        let (mut mean, mut std) = (CLIP_MEAN, CLIP_STD);
        let pp = dir.join("preprocessor_config.json");
        if pp.is_file() {
            let text = std::fs::read_to_string(&pp)
                .with_context(|| format!("cannot read {}", pp.display()))?;
            let c: PreprocessorConfig =
                serde_json::from_str(&text).with_context(|| format!("invalid {}", pp.display()))?;
            mean = c.image_mean.unwrap_or(mean);
            std = c.image_std.unwrap_or(std);
            if std.iter().any(|&s| s <= 0.0) {
                bail!("{}: image_std must be positive", pp.display());
            }
        }
        Ok(Self {
            kind,
            dir: dir.to_path_buf(),
            clip,
            tokenizer,
            head,
            mean,
            std,
        })
    }

    pub fn kind(&self) -> ScorerKind {
        self.kind
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn clip(&self) -> &ClipModel {
        &self.clip
    }

    pub fn image_size(&self) -> usize {
        self.clip.image_size()
    }

    pub fn param_count(&self) -> usize {
        self.clip.param_count() + self.head.as_ref().map_or(0, |h| h.param_count())
    }

    /// The model input of `images`: normalised pixels [N, 3, S, S].
    pub fn pixels(&self, images: &[RgbImage]) -> Result<Tensor> {
        let squares = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                to_square(img, self.image_size(), self.kind.geometry())
                    .with_context(|| format!("image {i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        normalize(&squares, self.mean, self.std, self.clip.device())
    }

    /// Scores of normalised pixels [N, 3, S, S] with `prompts` (N of them; ignored by
    /// `aesthetic`), one forward pass.
    pub fn score_pixels(&self, pixels: &Tensor, prompts: &[&str]) -> Result<Vec<f64>> {
        let n = pixels.dim(0)?;
        let img = self.clip.image_embeds(pixels)?;
        let scores = match self.kind {
            ScorerKind::Aesthetic => {
                let head = self.head.as_ref().context("aesthetic head not loaded")?;
                head.forward(&crate::models::clip::l2_normalize(&img)?)?
            }
            _ => {
                if prompts.len() != n {
                    bail!(
                        "{} scorer: {n} images but {} prompts (one prompt per image)",
                        self.kind.name(),
                        prompts.len()
                    );
                }
                let tok = self.tokenizer.as_ref().context("tokenizer not loaded")?;
                let ids = tok.encode_on(prompts, self.clip.device())?;
                let txt = self.clip.text_embeds(&ids)?;
                let cos = paired_cosine(&img, &txt)?;
                match self.kind {
                    ScorerKind::PickScore => (cos * self.clip.logit_scale().exp())?,
                    ScorerKind::HpsV2 => cos,
                    _ => (cos.maximum(0.0)? * 100.0)?,
                }
            }
        };
        Ok(scores.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }

    /// Scores of `images` with `prompts` (one per image; ignored by `aesthetic`), `batch` images
    /// per forward pass.
    pub fn score(&self, images: &[RgbImage], prompts: &[&str], batch: usize) -> Result<Vec<f64>> {
        if images.is_empty() {
            bail!("{} scorer: no images", self.kind.name());
        }
        if self.kind.uses_prompts() && prompts.len() != images.len() {
            bail!(
                "{} scorer: {} images but {} prompts (one prompt per image)",
                self.kind.name(),
                images.len(),
                prompts.len()
            );
        }
        let batch = batch.max(1);
        let mut out = Vec::with_capacity(images.len());
        for start in (0..images.len()).step_by(batch) {
            let end = (start + batch).min(images.len());
            let px = self.pixels(&images[start..end])?;
            let p = if self.kind.uses_prompts() {
                &prompts[start..end]
            } else {
                &[][..]
            };
            out.extend(self.score_pixels(&px, p)?);
        }
        Ok(out)
    }
}

/// Image batch [N, 3, H, W] (or one [3, H, W]) in [-1, 1] -> u8 RGB images, quantised as
/// `save_png` writes them.
pub fn images_from_tensor(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (v, b, h, w) = crate::image_io::batch_values(t, "score: images")?;
    (0..b)
        .map(|i| {
            RgbImage::from_raw(w as u32, h as u32, crate::image_io::rgb8(&v, i, h, w))
                .context("image buffer")
        })
        .collect()
}

/// Decode a PNG/JPEG file as RGB (alpha dropped, grey replicated, as PIL's `convert("RGB")`).
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    Ok(img.to_rgb8())
}
