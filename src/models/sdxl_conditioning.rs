//! SDXL's size conditioning ("micro-conditioning"): the six time ids its UNet embeds next to
//! the pooled text embedding.
//!
//! The order is diffusers' (`StableDiffusionXLPipeline._get_add_time_ids`):
//! `original_size + crops_coords_top_left + target_size`, i.e.
//! `[original_height, original_width, crop_top, crop_left, target_height, target_width]`.

use candle_core::{Device, Result, Tensor};

use super::unet::UNetConfig;

/// The VAE's downscale factor from pixels to latents (SD, SD2 and SDXL alike).
pub const VAE_SCALE_FACTOR: usize = 8;

/// Time ids of an image generated at its own size and not cropped: original size = target
/// size = (height, width), crop offset (0, 0) (diffusers' defaults).
pub fn default_time_ids(height: usize, width: usize) -> [f64; 6] {
    let (h, w) = (height as f64, width as f64);
    [h, w, 0.0, 0.0, h, w]
}

/// The time ids as an f32 tensor [6].
pub fn time_ids_tensor(ids: [f64; 6], device: &Device) -> Result<Tensor> {
    Tensor::new(&ids.map(|v| v as f32), device)
}

/// The square image size (pixels) a UNet generates by default: its latent `sample_size` times
/// [`VAE_SCALE_FACTOR`], or SDXL's 1024 when the config gives no single size.
pub fn default_image_size(config: &UNetConfig) -> usize {
    config
        .sample_size
        .as_ref()
        .and_then(|s| s.as_u64())
        .map_or(1024, |s| s as usize * VAE_SCALE_FACTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ids_are_original_size_crop_and_target_size() {
        assert_eq!(
            default_time_ids(768, 1024),
            [768.0, 1024.0, 0.0, 0.0, 768.0, 1024.0]
        );
    }
}
