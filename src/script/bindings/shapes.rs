//! The shapes world in scripts: `let w = shapes_world(); let x = w.render("a red circle", r);
//! let j = w.judge(x, ["a red circle"]);`.

use std::sync::Arc;

use rhai::plugin::*;

use crate::shapes::ShapesWorld;

/// The world as a script value (cheap to clone).
pub type ScriptWorld = Arc<ShapesWorld>;

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

    pub(super) fn judgement_map(js: &[Judgement], device: &Device) -> Result<Map, String> {
        let flag = |f: &dyn Fn(&Judgement) -> bool| -> Result<Dynamic, String> {
            let v: Vec<f32> = js.iter().map(|j| if f(j) { 1.0 } else { 0.0 }).collect();
            Tensor::from_vec(v, js.len(), device)
                .map(Dynamic::from)
                .map_err(|e| e.to_string())
        };
        let num = |f: &dyn Fn(&Judgement) -> f64| -> Result<Dynamic, String> {
            let v: Vec<f32> = js.iter().map(|j| f(j) as f32).collect();
            Tensor::from_vec(v, js.len(), device)
                .map(Dynamic::from)
                .map_err(|e| e.to_string())
        };
        let mut m = Map::new();
        m.insert("aligned".into(), flag(&|j| j.aligned)?);
        m.insert("colour_ok".into(), flag(&|j| j.colour_ok)?);
        m.insert("shape_ok".into(), flag(&|j| j.shape_ok)?);
        m.insert("empty".into(), flag(&|j| j.empty)?);
        m.insert("score".into(), num(&|j| j.score)?);
        m.insert("colour_conf".into(), num(&|j| j.colour_conf)?);
        m.insert("shape_iou".into(), num(&|j| j.shape_iou)?);
        m.insert(
            "colour".into(),
            Dynamic::from_array(
                js.iter()
                    .map(|j| Dynamic::from(j.colour.map(|c| COLOURS[c].0).unwrap_or("")))
                    .collect(),
            ),
        );
        m.insert(
            "shape".into(),
            Dynamic::from_array(
                js.iter()
                    .map(|j| Dynamic::from(j.shape.map(|s| SHAPES[s]).unwrap_or("")))
                    .collect(),
            ),
        );
        m.insert(
            "seen".into(),
            Dynamic::from_array(js.iter().map(|j| Dynamic::from(j.seen())).collect()),
        );
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
    use crate::script::error::{OrScriptError, ScriptResult};
    use crate::script::options::{dynamic_f64, Options};
    use crate::script::Host;
    use crate::shapes::{
        make_batch, BatchOptions, Judge, Prompt, RenderOptions, ShapesWorld, Split, COLOURS, SHAPES,
    };

    /// The shapes world: 16x16 images of a circle, square or triangle in one of six colours.
    pub fn shapes_world() -> ScriptWorld {
        std::sync::Arc::new(ShapesWorld::default())
    }

    /// The shapes world with options `#{antialias: true, noise: 0.0}` (noise: pixel std in
    /// [0, 1] units).
    #[rhai_fn(name = "shapes_world", return_raw)]
    pub fn shapes_world_with(ctx: NativeCallContext, opts: Map) -> ScriptResult<ScriptWorld> {
        let o = Options::new(&opts, "shapes_world", &["antialias", "noise"]).or_script(&ctx)?;
        let options = RenderOptions {
            antialias: o.bool("antialias", true).or_script(&ctx)?,
            noise: o.f64("noise", 0.0).or_script(&ctx)? as f32,
        };
        if !(0.0..=1.0).contains(&options.noise) {
            return Err(format!(
                "shapes_world: noise must be in [0, 1], got {}",
                options.noise
            ))
            .or_script(&ctx);
        }
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
    /// what the images show and `captions` what they are trained with. Options `#{split:
    /// "train", caption_noise: 0.0}`.
    #[rhai_fn(return_raw, volatile)]
    pub fn batch(
        ctx: NativeCallContext,
        w: &mut ScriptWorld,
        n: i64,
        r: ScriptRng,
        opts: Map,
    ) -> ScriptResult<Map> {
        let o = Options::new(&opts, "batch", &["split", "caption_noise"]).or_script(&ctx)?;
        let split = Split::parse(&o.string("split", "train").or_script(&ctx)?).or_script(&ctx)?;
        let caption_noise = o.f64("caption_noise", 0.0).or_script(&ctx)?;
        if n < 0 {
            return Err(format!("batch: n must be >= 0, got {n}")).or_script(&ctx);
        }
        let side = crate::shapes::world::IMAGE_SIZE;
        Host::of(&ctx)
            .check_tensor_size(
                "batch",
                &[n as usize, 3, side, side],
                candle_core::DType::F32,
            )
            .or_script(&ctx)?;
        let b = make_batch(
            w,
            n as usize,
            BatchOptions {
                split,
                caption_noise,
            },
            &mut lock(&r),
            &Host::of(&ctx).device,
        )
        .or_script(&ctx)?;
        let mut m = Map::new();
        m.insert("images".into(), Dynamic::from(b.images));
        m.insert("captions".into(), Dynamic::from_array(texts(&b.captions)));
        m.insert("prompts".into(), Dynamic::from_array(texts(&b.truth)));
        Ok(m)
    }

    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn to_string(w: &mut ScriptWorld) -> String {
        format!(
            "ShapesWorld(antialias={}, noise={})",
            w.options.antialias, w.options.noise
        )
    }
}
