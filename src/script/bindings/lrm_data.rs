//! Preference data for LRM training in scripts:
//!
//! ```text
//! let data = read_preferences("pairs.jsonl");        // or a parquet shard, or a folder
//! let b = data.batch([0, 1, 2, 3], #{resolution: 512, vae: vae, rng: r});
//! let out = lrm.pair_loss(b.prompts, b.latents_0, b.latents_1, b.t, b.label_0, b.label_1,
//!                         b.num_examples, #{});
//! print(data.skip_summary());                         // what was skipped, and why
//! ```
//! plus `latent_pairs(#{...})` for pairs already in latent space and `read_csv(path)`.

use std::sync::Arc;

use rhai::plugin::*;

use crate::reward::batches::PreferenceData;

/// A shared handle on one preference data set.
pub type ScriptPreferences = Arc<PreferenceData>;

mod helpers {
    use candle_core::{DType, Tensor};
    use rhai::{Array, Dynamic, Map};

    use crate::reward::batches::CsvValue;

    pub(super) fn index_list(arr: &Array, what: &str) -> Result<Vec<usize>, String> {
        arr.iter()
            .enumerate()
            .map(|(k, v)| {
                v.as_int()
                    .ok()
                    .and_then(|i| usize::try_from(i).ok())
                    .ok_or_else(|| {
                        format!(
                            "{what}: index {k} must be an int >= 0, got {} {v}",
                            v.type_name()
                        )
                    })
            })
            .collect()
    }

    pub(super) fn f32_values(v: &Dynamic, what: &str) -> Result<Vec<f32>, String> {
        let t = crate::script::convert::tensor_from_dynamic(v, &candle_core::Device::Cpu)
            .map_err(|e| format!("{what}: {e}"))?;
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| format!("{what}: {e}"))
    }

    pub(super) fn tensor(v: &Dynamic, what: &str) -> Result<Tensor, String> {
        v.clone()
            .try_cast::<Tensor>()
            .ok_or_else(|| format!("{what} must be a tensor, got {}", v.type_name()))
    }

    pub(super) fn csv_dynamic(v: CsvValue) -> Dynamic {
        match v {
            CsvValue::Int(i) => Dynamic::from(i),
            CsvValue::Float(f) => Dynamic::from(f),
            CsvValue::Bool(b) => Dynamic::from(b),
            CsvValue::Str(s) => Dynamic::from(s),
        }
    }

    pub(super) fn put(m: &mut Map, k: &str, v: Dynamic) {
        m.insert(k.into(), v);
    }
}

#[export_module]
pub mod lrm_data_api {
    use std::sync::Arc;

    use rhai::{Array, Dynamic, Map};

    use super::helpers::*;
    use super::ScriptPreferences;
    use crate::diffusion::{DdimConfig, DdimScheduler};
    use crate::reward::batches::{
        default_timesteps, read_csv as read_csv_file, BatchOptions, LatentPairs, PreferenceData,
    };
    use crate::reward::data::ImageSource;
    use crate::script::bindings::diffusion::Scheduler;
    use crate::script::bindings::rng::ScriptRng;
    use crate::script::bindings::vae::Vae;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::options::Options;
    use crate::script::Host;

    /// Preference pairs from a JSONL manifest `{prompt, image_0, image_1, label_0, label_1}`
    /// (paths relative to the manifest), a Pick-a-Pic parquet shard (any codec; images as bytes
    /// or `datasets` Image structs `{bytes, path}`), or a folder of them.
    /// Bad rows are counted (`data.skipped`, `data.skip_summary()`), bad files are errors.
    #[rhai_fn(return_raw, volatile)]
    pub fn read_preferences(ctx: NativeCallContext, path: &str) -> ScriptResult<ScriptPreferences> {
        let host = Host::of(&ctx);
        let file = host.readable(path).or_script(&ctx)?;
        let set = crate::reward::data::read_preferences(&file).or_script(&ctx)?;
        // The images a manifest names are read later, by `batch`: they pass the same gate now.
        let mut checked = std::collections::HashSet::new();
        for pair in &set.pairs {
            for image in [&pair.image_0, &pair.image_1] {
                if let ImageSource::Path(p) = image {
                    if checked.insert(p.clone()) {
                        host.files.check_read(p).or_script(&ctx)?;
                    }
                }
            }
        }
        Ok(Arc::new(PreferenceData::from_set(set, path)))
    }

