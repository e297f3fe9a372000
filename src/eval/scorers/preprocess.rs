//! Image preprocessing exactly as the scorers' references do it on PIL images: Pillow's bicubic
//! resampling (reimplemented here bit for bit: separable, antialiased by widening the cubic
//! kernel (a = -0.5) by the downscale factor, 22-bit fixed-point coefficients, horizontal pass
//! first, clip to u8 between passes), then a centre crop or pad, then `/255` and CLIP mean/std.
//!
//! Three geometries, one per reference:
//! * [`Geometry::HfCrop`] - transformers `CLIPImageProcessor` (PIL backend; PickScore, CLIP
//!   score): shortest side -> S (long side `int(S * long / short)`), crop top `(h - S) // 2`.
//! * [`Geometry::TorchvisionCrop`] - OpenAI clip / open_clip `Resize(S) + CenterCrop(S)`
//!   (aesthetic predictor): same resize, crop top `round((h - S) / 2)` (ties to even).
//! * [`Geometry::LongestPad`] - HPSv2's `ResizeMaxSize(S, fill=0)`: longest side -> S (sides
//!   `round(side * S / longest)`), then zero padding (black) to S x S, `pad // 2` on the
//!   left/top. Deviation: where the longest side already is S the reference skips the pad too
//!   and hands a non-square image to the model (which then fails); we pad.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;

/// OpenAI CLIP's normalisation (also open_clip's for ViT-H/14 and PickScore's processor).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// How an image becomes a square of side S.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Geometry {
    HfCrop,
    TorchvisionCrop,
    LongestPad,
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis: per output pixel the
/// first input index and the fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C `(int)` truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        let row = &mut k[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let v = if ww != 0.0 { w[x] / ww } else { w[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            row[x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, k }
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `Image.resize((w, h), Image.BICUBIC)` of Pillow for an RGB image, bit-exact.
pub fn pil_resize_bicubic(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (w as usize, h as usize);
    let src = img.as_raw();
    // Horizontal pass (skipped when the width does not change, as Pillow does).
    let (tmp, tw) = if ow != iw {
        let c = coeffs(iw, ow);
        let mut out = vec![0u8; ih * ow * 3];
        for y in 0..ih {
            let row = &src[y * iw * 3..(y + 1) * iw * 3];
            for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
                let k = &c.k[xx * c.ksize..xx * c.ksize + n];
                for ch in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (x, &kx) in k.iter().enumerate() {
                        ss += row[(x + xmin) * 3 + ch] as i64 * kx as i64;
                    }
                    out[(y * ow + xx) * 3 + ch] = clip8(ss);
                }
            }
        }
        (out, ow)
    } else {
        (src.to_vec(), iw)
    };
    // Vertical pass.
    let out = if oh != ih {
        let c = coeffs(ih, oh);
        let mut out = vec![0u8; oh * tw * 3];
        for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
            let k = &c.k[yy * c.ksize..yy * c.ksize + n];
            for x in 0..tw {
                for ch in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (y, &ky) in k.iter().enumerate() {
                        ss += tmp[((y + ymin) * tw + x) * 3 + ch] as i64 * ky as i64;
                    }
                    out[(yy * tw + x) * 3 + ch] = clip8(ss);
                }
            }
        }
        out
    } else {
        tmp
    };
    RgbImage::from_raw(w, h, out).expect("buffer size matches")
}

fn crop(img: &RgbImage, left: u32, top: u32, s: u32) -> RgbImage {
    image::imageops::crop_imm(img, left, top, s, s).to_image()
}

