//! The shapes world: one shape (circle, square, triangle) in one of six colours on a dark
//! 16x16 background, described by prompts like "a red circle".
//!
//! Rendering is deterministic given a [`SeededRng`]: the same seed draws the same sizes,
//! positions and noise. Pixels are produced in [0, 1] and returned in [-1, 1] (the range the
//! diffusion models work in).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::tensor::SeededRng;

/// Image side in pixels.
pub const IMAGE_SIZE: usize = 16;
/// Smallest and largest shape extent in pixels (inclusive).
pub const MIN_SIZE: f32 = 8.0;
pub const MAX_SIZE: f32 = 12.0;
/// Background colour in [0, 1] (near black).
pub const BACKGROUND: [f32; 3] = [0.06, 0.06, 0.07];

/// The palette in [0, 1] RGB: saturated colours far apart from each other and from the
/// background (smallest pairwise distance 0.55, blue-cyan).
pub const COLOURS: [(&str, [f32; 3]); 6] = [
    ("red", [0.92, 0.16, 0.14]),
    ("green", [0.18, 0.82, 0.20]),
    ("blue", [0.20, 0.30, 0.96]),
    ("yellow", [0.95, 0.90, 0.16]),
    ("magenta", [0.90, 0.20, 0.88]),
    ("cyan", [0.14, 0.86, 0.92]),
];

pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub const CIRCLE: usize = 0;
pub const SQUARE: usize = 1;
pub const TRIANGLE: usize = 2;

/// A (colour, shape) pair, by index into [`COLOURS`] and [`SHAPES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prompt {
    pub colour: usize,
    pub shape: usize,
}

impl Prompt {
    pub fn new(colour: usize, shape: usize) -> Result<Self> {
        if colour >= COLOURS.len() {
            bail!("colour index {colour} out of range 0..{}", COLOURS.len());
        }
        if shape >= SHAPES.len() {
            bail!("shape index {shape} out of range 0..{}", SHAPES.len());
        }
        Ok(Self { colour, shape })
    }

    pub fn colour_name(&self) -> &'static str {
        COLOURS[self.colour].0
    }

    pub fn shape_name(&self) -> &'static str {
        SHAPES[self.shape]
    }

    /// "a red circle".
    pub fn text(&self) -> String {
        format!("a {} {}", self.colour_name(), self.shape_name())
    }

    /// Parse "a red circle" (also "red circle", any case, extra spaces): exactly one colour
    /// word and one shape word.
    pub fn parse(text: &str) -> Result<Self> {
        let mut colour = None;
        let mut shape = None;
        for word in text.split_whitespace() {
            let w = word.to_ascii_lowercase();
            let w = w.trim_matches(|c: char| !c.is_ascii_alphabetic());
            if let Some(i) = COLOURS.iter().position(|(n, _)| *n == w) {
                if colour.replace(i).is_some() {
                    bail!("prompt {text:?}: more than one colour word");
                }
            } else if let Some(i) = SHAPES.iter().position(|n| *n == w) {
                if shape.replace(i).is_some() {
                    bail!("prompt {text:?}: more than one shape word");
                }
            } else if !matches!(w, "a" | "an" | "") {
                bail!(
                    "prompt {text:?}: unknown word `{w}` (colours: {}; shapes: {})",
                    COLOURS.map(|c| c.0).join(", "),
                    SHAPES.join(", ")
                );
            }
        }
        match (colour, shape) {
            (Some(colour), Some(shape)) => Ok(Self { colour, shape }),
            (None, _) => bail!(
                "prompt {text:?}: no colour word ({})",
                COLOURS.map(|c| c.0).join(", ")
            ),
            (_, None) => bail!("prompt {text:?}: no shape word ({})", SHAPES.join(", ")),
        }
    }
}