    /// Pairs already in latent space: `#{prompts: [..], latents_0: [N, C, H, W], latents_1,
    /// label_0: [N], label_1: [N], num_examples: [N] (optional: pairs per prompt)}`. Labels of
    /// each pair must be in [0, 1] and sum to 1.
    #[rhai_fn(return_raw)]
    pub fn latent_pairs(ctx: NativeCallContext, spec: Map) -> ScriptResult<ScriptPreferences> {
        let o = Options::new(
            &spec,
            "latent_pairs",
            &[
                "prompts",
                "latents_0",
                "latents_1",
                "label_0",
                "label_1",
                "num_examples",
            ],
        )
        .or_script(&ctx)?;
        let need = |k: &str| -> Result<Dynamic, String> {
            o.opt_dynamic(k)
                .ok_or_else(|| format!("latent_pairs: missing key `{k}`"))
        };
        let prompts: Vec<String> = need("prompts")
            .and_then(|p| {
                p.into_typed_array::<rhai::ImmutableString>()
                    .map_err(|e| format!("latent_pairs: prompts must be an array of strings ({e})"))
            })
            .or_script(&ctx)?
            .into_iter()
            .map(|s| s.to_string())
            .collect();
        let l0 = tensor(&need("latents_0").or_script(&ctx)?, "latents_0").or_script(&ctx)?;
        let l1 = tensor(&need("latents_1").or_script(&ctx)?, "latents_1").or_script(&ctx)?;
        let a = f32_values(&need("label_0").or_script(&ctx)?, "label_0").or_script(&ctx)?;
        let b = f32_values(&need("label_1").or_script(&ctx)?, "label_1").or_script(&ctx)?;
        let ne = match o.opt_dynamic("num_examples") {
            Some(v) => f32_values(&v, "num_examples").or_script(&ctx)?,
            None => Vec::new(),
        };
        LatentPairs::new(prompts, l0, l1, a, b, ne)
            .map(|p| Arc::new(PreferenceData::from_latents(p)))
            .or_script(&ctx)
    }

    /// Number of usable pairs.
    #[rhai_fn(get = "len", pure)]
    pub fn len(data: &mut ScriptPreferences) -> i64 {
        data.len() as i64
    }

    /// Number of rows skipped so far (by the reader, and images that failed to decode).
    #[rhai_fn(get = "skipped", pure)]
    pub fn skipped(data: &mut ScriptPreferences) -> i64 {
        data.skipped().len() as i64
    }

    /// One line per skip reason with its count ("" when nothing was skipped).
    #[rhai_fn(pure)]
    pub fn skip_summary(data: &mut ScriptPreferences) -> String {
        data.skip_summary()
    }

    /// Every skipped row as `#{location, reason}`.
    #[rhai_fn(pure)]
    pub fn skipped_rows(data: &mut ScriptPreferences) -> Array {
        data.skipped()
            .into_iter()
            .map(|s| {
                let mut m = Map::new();
                put(&mut m, "location", Dynamic::from(s.location));
                put(&mut m, "reason", Dynamic::from(s.reason));
                Dynamic::from_map(m)
            })
            .collect()
    }

    /// The prompt of pair `i`.
    #[rhai_fn(return_raw, pure)]
    pub fn prompt(
        ctx: NativeCallContext,
        data: &mut ScriptPreferences,
        i: i64,
    ) -> ScriptResult<String> {
        if i < 0 || i as usize >= data.len() {
            return Err(format!(
                "prompt: index {i} out of range (0..{})",
                data.len()
            ))
            .or_script(&ctx);
        }
        Ok(data.prompt(i as usize).to_string())
    }

    /// `#{label_0, label_1, num_examples}` of pair `i`.
    #[rhai_fn(return_raw, pure)]
    pub fn labels(
        ctx: NativeCallContext,
        data: &mut ScriptPreferences,
        i: i64,
    ) -> ScriptResult<Map> {
        if i < 0 || i as usize >= data.len() {
            return Err(format!(
                "labels: index {i} out of range (0..{})",
                data.len()
            ))
            .or_script(&ctx);
        }
        let (a, b, n) = data.labels(i as usize);
        let mut m = Map::new();
        put(&mut m, "label_0", Dynamic::from(a as f64));
        put(&mut m, "label_1", Dynamic::from(b as f64));
        put(&mut m, "num_examples", Dynamic::from(n as f64));
        Ok(m)
    }

    /// The pairs at `indices` as a new data set (train/validation splits, filters).
    #[rhai_fn(return_raw, pure)]
    pub fn subset(
        ctx: NativeCallContext,
        data: &mut ScriptPreferences,
        indices: Array,
    ) -> ScriptResult<ScriptPreferences> {
        let idx = index_list(&indices, "subset").or_script(&ctx)?;
        data.subset(&idx).map(Arc::new).or_script(&ctx)
    }

