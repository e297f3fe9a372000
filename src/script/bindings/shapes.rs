//! The shapes world in scripts: `let w = shapes_world(); let x = w.render("a red circle", r);
//! let j = w.judge(x, ["a red circle"]);`.

use std::sync::Arc;

use rhai::plugin::*;

use crate::shapes::ShapesWorld;

/// The world as a script value (cheap to clone).
pub type ScriptWorld = Arc<ShapesWorld>;

/// The options each function here declares (for `lpo fns` and docs/API.md).
pub fn declared_options() -> Vec<(&'static str, Vec<crate::script::declared::OptionDoc>)> {
    use crate::script::declared::option_docs;
    vec![
        (
            "shapes_world",
            option_docs::<crate::shapes::RenderOptions>(),
        ),
        ("batch", option_docs::<crate::shapes::BatchOptions>()),
    ]
}

mod helpers {
    use candle_core::{Device, Tensor};
    use rhai::{Array, Dynamic, Map};

    use crate::script::bindings::rng::ScriptRng;
    use crate::shapes::{Judgement, Prompt, COLOURS, SHAPES};
    use crate::tensor::SeededRng;

    pub(super) fn lock(r: &ScriptRng) -> std::sync::MutexGuard<'_, SeededRng> {
        r.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn prompt_list(items: &Array, what: &str) -> Result<Vec<Prompt>, String> {
        items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = v
                    .clone()
                    .into_string()
                    .map_err(|t| format!("{what}: prompt {i} is a {t}, not a string"))?;
                Prompt::parse(&s).map_err(|e| format!("{what}: prompt {i}: {e}"))
            })
            .collect()
    }

    pub(super) fn texts(prompts: &[Prompt]) -> Array {
        prompts.iter().map(|p| Dynamic::from(p.text())).collect()
    }

    /// The texts of a pretraining batch (its images go beside them).
    #[derive(serde::Serialize)]
    pub(super) struct BatchTexts {
        /// What each image is trained with.
        pub captions: Vec<String>,
        /// What each image shows.
        pub prompts: Vec<String>,
    }

    /// What the judge recognized, per image ("" when unrecognized).
    #[derive(serde::Serialize)]
    struct Recognized {
        colour: Vec<&'static str>,
        shape: Vec<&'static str>,
        seen: Vec<String>,
    }

    /// The judgements as a map: one [B] f32 tensor per number or flag (0/1), one array per
    /// recognized name.
    pub(super) fn judgement_map(js: &[Judgement], device: &Device) -> Result<Map, String> {
        let column = |f: &dyn Fn(&Judgement) -> f64| -> Result<Dynamic, String> {
            let v: Vec<f32> = js.iter().map(|j| f(j) as f32).collect();
            Tensor::from_vec(v, js.len(), device)
                .map(Dynamic::from)
                .map_err(|e| e.to_string())
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let mut m = crate::script::declared::to_map(&Recognized {
            colour: js
                .iter()
                .map(|j| j.colour.map_or("", |c| COLOURS[c].0))
                .collect(),
            shape: js
                .iter()
                .map(|j| j.shape.map_or("", |s| SHAPES[s]))
                .collect(),
            seen: js.iter().map(Judgement::seen).collect(),
        })?;
        let columns = [
            ("aligned", column(&|j| flag(j.aligned))?),
            ("colour_ok", column(&|j| flag(j.colour_ok))?),
            ("shape_ok", column(&|j| flag(j.shape_ok))?),
            ("empty", column(&|j| flag(j.empty))?),
            ("score", column(&|j| j.score)?),
            ("colour_conf", column(&|j| j.colour_conf)?),
            ("shape_iou", column(&|j| j.shape_iou)?),
        ];
        for (key, value) in columns {
            m.insert(key.into(), value);
        }
        Ok(m)
    }
}

#[export_module]
pub mod shapes_api {
    use super::helpers::*;
    use candle_core::Tensor;
    use rhai::{Array, Dynamic, Map};