impl std::fmt::Display for Prompt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// Rendering options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct RenderOptions {
    /// Coverage by 4x4 supersampling (soft edges) instead of pixel-centre sampling.
    pub antialias: bool,
    /// Std of Gaussian noise added to every pixel, in [0, 1] units (0 = none).
    pub noise: f32,
}

impl RenderOptions {
    /// An error naming the value out of range.
    pub fn check(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.noise) {
            bail!("noise must be in [0, 1], got {}", self.noise);
        }
        Ok(())
    }
}

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            antialias: true,
            noise: 0.0,
        }
    }
}

/// Where a shape was drawn: its box (top-left corner and side, in pixels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub x: f32,
    pub y: f32,
    pub size: f32,
}

/// The world: palette, shapes, prompts and their fixed train / held-out split.
#[derive(Debug, Clone)]
pub struct ShapesWorld {
    pub options: RenderOptions,
}

impl Default for ShapesWorld {
    fn default() -> Self {
        Self::new(RenderOptions::default())
    }
}

/// Whether the point (px, py) lies inside `shape` drawn in the box (x, y, w, h).
/// Triangles point up: apex at the top centre, base along the bottom edge.
pub fn inside(shape: usize, px: f32, py: f32, x: f32, y: f32, w: f32, h: f32) -> bool {
    if px < x || px > x + w || py < y || py > y + h {
        return false;
    }
    match shape {
        CIRCLE => {
            let (cx, cy) = (x + w / 2.0, y + h / 2.0);
            let dx = (px - cx) / (w / 2.0);
            let dy = (py - cy) / (h / 2.0);
            dx * dx + dy * dy <= 1.0
        }
        SQUARE => true,
        _ => {
            let half = (w / 2.0) * (py - y) / h;
            (px - (x + w / 2.0)).abs() <= half
        }
    }
}

impl ShapesWorld {
    pub fn new(options: RenderOptions) -> Self {
        Self { options }
    }

    pub fn image_size(&self) -> usize {
        IMAGE_SIZE
    }

    /// All 18 prompts, colour-major.
    pub fn prompts(&self) -> Vec<Prompt> {
        (0..COLOURS.len())
            .flat_map(|c| {
                (0..SHAPES.len()).map(move |s| Prompt {
                    colour: c,
                    shape: s,
                })
            })
            .collect()
    }

    /// Whether a prompt is held out: colour i with shape i mod 3 (red circle, green square,
    /// blue triangle, yellow circle, magenta square, cyan triangle), so every colour and
    /// every shape appears both in training and in the held-out set.
    pub fn is_heldout(&self, p: Prompt) -> bool {
        p.shape == p.colour % SHAPES.len()
    }

    /// The 12 training prompts.
    pub fn train_prompts(&self) -> Vec<Prompt> {
        self.prompts()
            .into_iter()
            .filter(|p| !self.is_heldout(*p))
            .collect()
    }

    /// The 6 held-out prompts.
    pub fn heldout_prompts(&self) -> Vec<Prompt> {
        self.prompts()
            .into_iter()
            .filter(|p| self.is_heldout(*p))
            .collect()
    }

    /// A prompt uniform over all 18.
    pub fn random_prompt(&self, rng: &mut SeededRng) -> Prompt {
        let all = self.prompts();
        all[rng.int_in(0, all.len() as i64) as usize]
    }

    /// A prompt uniform over `from`.
    pub fn random_from(&self, from: &[Prompt], rng: &mut SeededRng) -> Result<Prompt> {
        if from.is_empty() {
            bail!("random_from: no prompts to choose from");
        }
        Ok(from[rng.int_in(0, from.len() as i64) as usize])
    }

