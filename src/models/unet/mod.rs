//! diffusers' `UNet2DConditionModel` (SD1.5, SD2.x, SDXL), trainable with correct gradients.
//!
//! ```ignore
//! let unet = UNet2DConditionModel::load(dir, DType::F32, &Device::Cpu, WeightMode::Frozen)?;
//! let eps = unet.forward(&x, &t, &ehs, None)?;            // noise prediction
//! let f = unet.features(&x, &t, &ehs, None)?;             // encoder-only pass (LRM)
//! unet.add_lora(&LoraConfig { rank: 4, alpha: 4.0, targets: LoraConfig::default_targets(), seed: 0 })?;
//! let vars = unet.trainable_vars();                       // LoRA vars only
//! unet.set_lora_enabled(false);                           // reference model = base weights
//! ```
//! Timesteps are one per batch row (`[B]`, any numeric dtype); a 0-d or one-element tensor is
//! broadcast to the batch. Frozen models hold plain tensors, so their forward keeps no graph.

pub mod attention;
pub mod blocks;
pub mod checkpointed_attention;
pub mod config;
pub mod embeddings;
pub mod options;
pub mod resnet;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Module, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use self::attention::TransformerCfg;
use self::blocks::{BlockCfg, DownBlock, MidBlock, UpBlock};
pub use self::config::UNetConfig;
use self::embeddings::{TimestepEmbedding, Timesteps};
pub use self::options::{RandomUNetOptions, UNetLoadOptions, UNetSaveOptions};
use crate::models::loading::{WeightMode, Weights};
use crate::models::lora::{LoraConfig, LoraHub, LoraLayer};
use crate::models::lora_file;
use crate::models::nn::GroupNorm;
use crate::tensor::SeededRng;

/// SDXL's added conditioning (`addition_embed_type: "text_time"`).
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// `[B, projection_class_embeddings_input_dim - 6 * addition_time_embed_dim]` (pooled text embeds).
    pub text_embeds: Tensor,
    /// `[B, 6]` (original size, crop top-left, target size).
    pub time_ids: Tensor,
}

impl AddedCond {
    /// The rows of `self` followed by those of `other` (the [cond; uncond] guidance batch).
    pub fn cat_rows(&self, other: &AddedCond) -> candle_core::Result<AddedCond> {
        Ok(AddedCond {
            text_embeds: Tensor::cat(&[&self.text_embeds, &other.text_embeds], 0)?,
            time_ids: Tensor::cat(&[&self.time_ids, &other.time_ids], 0)?,
        })
    }
}

/// The encoder-only pass: mid-block output and every down-block residual (conv_in output first).
#[derive(Debug, Clone)]
pub struct UNetFeatures {
    pub mid: Tensor,
    pub down: Vec<Tensor>,
}

/// The weights file stem of a diffusers UNet folder.
pub const WEIGHTS_STEM: &str = "diffusion_pytorch_model";

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    dtype: DType,
    device: Device,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_time_proj: Option<Timesteps>,
    add_embedding: Option<TimestepEmbedding>,
    conv_in: Arc<LoraLayer>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Arc<LoraLayer>,
    /// The trainable base weights (WeightMode::Trainable), sorted by name.
    base_vars: Vec<(String, Var)>,
    /// Every base weight by name (a `Var`'s tensor for trainable models, so it follows updates).
    base_tensors: Vec<(String, Tensor)>,
    param_count: usize,
    lora: LoraHub,
    /// The folder the weights came from (`load`), for exports that need every base weight.
    source_dir: Option<std::path::PathBuf>,
}

/// Var-builder backend over loaded tensors or seeded random draws; checks names and shapes
/// with errors naming the source, and turns tensors into `Var`s for trainable models.
struct Backend {
    source: Source,
    what: String,
    trainable: bool,
    vars: Mutex<Vec<(String, Var)>>,
    tensors: Mutex<Vec<(String, Tensor)>>,
    params: std::sync::atomic::AtomicUsize,
}

