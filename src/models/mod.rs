//! Stable Diffusion's networks, owned here so they train with correct gradients: UNet,
//! CLIP text encoders, VAE, tokenizers, LoRA. Models know nothing of scripts.

pub mod checked_vb;
pub mod clip_text;
pub mod config;
pub mod conv;
pub mod frozen_layer;
pub mod loading;
pub mod lora;
pub mod lora_export;
pub mod lora_file;
pub mod model_folder;
pub mod nn;
pub mod tokenizer;
pub mod unet;
pub mod vae;
