//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` as diffusers builds them for SD UNets.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::models::lora::{LoraHub, LoraLayer};
use crate::models::nn::GroupNorm;

/// norm1 -> silu -> conv1 -> + time_emb_proj(silu(temb)) -> norm2 -> silu -> conv2, plus the
/// (1x1-projected when channels change) input, divided by `output_scale_factor`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Arc<LoraLayer>,
    time_emb_proj: Arc<LoraLayer>,
    norm2: GroupNorm,
    conv2: Arc<LoraLayer>,
    conv_shortcut: Option<Arc<LoraLayer>>,
    output_scale_factor: f64,
    hub: LoraHub,
}

impl ResnetBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        hub: &LoraHub,
        cin: usize,
        cout: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, cin, eps, vb.pp("norm1"))?,
            conv1: hub.conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: hub.linear(temb, cout, true, vb.pp("time_emb_proj"))?,
            norm2: GroupNorm::new(groups, cout, eps, vb.pp("norm2"))?,
            conv2: hub.conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if cin != cout {
                Some(hub.conv(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
            output_scale_factor,
            hub: hub.clone(),
        })
    }

    /// The block; with gradient checkpointing on, one node that recomputes it in backward.
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        if !self.hub.gradient_checkpointing() {
            return self.eval(x, temb);
        }
        let block = self.clone();
        self.hub
            .checkpoint("resnet-block-checkpoint", &[x, temb], move |t| {
                block.eval(&t[0], &t[1])
            })
    }

    fn eval(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let t = self
            .time_emb_proj
            .forward(&temb.silu()?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        // The time embedding and the skip are added inside the convs' nodes, so the graph does
        // not keep the convs' own outputs as well as the sums.
        let h = self.conv1.forward_add(&self.norm1.forward_silu(x)?, &t)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = self
            .conv2
            .forward_add(&self.norm2.forward_silu(&h)?, &skip)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// 3x3 stride-2 conv (`downsamplers.0.conv`); padding 0 pads right/bottom by one like diffusers.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Arc<LoraLayer>,
    padding: usize,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, hub: &LoraHub, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: hub.conv(channels, channels, 3, 2, padding, vb.pp("conv"))?,
            padding,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest upsampling (x2, or to the skip connection's size) then a 3x3 conv (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Arc<LoraLayer>,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, hub: &LoraHub, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: hub.conv(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}