enum Source {
    Tensors(HashMap<String, Tensor>),
    Random(Box<Mutex<SeededRng>>),
}

impl Backend {
    fn wrap(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        self.params
            .fetch_add(t.elem_count(), std::sync::atomic::Ordering::Relaxed);
        let lock_err = |_| candle_core::Error::Msg("tensor list lock poisoned".into());
        if !self.trainable {
            self.tensors
                .lock()
                .map_err(lock_err)?
                .push((name.to_string(), t.clone()));
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.tensors
            .lock()
            .map_err(lock_err)?
            .push((name.to_string(), out.clone()));
        self.vars
            .lock()
            .map_err(|_| candle_core::Error::Msg("var list lock poisoned".into()))?
            .push((name.to_string(), var));
        Ok(out)
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match &self.source {
            Source::Tensors(map) => {
                let t = map.get(name).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{}: missing tensor `{name}` (expected shape {s:?})",
                        self.what
                    ))
                })?;
                if t.shape() != &s {
                    return Err(candle_core::Error::Msg(format!(
                        "{}: tensor `{name}` has shape {:?}, expected {s:?}",
                        self.what,
                        t.dims()
                    )));
                }
                t.to_dtype(dtype)?.to_device(dev)?
            }
            Source::Random(rng) => {
                let mut rng = rng
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("rng lock poisoned".into()))?;
                let dims = s.dims();
                if name.ends_with("bias") {
                    Tensor::zeros(s, dtype, dev)?
                } else if dims.len() == 1 {
                    Tensor::ones(s, dtype, dev)?
                } else {
                    let fan_in: usize = dims[1..].iter().product();
                    (rng.randn(s, dev)? * (1.0 / (fan_in as f64).sqrt()))?.to_dtype(dtype)?
                }
            }
        };
        self.wrap(name, t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.source {
            Source::Tensors(map) => {
                let t = map.get(name).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: missing tensor `{name}`", self.what))
                })?;
                self.wrap(name, t.to_dtype(dtype)?.to_device(dev)?)
            }
            Source::Random(_) => Err(candle_core::Error::Msg(format!(
                "random init needs a shape for `{name}`"
            ))),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.source {
            Source::Tensors(map) => map.contains_key(name),
            Source::Random(_) => true,
        }
    }
}

