//! Image grids: a batch [B, 3, H, W] as one RGB8 picture, `nrow` images per row, magnified by
//! an integer factor, optionally labelled: a caption under each image (e.g. its prompt) and a
//! label left of each row (e.g. "before" / "after"), drawn in the embedded 8x8 font on white.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::fsutil::atomic_write;
use crate::image_io::{batch_values, encode_png, rgb8};
use crate::image_text::{draw_text, wrap, GLYPH};

/// Options of [`make_grid`].
#[derive(Debug, Clone, Copy)]
pub struct GridOptions {
    /// Images per row.
    pub nrow: usize,
    /// Pixels between images (before upscaling).
    pub padding: usize,
    /// Integer nearest-neighbour magnification of the whole grid.
    pub upscale: usize,
    /// Grey level of the padding.
    pub pad_value: u8,
}

impl Default for GridOptions {
    fn default() -> Self {
        Self {
            nrow: 8,
            padding: 1,
            upscale: 4,
            pad_value: 128,
        }
    }
}

/// Text drawn with a grid; empty lists draw nothing (and leave no room).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GridLabels {
    /// One caption per image (or none), wrapped to the image's width; "" leaves a cell blank.
    pub captions: Vec<String>,
    /// One label per row (or none), left of the row.
    pub rows: Vec<String>,
}

/// Caption lines at most (longer captions end with `..`).
const MAX_CAPTION_LINES: usize = 3;
/// Longest row label (characters).
const MAX_ROW_LABEL: usize = 24;
const TEXT: [u8; 3] = [0, 0, 0];
const LABEL_BACKGROUND: [u8; 3] = [255, 255, 255];

/// Where everything of a grid goes, in pixels of the final picture.
struct Layout {
    cols: usize,
    rows: usize,
    /// Side of one magnified image.
    cell: (usize, usize),
    pad: usize,
    /// Glyph magnification of the labels.
    text_scale: usize,
    /// Width of the row-label band (0 without row labels).
    label_w: usize,
    /// Wrapped caption lines per image.
    captions: Vec<Vec<String>>,
    /// Height of the caption band under each row (0 when the row has no caption).
    band_h: Vec<usize>,
    width: usize,
    height: usize,
}

impl Layout {
    fn new(b: usize, h: usize, w: usize, opts: &GridOptions, labels: &GridLabels) -> Result<Self> {
        if opts.nrow == 0 {
            bail!("grid: nrow must be >= 1");
        }
        if opts.upscale == 0 || opts.upscale > 64 {
            bail!("grid: upscale must be in 1..=64, got {}", opts.upscale);
        }
        let cols = opts.nrow.min(b).max(1);
        let rows = b.div_ceil(cols);
        if !labels.captions.is_empty() && labels.captions.len() != b {
            bail!(
                "grid: {} captions for {b} images (give one per image, \"\" for none)",
                labels.captions.len()
            );
        }
        if !labels.rows.is_empty() && labels.rows.len() != rows {
            bail!(
                "grid: {} row labels for {rows} rows ({b} images, {cols} per row)",
                labels.rows.len()
            );
        }
        let (cw, ch) = (w * opts.upscale, h * opts.upscale);
        let pad = opts.padding * opts.upscale;
        // 8 px text up to 255 px wide images, larger on larger ones.
        let text_scale = (cw / 256).clamp(1, 4);
        let (glyph, line_h) = (GLYPH * text_scale, (GLYPH + 2) * text_scale);
        let captions: Vec<Vec<String>> = labels
            .captions
            .iter()
            .map(|c| wrap(c, cw / glyph, MAX_CAPTION_LINES))
            .collect();
        let band_h = (0..rows)
            .map(|r| {
                let lines = captions
                    .iter()
                    .skip(r * cols)
                    .take(cols)
                    .map(Vec::len)
                    .max()
                    .unwrap_or(0);
                if lines == 0 {
                    0
                } else {
                    lines * line_h + 2 * text_scale
                }
            })
            .collect::<Vec<_>>();
        let longest = labels
            .rows
            .iter()
            .map(|l| l.chars().count().min(MAX_ROW_LABEL))
            .max()
            .unwrap_or(0);
        let label_w = if longest == 0 {
            0
        } else {
            longest * glyph + 2 * GLYPH * text_scale
        };
        let width = label_w + cols * (cw + pad) + pad;
        let height = band_h.iter().map(|b| ch + b + pad).sum::<usize>() + pad;
        Ok(Self {
            cols,
            rows,
            cell: (cw, ch),
            pad,
            text_scale,
            label_w,
            captions,
            band_h,
            width,
            height,
        })
    }

