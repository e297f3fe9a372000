//! A judge that reads only pixels: which colour and shape does an image show, and does it
//! match its prompt?
//!
//! 1. Foreground mask: the background colour is the mean of the darkest quarter of the
//!    pixels; a pixel's strength is its largest channel excess over that background; the mask
//!    keeps pixels above half the image's 95th-percentile strength (at least 0.2), and only its
//!    largest 8-connected component (stray noise pixels are dropped).
//! 2. Colour: the palette entry nearest to the mean of the component's core pixels, comparing
//!    against each entry's shades (its excess over the background scaled by 0.6..1.15, so a dim
//!    red is red); none when farther than `max_colour_dist`.
//! 3. Shape: each pixel's soft coverage is its projection onto the foreground colour (so
//!    anti-aliased edges count fractionally); for each shape the template with the same area and
//!    centroid is rendered (4x4 supersampled; triangles in all four orientations, though the
//!    world renders them apex up) and compared by soft IoU. The best wins if its IoU is at least
//!    `min_iou` and beats the runner-up by `min_shape_margin`; ambiguous images get no shape.
//!
//! The graded `score` in [0, 1] is relative to the prompt: half a Gaussian similarity of the
//! mean colour to the prompt's palette colour, half the IoU with the prompt shape's template.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use super::world::{inside, Prompt, CIRCLE, COLOURS, SHAPES, SQUARE, TRIANGLE};

/// The verdict on one image against one prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    /// Predicted colour index (None when the image is empty).
    pub colour: Option<usize>,
    /// Predicted shape index (None when empty or no template fits at least `min_iou`).
    pub shape: Option<usize>,
    pub colour_ok: bool,
    pub shape_ok: bool,
    /// colour_ok && shape_ok.
    pub aligned: bool,
    /// Graded agreement with the prompt in [0, 1].
    pub score: f64,
    /// No foreground found.
    pub empty: bool,
    /// (d2 - d1) / (d2 + d1) of the two nearest palette distances: 1 exact, 0 a tie.
    pub colour_conf: f64,
    /// Distance of the mean foreground colour to its nearest palette shade ([0, 1] RGB).
    pub colour_dist: f64,
    /// Soft IoU of the foreground coverage with the best-fitting template.
    pub shape_iou: f64,
    /// Best template IoU minus the second shape's best.
    pub shape_margin: f64,
    /// Foreground pixel count.
    pub area: usize,
}

impl Judgement {
    fn empty() -> Self {
        Self {
            colour: None,
            shape: None,
            colour_ok: false,
            shape_ok: false,
            aligned: false,
            score: 0.0,
            empty: true,
            colour_conf: 0.0,
            colour_dist: f64::INFINITY,
            shape_iou: 0.0,
            shape_margin: 0.0,
            area: 0,
        }
    }

    /// "a red circle" for what the judge saw, "(empty)" or "a red (unknown shape)".
    pub fn seen(&self) -> String {
        let c = self
            .colour
            .map(|c| COLOURS[c].0)
            .unwrap_or("(unknown colour)");
        let s = self.shape.map(|s| SHAPES[s]).unwrap_or("(unknown shape)");
        if self.empty {
            "(empty)".into()
        } else {
            format!("a {c} {s}")
        }
    }
}

/// Thresholds of the judge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judge {
    /// A shape is recognized only with template (soft) IoU >= this...
    pub min_iou: f64,
    /// ...and at least this much above the next shape's (ambiguous images get no shape).
    pub min_shape_margin: f64,
    /// A colour is recognized only within this RGB distance ([0, 1] units) of its palette entry.
    pub max_colour_dist: f64,
    /// Width of the Gaussian colour similarity in the graded score.
    pub colour_sigma: f64,
    /// Smallest foreground area as a fraction of the image.
    pub min_area_frac: f64,
    /// Largest area of a recognizable shape as a fraction of the image (the world's largest
    /// shape covers 56%); a mask beyond it is texture or noise, not a shape.
    pub max_area_frac: f64,
}

impl Default for Judge {
    fn default() -> Self {
        Self {
            min_iou: 0.6,
            min_shape_margin: 0.02,
            max_colour_dist: 0.3,
            colour_sigma: 0.2,
            min_area_frac: 0.03,
            max_area_frac: 0.65,
        }
    }
}