    use super::ScriptWorld;
    use crate::script::bindings::rng::ScriptRng;
    use crate::script::convert::dynamic_f64;
    use crate::script::declared::{from_map, to_map};
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::Host;
    use crate::shapes::{
        make_batch, BatchOptions, Judge, Prompt, RenderOptions, ShapesWorld, Split, COLOURS, SHAPES,
    };

    /// The shapes world: 16x16 images of a circle, square or triangle in one of six colours.
    pub fn shapes_world() -> ScriptWorld {
        std::sync::Arc::new(ShapesWorld::default())
    }

    /// The shapes world with rendering options `antialias`, `noise`.
    #[rhai_fn(name = "shapes_world", return_raw)]
    pub fn shapes_world_with(ctx: NativeCallContext, opts: Map) -> ScriptResult<ScriptWorld> {
        let options: RenderOptions = from_map(&opts, "shapes_world").or_script(&ctx)?;
        options
            .check()
            .map_err(|e| format!("shapes_world: {e}"))
            .or_script(&ctx)?;
        Ok(std::sync::Arc::new(ShapesWorld::new(options)))
    }

    /// All 18 prompts ("a red circle", ...).
    #[rhai_fn(get = "prompts", pure)]
    pub fn prompts(w: &mut ScriptWorld) -> Array {
        texts(&w.prompts())
    }

    /// The 12 training prompts.
    #[rhai_fn(get = "train_prompts", pure)]
    pub fn train_prompts(w: &mut ScriptWorld) -> Array {
        texts(&w.train_prompts())
    }

    /// The 6 held-out prompts (every colour and shape also appears in training).
    #[rhai_fn(get = "heldout_prompts", pure)]
    pub fn heldout_prompts(w: &mut ScriptWorld) -> Array {
        texts(&w.heldout_prompts())
    }

    /// The colour names.
    #[rhai_fn(get = "colours", pure)]
    pub fn colours(_w: &mut ScriptWorld) -> Array {
        COLOURS.iter().map(|(n, _)| Dynamic::from(*n)).collect()
    }

    /// The shape names.
    #[rhai_fn(get = "shapes", pure)]
    pub fn shapes(_w: &mut ScriptWorld) -> Array {
        SHAPES.iter().map(|n| Dynamic::from(*n)).collect()
    }

    /// Image side in pixels (16).
    #[rhai_fn(get = "size", pure)]
    pub fn size(w: &mut ScriptWorld) -> i64 {
        w.image_size() as i64
    }

    /// True when `prompt` is one of the held-out prompts.
    #[rhai_fn(return_raw, pure)]
    pub fn is_heldout(
        ctx: NativeCallContext,
        w: &mut ScriptWorld,
        prompt: &str,
    ) -> ScriptResult<bool> {
        let p = Prompt::parse(prompt).or_script(&ctx)?;
        Ok(w.is_heldout(p))
    }

    /// One image [3, 16, 16] in [-1, 1] of `prompt` at a random size and position.
    #[rhai_fn(return_raw, volatile)]
    pub fn render(
        ctx: NativeCallContext,
        w: &mut ScriptWorld,
        prompt: &str,
        r: ScriptRng,
    ) -> ScriptResult<Tensor> {
        let p = Prompt::parse(prompt).or_script(&ctx)?;
        w.render(p, &mut lock(&r), &Host::of(&ctx).device)
            .or_script(&ctx)
    }

    /// Images [B, 3, 16, 16] in [-1, 1], one per prompt of the array.
    #[rhai_fn(return_raw, volatile)]
    pub fn render_batch(
        ctx: NativeCallContext,
        w: &mut ScriptWorld,
        prompts: Array,
        r: ScriptRng,
    ) -> ScriptResult<Tensor> {
        let ps = prompt_list(&prompts, "render_batch").or_script(&ctx)?;
        w.render_batch(&ps, &mut lock(&r), &Host::of(&ctx).device)
            .or_script(&ctx)
    }

