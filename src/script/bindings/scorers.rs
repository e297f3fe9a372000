//! Built-in evaluation scorers in scripts:
//! `let s = load_scorer("pickscore", dir); let scores = s.score(images, prompts);`
//! Kinds: `pickscore`, `hpsv2`, `aesthetic`, `clip_score` (see `crate::eval::scorers`).

use std::sync::Arc;

use rhai::plugin::*;

use crate::eval::scorers::ScoreOptions;
use crate::script::declared::{option_docs, OptionDoc};

/// Script value of `load_scorer`.
pub type ScriptScorer = Arc<crate::eval::scorers::Scorer>;

/// The options of this module's functions, for `lpo fns` (`load_scorer` takes the shared
/// model-loading options `#{dtype, device}`).
pub fn declared_options() -> Vec<(&'static str, Vec<OptionDoc>)> {
    vec![("score", option_docs::<ScoreOptions>())]
}

mod helpers {
    use std::path::PathBuf;

    use candle_core::Tensor;
    use image::RgbImage;
    use rhai::{Array, Dynamic};

    use crate::eval::scorers::{images_from_tensor, read_image, Scorer};
    use crate::script::Host;

    /// Images to score: a tensor [N, 3, H, W] / [3, H, W] in [-1, 1], or PNG/JPEG paths (one
    /// string or an array of strings), decoded only when their batch comes.
    pub(super) enum Images {
        Decoded(Vec<RgbImage>),
        Files(Vec<PathBuf>),
    }

    impl Images {
        pub(super) fn from_dynamic(host: &Host, v: &Dynamic) -> Result<Self, String> {
            if let Some(t) = v.clone().try_cast::<Tensor>() {
                return images_from_tensor(&t)
                    .map(Images::Decoded)
                    .map_err(|e| format!("{e:#}"));
            }
            let paths: Vec<String> = if let Ok(s) = v.clone().into_string() {
                vec![s]
            } else if v.is_array() {
                let arr = v.read_lock::<Array>().expect("checked is_array");
                arr.iter()
                    .enumerate()
                    .map(|(i, p)| {
                        p.clone()
                            .into_string()
                            .map_err(|t| format!("score: images[{i}] is a {t}, not a file path"))
                    })
                    .collect::<Result<_, _>>()?
            } else {
                return Err(format!(
                    "score: images must be a tensor [N, 3, H, W] in [-1, 1] or an array of \
                     image file paths, got {}",
                    v.type_name()
                ));
            };
            let files = paths
                .iter()
                .map(|p| host.readable(p).map_err(|e| format!("score: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Images::Files(files))
        }

        pub(super) fn len(&self) -> usize {
            match self {
                Images::Decoded(v) => v.len(),
                Images::Files(v) => v.len(),
            }
        }

        pub(super) fn batch(&self, start: usize, end: usize) -> Result<Vec<RgbImage>, String> {
            match self {
                Images::Decoded(v) => Ok(v[start..end].to_vec()),
                Images::Files(v) => v[start..end]
                    .iter()
                    .map(|p| read_image(p).map_err(|e| format!("score: {e:#}")))
                    .collect(),
            }
        }
    }

    /// One prompt per image: an array of strings, or one string for every image.
    fn prompts(v: &Dynamic, n: usize) -> Result<Vec<String>, String> {
        if let Ok(s) = v.clone().into_string() {
            return Ok(vec![s; n]);
        }
        if v.is_array() {
            let arr = v.read_lock::<Array>().expect("checked is_array");
            return arr
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    p.clone()
                        .into_string()
                        .map_err(|t| format!("score: prompt {i} is a {t}, not a string"))
                })
                .collect();
        }
        Err(format!(
            "score: prompts must be a string or an array of strings, got {}",
            v.type_name()
        ))
    }

    /// The prompts of `n` images for `scorer` (none when it ignores them).
    pub(super) fn prompts_for(
        scorer: &Scorer,
        v: &Dynamic,
        n: usize,
    ) -> Result<Vec<String>, String> {
        if !scorer.kind().uses_prompts() {
            return Ok(Vec::new());
        }
        let p = prompts(v, n)?;
        if p.len() != n {
            return Err(format!(
                "score: {n} images but {} prompts (one prompt per image)",
                p.len()
            ));
        }
        Ok(p)
    }

    /// Score `images` `batch` at a time, checking the run's stop requests between batches.
    pub(super) fn score_batches(
        host: &Host,
        scorer: &Scorer,
        images: &Images,
        prompts: &[String],
        batch: usize,
    ) -> anyhow::Result<Vec<f64>> {
        let n = images.len();
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(batch) {
            host.check()?;
            let end = (start + batch).min(n);
            let imgs = images.batch(start, end).map_err(anyhow::Error::msg)?;
            let p: Vec<&str> = prompts
                .get(start..end)
                .unwrap_or_default()
                .iter()
                .map(String::as_str)
                .collect();
            out.extend(scorer.score(&imgs, &p, batch)?);
        }
        Ok(out)
    }
}

#[export_module]
pub mod scorers_api {
    use std::sync::Arc;

    use rhai::{Array, Dynamic, Map};

