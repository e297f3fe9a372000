//! What the shapes recipes need beyond the model APIs: the tiny model maker, saving a whole UNet
//! folder, model parameters as optimizer `Params`, copying model folders, and reading a pair
//! manifest with its images.
//!
//! ```text
//! new_shapes_model("models/shapes-random", #{seed: 0});
//! let unet = load_unet("models/shapes-random", #{trainable: true});
//! let opt = adamw(unet.params(), #{lr: 1e-3});
//! unet.save("out/unet");                    // config.json + diffusion_pytorch_model.safetensors
//! let pairs = read_pair_manifest("pairs/pairs.jsonl");
//! let img = load_png(pairs[0].image_0);     // [3, H, W] in [-1, 1]
//! ```

use rhai::plugin::*;

mod helpers {
    use candle_core::DType;
    use rhai::{Dynamic, Map, NativeCallContext};

    use crate::reward::data::ImageSource;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::options::Options;
    use crate::tensor::parse_dtype;

    pub(super) fn save_dtype(ctx: &NativeCallContext, opts: &Map) -> ScriptResult<DType> {
        let o = Options::new(opts, "save", &["dtype"]).or_script(ctx)?;
        let d = parse_dtype(&o.string("dtype", "f32").or_script(ctx)?).or_script(ctx)?;
        if !matches!(d, DType::F32 | DType::F16 | DType::BF16) {
            return Err(format!("save: dtype must be f32, f16 or bf16, got {d:?}")).or_script(ctx);
        }
        Ok(d)
    }

    pub(super) fn image_source(src: &ImageSource) -> Dynamic {
        match src {
            ImageSource::Path(p) => Dynamic::from(p.display().to_string()),
            ImageSource::Bytes(_) => Dynamic::UNIT,
        }
    }
}

#[export_module]
pub mod shapes_pipe_api {
    use candle_core::{DType, Tensor};
    use rhai::{Array, Dynamic, Map};

    use super::helpers;
    use crate::models::model_folder::copy_model_folder;
    use crate::optim::Params;
    use crate::reward::data::read_manifest;
    use crate::script::bindings::unet::ScriptUNet;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::options::Options;
    use crate::script::Host;
    use crate::shapes::model_maker::{make_shapes_model, ShapesModelSpec};

    /// Write a tiny random shapes model in the diffusers layout to `dir` (`unet/` 3->3 channels
    /// at 16x16, `text_encoder/`, a word-level `tokenizer/`, SD1.5 DDIM `scheduler/`). Options
    /// `#{seed: 0, block_out_channels: [32, 64, 64], layers_per_block: 1, text_hidden: 64,
    /// text_layers: 2, text_heads: 4}`. Returns the UNet's parameter count.
    #[rhai_fn(return_raw, volatile)]
    pub fn new_shapes_model(ctx: NativeCallContext, dir: &str, opts: Map) -> ScriptResult<i64> {
        let o = Options::new(
            &opts,
            "new_shapes_model",
            &[
                "seed",
                "block_out_channels",
                "layers_per_block",
                "text_hidden",
                "text_layers",
                "text_heads",
            ],
        )
        .or_script(&ctx)?;
        let d = ShapesModelSpec::default();
        let boc = match o
            .opt_typed::<Array>("block_out_channels", "an array of ints")
            .or_script(&ctx)?
        {
            None => d.block_out_channels.clone(),
            Some(a) => a
                .iter()
                .map(|v| {
                    v.as_int()
                        .ok()
                        .filter(|&i| i > 0)
                        .map(|i| i as usize)
                        .ok_or("new_shapes_model: block_out_channels must be positive ints")
                })
                .collect::<Result<Vec<_>, _>>()
                .or_script(&ctx)?,
        };
        let spec = ShapesModelSpec {
            seed: o.i64("seed", 0).or_script(&ctx)? as u64,
            block_out_channels: boc,
            layers_per_block: o
                .usize("layers_per_block", d.layers_per_block)
                .or_script(&ctx)?,
            text_hidden: o.usize("text_hidden", d.text_hidden).or_script(&ctx)?,
            text_layers: o.usize("text_layers", d.text_layers).or_script(&ctx)?,
            text_heads: o.usize("text_heads", d.text_heads).or_script(&ctx)?,
            ..d
        };
        make_shapes_model(&Host::of(&ctx).writable(dir).or_script(&ctx)?, &spec)
            .map(|n| n as i64)
            .or_script(&ctx)
    }

    /// `new_shapes_model(dir)` with seed 0.
    #[rhai_fn(name = "new_shapes_model", return_raw, volatile)]
    pub fn new_shapes_model_default(ctx: NativeCallContext, dir: &str) -> ScriptResult<i64> {
        new_shapes_model(ctx, dir, Map::new())
    }

    /// Copy a model folder's components (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
    /// `scheduler/`, ...: subfolders with a config) from `src` to `dst`, each file atomically,
    /// and write `dst/model_index.json` when they make a diffusers pipeline (a folder without
    /// `vae/` gets none). Other files (evaluation caches, metrics) are not copied.
    #[rhai_fn(return_raw)]
    pub fn copy_model(ctx: NativeCallContext, src: &str, dst: &str) -> ScriptResult<()> {
        let host = Host::of(&ctx);
        let src = host.readable(src).or_script(&ctx)?;
        let dst = host.writable(dst).or_script(&ctx)?;
        copy_model_folder(&src, &dst).map(|_| ()).or_script(&ctx)
    }