/// Resize + crop/pad `img` to `size` x `size` as the reference of `geometry` does (u8, before
/// normalisation).
pub fn to_square(img: &RgbImage, size: usize, geometry: Geometry) -> Result<RgbImage> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("empty image ({w}x{h})");
    }
    if size == 0 {
        bail!("target size must be >= 1");
    }
    let s = size as u32;
    match geometry {
        Geometry::HfCrop | Geometry::TorchvisionCrop => {
            let (short, long) = (w.min(h), w.max(h));
            // Python: int(size * long / short), a true division then truncation.
            let new_long = ((size * long) as f64 / short as f64) as usize;
            let (nw, nh) = if w <= h {
                (size, new_long)
            } else {
                (new_long, size)
            };
            let resized = if (nw, nh) == (w, h) {
                img.clone()
            } else {
                pil_resize_bicubic(img, nw as u32, nh as u32)
            };
            let offset = |d: usize| -> u32 {
                let margin = d - size;
                match geometry {
                    Geometry::HfCrop => (margin / 2) as u32,
                    _ => (margin as f64 / 2.0).round_ties_even() as u32,
                }
            };
            Ok(crop(&resized, offset(nw), offset(nh), s))
        }
        Geometry::LongestPad => {
            let scale = size as f64 / w.max(h) as f64;
            let (nw, nh) = if scale != 1.0 {
                (
                    ((w as f64 * scale).round_ties_even() as usize).clamp(1, size),
                    ((h as f64 * scale).round_ties_even() as usize).clamp(1, size),
                )
            } else {
                (w, h)
            };
            let resized = if (nw, nh) == (w, h) {
                img.clone()
            } else {
                pil_resize_bicubic(img, nw as u32, nh as u32)
            };
            if (nw, nh) == (size, size) {
                return Ok(resized);
            }
            let mut out = RgbImage::new(s, s);
            image::imageops::replace(
                &mut out,
                &resized,
                ((size - nw) / 2) as i64,
                ((size - nh) / 2) as i64,
            );
            Ok(out)
        }
    }
}

/// u8 squares -> normalised pixels [N, 3, S, S] (f32): `(v / 255 - mean) / std`.
pub fn normalize(
    images: &[RgbImage],
    mean: [f32; 3],
    std: [f32; 3],
    device: &Device,
) -> Result<Tensor> {
    let Some(first) = images.first() else {
        bail!("no images");
    };
    let (w, h) = (first.width() as usize, first.height() as usize);
    let mut v = Vec::with_capacity(images.len() * 3 * w * h);
    for img in images {
        if (img.width() as usize, img.height() as usize) != (w, h) {
            bail!("images of different sizes in one batch");
        }
        let raw = img.as_raw();
        for c in 0..3 {
            for p in 0..w * h {
                v.push((raw[p * 3 + c] as f32 / 255.0 - mean[c]) / std[c]);
            }
        }
    }
    Ok(Tensor::from_vec(v, (images.len(), 3, h, w), device)?)
}

/// u8 square [3, S, S] values in channel-major order (for tests and checks).
pub fn channel_major(img: &RgbImage) -> Vec<u8> {
    let n = (img.width() * img.height()) as usize;
    let raw = img.as_raw();
    (0..3)
        .flat_map(|c| (0..n).map(move |p| raw[p * 3 + c]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_resize_is_identity_and_weights_sum_to_one() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 50) as u8, 9]));
        assert_eq!(pil_resize_bicubic(&img, 7, 5), img);
        for (i, o) in [(100, 7), (7, 100), (224, 224), (97, 58)] {
            let c = coeffs(i, o);
            for (xx, &(_, n)) in c.bounds.iter().enumerate() {
                let s: i64 = c.k[xx * c.ksize..xx * c.ksize + n]
                    .iter()
                    .map(|&k| k as i64)
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant_in_every_geometry() {
        let img = RgbImage::from_pixel(33, 20, image::Rgb([200, 17, 90]));
        for g in [Geometry::HfCrop, Geometry::TorchvisionCrop] {
            let out = to_square(&img, 16, g).unwrap();
            assert_eq!((out.width(), out.height()), (16, 16));
            assert!(out.pixels().all(|p| p.0 == [200, 17, 90]), "{g:?}");
        }
        let out = to_square(&img, 16, Geometry::LongestPad).unwrap();
        // 33x20 -> 16x10 (round(9.7)), padded 3 rows on top, 3 below.
        assert_eq!(out.get_pixel(5, 0).0, [0, 0, 0]);
        assert_eq!(out.get_pixel(5, 3).0, [200, 17, 90]);
        assert_eq!(out.get_pixel(5, 12).0, [200, 17, 90]);
        assert_eq!(out.get_pixel(5, 13).0, [0, 0, 0]);
    }
}