fn percentile(sorted: &[f32], q: f64) -> f32 {
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Largest 8-connected component of `mask` (h x w), as a mask.
fn largest_component(mask: &[bool], h: usize, w: usize) -> Vec<bool> {
    let mut label = vec![0u32; mask.len()];
    let mut best = (0u32, 0usize);
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let mut size = 0;
        while let Some(p) = stack.pop() {
            size += 1;
            let (i, j) = ((p / w) as i64, (p % w) as i64);
            for di in -1..=1 {
                for dj in -1..=1 {
                    let (ni, nj) = (i + di, j + dj);
                    if ni < 0 || nj < 0 || ni >= h as i64 || nj >= w as i64 {
                        continue;
                    }
                    let q = ni as usize * w + nj as usize;
                    if mask[q] && label[q] == 0 {
                        label[q] = next;
                        stack.push(q);
                    }
                }
            }
        }
        if size > best.1 {
            best = (next, size);
        }
    }
    label.iter().map(|&l| l != 0 && l == best.0).collect()
}

/// Coverage (4x4 supersampled) of `shape` drawn in the continuous box (x, y, side) on an
/// h x w image; `orient` rotates triangles (0 apex up, 1 down, 2 left, 3 right).
fn template(
    shape: usize,
    orient: usize,
    x: f32,
    y: f32,
    side: f32,
    h: usize,
    w: usize,
) -> Vec<f32> {
    const SUB: usize = 4;
    let mut out = vec![0f32; h * w];
    let i0 = (y.floor().max(0.0) as usize).min(h);
    let i1 = ((y + side).ceil().max(0.0) as usize).min(h);
    let j0 = (x.floor().max(0.0) as usize).min(w);
    let j1 = ((x + side).ceil().max(0.0) as usize).min(w);
    for i in i0..i1 {
        for j in j0..j1 {
            let mut hits = 0;
            for si in 0..SUB {
                for sj in 0..SUB {
                    let u = j as f32 + (sj as f32 + 0.5) / SUB as f32 - x;
                    let v = i as f32 + (si as f32 + 0.5) / SUB as f32 - y;
                    // into the canonical (apex-up) frame of the box
                    let (cu, cv) = match orient {
                        0 => (u, v),
                        1 => (u, side - v),
                        2 => (v, u),
                        _ => (v, side - u),
                    };
                    hits += inside(shape, cu, cv, 0.0, 0.0, side, side) as usize;
                }
            }
            out[i * w + j] = hits as f32 / (SUB * SUB) as f32;
        }
    }
    out
}

/// Soft IoU: sum of minima over sum of maxima.
fn soft_iou(a: &[f32], b: &[f32]) -> f64 {
    let (mut inter, mut union) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        inter += x.min(y) as f64;
        union += x.max(y) as f64;
    }
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// The box (x, y, side) of `shape` in orientation `orient` whose area and centroid are `area`
/// and (cx, cy).
fn fitted_box(shape: usize, orient: usize, area: f64, cx: f64, cy: f64) -> (f32, f32, f32) {
    let s = match shape {
        CIRCLE => (4.0 * area / std::f64::consts::PI).sqrt(),
        SQUARE => area.sqrt(),
        _ => (2.0 * area).sqrt(),
    };
    let (x, y) = match (shape, orient) {
        (TRIANGLE, 0) => (cx - s / 2.0, cy - 2.0 * s / 3.0),
        (TRIANGLE, 1) => (cx - s / 2.0, cy - s / 3.0),
        (TRIANGLE, 2) => (cx - 2.0 * s / 3.0, cy - s / 2.0),
        (TRIANGLE, _) => (cx - s / 3.0, cy - s / 2.0),
        _ => (cx - s / 2.0, cy - s / 2.0),
    };
    (x as f32, y as f32, s as f32)
}