    /// A training batch of the pairs at `indices`: `#{prompts, latents_0, latents_1, t [N, 2],
    /// label_0, label_1, num_examples, indices, n, skipped}` (pairs whose images fail to decode
    /// are left out and counted). Options: `rng` (required: timesteps, VAE samples, noise),
    /// `resolution` (512), `vae` (encode images; without one the images are the latents),
    /// `scheduler` (SD1.5's DDIM schedule by default), `timesteps` (an int, or an array to draw
    /// from; default 1, 51, ..., 951), `per_image_t` (false: both images share t), `clean`
    /// (false: true returns the latents un-noised).
    #[rhai_fn(return_raw, pure, volatile)]
    pub fn batch(
        ctx: NativeCallContext,
        data: &mut ScriptPreferences,
        indices: Array,
        opts: Map,
    ) -> ScriptResult<Map> {
        let host = Host::of(&ctx);
        host.check().or_script(&ctx)?;
        let idx = index_list(&indices, "batch").or_script(&ctx)?;
        let o = Options::new(
            &opts,
            "batch",
            &[
                "rng",
                "resolution",
                "vae",
                "scheduler",
                "timesteps",
                "per_image_t",
                "clean",
            ],
        )
        .or_script(&ctx)?;
        let rng = o
            .opt_typed::<ScriptRng>("rng", "an Rng (rng(seed))")
            .or_script(&ctx)?
            .ok_or("batch: option `rng` is required (e.g. #{rng: rng(0)}): it draws the timesteps, VAE samples and noise")
            .or_script(&ctx)?;
        let vae = o.opt_typed::<Vae>("vae", "a Vae").or_script(&ctx)?;
        let scheduler = match o
            .opt_typed::<Scheduler>("scheduler", "a Scheduler")
            .or_script(&ctx)?
        {
            Some(s) => s,
            None => DdimScheduler::new(DdimConfig::default(), &host.device).or_script(&ctx)?,
        };
        let timesteps = match o.opt_dynamic("timesteps") {
            None => default_timesteps(),
            Some(v) if v.is_int() => vec![v.as_int().unwrap()],
            Some(v) if v.is_array() => {
                let arr = v.cast::<Array>();
                arr.iter()
                    .map(|x| {
                        x.as_int().map_err(|_| {
                            format!("batch: timesteps must be ints, got {}", x.type_name())
                        })
                    })
                    .collect::<Result<Vec<i64>, String>>()
                    .or_script(&ctx)?
            }
            Some(v) => {
                return Err(format!(
                    "batch: option `timesteps` must be an int or an array of ints, got {}",
                    v.type_name()
                ))
                .or_script(&ctx)
            }
        };
        let resolution = o.usize("resolution", 512).or_script(&ctx)?;
        // Both images of each pair, decoded at `resolution`.
        host.check_tensor_size(
            "batch",
            &[idx.len(), 2, 3, resolution, resolution],
            candle_core::DType::F32,
        )
        .or_script(&ctx)?;
        let bo = BatchOptions {
            resolution,
            vae: vae.as_deref(),
            scheduler: &scheduler,
            timesteps,
            per_image_t: o.bool("per_image_t", false).or_script(&ctx)?,
            clean: o.bool("clean", false).or_script(&ctx)?,
            device: host.device.clone(),
        };
        let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
        let b = data.batch(&idx, &bo, &mut r).or_script(&ctx)?;
        let mut m = Map::new();
        let n = b.indices.len() as i64;
        put(
            &mut m,
            "prompts",
            Dynamic::from_array(b.prompts.into_iter().map(Dynamic::from).collect()),
        );
        put(&mut m, "latents_0", Dynamic::from(b.latents_0));
        put(&mut m, "latents_1", Dynamic::from(b.latents_1));
        put(&mut m, "t", Dynamic::from(b.t));
        put(&mut m, "label_0", Dynamic::from(b.label_0));
        put(&mut m, "label_1", Dynamic::from(b.label_1));
        put(&mut m, "num_examples", Dynamic::from(b.num_examples));
        put(
            &mut m,
            "indices",
            Dynamic::from_array(
                b.indices
                    .into_iter()
                    .map(|i| Dynamic::from(i as i64))
                    .collect(),
            ),
        );
        put(&mut m, "n", Dynamic::from(n));
        put(&mut m, "skipped", Dynamic::from(b.skipped as i64));
        Ok(m)
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn to_string(data: &mut ScriptPreferences) -> String {
        format!(
            "Preferences({}: {} pairs, {} skipped)",
            data.origin,
            data.len(),
            data.skipped().len()
        )
    }

    /// Rows of a CSV file as maps column -> value (numbers parsed, `true`/`false` as bools).
    #[rhai_fn(return_raw, volatile)]
    pub fn read_csv(ctx: NativeCallContext, path: &str) -> ScriptResult<Array> {
        read_csv_columns(ctx, path, Array::new())
    }

    /// `read_csv(path)` that first checks the header has every column of `required` (an error
    /// names the file and the missing columns).
    #[rhai_fn(name = "read_csv", return_raw, volatile)]
    pub fn read_csv_columns(
        ctx: NativeCallContext,
        path: &str,
        required: Array,
    ) -> ScriptResult<Array> {
        let (columns, rows) =
            read_csv_file(&Host::of(&ctx).readable(path).or_script(&ctx)?).or_script(&ctx)?;
        let missing: Vec<String> = required
            .iter()
            .map(|c| c.to_string())
            .filter(|c| !columns.iter().any(|h| h == c))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{path}: missing column(s) {} (the header has: {})",
                missing.join(", "),
                columns.join(", ")
            ))
            .or_script(&ctx);
        }
        Ok(rows
            .into_iter()
            .map(|row| {
                let m: Map = columns
                    .iter()
                    .zip(row)
                    .map(|(c, v)| (c.as_str().into(), csv_dynamic(v)))
                    .collect();
                Dynamic::from_map(m)
            })
            .collect())
    }
}