    /// Judge images [B, 3, H, W] (or [3, H, W]) in [-1, 1] against one prompt per image: map of
    /// [B] f32 tensors `aligned`, `colour_ok`, `shape_ok`, `empty` (0/1), `score`, `colour_conf`,
    /// `shape_iou`, and arrays `colour`, `shape` ("" when unrecognized), `seen`.
    #[rhai_fn(return_raw, pure)]
    pub fn judge(
        ctx: NativeCallContext,
        _w: &mut ScriptWorld,
        images: Tensor,
        prompts: Array,
    ) -> ScriptResult<Map> {
        let ps = prompt_list(&prompts, "judge").or_script(&ctx)?;
        let js = Judge::default()
            .judge_tensor(&images, &ps)
            .or_script(&ctx)?;
        judgement_map(&js, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// Judge every image against the same prompt.
    #[rhai_fn(name = "judge", return_raw, pure)]
    pub fn judge_one(
        ctx: NativeCallContext,
        _w: &mut ScriptWorld,
        images: Tensor,
        prompt: &str,
    ) -> ScriptResult<Map> {
        let p = Prompt::parse(prompt).or_script(&ctx)?;
        let js = Judge::default()
            .judge_tensor(&images, &[p])
            .or_script(&ctx)?;
        judgement_map(&js, &Host::of(&ctx).device).or_script(&ctx)
    }

    /// With probability `p` the prompt with a wrong colour or a wrong shape, else unchanged.
    #[rhai_fn(return_raw, volatile)]
    pub fn noisy_caption(
        ctx: NativeCallContext,
        w: &mut ScriptWorld,
        prompt: &str,
        p: Dynamic,
        r: ScriptRng,
    ) -> ScriptResult<String> {
        let prob = dynamic_f64(&p)
            .ok_or("noisy_caption: p must be a number")
            .or_script(&ctx)?;
        if !(0.0..=1.0).contains(&prob) {
            return Err(format!("noisy_caption: p must be in [0, 1], got {prob}")).or_script(&ctx);
        }
        let parsed = Prompt::parse(prompt).or_script(&ctx)?;
        Ok(w.noisy_caption(parsed, prob, &mut lock(&r)).text())
    }

    /// A prompt drawn uniformly from all 18.
    #[rhai_fn(volatile)]
    pub fn random_prompt(w: &mut ScriptWorld, r: ScriptRng) -> String {
        w.random_prompt(&mut lock(&r)).text()
    }

    /// A prompt drawn uniformly from a split: "train", "heldout" or "all".
    #[rhai_fn(name = "random_prompt", return_raw, volatile)]
    pub fn random_prompt_from(
        ctx: NativeCallContext,
        w: &mut ScriptWorld,
        r: ScriptRng,
        split: &str,
    ) -> ScriptResult<String> {
        let pool = Split::parse(split).or_script(&ctx)?.prompts(w);
        Ok(w.random_from(&pool, &mut lock(&r)).or_script(&ctx)?.text())
    }

    /// A pretraining batch: `#{images [n, 3, 16, 16], captions, prompts}` where `prompts` are
    /// what the images show and `captions` what they are trained with. Options `split`,
    /// `caption_noise`.
    #[rhai_fn(return_raw, volatile)]
    pub fn batch(
        ctx: NativeCallContext,
        w: &mut ScriptWorld,
        n: i64,
        r: ScriptRng,
        opts: Map,
    ) -> ScriptResult<Map> {
        let options: BatchOptions = from_map(&opts, "batch").or_script(&ctx)?;
        if n < 0 {
            return Err(format!("batch: n must be >= 0, got {n}")).or_script(&ctx);
        }
        let side = crate::shapes::world::IMAGE_SIZE;
        let dims = [n as usize, 3, side, side];
        let host = Host::of(&ctx);
        host.check_tensor_size("batch", &dims, candle_core::DType::F32)
            .or_script(&ctx)?;
        let b = make_batch(w, n as usize, options, &mut lock(&r), &host.device).or_script(&ctx)?;
        let mut out = to_map(&BatchTexts {
            captions: b.captions.iter().map(|p| p.text()).collect(),
            prompts: b.truth.iter().map(|p| p.text()).collect(),
        })
        .or_script(&ctx)?;
        out.insert("images".into(), Dynamic::from(b.images));
        Ok(out)
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn to_string(w: &mut ScriptWorld) -> String {
        format!(
            "ShapesWorld(antialias={}, noise={})",
            w.options.antialias, w.options.noise
        )
    }
}