impl UNet2DConditionModel {
    /// Load `dir/config.json` and `dir/diffusion_pytorch_model*.safetensors`.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        mode: WeightMode,
    ) -> anyhow::Result<Self> {
        let config = UNetConfig::from_dir(dir)?;
        let weights = Weights::load(dir, WEIGHTS_STEM, dtype, device)?;
        let what = weights.describe();
        let source = Source::Tensors(weights.tensors);
        let mut model = Self::build(config, source, what, dtype, device, mode)?;
        model.source_dir = Some(dir.to_path_buf());
        Ok(model)
    }

    /// A model of `config` with seeded random weights (conv/linear N(0, 1/fan_in), norm scales 1,
    /// biases 0): for benchmarks and shape tests without a checkpoint.
    pub fn random(
        config: UNetConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
        mode: WeightMode,
    ) -> anyhow::Result<Self> {
        config.validate().context("unsupported UNet config")?;
        let source = Source::Random(Box::new(Mutex::new(SeededRng::new(seed))));
        Self::build(
            config,
            source,
            format!("random UNet (seed {seed})"),
            dtype,
            device,
            mode,
        )
    }

    fn build(
        config: UNetConfig,
        source: Source,
        what: String,
        dtype: DType,
        device: &Device,
        mode: WeightMode,
    ) -> anyhow::Result<Self> {
        let backend = Backend {
            source,
            what: what.clone(),
            trainable: mode == WeightMode::Trainable,
            vars: Mutex::new(Vec::new()),
            tensors: Mutex::new(Vec::new()),
            params: Default::default(),
        };
        // Keep a handle on the var list: build through an Arc'd backend.
        let shared = std::sync::Arc::new(backend);
        let vb = VarBuilder::from_backend(
            Box::new(SharedBackend(shared.clone())),
            dtype,
            device.clone(),
        );
        let lora = LoraHub::new();
        let mut model = Self::new(vb, &config, &lora, dtype, device)
            .with_context(|| format!("cannot build the UNet from {what}"))?;
        model.param_count = shared.params.load(std::sync::atomic::Ordering::Relaxed);
        let mut vars = std::mem::take(
            &mut *shared
                .vars
                .lock()
                .map_err(|_| anyhow::anyhow!("var list lock poisoned"))?,
        );
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        model.base_vars = vars;
        let mut tensors = std::mem::take(
            &mut *shared
                .tensors
                .lock()
                .map_err(|_| anyhow::anyhow!("tensor list lock poisoned"))?,
        );
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        model.base_tensors = tensors;
        model.lora = lora;
        Ok(model)
    }

    fn new(
        vb: VarBuilder,
        cfg: &UNetConfig,
        hub: &LoraHub,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let plan = cfg
            .plan()
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let temb = cfg.time_embed_dim();
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        let time_proj = Timesteps::new(boc[0], cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), hub, boc[0], temb)?;
        let (add_time_proj, add_embedding) = if cfg.needs_added_cond() {
            let d = cfg.addition_time_embed_dim.unwrap_or_default();
            let inp = cfg
                .projection_class_embeddings_input_dim
                .unwrap_or_default();
            (
                Some(Timesteps::new(d, cfg.flip_sin_to_cos, cfg.freq_shift)),
                Some(TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    hub,
                    inp,
                    temb,
                )?),
            )
        } else {
            (None, None)
        };
        let k = cfg.conv_in_kernel;
        let conv_in = hub.conv(cfg.in_channels, boc[0], k, 1, (k - 1) / 2, vb.pp("conv_in"))?;
        let attn_cfg = |layers: usize, heads: usize, cross: usize| TransformerCfg {
            heads,
            layers,
            cross,
            groups,
            linear: cfg.use_linear_projection,
            upcast: cfg.upcast_attention,
        };
        let mut down_blocks = Vec::new();
        let mut cout = boc[0];
        for (i, ty) in cfg.down_block_types.iter().enumerate() {
            let cin = cout;
            cout = boc[i];
            let attn = (ty == "CrossAttnDownBlock2D")
                .then(|| attn_cfg(plan.layers[i], plan.heads[i], plan.cross_dims[i]));
            let bc = BlockCfg {
                cin,
                cout,
                temb,
                layers: cfg.layers_per_block,
                groups,
                eps,
                attn,
            };
            let down = (i + 1 < n).then_some(cfg.downsample_padding);
            down_blocks.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                hub,
                &bc,
                down,
            )?);
        }
        let mid_cfg = BlockCfg {
            cin: boc[n - 1],
            cout: boc[n - 1],
            temb,
            layers: 1,
            groups,
            eps,
            attn: Some(attn_cfg(
                plan.layers[n - 1],
                plan.heads[n - 1],
                plan.cross_dims[n - 1],
            )),
        };
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            hub,
            &mid_cfg,
            cfg.mid_block_scale_factor,
        )?;
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = plan.heads.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = plan.cross_dims.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out_ch = rev[0];
        for (i, ty) in cfg.up_block_types.iter().enumerate() {
            let prev = out_ch;
            out_ch = rev[i];
            let cin = rev[(i + 1).min(n - 1)];
            let attn = (ty == "CrossAttnUpBlock2D")
                .then(|| attn_cfg(plan.up_layers[i], rev_heads[i], rev_cross[i]));
            let bc = BlockCfg {
                cin,
                cout: out_ch,
                temb,
                layers: cfg.layers_per_block + 1,
                groups,
                eps,
                attn,
            };
            up_blocks.push(UpBlock::new(
                vb.pp(format!("up_blocks.{i}")),
                hub,
                &bc,
                prev,
                i + 1 < n,
            )?);
        }
        let conv_norm_out = GroupNorm::new(groups, boc[0], eps, vb.pp("conv_norm_out"))?;
        let k = cfg.conv_out_kernel;
        let conv_out = hub.conv(
            boc[0],
            cfg.out_channels,
            k,
            1,
            (k - 1) / 2,
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            config: cfg.clone(),
            dtype,
            device: device.clone(),
            time_proj,
            time_embedding,
            add_time_proj,
            add_embedding,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            base_vars: Vec::new(),
            base_tensors: Vec::new(),
            param_count: 0,
            lora: hub.clone(),
            source_dir: None,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Timesteps as a `[B]` tensor: `[B]` as given, a 0-d / one-element tensor broadcast to B.
    fn batch_timesteps(&self, t: &Tensor, b: usize) -> anyhow::Result<Tensor> {
        let n = t.elem_count();
        if t.rank() <= 1 && n == b {
            return Ok(t.flatten_all()?);
        }
        if n == 1 {
            return Ok(t.flatten_all()?.broadcast_as(b)?.contiguous()?);
        }
        bail!(
            "UNet: timesteps have shape {:?}; expected [{b}] (one per batch row) or a single value",
            t.dims()
        )
    }

    /// The sinusoidal projection `t_emb` and the time embedding `emb` (incl. SDXL's added
    /// embedding) for a batch of `b` rows.
    pub fn time_embeddings(
        &self,
        t: &Tensor,
        b: usize,
        added: Option<&AddedCond>,
    ) -> anyhow::Result<(Tensor, Tensor)> {
        let t = self.batch_timesteps(t, b)?;
        let t_emb = self.time_proj.forward(&t, self.dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let (Some(proj), Some(embed)) = (&self.add_time_proj, &self.add_embedding) {
            let Some(added) = added else {
                bail!("UNet: this SDXL-style model (addition_embed_type text_time) needs the added conditioning #{{text_embeds, time_ids}}")
            };
            let ids = &added.time_ids;
            if ids.rank() != 2 || ids.dim(0)? != b {
                bail!(
                    "UNet: time_ids have shape {:?}, expected [{b}, n]",
                    ids.dims()
                );
            }
            let te = &added.text_embeds;
            if te.rank() != 2 || te.dim(0)? != b {
                bail!(
                    "UNet: text_embeds have shape {:?}, expected [{b}, d]",
                    te.dims()
                );
            }
            let time_embeds = proj.forward(ids, self.dtype)?.reshape((b, ()))?;
            let expect = self
                .config
                .projection_class_embeddings_input_dim
                .unwrap_or_default();
            let got = te.dim(1)? + time_embeds.dim(1)?;
            if got != expect {
                bail!(
                    "UNet: text_embeds [{b}, {}] + time_ids [{b}, {}] give {got} features, expected projection_class_embeddings_input_dim = {expect}",
                    te.dim(1)?,
                    ids.dim(1)?
                );
            }
            let add = Tensor::cat(&[&te.to_dtype(self.dtype)?, &time_embeds], 1)?;
            emb = (emb + embed.forward(&add)?)?;
        }
        Ok((t_emb, emb))
    }

    fn check_inputs(&self, x: &Tensor, ehs: &Tensor) -> anyhow::Result<usize> {
        let (b, c, _, _) = x
            .dims4()
            .with_context(|| format!("UNet: sample must be [B, C, H, W], got {:?}", x.dims()))?;
        if c != self.config.in_channels {
            bail!(
                "UNet: sample has {c} channels, the model expects {}",
                self.config.in_channels
            );
        }
        let (eb, _, ed) = ehs.dims3().with_context(|| {
            format!(
                "UNet: encoder_hidden_states must be [B, tokens, dim], got {:?}",
                ehs.dims()
            )
        })?;
        let plan = self.config.plan()?;
        if eb != b {
            bail!("UNet: encoder_hidden_states batch {eb} != sample batch {b}");
        }
        if !plan.cross_dims.contains(&ed) {
            bail!(
                "UNet: encoder_hidden_states dim {ed}, the model expects cross_attention_dim {:?}",
                plan.cross_dims
            );
        }
        Ok(b)
    }

    fn encode(
        &self,
        x: &Tensor,
        t: &Tensor,
        ehs: &Tensor,
        added: Option<&AddedCond>,
    ) -> anyhow::Result<(Tensor, Vec<Tensor>, Tensor, Tensor)> {
        let b = self.check_inputs(x, ehs)?;
        let (_, emb) = self.time_embeddings(t, b, added)?;
        let x = x.to_dtype(self.dtype)?;
        let x = if self.config.center_input_sample {
            ((x * 2.0)? - 1.0)?
        } else {
            x
        };
        let ehs = ehs.to_dtype(self.dtype)?;
        let mut h = self.conv_in.forward(&x)?;
        let mut res = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, r) = block.forward(&h, &emb, &ehs)?;
            h = out;
            res.extend(r);
        }
        let mid = self.mid_block.forward(&h, &emb, &ehs)?;
        Ok((mid, res, emb, ehs))
    }

    /// Noise prediction (`.sample` of diffusers' forward).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        ehs: &Tensor,
        added: Option<&AddedCond>,
    ) -> anyhow::Result<Tensor> {
        let (mut h, res, emb, ehs) = self.encode(x, t, ehs, added)?;
        let mut end = res.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let k = block.num_resnets();
            let start = end - k;
            let skips: Vec<Tensor> = res[start..end].iter().rev().cloned().collect();
            end = start;
            let up_size = if i + 1 < self.up_blocks.len() {
                let (_, _, hh, ww) = res[end - 1].dims4()?;
                Some((hh, ww))
            } else {
                None
            };
            h = block.forward(&h, &skips, &emb, &ehs, up_size)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        Ok(self.conv_out.forward(&h)?)
    }

    /// The encoder-only pass (conv_in -> down blocks -> mid block; no up blocks).
    pub fn features(
        &self,
        x: &Tensor,
        t: &Tensor,
        ehs: &Tensor,
        added: Option<&AddedCond>,
    ) -> anyhow::Result<UNetFeatures> {
        let (mid, down, _, _) = self.encode(x, t, ehs, added)?;
        Ok(UNetFeatures { mid, down })
    }

    /// What the optimizer steps, sorted by name: the LoRA vars (`unet.<path>.lora_A.weight`, ...)
    /// when adapters are attached, else the base weights of a trainable model, else nothing.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        if self.lora.has_adapters() {
            self.lora.vars("unet.")
        } else {
            self.base_vars.clone()
        }
    }

    /// Number of base parameters (elements), adapters excluded.
    pub fn param_count(&self) -> usize {
        self.param_count
    }

    /// Number of LoRA parameters (elements).
    pub fn lora_param_count(&self) -> usize {
        self.lora.vars("").iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The folder `load` read the weights from (None for a random model).
    pub fn source_dir(&self) -> Option<&Path> {
        self.source_dir.as_deref()
    }

    pub fn lora(&self) -> &LoraHub {
        &self.lora
    }

    /// Attach LoRA adapters (base weights must be frozen: load with WeightMode::Frozen).
    pub fn add_lora(&self, cfg: &LoraConfig) -> anyhow::Result<usize> {
        if !self.base_vars.is_empty() {
            bail!("add_lora: this UNet was loaded trainable; LoRA trains the adapters only, so load it frozen (trainable: false)");
        }
        self.lora.add(cfg)
    }

    pub fn lora_enabled(&self) -> bool {
        self.lora.enabled()
    }

    /// Adapters on/off; off gives the base model's output bit for bit (the LPO reference model).
    pub fn set_lora_enabled(&self, on: bool) {
        self.lora.set_enabled(on)
    }

    /// Gradient checkpointing (diffusers' `enable_gradient_checkpointing`): each ResnetBlock2D
    /// and transformer block keeps only its inputs for backward and recomputes its activations
    /// there. Same gradients, less memory, one more forward of each block.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.lora.set_gradient_checkpointing(on)
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.lora.gradient_checkpointing()
    }

    /// Write the adapters for diffusers' `load_lora_weights` and [`Self::load_lora`]
    /// (PEFT keys, alpha in `lora_adapter_metadata`; see [`lora_file`]).
    pub fn save_lora(&self, path: &Path) -> anyhow::Result<()> {
        lora_file::save(&self.lora, path)
    }

    /// Load a LoRA file in any convention `accept` allows, alpha also from a PEFT
    /// `adapter_config.json` (see [`lora_file::load`]).
    pub fn load_lora(
        &self,
        path: &Path,
        accept: lora_file::Accept,
        peft_config: Option<&Path>,
    ) -> anyhow::Result<lora_file::LoadedLora> {
        if !self.base_vars.is_empty() {
            bail!("load_lora: this UNet was loaded trainable; load it frozen to use LoRA");
        }
        lora_file::load(&self.lora, path, accept, peft_config)
    }

    /// The current base weights by diffusers name (detached; merged LoRA layers included).
    /// Errors while unmerged adapters are attached: merge them or save them with `save_lora`.
    pub fn weights_map(&self) -> anyhow::Result<HashMap<String, Tensor>> {
        if self.lora.has_adapters() {
            bail!("the UNet has unmerged LoRA adapters: merge_lora() first, or save_lora()");
        }
        let mut map: HashMap<String, Tensor> = self
            .base_tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.detach()))
            .collect();
        for layer in self.lora.layers() {
            let name = format!("{}.weight", layer.path);
            if let Some(slot) = map.get_mut(&name) {
                *slot = layer.weight()?.detach();
            }
        }
        Ok(map)
    }

    /// A frozen model on this one's weights, sharing their storage (no copy, and in-place
    /// optimizer updates show through): for sampling a trained model without recording a
    /// backward graph, which kept every activation of a forward alive and made sampling ~1.5x
    /// slower. Errors while unmerged LoRA adapters are attached.
    pub fn frozen_view(&self) -> anyhow::Result<Self> {
        let what = match &self.source_dir {
            Some(dir) => format!("a frozen view of the UNet from {}", dir.display()),
            None => "a frozen view of a UNet".to_string(),
        };
        let source = Source::Tensors(self.weights_map()?);
        let mut model = Self::build(
            self.config.clone(),
            source,
            what,
            self.dtype,
            &self.device,
            WeightMode::Frozen,
        )?;
        model.source_dir = self.source_dir.clone();
        Ok(model)
    }

    /// Write a diffusers UNet folder: `dir/config.json` and
    /// `dir/diffusion_pytorch_model.safetensors` with weights stored as `dtype` (f32 or f16;
    /// loading converts back to the compute dtype). Both files are written atomically.
    pub fn save(&self, dir: &Path, dtype: DType) -> anyhow::Result<()> {
        let map = self
            .weights_map()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config = self.config.to_diffusers_json()?;
        crate::fsutil::atomic_write(
            &dir.join("config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        crate::tensor::io::save_safetensors(&map, &dir.join(format!("{WEIGHTS_STEM}.safetensors")))
    }

    /// Fold every adapter into its base weight (the adapters are removed).
    pub fn merge_lora(&self) -> anyhow::Result<usize> {
        self.lora.merge()
    }
}

/// Lets `build` keep reading the var list after the VarBuilder took the backend.
struct SharedBackend(std::sync::Arc<Backend>);

impl SimpleBackend for SharedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}
