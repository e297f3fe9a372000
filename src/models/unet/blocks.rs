//! Down, mid and up blocks (`CrossAttnDownBlock2D`/`DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D`/`UpBlock2D`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{Transformer2DModel, TransformerCfg};
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::models::lora::LoraHub;

/// Shared sizes for building a block.
pub struct BlockCfg {
    pub cin: usize,
    pub cout: usize,
    pub temb: usize,
    pub layers: usize,
    pub groups: usize,
    pub eps: f64,
    /// Some(..) for the cross-attention variants.
    pub attn: Option<TransformerCfg>,
}

/// A down block; `forward` returns the output and its residuals (each resnet/attention output,
/// then the downsampler output), in diffusers order.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(
        vb: VarBuilder,
        hub: &LoraHub,
        cfg: &BlockCfg,
        downsample: Option<usize>,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..cfg.layers {
            let cin = if j == 0 { cfg.cin } else { cfg.cout };
            resnets.push(ResnetBlock2D::new(
                vb.pp(format!("resnets.{j}")),
                hub,
                cin,
                cfg.cout,
                cfg.temb,
                cfg.groups,
                cfg.eps,
                1.0,
            )?);
            if let Some(a) = &cfg.attn {
                attentions.push(Transformer2DModel::new(
                    vb.pp(format!("attentions.{j}")),
                    hub,
                    cfg.cout,
                    a,
                )?);
            }
        }
        let downsampler = match downsample {
            Some(padding) => Some(Downsample2D::new(
                vb.pp("downsamplers.0"),
                hub,
                cfg.cout,
                padding,
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut res = Vec::with_capacity(self.resnets.len() + 1);
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, ctx)?;
            }
            res.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            res.push(h.clone());
        }
        Ok((h, res))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) per transformer layer group.
#[derive(Debug, Clone)]
pub struct MidBlock {
    first: ResnetBlock2D,
    rest: Vec<(Transformer2DModel, ResnetBlock2D)>,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, hub: &LoraHub, cfg: &BlockCfg, scale: f64) -> Result<Self> {
        let c = cfg.cout;
        let first = ResnetBlock2D::new(
            vb.pp("resnets.0"),
            hub,
            c,
            c,
            cfg.temb,
            cfg.groups,
            cfg.eps,
            scale,
        )?;
        let attn = cfg.attn.as_ref().expect("mid block has attention");
        let rest = vec![(
            Transformer2DModel::new(vb.pp("attentions.0"), hub, c, attn)?,
            ResnetBlock2D::new(
                vb.pp("resnets.1"),
                hub,
                c,
                c,
                cfg.temb,
                cfg.groups,
                cfg.eps,
                scale,
            )?,
        )];
        Ok(Self { first, rest })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x, temb)?;
        for (attn, resnet) in &self.rest {
            h = resnet.forward(&attn.forward(&h, ctx)?, temb)?;
        }
        Ok(h)
    }
}

/// An up block: `layers + 1` resnets, each fed the concatenation of the running state and the
/// next skip connection (popped from the end), optionally followed by attention; then upsampling.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `cfg.cin` is the block's input channels (skip of the last resnet), `prev` the channels of
    /// the incoming state, `cfg.layers` the number of resnets (layers_per_block + 1).
    pub fn new(
        vb: VarBuilder,
        hub: &LoraHub,
        cfg: &BlockCfg,
        prev: usize,
        upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..cfg.layers {
            let skip = if j == cfg.layers - 1 {
                cfg.cin
            } else {
                cfg.cout
            };
            let rin = if j == 0 { prev } else { cfg.cout };
            resnets.push(ResnetBlock2D::new(
                vb.pp(format!("resnets.{j}")),
                hub,
                rin + skip,
                cfg.cout,
                cfg.temb,
                cfg.groups,
                cfg.eps,
                1.0,
            )?);
            if let Some(a) = &cfg.attn {
                attentions.push(Transformer2DModel::new(
                    vb.pp(format!("attentions.{j}")),
                    hub,
                    cfg.cout,
                    a,
                )?);
            }
        }
        let upsampler = if upsample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), hub, cfg.cout)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's residuals in the order they are consumed (last first);
    /// `up_size` the spatial size to upsample to (the next block's skip size).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        ctx: &Tensor,
        up_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = Tensor::cat(&[&h, &skips[j]], 1)?;
            h = resnet.forward(&h, temb)?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, ctx)?;
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, up_size)?;
        }
        Ok(h)
    }
}
