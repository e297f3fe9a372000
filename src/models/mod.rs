//! Stable Diffusion's networks, owned here so they train with correct gradients: UNet,
//! CLIP text encoders, VAE, tokenizers, LoRA; CLIP image towers for the built-in scorers. Models know nothing of scripts.

pub mod checked_vb;
pub mod clip;
pub mod clip_text;
pub mod clip_vision;
pub mod config;
pub mod conv;
pub mod frozen_layer;
pub mod loading;
pub mod lora;
pub mod lora_export;
pub mod lora_file;
pub mod model_folder;
pub mod nn;
pub mod open_clip;
pub mod sdxl_conditioning;
pub mod tokenizer;
pub mod unet;
pub mod vae;
