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

use crate::reward::batches::{BatchSettings, LatentPairsSpec, PreferenceData};
use crate::script::declared::{option_docs, OptionDoc};

/// A shared handle on one preference data set.
pub type ScriptPreferences = Arc<PreferenceData>;

/// The options of this module's functions, for `lpo fns` (host objects in the doc comments).
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    vec![
        ("batch", option_docs::<BatchSettings>()),
        ("latent_pairs", option_docs::<LatentPairsSpec>()),
    ]
}

mod helpers {
    use candle_core::{DType, Tensor};
    use rhai::{Array, Dynamic, Map};

    use crate::diffusion::{DdimConfig, DdimScheduler};
    use crate::reward::batches::{
        BatchOptions, BatchSettings, CsvValue, LatentPairs, LatentPairsSpec, PairBatch,
    };
    use crate::script::bindings::diffusion::Scheduler;
    use crate::script::bindings::rng::ScriptRng;
    use crate::script::bindings::vae::Vae;
    use crate::script::declared::{from_map_with, to_map};
    use crate::script::Host;

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

    fn f32_values(v: &Dynamic, what: &str) -> Result<Vec<f32>, String> {
        let t = crate::script::convert::tensor_from_dynamic(v, &candle_core::Device::Cpu)
            .map_err(|e| format!("{what}: {e}"))?;
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| format!("{what}: {e}"))
    }

    /// The host object under `key` (None when absent or `()`), checked to be a `T`.
    fn host_object<T: Clone + 'static>(
        host: &Map,
        func: &str,
        key: &str,
        what: &str,
    ) -> Result<Option<T>, String> {
        match host.get(key).filter(|v| !v.is_unit()) {
            None => Ok(None),
            Some(v) => v.clone().try_cast::<T>().map(Some).ok_or_else(|| {
                format!(
                    "{func}: option `{key}` must be {what}, got {} ({v})",
                    v.type_name()
                )
            }),
        }
    }

    const TENSORS: [&str; 5] = [
        "latents_0",
        "latents_1",
        "label_0",
        "label_1",
        "num_examples",
    ];

    /// `latent_pairs`' spec: prompts, latents (tensors), labels and counts (tensors or arrays).
    pub(super) fn latent_pairs_from(spec: &Map) -> Result<LatentPairs, String> {
        let (plain, tensors) = from_map_with::<LatentPairsSpec>(spec, "latent_pairs", &TENSORS)?;
        let missing = |k: &str| format!("latent_pairs: missing key `{k}`");
        let need = |k: &str| {
            tensors
                .get(k)
                .filter(|v| !v.is_unit())
                .ok_or_else(|| missing(k))
        };
        let latents = |k: &str| {
            host_object::<Tensor>(&tensors, "latent_pairs", k, "a tensor")?
                .ok_or_else(|| missing(k))
        };
        let num_examples = match tensors.get("num_examples").filter(|v| !v.is_unit()) {
            Some(v) => f32_values(v, "num_examples")?,
            None => Vec::new(),
        };
        LatentPairs::new(
            plain.prompts.ok_or_else(|| missing("prompts"))?,
            latents("latents_0")?,
            latents("latents_1")?,
            f32_values(need("label_0")?, "label_0")?,
            f32_values(need("label_1")?, "label_1")?,
            num_examples,
        )
        .map_err(|e| format!("{e:#}"))
    }

    pub(super) type BatchObjects = (ScriptRng, Option<Vae>, Scheduler);

    /// The RNG, VAE and scheduler of `batch`'s options (the RNG is required).
    fn batch_objects(host: &Host, objects: &Map) -> Result<BatchObjects, String> {
        let rng = host_object::<ScriptRng>(objects, "batch", "rng", "an Rng (rng(seed))")?
            .ok_or("batch: option `rng` is required (e.g. #{rng: rng(0)}): it draws the timesteps, VAE samples and noise")?;
        let vae = host_object::<Vae>(objects, "batch", "vae", "a Vae")?;
        let scheduler =
            match host_object::<Scheduler>(objects, "batch", "scheduler", "a Scheduler")? {
                Some(s) => s,
                None => DdimScheduler::new(DdimConfig::default(), &host.device)
                    .map_err(|e| format!("{e:#}"))?,
            };
        Ok((rng, vae, scheduler))
    }

    /// `batch`'s options: the settings, and the RNG, VAE and scheduler beside them.
    pub(super) fn batch_options(
        host: &Host,
        opts: &Map,
    ) -> Result<(BatchSettings, BatchObjects), String> {
        let (settings, objects) =
            from_map_with::<BatchSettings>(opts, "batch", &["rng", "vae", "scheduler"])?;
        Ok((settings, batch_objects(host, &objects)?))
    }

    /// A batch as the script sees it: its plain fields, `n`, and the tensors.
    pub(super) fn batch_map(b: &PairBatch) -> Result<Map, String> {
        let mut m = to_map(b)?;
        m.insert("n".into(), Dynamic::from(b.indices.len() as i64));
        for (k, t) in b.tensors() {
            m.insert(k.into(), Dynamic::from(t.clone()));
        }
        Ok(m)
    }

    /// Make a batch of `indices` with the settings and objects of `batch`'s options.
    pub(super) fn make_batch(
        host: &Host,
        data: &crate::reward::batches::PreferenceData,
        idx: &[usize],
        settings: BatchSettings,
        (rng, vae, scheduler): BatchObjects,
    ) -> anyhow::Result<PairBatch> {
        let opts = BatchOptions {
            settings,
            vae: vae.as_deref(),
            scheduler: &scheduler,
            device: host.device.clone(),
        };
        let mut r = rng.lock().unwrap_or_else(|e| e.into_inner());
        data.batch(idx, &opts, &mut r)
    }

    pub(super) fn csv_dynamic(v: CsvValue) -> Dynamic {
        match v {
            CsvValue::Int(i) => Dynamic::from(i),
            CsvValue::Float(f) => Dynamic::from(f),
            CsvValue::Bool(b) => Dynamic::from(b),
            CsvValue::Str(s) => Dynamic::from(s),
        }
    }
}