/// Distance of `mean` to the nearest shade of palette colour `rgb` over background `bg`: the
/// colour's excess over the background scaled by 0.6..1.15 (a dim or bright red is still red).
fn shade_dist(mean: [f64; 3], rgb: [f32; 3], bg: [f32; 3]) -> f64 {
    let m: Vec<f64> = (0..3).map(|c| mean[c] - bg[c] as f64).collect();
    let d: Vec<f64> = (0..3).map(|c| (rgb[c] - bg[c]) as f64).collect();
    let dd: f64 = d.iter().map(|x| x * x).sum();
    let alpha = if dd > 0.0 {
        ((0..3).map(|c| m[c] * d[c]).sum::<f64>() / dd).clamp(0.6, 1.15)
    } else {
        1.0
    };
    (0..3)
        .map(|c| (m[c] - alpha * d[c]).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn dist(a: [f64; 3], b: [f32; 3]) -> f64 {
    (0..3)
        .map(|c| (a[c] - b[c] as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

impl Judge {
    /// Judge one image given as channel-major pixels [3, h, w] in [-1, 1].
    pub fn judge_pixels(
        &self,
        px: &[f32],
        h: usize,
        w: usize,
        prompt: Prompt,
    ) -> Result<Judgement> {
        let n = h * w;
        if px.len() != 3 * n || n == 0 {
            bail!(
                "judge: expected 3*{h}*{w} = {} pixel values, got {}",
                3 * n,
                px.len()
            );
        }
        let v: Vec<f32> = px
            .iter()
            .map(|&x| {
                if x.is_finite() {
                    ((x + 1.0) / 2.0).clamp(0.0, 1.0)
                } else {
                    0.0
                }
            })
            .collect();
        let at = |c: usize, p: usize| v[c * n + p];

        // background: mean colour of the darkest quarter
        let mut order: Vec<usize> = (0..n).collect();
        let bright = |p: usize| at(0, p).max(at(1, p)).max(at(2, p));
        order.sort_by(|&a, &b| bright(a).total_cmp(&bright(b)));
        let dark = &order[..(n / 4).max(1)];
        let mut bg = [0f32; 3];
        for (c, b) in bg.iter_mut().enumerate() {
            *b = dark.iter().map(|&p| at(c, p)).sum::<f32>() / dark.len() as f32;
        }
        let strength: Vec<f32> = (0..n)
            .map(|p| (0..3).map(|c| at(c, p) - bg[c]).fold(f32::MIN, f32::max))
            .collect();
        let mut sorted = strength.clone();
        sorted.sort_by(f32::total_cmp);
        let top = percentile(&sorted, 0.95);
        let thr = (0.5 * top).max(0.2);
        let mask: Vec<bool> = strength.iter().map(|&s| s > thr).collect();
        let mask = largest_component(&mask, h, w);
        let area = mask.iter().filter(|&&m| m).count();
        let min_area = ((self.min_area_frac * n as f64).ceil() as usize).max(4);
        if area < min_area {
            return Ok(Judgement {
                area,
                ..Judgement::empty()
            });
        }

        // colour: mean of the component's core pixels (strength >= 75% of its maximum)
        let max_in = (0..n)
            .filter(|&p| mask[p])
            .map(|p| strength[p])
            .fold(f32::MIN, f32::max);
        let mut core: Vec<usize> = (0..n)
            .filter(|&p| mask[p] && strength[p] >= 0.75 * max_in)
            .collect();
        if core.len() < 3 {
            core = (0..n).filter(|&p| mask[p]).collect();
        }
        let mut mean = [0f64; 3];
        for (c, m) in mean.iter_mut().enumerate() {
            *m = core.iter().map(|&p| at(c, p) as f64).sum::<f64>() / core.len() as f64;
        }
        let mut d: Vec<(f64, usize)> = COLOURS
            .iter()
            .enumerate()
            .map(|(i, (_, rgb))| (shade_dist(mean, *rgb, bg), i))
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (d1, pred_colour) = d[0];
        let d2 = d[1].0;
        let colour_conf = if d1 + d2 > 0.0 {
            (d2 - d1) / (d2 + d1)
        } else {
            0.0
        };
        let colour = (d1 <= self.max_colour_dist).then_some(pred_colour);

        // shape: soft coverage of each pixel along the foreground colour direction, inside the
        // component grown by one pixel (to keep its soft edges); then, for each shape, the
        // template with the same area and centroid, and the soft IoU with it.
        let dir: Vec<f64> = (0..3).map(|c| mean[c] - bg[c] as f64).collect();
        let dd: f64 = dir.iter().map(|x| x * x).sum();
        let mut region = mask.clone();
        for p in (0..n).filter(|&p| mask[p]) {
            let (i, j) = ((p / w) as i64, (p % w) as i64);
            for di in -1..=1 {
                for dj in -1..=1 {
                    let (ni, nj) = (i + di, j + dj);
                    if ni >= 0 && nj >= 0 && ni < h as i64 && nj < w as i64 {
                        region[ni as usize * w + nj as usize] = true;
                    }
                }
            }
        }
        let soft: Vec<f32> = (0..n)
            .map(|p| {
                if !region[p] || dd <= 0.0 {
                    return 0.0;
                }
                let proj: f64 = (0..3)
                    .map(|c| (at(c, p) - bg[c]) as f64 * dir[c])
                    .sum::<f64>()
                    / dd;
                proj.clamp(0.0, 1.0) as f32
            })
            .collect();
        let total: f64 = soft.iter().map(|&a| a as f64).sum();
        let (mut cx, mut cy) = (0f64, 0f64);
        for (p, &a) in soft.iter().enumerate() {
            cx += a as f64 * ((p % w) as f64 + 0.5);
            cy += a as f64 * ((p / w) as f64 + 0.5);
        }
        let (cx, cy) = (cx / total.max(1e-9), cy / total.max(1e-9));
        let ious: Vec<f64> = (0..SHAPES.len())
            .map(|s| {
                let orients = if s == TRIANGLE { 4 } else { 1 };
                (0..orients)
                    .map(|o| {
                        let (x, y, side) = fitted_box(s, o, total, cx, cy);
                        soft_iou(&soft, &template(s, o, x, y, side, h, w))
                    })
                    .fold(0.0, f64::max)
            })
            .collect();
        let mut ranked: Vec<(f64, usize)> = ious.iter().enumerate().map(|(i, &x)| (x, i)).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        let (best_iou, pred_shape) = ranked[0];
        let shape_margin = best_iou - ranked[1].0;
        let fits = best_iou >= self.min_iou
            && shape_margin >= self.min_shape_margin
            && (area as f64) <= self.max_area_frac * n as f64;
        let shape = fits.then_some(pred_shape);

        let colour_ok = colour == Some(prompt.colour);
        let shape_ok = shape == Some(prompt.shape);
        let dp = dist(mean, COLOURS[prompt.colour].1);
        let colour_sim = (-dp * dp / (2.0 * self.colour_sigma * self.colour_sigma)).exp();
        let score = 0.5 * colour_sim + 0.5 * ious[prompt.shape];
        Ok(Judgement {
            colour,
            shape,
            colour_ok,
            shape_ok,
            aligned: colour_ok && shape_ok,
            score,
            empty: false,
            colour_conf,
            colour_dist: d1,
            shape_iou: best_iou,
            shape_margin,
            area,
        })
    }

    /// Judge a [3, H, W] or [B, 3, H, W] tensor in [-1, 1] against one prompt per image (or
    /// one prompt for all).
    pub fn judge_tensor(&self, images: &Tensor, prompts: &[Prompt]) -> Result<Vec<Judgement>> {
        let images = match images.rank() {
            3 => images.unsqueeze(0)?,
            4 => images.clone(),
            r => bail!(
                "judge: images must be [3, H, W] or [B, 3, H, W], got rank {r} {:?}",
                images.dims()
            ),
        };
        let (b, c, h, w) = images.dims4()?;
        if c != 3 {
            bail!(
                "judge: images must have 3 channels, got shape {:?}",
                images.dims()
            );
        }
        if prompts.len() != b && prompts.len() != 1 {
            bail!(
                "judge: {b} images but {} prompts (give one per image, or one for all)",
                prompts.len()
            );
        }
        let flat: Vec<f32> = images.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let per = 3 * h * w;
        (0..b)
            .map(|i| {
                let p = if prompts.len() == 1 {
                    prompts[0]
                } else {
                    prompts[i]
                };
                self.judge_pixels(&flat[i * per..(i + 1) * per], h, w, p)
            })
            .collect()
    }
}