    /// Whether `path` is an existing folder (an error for a path the script may not read).
    #[rhai_fn(return_raw, volatile)]
    pub fn dir_exists(ctx: NativeCallContext, path: &str) -> ScriptResult<bool> {
        Ok(Host::of(&ctx).readable(path).or_script(&ctx)?.is_dir())
    }

    /// Save the UNet as a diffusers folder: `dir/config.json` and
    /// `dir/diffusion_pytorch_model.safetensors` (f32; merged LoRA layers included, unmerged
    /// adapters are an error).
    #[rhai_fn(name = "save", return_raw, pure)]
    pub fn save_unet(ctx: NativeCallContext, unet: &mut ScriptUNet, dir: &str) -> ScriptResult<()> {
        unet.save(&Host::of(&ctx).writable(dir).or_script(&ctx)?, DType::F32)
            .or_script(&ctx)
    }

    /// `unet.save(dir, #{dtype: "f16"})`: weights stored as f32, f16 or bf16 (loading converts).
    #[rhai_fn(name = "save", return_raw, pure)]
    pub fn save_unet_opts(
        ctx: NativeCallContext,
        unet: &mut ScriptUNet,
        dir: &str,
        opts: Map,
    ) -> ScriptResult<()> {
        let dtype = helpers::save_dtype(&ctx, &opts)?;
        unet.save(&Host::of(&ctx).writable(dir).or_script(&ctx)?, dtype)
            .or_script(&ctx)
    }

    /// The UNet's trainable tensors as optimizer `Params` (LoRA vars when adapters are attached,
    /// else the base weights of a model loaded `trainable: true`; empty when frozen).
    #[rhai_fn(name = "params", return_raw, pure)]
    pub fn unet_params(ctx: NativeCallContext, unet: &mut ScriptUNet) -> ScriptResult<Params> {
        Params::from_vars(unet.trainable_vars()).or_script(&ctx)
    }

    /// Read a JSONL pair manifest (`{prompt, image_0, image_1, label_0, label_1}` per line, image
    /// paths relative to the manifest's folder) with the same reader as real preference sets:
    /// an array of `#{prompt, image_0, image_1, label_0, label_1, num_examples[, group]}`. Rows that cannot
    /// be used are skipped with a warning.
    #[rhai_fn(return_raw)]
    pub fn read_pair_manifest(ctx: NativeCallContext, path: &str) -> ScriptResult<Array> {
        let set = read_manifest(&Host::of(&ctx).readable(path).or_script(&ctx)?).or_script(&ctx)?;
        if !set.skipped.is_empty() {
            tracing::warn!("{path}: {}", set.skip_summary());
        }
        Ok(set
            .pairs
            .iter()
            .map(|p| {
                let mut m = Map::new();
                m.insert("prompt".into(), Dynamic::from(p.prompt.clone()));
                m.insert("image_0".into(), helpers::image_source(&p.image_0));
                m.insert("image_1".into(), helpers::image_source(&p.image_1));
                m.insert("label_0".into(), Dynamic::from(p.label_0 as f64));
                m.insert("label_1".into(), Dynamic::from(p.label_1 as f64));
                m.insert(
                    "num_examples".into(),
                    Dynamic::from(p.num_examples_per_prompt as f64),
                );
                if let Some(g) = p.group {
                    m.insert("group".into(), Dynamic::from(g));
                }
                Dynamic::from_map(m)
            })
            .collect())
    }

    /// Write an array of maps as JSON Lines (one compact object per line), atomically.
    /// Returns the number of lines.
    #[rhai_fn(return_raw)]
    pub fn write_jsonl(ctx: NativeCallContext, rows: Array, path: &str) -> ScriptResult<i64> {
        let mut text = String::new();
        for (i, row) in rows.iter().enumerate() {
            let v: serde_json::Value = rhai::serde::from_dynamic(row)
                .map_err(|e| format!("write_jsonl: row {i} is not plain data: {e}"))
                .or_script(&ctx)?;
            text.push_str(&serde_json::to_string(&v).or_script(&ctx)?);
            text.push('\n');
        }
        crate::fsutil::atomic_write(
            &Host::of(&ctx).writable(path).or_script(&ctx)?,
            text.as_bytes(),
        )
        .or_script(&ctx)?;
        Ok(rows.len() as i64)
    }

    /// Load a PNG/JPEG as [3, H, W] f32 in [-1, 1] at its own size.
    #[rhai_fn(return_raw, volatile)]
    pub fn load_png(ctx: NativeCallContext, path: &str) -> ScriptResult<Tensor> {
        let img = crate::image_io::read_rgb(&Host::of(&ctx).readable(path).or_script(&ctx)?)
            .or_script(&ctx)?;
        crate::image_io::rgb_to_tensor(&img, &Host::of(&ctx).device).or_script(&ctx)
    }
}
