//! Line plots as PNG with plotters' bitmap backend.
//!
//! Text needs no system fonts: a thin backend wrapper draws every label with the embedded 8x8
//! bitmap font of [`crate::image_text`], so plots render identically on any machine.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use image::ImageEncoder;
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::number::format_tick;
use crate::fsutil::atomic_write;
use crate::image_text::glyph;

/// A bitmap backend whose text is drawn with an embedded 8x8 font.
struct GlyphBackend<'a> {
    inner: BitMapBackend<'a>,
}

type BitmapError<'a> = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

/// Glyph magnification for a font size; plotters' own (font-less) text layout estimates about
/// 0.45 * size pixels per character, which an 8 px glyph matches at size 18.
fn glyph_scale(size: f64) -> i32 {
    ((size / 18.0).round() as i32).max(1)
}

impl<'a> DrawingBackend for GlyphBackend<'a> {
    type ErrorType = BitmapError<'a>;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<S: BackendTextStyle>(
        &self,
        text: &str,
        style: &S,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        let s = glyph_scale(style.size());
        Ok(((8 * s * text.chars().count() as i32) as u32, (8 * s) as u32))
    }

    fn draw_text<S: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let s = glyph_scale(style.size());
        let width = 8 * s * text.chars().count() as i32;
        let height = 8 * s;
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let trans = style.transform();
        let (w, h) = self.get_size();
        for (k, ch) in text.chars().enumerate() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for c in 0..8 {
                    if bits & (1 << c) == 0 {
                        continue;
                    }
                    for sy in 0..s {
                        for sx in 0..s {
                            let lx = k as i32 * 8 * s + c * s + sx + dx;
                            let ly = r as i32 * s + sy + dy;
                            let (tx, ty) = trans.transform(lx, ly);
                            let (x, y) = (pos.0 + tx, pos.1 + ty);
                            if x >= 0 && y >= 0 && x < w as i32 && y < h as i32 {
                                self.inner.draw_pixel((x, y), color)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Options of [`line_plot_with`] (scripts pass the title beside the other options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct LinePlot {
    #[serde(skip)]
    pub title: String,
    /// Caption of the x axis.
    pub x_label: String,
    /// Caption of the y axis.
    pub y_label: String,
    /// Picture width in pixels.
    pub width: u32,
    /// Picture height in pixels.
    pub height: u32,
}

impl Default for LinePlot {
    fn default() -> Self {
        Self::new("")
    }
}

impl LinePlot {
    pub fn new(title: &str) -> Self {
        Self {
            title: title.to_string(),
            x_label: String::new(),
            y_label: String::new(),
            width: 640,
            height: 400,
        }
    }
}

const SERIES_COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn padded_range(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let pad = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            0.5
        };
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * frac;
    (lo - pad, hi + pad)
}

/// A line plot of named series of (x, y) points, written as a PNG (640x400) at `path`.
/// Non-finite points are skipped; empty series are allowed (an empty frame).
pub fn line_plot(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    line_plot_with(path, &LinePlot::new(title), series)
}

/// [`line_plot`] with axis labels and size.
pub fn line_plot_with(
    path: &Path,
    opts: &LinePlot,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let png = render_line_plot(opts, series)?;
    atomic_write(path, &png)
}

/// Stroke width of series `i` of `n`: earlier series (drawn first, underneath) are wider, so
/// a series that coincides with a later one still shows as a border around it.
fn line_width(i: usize, n: usize) -> u32 {
    2 + 2 * (n - 1 - i).min(3) as u32
}

/// Height of one legend line and length of its colour swatch (pixels).
const LEGEND_LINE: u32 = 16;
const LEGEND_SWATCH: u32 = 18;

/// Where a legend entry goes in the band under the chart (its top-left corner).
struct LegendEntry {
    x: u32,
    y: u32,
}

/// Legend entries (swatch, gap, name in 8 px glyphs) flowed left to right into lines of at
/// most `width` pixels, each line centred.
fn legend_layout(names: &[&str], width: u32) -> Vec<LegendEntry> {
    let entry_w = |n: &str| LEGEND_SWATCH + 6 + 8 * n.chars().count() as u32 + 20;
    // Entry widths, line by line.
    let mut lines: Vec<Vec<u32>> = Vec::new();
    let mut used = 0;
    for n in names {
        let ew = entry_w(n);
        match lines.last_mut() {
            Some(line) if used + ew <= width => line.push(ew),
            _ => {
                lines.push(vec![ew]);
                used = 0;
            }
        }
        used += ew;
    }
    let mut out: Vec<LegendEntry> = Vec::with_capacity(names.len());
    for (l, line) in lines.iter().enumerate() {
        let mut x = width.saturating_sub(line.iter().sum()) / 2;
        for ew in line {
            out.push(LegendEntry {
                x,
                y: 4 + l as u32 * LEGEND_LINE,
            });
            x += ew;
        }
    }
    out
}

/// The plot as PNG bytes.
pub fn render_line_plot(opts: &LinePlot, series: &[(String, Vec<(f64, f64)>)]) -> Result<Vec<u8>> {
    let (w, h) = (opts.width, opts.height);
    if !(64..=8192).contains(&w) || !(64..=8192).contains(&h) {
        bail!("line_plot: size {w}x{h} out of range 64..8192");
    }
    let clean: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, pts)| {
            (
                n.clone(),
                pts.iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect(),
            )
        })
        .collect();
    let all = clean.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1) = padded_range(x0, x1, 0.0);
    let (y0, y1) = padded_range(y0, y1, 0.05);

    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let backend = GlyphBackend {
            inner: BitMapBackend::with_buffer(&mut buf, (w, h)),
        };
        let root = backend.into_drawing_area();
        // 16 px glyphs when the title fits, else 8 px
        let caption_size = if 16 * opts.title.chars().count() as u32 + 24 <= w {
            32
        } else {
            18
        };
        let err = |e: &dyn std::fmt::Display| anyhow!("line_plot `{}`: {e}", opts.title);
        root.fill(&WHITE).map_err(|e| err(&e))?;
        // The legend goes in a band under the chart, where it cannot cover a line.
        let names: Vec<&str> = clean.iter().map(|(n, _)| n.as_str()).collect();
        let legend = legend_layout(&names, w.saturating_sub(24));
        let legend_h = legend.iter().map(|e| e.y + LEGEND_LINE).max().unwrap_or(0);
        let (plot_area, legend_area) = root.split_vertically(h.saturating_sub(legend_h));
        let mut chart = ChartBuilder::on(&plot_area)
            .caption(&opts.title, ("sans-serif", caption_size))
            .margin(12)
            .margin_right(36)
            .x_label_area_size(if opts.x_label.is_empty() { 24 } else { 40 })
            .y_label_area_size(if opts.y_label.is_empty() { 70 } else { 86 })
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(opts.x_label.as_str())
            .y_desc(opts.y_label.as_str())
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|v| format_tick(*v, x0, x1))
            .y_label_formatter(&|v| format_tick(*v, y0, y1))
            .label_style(("sans-serif", 18))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (_, pts)) in clean.iter().enumerate() {
            let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    pts.iter().copied(),
                    Color::stroke_width(&colour, line_width(i, clean.len())),
                ))
                .map_err(|e| err(&e))?;
            if pts.len() == 1 {
                chart
                    .draw_series(std::iter::once(Circle::new(pts[0], 3, colour.filled())))
                    .map_err(|e| err(&e))?;
            }
        }
        for (i, e) in legend.iter().enumerate() {
            let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
            let (x, y) = (e.x as i32 + 12, e.y as i32);
            let mid = y + LEGEND_LINE as i32 / 2 - 2;
            legend_area
                .draw(&PathElement::new(
                    vec![(x, mid), (x + LEGEND_SWATCH as i32, mid)],
                    Color::stroke_width(&colour, 3),
                ))
                .map_err(|e| err(&e))?;
            legend_area
                .draw(&Text::new(
                    names[i],
                    (x + LEGEND_SWATCH as i32 + 6, y + 2),
                    ("sans-serif", 18).into_font().color(&BLACK),
                ))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    encode_rgb_png(&buf, w, h)
}

/// RGB8 bytes as PNG bytes.
pub fn encode_rgb_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| anyhow!("PNG encoding failed: {e}"))?;
    Ok(out)
}