    /// With probability `p`, replace the colour or (equally likely) the shape by a uniformly
    /// chosen wrong one; otherwise return the prompt unchanged. For pretraining captions.
    pub fn noisy_caption(&self, prompt: Prompt, p: f64, rng: &mut SeededRng) -> Prompt {
        if rng.uniform() >= p {
            return prompt;
        }
        let mut out = prompt;
        if rng.uniform() < 0.5 {
            let k = rng.int_in(1, COLOURS.len() as i64) as usize;
            out.colour = (prompt.colour + k) % COLOURS.len();
        } else {
            let k = rng.int_in(1, SHAPES.len() as i64) as usize;
            out.shape = (prompt.shape + k) % SHAPES.len();
        }
        out
    }

    /// A random placement: size uniform in [8, 12] px, box fully inside the image.
    pub fn random_placement(&self, rng: &mut SeededRng) -> Placement {
        let size = MIN_SIZE + (MAX_SIZE - MIN_SIZE) * rng.uniform() as f32;
        let room = IMAGE_SIZE as f32 - size;
        let x = room * rng.uniform() as f32;
        let y = room * rng.uniform() as f32;
        Placement { x, y, size }
    }

    /// Pixels [3, 16, 16] (channel-major) in [0, 1] for a prompt at a placement; draws only
    /// the optional noise from `rng`.
    pub fn render_at(&self, prompt: Prompt, at: Placement, rng: &mut SeededRng) -> Vec<f32> {
        let n = IMAGE_SIZE;
        let colour = COLOURS[prompt.colour].1;
        let sub: usize = if self.options.antialias { 4 } else { 1 };
        let mut out = vec![0f32; 3 * n * n];
        for i in 0..n {
            for j in 0..n {
                let mut hits = 0usize;
                for si in 0..sub {
                    for sj in 0..sub {
                        let py = i as f32 + (si as f32 + 0.5) / sub as f32;
                        let px = j as f32 + (sj as f32 + 0.5) / sub as f32;
                        if inside(prompt.shape, px, py, at.x, at.y, at.size, at.size) {
                            hits += 1;
                        }
                    }
                }
                let a = hits as f32 / (sub * sub) as f32;
                for c in 0..3 {
                    out[c * n * n + i * n + j] = BACKGROUND[c] * (1.0 - a) + colour[c] * a;
                }
            }
        }
        if self.options.noise > 0.0 {
            let noise = rng.normal_vec(out.len());
            for (v, z) in out.iter_mut().zip(noise) {
                *v = (*v + self.options.noise * z).clamp(0.0, 1.0);
            }
        }
        out
    }

    /// Pixels [3, 16, 16] in [0, 1] at a random placement.
    pub fn render_pixels(&self, prompt: Prompt, rng: &mut SeededRng) -> Vec<f32> {
        let at = self.random_placement(rng);
        self.render_at(prompt, at, rng)
    }

    /// A [3, 16, 16] f32 tensor in [-1, 1].
    pub fn render(&self, prompt: Prompt, rng: &mut SeededRng, device: &Device) -> Result<Tensor> {
        let px = to_signed(self.render_pixels(prompt, rng));
        Ok(Tensor::from_vec(px, (3, IMAGE_SIZE, IMAGE_SIZE), device)?)
    }

    /// Parse `text` and render it.
    pub fn render_text(&self, text: &str, rng: &mut SeededRng, device: &Device) -> Result<Tensor> {
        self.render(Prompt::parse(text)?, rng, device)
    }

    /// A [B, 3, 16, 16] f32 tensor in [-1, 1], one image per prompt.
    pub fn render_batch(
        &self,
        prompts: &[Prompt],
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Tensor> {
        let n = IMAGE_SIZE;
        let mut all = Vec::with_capacity(prompts.len() * 3 * n * n);
        for p in prompts {
            all.extend(to_signed(self.render_pixels(*p, rng)));
        }
        Ok(Tensor::from_vec(all, (prompts.len(), 3, n, n), device)?)
    }
}

/// [0, 1] -> [-1, 1].
pub fn to_signed(mut v: Vec<f32>) -> Vec<f32> {
    for x in v.iter_mut() {
        *x = *x * 2.0 - 1.0;
    }
    v
}
