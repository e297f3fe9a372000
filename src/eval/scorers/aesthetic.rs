//! The LAION improved-aesthetic-predictor head: an MLP on the L2-normalised CLIP ViT-L/14 image
//! embedding, `Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
//! Linear(64, 16), Linear(16, 1)` - no activations (as published). Read from
//! `aesthetic_mlp.safetensors` with the reference's keys `layers.{0,2,4,6,7}.{weight,bias}`;
//! the sizes come from the file (any chain of linears ending in one output).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

pub struct AestheticHead {
    layers: Vec<Linear>,
    params: usize,
}

impl AestheticHead {
    /// Load the head from `file`; its input must be `embed_dim` wide.
    pub fn load(file: &Path, embed_dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(file, device).with_context(|| {
            format!(
                "cannot read aesthetic head {} (truncated or not safetensors?)",
                file.display()
            )
        })?;
        let mut idx: Vec<usize> = tensors
            .keys()
            .filter_map(|k| {
                k.strip_prefix("layers.")?
                    .strip_suffix(".weight")?
                    .parse()
                    .ok()
            })
            .collect();
        idx.sort_unstable();
        if idx.is_empty() {
            bail!(
                "{}: no `layers.<i>.weight` tensors (expected the improved-aesthetic-predictor MLP)",
                file.display()
            );
        }
        let mut layers = Vec::new();
        let mut width = embed_dim;
        let mut params = 0;
        for i in idx {
            let wk = format!("layers.{i}.weight");
            let bk = format!("layers.{i}.bias");
            let w = &tensors[&wk];
            let b = tensors
                .get(&bk)
                .with_context(|| format!("{}: missing tensor `{bk}`", file.display()))?;
            let (out_dim, in_dim) = w.dims2().map_err(|_| {
                anyhow::anyhow!(
                    "{}: `{wk}` has shape {:?}, expected [out, in]",
                    file.display(),
                    w.dims()
                )
            })?;
            if in_dim != width {
                bail!(
                    "{}: `{wk}` takes {in_dim} inputs but {width} arrive (the CLIP model's \
                     projection_dim is {embed_dim}: is this the head of another CLIP?)",
                    file.display()
                );
            }
            if b.dims() != [out_dim] {
                bail!(
                    "{}: `{bk}` has shape {:?}, expected [{out_dim}]",
                    file.display(),
                    b.dims()
                );
            }
            params += w.elem_count() + b.elem_count();
            layers.push(Linear::new(w.to_dtype(dtype)?, Some(b.to_dtype(dtype)?)));
            width = out_dim;
        }
        if width != 1 {
            bail!(
                "{}: the last layer has {width} outputs, expected 1",
                file.display()
            );
        }
        Ok(Self { layers, params })
    }

    /// Normalised embeddings [B, P] -> scores [B].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        Ok(x.squeeze(1)?)
    }

    pub fn param_count(&self) -> usize {
        self.params
    }
}