#[export_module]
pub mod lrm_data_api {
    use std::sync::Arc;

    use rhai::{Array, Dynamic, Map};

    use super::helpers::*;
    use super::ScriptPreferences;
    use crate::reward::batches::{read_csv as read_csv_file, PreferenceData};
    use crate::reward::data::ImageSource;
    use crate::script::declared::to_map;
    use crate::script::error::{OrScriptError, ScriptResult};
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
        latent_pairs_from(&spec)
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
            .iter()
            .filter_map(|s| to_map(s).ok())
            .map(Dynamic::from_map)
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
        to_map(&data.labels(i as usize)).or_script(&ctx)
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
    /// are left out and counted). Options: `rng` (required: draws the timesteps, VAE samples
    /// and noise), `vae` (encodes the images; without one the images are the latents),
    /// `scheduler` (SD1.5's DDIM schedule by default), and `resolution`, `timesteps`,
    /// `per_image_t`, `clean`.
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
        let (settings, objects) = batch_options(&host, &opts).or_script(&ctx)?;
        // Both images of each pair, decoded at `resolution`.
        let r = settings.resolution;
        host.check_tensor_size("batch", &[idx.len(), 2, 3, r, r], candle_core::DType::F32)
            .or_script(&ctx)?;
        let b = make_batch(&host, data, &idx, settings, objects).or_script(&ctx)?;
        batch_map(&b).or_script(&ctx)
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

#[cfg(test)]
mod tests {
    use rhai::{Dynamic, Map};

    use crate::reward::batches::BatchSettings;
    use crate::script::declared::from_map;

    #[test]
    fn batch_timesteps_take_an_int_or_an_array() {
        let one: Map = [("timesteps".into(), Dynamic::from(51_i64))]
            .into_iter()
            .collect();
        let s: BatchSettings = from_map(&one, "batch").unwrap();
        assert_eq!(s.timesteps, vec![51]);
        let many: Map = [(
            "timesteps".into(),
            Dynamic::from_array(vec![Dynamic::from(1_i64), Dynamic::from(951_i64)]),
        )]
        .into_iter()
        .collect();
        let s: BatchSettings = from_map(&many, "batch").unwrap();
        assert_eq!((s.timesteps, s.resolution), (vec![1, 951], 512));
        let bad: Map = [("timesteps".into(), Dynamic::from(1.5_f64))]
            .into_iter()
            .collect();
        let err = from_map::<BatchSettings>(&bad, "batch").unwrap_err();
        assert!(
            err.contains("timesteps") && err.contains("an int or an array of ints"),
            "{err}"
        );
    }
}
