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

/// The options each function here declares (for `lpo fns` and docs/API.md).
pub fn declared_options() -> Vec<(&'static str, Vec<crate::script::declared::OptionDoc>)> {
    use crate::script::declared::option_docs;
    vec![
        (
            "new_shapes_model",
            option_docs::<crate::shapes::model_maker::ShapesModelSpec>(),
        ),
        (
            "save",
            option_docs::<crate::models::unet::UNetSaveOptions>(),
        ),
    ]
}

mod helpers {
    use serde::Serialize;

    use crate::reward::data::{ImageSource, PreferencePair};

    /// One manifest row as scripts see it.
    #[derive(Serialize)]
    pub(super) struct PairRow {
        prompt: String,
        /// The image's path; `()` for images held as bytes.
        image_0: Option<String>,
        image_1: Option<String>,
        label_0: f64,
        label_1: f64,
        num_examples: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<i64>,
    }

    fn path_of(src: &ImageSource) -> Option<String> {
        match src {
            ImageSource::Path(p) => Some(p.display().to_string()),
            ImageSource::Bytes(_) => None,
        }
    }

    impl From<&PreferencePair> for PairRow {
        fn from(p: &PreferencePair) -> Self {
            Self {
                prompt: p.prompt.clone(),
                image_0: path_of(&p.image_0),
                image_1: path_of(&p.image_1),
                label_0: p.label_0 as f64,
                label_1: p.label_1 as f64,
                num_examples: p.num_examples_per_prompt as f64,
                group: p.group,
            }
        }
    }
}

#[export_module]
pub mod shapes_pipe_api {
    use candle_core::{DType, Tensor};
    use rhai::{Array, Dynamic, Map};

    use super::helpers;
    use crate::models::model_folder::copy_model_folder;
    use crate::models::unet::UNetSaveOptions;
    use crate::optim::Params;
    use crate::reward::data::read_manifest;
    use crate::script::bindings::unet::ScriptUNet;
    use crate::script::declared::{from_map, to_map};
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;
    use crate::shapes::model_maker::{make_shapes_model, ShapesModelSpec};

    /// Write a tiny random shapes model in the diffusers layout to `dir` (`unet/` 3->3 channels
    /// at 16x16, `text_encoder/`, a word-level `tokenizer/`, SD1.5 DDIM `scheduler/`). Options: `seed`
    /// and the sizes. Returns the UNet's parameter count.
    #[rhai_fn(return_raw, volatile)]
    pub fn new_shapes_model(ctx: NativeCallContext, dir: &str, opts: Map) -> ScriptResult<i64> {
        let spec: ShapesModelSpec = from_map(&opts, "new_shapes_model").or_script(&ctx)?;
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
        let options: UNetSaveOptions = from_map(&opts, "save").or_script(&ctx)?;
        let dtype = options
            .dtype()
            .map_err(|e| format!("save: {e}"))
            .or_script(&ctx)?;
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
        set.pairs
            .iter()
            .map(|p| to_map(&helpers::PairRow::from(p)).map(Dynamic::from_map))
            .collect::<Result<Array, _>>()
            .or_script(&ctx)
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

#[cfg(test)]
mod tests {
    #[test]
    fn shapes_options_keep_their_names_and_defaults() {
        let got: Vec<(String, String, Option<String>)> = super::declared_options()
            .into_iter()
            .chain(crate::script::bindings::shapes::declared_options())
            .flat_map(|(f, docs)| {
                docs.into_iter()
                    .map(move |d| (f.to_string(), d.name, d.default))
            })
            .collect();
        let expect = [
            (
                "new_shapes_model",
                "block_out_channels",
                Some("[32, 64, 64]"),
            ),
            ("new_shapes_model", "layers_per_block", Some("1")),
            ("new_shapes_model", "seed", Some("0")),
            ("new_shapes_model", "text_heads", Some("4")),
            ("new_shapes_model", "text_hidden", Some("64")),
            ("new_shapes_model", "text_layers", Some("2")),
            ("save", "dtype", Some("\"f32\"")),
            ("shapes_world", "antialias", Some("true")),
            ("shapes_world", "noise", Some("0.0")),
            ("batch", "caption_noise", Some("0.0")),
            ("batch", "split", Some("\"train\"")),
        ];
        let expect: Vec<_> = expect
            .iter()
            .map(|(f, n, d)| (f.to_string(), n.to_string(), d.map(String::from)))
            .collect();
        assert_eq!(got, expect);
    }
}