    use super::helpers::{prompts_for, score_batches, Images};
    use super::ScriptScorer;
    use crate::eval::scorers::{ScoreOptions, Scorer, ScorerKind};
    use crate::models::loading::WeightMode;
    use crate::script::bindings::text::helpers::load_options;
    use crate::script::declared::from_map;
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;

    /// A built-in scorer, frozen, f32, on the run's device. `kind`: `"pickscore"` (HF folder of
    /// yuvalkirstain/PickScore_v1), `"hpsv2"` (open_clip checkpoint converted by
    /// scripts/convert_scorer_weights.py), `"aesthetic"` (HF CLIP ViT-L/14 folder +
    /// `aesthetic_mlp.safetensors`), `"clip_score"` (any HF CLIPModel folder).
    #[rhai_fn(return_raw, volatile)]
    pub fn load_scorer(
        ctx: NativeCallContext,
        kind: &str,
        dir: &str,
    ) -> ScriptResult<ScriptScorer> {
        load_scorer_with(ctx, kind, dir, Map::new())
    }

    /// `load_scorer(kind, dir, #{dtype, device})`.
    #[rhai_fn(name = "load_scorer", return_raw, volatile)]
    pub fn load_scorer_with(
        ctx: NativeCallContext,
        kind: &str,
        dir: &str,
        options: Map,
    ) -> ScriptResult<ScriptScorer> {
        let host = Host::of(&ctx);
        let kind = ScorerKind::parse(kind).or_script(&ctx)?;
        let (dtype, device, mode) =
            load_options(&options, "load_scorer", &host.device).or_script(&ctx)?;
        if mode == WeightMode::Trainable {
            return Err("load_scorer: scorers are inference only (no `trainable`)").or_script(&ctx);
        }
        Scorer::load(kind, &host.readable(dir).or_script(&ctx)?, dtype, &device)
            .map(Arc::new)
            .or_script(&ctx)
    }

    /// Scores (array of floats, one per image) of `images` - a tensor [N, 3, H, W] in [-1, 1]
    /// as `vae.decode` gives (quantised to 8 bits as `save_png` writes it) or an array of PNG /
    /// JPEG paths - with `prompts` (an array of N strings, or one string for all).
    #[rhai_fn(name = "score", return_raw)]
    pub fn score(
        ctx: NativeCallContext,
        scorer: &mut ScriptScorer,
        images: Dynamic,
        prompts: Dynamic,
    ) -> ScriptResult<Array> {
        score_with(ctx, scorer, images, prompts, Map::new())
    }

    /// Scores of `images` for a scorer that ignores prompts (`aesthetic`).
    #[rhai_fn(name = "score", return_raw)]
    pub fn score_images(
        ctx: NativeCallContext,
        scorer: &mut ScriptScorer,
        images: Dynamic,
    ) -> ScriptResult<Array> {
        if scorer.kind().uses_prompts() {
            return Err(format!(
                "score: the {} scorer needs prompts: s.score(images, prompts)",
                scorer.kind().name()
            ))
            .or_script(&ctx);
        }
        score_with(ctx, scorer, images, Dynamic::from(Array::new()), Map::new())
    }

    /// `score(images, prompts, #{batch_size})`: images per forward pass.
    #[rhai_fn(name = "score", return_raw)]
    pub fn score_with(
        ctx: NativeCallContext,
        scorer: &mut ScriptScorer,
        images: Dynamic,
        prompts: Dynamic,
        opts: Map,
    ) -> ScriptResult<Array> {
        let o: ScoreOptions = from_map(&opts, "score").or_script(&ctx)?;
        if o.batch_size == 0 {
            return Err("score: batch_size must be >= 1").or_script(&ctx);
        }
        let host = Host::of(&ctx);
        let images = Images::from_dynamic(&host, &images).or_script(&ctx)?;
        let n = images.len();
        if n == 0 {
            return Err("score: no images").or_script(&ctx);
        }
        let prompts = prompts_for(scorer, &prompts, n).or_script(&ctx)?;
        let s = scorer.image_size();
        host.check_tensor_size("score", &[o.batch_size, 3, s, s], candle_core::DType::F32)
            .or_script(&ctx)?;
        let scores =
            score_batches(&host, scorer, &images, &prompts, o.batch_size).or_script(&ctx)?;
        Ok(scores.into_iter().map(Dynamic::from).collect())
    }

    /// The scorer's kind name.
    #[rhai_fn(get = "kind", pure)]
    pub fn kind(scorer: &mut ScriptScorer) -> String {
        scorer.kind().name().to_string()
    }

    /// Side of the square model input (224 for the published scorers).
    #[rhai_fn(get = "image_size", pure)]
    pub fn image_size(scorer: &mut ScriptScorer) -> i64 {
        scorer.image_size() as i64
    }

    /// Number of scalar parameters.
    #[rhai_fn(get = "param_count", pure)]
    pub fn param_count(scorer: &mut ScriptScorer) -> i64 {
        scorer.param_count() as i64
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn scorer_to_string(scorer: &mut ScriptScorer) -> String {
        format!(
            "Scorer(kind={}, image_size={}, params={}, dir={})",
            scorer.kind().name(),
            scorer.image_size(),
            scorer.param_count(),
            scorer.dir().display()
        )
    }
}
