//! Images <-> tensors: PNG writing of [3, H, W] / [B, 3, H, W] tensors in [-1, 1] (grids of
//! them: [`crate::image_grid`]), and PNG/JPEG loading with bilinear resize + centre crop (also for real preference datasets).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::imageops::{self, FilterType};
use image::{ImageEncoder, RgbImage};

use crate::fsutil::atomic_write;

fn to_u8(x: f32) -> u8 {
    if x.is_finite() {
        (((x + 1.0) * 0.5) * 255.0).round().clamp(0.0, 255.0) as u8
    } else {
        0
    }
}

/// Check that `t` is an image batch [B, 3, H, W] (a [3, H, W] image counts as B = 1) and return
/// it as f32 values with its dims.
pub(crate) fn batch_values(t: &Tensor, what: &str) -> Result<(Vec<f32>, usize, usize, usize)> {
    let t4 = match t.rank() {
        3 => t.unsqueeze(0)?,
        4 => t.clone(),
        r => bail!(
            "{what}: expected an image [3, H, W] or a batch [B, 3, H, W], got rank {r} shape {:?}",
            t.dims()
        ),
    };
    let (b, c, h, w) = t4.dims4()?;
    if c != 3 {
        bail!("{what}: expected 3 channels, got shape {:?}", t.dims());
    }
    if h == 0 || w == 0 {
        bail!("{what}: empty image of shape {:?}", t.dims());
    }
    let v: Vec<f32> = t4.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok((v, b, h, w))
}

/// Image `i` of channel-major values as interleaved RGB8.
pub(crate) fn rgb8(v: &[f32], i: usize, h: usize, w: usize) -> Vec<u8> {
    let n = h * w;
    let base = i * 3 * n;
    let mut out = Vec::with_capacity(3 * n);
    for p in 0..n {
        for c in 0..3 {
            out.push(to_u8(v[base + c * n + p]));
        }
    }
    out
}

pub(crate) fn encode_png(rgb: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| anyhow!("PNG encoding failed: {e}"))?;
    Ok(out)
}

/// The file name of image `i` of a batch saved at `path`: `{}` in the name is replaced by the
/// zero-padded index, otherwise `_{index}` goes before the extension.
pub fn indexed_path(path: &Path, i: usize) -> PathBuf {
    let s = path.to_string_lossy();
    if s.contains("{}") {
        return PathBuf::from(s.replace("{}", &format!("{i:04}")));
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_string())
        .unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}_{i:04}.{ext}"))
}

/// Save a [3, H, W] tensor as one PNG at `path`, or a [B, 3, H, W] batch as B PNGs named by
/// [`indexed_path`]. Values in [-1, 1] (clamped). Returns the paths written.
pub fn save_png(t: &Tensor, path: &Path) -> Result<Vec<PathBuf>> {
    let (v, b, h, w) = batch_values(t, "save_png")?;
    let paths: Vec<PathBuf> = if t.rank() == 3 {
        vec![path.to_path_buf()]
    } else {
        (0..b).map(|i| indexed_path(path, i)).collect()
    };
    for (i, p) in paths.iter().enumerate() {
        let png = encode_png(&rgb8(&v, i, h, w), w, h)?;
        atomic_write(p, &png).with_context(|| format!("save_png: cannot write {}", p.display()))?;
    }
    Ok(paths)
}

/// Decode an image file (PNG or JPEG; the format is read from the content) as RGB8.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let img = reader
        .decode()
        .map_err(|e| anyhow!("cannot decode image {}: {e}", path.display()))?;
    Ok(img.to_rgb8())
}

/// Resize (bilinear) so the shorter side is `size`, then centre-crop to size x size.
pub fn resize_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == size && h == size {
        return img.clone();
    }
    let scale = size as f64 / w.min(h) as f64;
    let nw = ((w as f64 * scale).round() as u32).max(size);
    let nh = ((h as f64 * scale).round() as u32).max(size);
    let resized = imageops::resize(img, nw, nh, FilterType::Triangle);
    let (x, y) = ((nw - size) / 2, (nh - size) / 2);
    imageops::crop_imm(&resized, x, y, size, size).to_image()
}

/// RGB8 image -> [3, H, W] f32 in [-1, 1].
pub fn rgb_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let raw = img.as_raw();
    let mut v = vec![0f32; 3 * h * w];
    for p in 0..h * w {
        for c in 0..3 {
            v[c * h * w + p] = raw[p * 3 + c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(v, (3, h, w), device)?)
}

/// Load a PNG/JPEG as [3, size, size] in [-1, 1]: bilinear resize of the shorter side to
/// `size`, then a centre crop.
pub fn load_image(path: &Path, size: usize, device: &Device) -> Result<Tensor> {
    if size == 0 || size > 16384 {
        bail!(
            "load_image {}: size must be in 1..=16384, got {size}",
            path.display()
        );
    }
    let img = read_rgb(path)?;
    rgb_to_tensor(&resize_center_crop(&img, size as u32), device)
}