    /// Top edge of row `r`'s images.
    fn row_top(&self, r: usize) -> usize {
        self.pad
            + self.band_h[..r]
                .iter()
                .map(|b| self.cell.1 + b + self.pad)
                .sum::<usize>()
    }

    /// Left edge of column `c`'s images.
    fn col_left(&self, c: usize) -> usize {
        self.label_w + self.pad + c * (self.cell.0 + self.pad)
    }
}

/// Width and height of the grid [`make_labelled_grid`] draws for `b` images of h x w (for size
/// checks before any pixel is made).
pub fn grid_size(
    b: usize,
    h: usize,
    w: usize,
    opts: &GridOptions,
    labels: &GridLabels,
) -> Result<(usize, usize)> {
    let l = Layout::new(b, h, w, opts, labels)?;
    Ok((l.width, l.height))
}

/// A grid of a [B, 3, H, W] batch (or one [3, H, W] image) as interleaved RGB8 with its width
/// and height.
pub fn make_grid(t: &Tensor, opts: GridOptions) -> Result<(Vec<u8>, usize, usize)> {
    make_labelled_grid(t, opts, &GridLabels::default())
}

/// [`make_grid`] with captions under the images and labels left of the rows.
pub fn make_labelled_grid(
    t: &Tensor,
    opts: GridOptions,
    labels: &GridLabels,
) -> Result<(Vec<u8>, usize, usize)> {
    let (v, b, h, w) = batch_values(t, "grid")?;
    let l = Layout::new(b, h, w, &opts, labels)?;
    let mut out = vec![opts.pad_value; l.width * l.height * 3];
    let fill = |out: &mut [u8], x0: usize, y0: usize, fw: usize, fh: usize| {
        for y in y0..y0 + fh {
            for px in out[(y * l.width + x0) * 3..(y * l.width + x0 + fw) * 3].chunks_mut(3) {
                px.copy_from_slice(&LABEL_BACKGROUND);
            }
        }
    };
    if l.label_w > 0 {
        fill(&mut out, 0, 0, l.label_w, l.height);
    }
    let s = l.text_scale;
    let (cw, ch) = l.cell;
    for r in 0..l.rows {
        let top = l.row_top(r);
        if let Some(label) = labels.rows.get(r) {
            let text: String = label.chars().take(MAX_ROW_LABEL).collect();
            let y = top + ch.saturating_sub(GLYPH * s) / 2;
            draw_text(&mut out, l.width, GLYPH * s, y, &text, s, TEXT);
        }
        for c in 0..l.cols {
            let i = r * l.cols + c;
            if i >= b {
                break;
            }
            let left = l.col_left(c);
            let img = upscale(&rgb8(&v, i, h, w), w, h, opts.upscale);
            for y in 0..ch {
                let d = ((top + y) * l.width + left) * 3;
                out[d..d + cw * 3].copy_from_slice(&img[y * cw * 3..(y + 1) * cw * 3]);
            }
            if l.band_h[r] > 0 {
                fill(&mut out, left, top + ch, cw, l.band_h[r]);
            }
            for (k, line) in l.captions.get(i).into_iter().flatten().enumerate() {
                // Centred under the image.
                let x = left + cw.saturating_sub(line.chars().count() * GLYPH * s) / 2;
                let y = top + ch + s + k * (GLYPH + 2) * s;
                draw_text(&mut out, l.width, x, y, line, s, TEXT);
            }
        }
    }
    Ok((out, l.width, l.height))
}

/// Nearest-neighbour upscale of interleaved RGB8 by an integer factor.
fn upscale(rgb: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
    if k <= 1 {
        return rgb.to_vec();
    }
    let (ow, oh) = (w * k, h * k);
    let mut out = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let s = ((y / k) * w + x / k) * 3;
            let d = (y * ow + x) * 3;
            out[d..d + 3].copy_from_slice(&rgb[s..s + 3]);
        }
    }
    out
}

/// Save [`make_grid`] as a PNG.
pub fn save_grid(t: &Tensor, path: &Path, opts: GridOptions) -> Result<()> {
    save_labelled_grid(t, path, opts, &GridLabels::default())
}

/// Save [`make_labelled_grid`] as a PNG.
pub fn save_labelled_grid(
    t: &Tensor,
    path: &Path,
    opts: GridOptions,
    labels: &GridLabels,
) -> Result<()> {
    let (rgb, w, h) = make_labelled_grid(t, opts, labels)?;
    let png = encode_png(&rgb, w, h)?;
    atomic_write(path, &png).with_context(|| format!("save_grid: cannot write {}", path.display()))
}
