//! The shapes world and its judge: palette, prompt split, deterministic rendering, and the
//! judge's accuracy properties (ground truth, pixel noise, wrong prompts, blank/noise images).

use candle_core::{Device, Tensor};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use lpo::shapes::world::{to_signed, BACKGROUND};
use lpo::shapes::{
    make_batch, BatchOptions, Judge, Prompt, RenderOptions, ShapesWorld, Split, COLOURS, SHAPES,
};
use lpo::tensor::SeededRng;

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    (0..3).map(|c| (a[c] - b[c]).powi(2)).sum::<f32>().sqrt()
}

#[test]
fn palette_is_well_separated() {
    for (i, (name, rgb)) in COLOURS.iter().enumerate() {
        assert!(
            dist(*rgb, BACKGROUND) > 0.75,
            "{name} too close to background"
        );
        for (other, rgb2) in &COLOURS[i + 1..] {
            let d = dist(*rgb, *rgb2);
            assert!(d >= 0.5, "{name} and {other} are only {d} apart");
        }
    }
}

#[test]
fn prompt_split_covers_every_colour_and_shape_on_both_sides() {
    let w = ShapesWorld::default();
    let (train, held) = (w.train_prompts(), w.heldout_prompts());
    assert_eq!(w.prompts().len(), 18);
    assert_eq!((train.len(), held.len()), (12, 6));
    for p in &held {
        assert!(!train.contains(p));
    }
    for c in 0..COLOURS.len() {
        assert!(train.iter().any(|p| p.colour == c) && held.iter().any(|p| p.colour == c));
    }
    for s in 0..SHAPES.len() {
        assert!(train.iter().any(|p| p.shape == s) && held.iter().any(|p| p.shape == s));
    }
    // fixed: the same every time
    assert_eq!(held[0].text(), "a red circle");
}

#[test]
fn prompts_parse_and_bad_ones_are_named() {
    for p in ShapesWorld::default().prompts() {
        assert_eq!(Prompt::parse(&p.text()).unwrap(), p);
    }
    assert_eq!(
        Prompt::parse("  Red   TRIANGLE ").unwrap().text(),
        "a red triangle"
    );
    let e = Prompt::parse("a purple circle").unwrap_err().to_string();
    assert!(e.contains("purple"), "{e}");
    assert!(Prompt::parse("a red")
        .unwrap_err()
        .to_string()
        .contains("no shape"));
    assert!(Prompt::parse("a red blue circle").is_err());
}

#[test]
fn rendering_is_deterministic_in_range_and_sized() {
    let w = ShapesWorld::default();
    let p = Prompt::parse("a blue square").unwrap();
    let a = w.render(p, &mut SeededRng::new(5), &Device::Cpu).unwrap();
    let b = w.render(p, &mut SeededRng::new(5), &Device::Cpu).unwrap();
    let c = w.render(p, &mut SeededRng::new(6), &Device::Cpu).unwrap();
    assert_eq!(a.dims(), &[3, 16, 16]);
    let (va, vb, vc): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        a.flatten_all().unwrap().to_vec1().unwrap(),
        b.flatten_all().unwrap().to_vec1().unwrap(),
        c.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert_eq!(va, vb);
    assert_ne!(va, vc);
    assert!(va.iter().all(|&x| (-1.0..=1.0).contains(&x)));
    // the shape's extent (pixels at least half covered) is 8..12 px and inside the image
    let mut rng = SeededRng::new(9);
    for k in 0..200 {
        let prompt = Prompt::new(k % 6, 1).unwrap();
        let px = w.render_pixels(prompt, &mut rng);
        let bright = |i: usize, j: usize| {
            (0..3)
                .map(|c| px[c * 256 + i * 16 + j] - BACKGROUND[c])
                .fold(0f32, f32::max)
        };
        let col = COLOURS[prompt.colour].1;
        let full = col
            .iter()
            .zip(BACKGROUND)
            .map(|(a, b)| a - b)
            .fold(0f32, f32::max);
        let rows: Vec<usize> = (0..16)
            .filter(|&i| (0..16).any(|j| bright(i, j) > 0.5 * full))
            .collect();
        let cols: Vec<usize> = (0..16)
            .filter(|&j| (0..16).any(|i| bright(i, j) > 0.5 * full))
            .collect();
        let h = rows.last().unwrap() - rows[0] + 1;
        let wd = cols.last().unwrap() - cols[0] + 1;
        assert!(
            (7..=13).contains(&h) && (7..=13).contains(&wd),
            "square {k}: {wd}x{h}"
        );
    }
    // batch: one image per prompt
    let ps = w.train_prompts();
    let batch = w
        .render_batch(&ps, &mut SeededRng::new(1), &Device::Cpu)
        .unwrap();
    assert_eq!(batch.dims(), &[12, 3, 16, 16]);
}

fn accuracy(
    world: &ShapesWorld,
    noise_sigma: f32,
    n_per_prompt: usize,
    seed: u64,
) -> (usize, usize) {
    let judge = Judge::default();
    let mut rng = SeededRng::new(seed);
    let (mut ok, mut total) = (0, 0);
    for p in world.prompts() {
        for _ in 0..n_per_prompt {
            let mut px = to_signed(world.render_pixels(p, &mut rng));
            if noise_sigma > 0.0 {
                for (v, z) in px.iter_mut().zip(rng.normal_vec(3 * 256)) {
                    *v += noise_sigma * z;
                }
            }
            let j = judge.judge_pixels(&px, 16, 16, p).unwrap();
            ok += j.aligned as usize;
            total += 1;
        }
    }
    (ok, total)
}

#[test]
fn judge_is_accurate_on_ground_truth_renders() {
    let (ok, total) = accuracy(&ShapesWorld::default(), 0.0, 120, 11);
    assert!(total >= 2000);
    let acc = ok as f64 / total as f64;
    assert!(acc >= 0.995, "aligned {ok}/{total} = {acc}");
    // hard-edged renders too
    let hard = ShapesWorld::new(RenderOptions {
        antialias: false,
        noise: 0.0,
    });
    let (ok, total) = accuracy(&hard, 0.0, 40, 12);
    assert!(
        ok as f64 / total as f64 >= 0.995,
        "no antialias: {ok}/{total}"
    );
}

#[test]
fn judge_survives_pixel_noise() {
    let (ok, total) = accuracy(&ShapesWorld::default(), 0.1, 120, 13);
    let acc = ok as f64 / total as f64;
    assert!(acc >= 0.99, "noise 0.1: aligned {ok}/{total} = {acc}");
    // noisy renders are not aligned with any wrong prompt either
    let (world, judge) = (ShapesWorld::default(), Judge::default());
    let mut rng = SeededRng::new(14);
    let all = world.prompts();
    for k in 0..540 {
        let p = all[k % all.len()];
        let mut px = to_signed(world.render_pixels(p, &mut rng));
        for (v, z) in px.iter_mut().zip(rng.normal_vec(768)) {
            *v += 0.1 * z;
        }
        for q in all.iter().filter(|q| **q != p) {
            assert!(
                !judge.judge_pixels(&px, 16, 16, *q).unwrap().aligned,
                "noisy {p} judged as {q}"
            );
        }
    }
}

#[test]
fn judge_rejects_every_wrong_prompt() {
    let world = ShapesWorld::default();
    let judge = Judge::default();
    let mut rng = SeededRng::new(17);
    let all = world.prompts();
    let (mut aligned_wrong, mut judged) = (0, 0);
    for p in &all {
        for _ in 0..112 {
            let px = to_signed(world.render_pixels(*p, &mut rng));
            for q in all.iter().filter(|q| *q != p) {
                let j = judge.judge_pixels(&px, 16, 16, *q).unwrap();
                aligned_wrong += j.aligned as usize;
                if q.colour != p.colour {
                    assert!(!j.colour_ok, "{p} judged colour-ok as {q}");
                }
                if q.shape != p.shape {
                    assert!(!j.shape_ok, "{p} judged shape-ok as {q}");
                }
                judged += 1;
            }
        }
    }
    assert!(judged >= 2000 * 17);
    assert_eq!(aligned_wrong, 0);
}

#[test]
fn judge_score_is_graded() {
    let world = ShapesWorld::default();
    let judge = Judge::default();
    let mut rng = SeededRng::new(21);
    let (mut right, mut wrong_colour, mut wrong_shape) = (0.0, 0.0, 0.0);
    let n = 300;
    for k in 0..n {
        let p = Prompt::new(k % 6, k % 3).unwrap();
        let px = to_signed(world.render_pixels(p, &mut rng));
        right += judge.judge_pixels(&px, 16, 16, p).unwrap().score;
        let qc = Prompt::new((p.colour + 1) % 6, p.shape).unwrap();
        wrong_colour += judge.judge_pixels(&px, 16, 16, qc).unwrap().score;
        let qs = Prompt::new(p.colour, (p.shape + 1) % 3).unwrap();
        wrong_shape += judge.judge_pixels(&px, 16, 16, qs).unwrap().score;
    }
    let (right, wc, ws) = (
        right / n as f64,
        wrong_colour / n as f64,
        wrong_shape / n as f64,
    );
    assert!(right > 0.9, "mean score of correct renders {right}");
    assert!(
        wc < 0.6 && ws < right - 0.1,
        "right {right}, wrong colour {wc}, wrong shape {ws}"
    );
}

#[test]
fn blank_and_noise_images_are_not_aligned() {
    let judge = Judge::default();
    let world = ShapesWorld::default();
    let mut rng = SeededRng::new(3);
    let mut images: Vec<Vec<f32>> = vec![
        vec![-1.0; 768],
        vec![0.0; 768],
        vec![1.0; 768],
        vec![f32::NAN; 768],
        vec![-0.2; 768],
    ];
    // a full-frame palette colour
    let mut red = vec![0f32; 768];
    for c in 0..3 {
        for p in 0..256 {
            red[c * 256 + p] = COLOURS[0].1[c] * 2.0 - 1.0;
        }
    }
    images.push(red);
    for _ in 0..30 {
        images.push(rng.normal_vec(768)); // diffusion noise
        images.push(
            rng.uniform_vec(768)
                .into_iter()
                .map(|u| u * 2.0 - 1.0)
                .collect(),
        );
        images.push(
            rng.normal_vec(768)
                .into_iter()
                .map(|z| -0.88 + 0.1 * z)
                .collect(),
        ); // dark + noise
    }
    for (i, px) in images.iter().enumerate() {
        for p in world.prompts() {
            let j = judge.judge_pixels(px, 16, 16, p).unwrap();
            assert!(!j.aligned, "image {i} judged aligned with {p}: {j:?}");
        }
    }
    assert!(
        judge
            .judge_pixels(&vec![-1.0; 768], 16, 16, Prompt::new(0, 0).unwrap())
            .unwrap()
            .empty
    );
    assert!(judge
        .judge_pixels(&[0.0; 10], 16, 16, Prompt::new(0, 0).unwrap())
        .is_err());
}

#[test]
fn judge_tensor_checks_shapes_and_broadcasts_one_prompt() {
    let world = ShapesWorld::default();
    let judge = Judge::default();
    let p = Prompt::parse("a green triangle").unwrap();
    let x = world
        .render_batch(&[p, p, p], &mut SeededRng::new(2), &Device::Cpu)
        .unwrap();
    let js = judge.judge_tensor(&x, &[p]).unwrap();
    assert_eq!(js.len(), 3);
    assert!(js.iter().all(|j| j.aligned));
    let e = judge.judge_tensor(&x, &[p, p]).unwrap_err().to_string();
    assert!(e.contains("3 images but 2 prompts"), "{e}");
    let bad = Tensor::zeros((2, 4, 16, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(judge
        .judge_tensor(&bad, &[p])
        .unwrap_err()
        .to_string()
        .contains("3 channels"));
}

#[test]
fn caption_noise_changes_exactly_one_attribute_at_rate_p() {
    let w = ShapesWorld::default();
    let mut rng = SeededRng::new(8);
    let p = Prompt::parse("a cyan circle").unwrap();
    for _ in 0..200 {
        assert_eq!(w.noisy_caption(p, 0.0, &mut rng), p);
        let q = w.noisy_caption(p, 1.0, &mut rng);
        assert_ne!(q, p);
        assert!((q.colour == p.colour) ^ (q.shape == p.shape), "{q}");
    }
    let changed = (0..4000)
        .filter(|_| w.noisy_caption(p, 0.4, &mut rng) != p)
        .count();
    let rate = changed as f64 / 4000.0;
    assert!((rate - 0.4).abs() < 0.03, "{rate}");
}

#[test]
fn batches_draw_from_their_split() {
    let w = ShapesWorld::default();
    let mut rng = SeededRng::new(4);
    let opts = BatchOptions {
        split: Split::Train,
        caption_noise: 0.5,
    };
    let b = make_batch(&w, 64, opts, &mut rng, &Device::Cpu).unwrap();
    assert_eq!(b.images.dims(), &[64, 3, 16, 16]);
    assert!(b.truth.iter().all(|p| !w.is_heldout(*p)));
    let noisy = b
        .captions
        .iter()
        .zip(&b.truth)
        .filter(|(c, t)| c != t)
        .count();
    assert!((15..=50).contains(&noisy), "{noisy}");
    let js = Judge::default().judge_tensor(&b.images, &b.truth).unwrap();
    assert!(js.iter().all(|j| j.aligned));
    let h = make_batch(
        &w,
        32,
        BatchOptions {
            split: Split::Heldout,
            caption_noise: 0.0,
        },
        &mut rng,
        &Device::Cpu,
    )
    .unwrap();
    assert!(h.truth.iter().all(|p| w.is_heldout(*p)) && h.captions == h.truth);
}

fn engine() -> lpo::script::ScriptEngine {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
}

#[test]
fn script_api_renders_and_judges() {
    let e = engine();
    let acc: f64 = e
        .engine
        .eval(
            r#"
            let w = shapes_world();
            let r = rng(1);
            let ps = w.train_prompts + w.train_prompts;
            let x = w.render_batch(ps, r);
            if x.shape != [24, 3, 16, 16] { throw "bad shape " + x.shape; }
            if w.prompts.len() != 18 || w.heldout_prompts.len() != 6 { throw "bad split"; }
            let j = w.judge(x, ps);
            if j.colour[0] != "red" || j.seen.len() != 24 { throw "bad judgement " + j.seen; }
            let wrong = w.judge(x, "a blue circle");
            if wrong.aligned.sum().item() > 3.0 { throw "wrong prompt judged aligned"; }
            let one = w.render("a cyan triangle", r);
            let jo = w.judge(one, ["a cyan triangle"]);
            if jo.aligned.item() != 1.0 { throw "single render not aligned"; }
            let c = w.noisy_caption("a red circle", 1.0, r);
            if c == "a red circle" { throw "caption not changed"; }
            let b = w.batch(8, r, #{caption_noise: 0.0, split: "heldout"});
            for p in b.prompts { if !w.is_heldout(p) { throw "not heldout " + p; } }
            if w.random_prompt(r, "train") in w.heldout_prompts { throw "train prompt from heldout"; }
            j.aligned.mean().item() * 0.5 + j.score.mean().item() * 0.5
        "#,
        )
        .unwrap();
    assert!(acc > 0.9, "{acc}");
    let err = e
        .engine
        .eval::<rhai::Dynamic>("let w = shapes_world();\nw.render(\"a purple circle\", rng(1))")
        .unwrap_err()
        .to_string();
    assert!(err.contains("purple") && err.contains("line 2"), "{err}");
    let err = e
        .engine
        .eval::<rhai::Dynamic>("shapes_world(#{noize: 0.1})")
        .unwrap_err()
        .to_string();
    assert!(err.contains("noize"), "{err}");
}

#[test]
fn dim_or_tinted_renders_keep_their_colour() {
    let world = ShapesWorld::default();
    let judge = Judge::default();
    let mut rng = SeededRng::new(31);
    for k in 0..360 {
        let p = world.prompts()[k % 18];
        let raw = world.render_pixels(p, &mut rng);
        let dim = to_signed(raw.iter().map(|v| v * 0.75).collect());
        let tinted = to_signed(
            raw.iter()
                .enumerate()
                .map(|(i, v)| v + if i < 256 { 0.08 } else { -0.05 })
                .collect(),
        );
        for (what, px) in [("dim", dim), ("tinted", tinted)] {
            let j = judge.judge_pixels(&px, 16, 16, p).unwrap();
            assert!(j.aligned, "{what} {p}: {j:?}");
        }
    }
}
