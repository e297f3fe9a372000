//! LRM scoring throughput (not a test): scores per second of the tiny-lrm model (16x16 latents)
//! and of an SD1.5-shaped LRM with random weights at 32x32 latents, with guidance off (1.0) and
//! on (7.5: the UNet runs twice). Text is encoded once per batch outside the timed loop for
//! the SD1.5 model (its conditioning is random [B, 77, 768]), and inside it for tiny-lrm.
//! `cargo bench --bench lrm`.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lpo::models::clip_text::ClipTextModel;
use lpo::models::loading::WeightMode;
use lpo::models::tokenizer::ClipTokenizer;
use lpo::models::unet::{UNet2DConditionModel, UNetConfig};
use lpo::reward::lrm::{LatentRewardModel, LrmOptions, TextConditioning, TextSide};
use lpo::tensor::SeededRng;

fn time_s(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() / reps as f64
}

fn tiny(guidance: f64, b: usize, reps: usize) {
    let dev = Device::Cpu;
    let lrm = LatentRewardModel::load(
        Path::new("tests/fixtures/tiny-lrm"),
        LrmOptions {
            guidance_scale: guidance,
            ..LrmOptions::default()
        },
        &dev,
    )
    .unwrap();
    let x = SeededRng::new(0).randn((b, 4, 16, 16), &dev).unwrap();
    let prompts: Vec<String> = (0..b).map(|i| format!("a photo of thing {i}")).collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let ids = lrm.tokenize(&refs).unwrap();
    let t = Tensor::new(vec![500i64; b], &dev).unwrap();
    let s = time_s(reps, || {
        lrm.score(&x, &ids, &t).unwrap();
    });
    println!(
        "tiny-lrm, guidance {guidance}: batch {b}, 16x16 latents (text encoded per call): {:.1} ms/batch, {:.1} scores/s",
        s * 1e3,
        b as f64 / s
    );
}

fn sd15(guidance: f64, b: usize, reps: usize) {
    let dev = Device::Cpu;
    let text = std::fs::read_to_string("tests/fixtures/configs/sd15.json").unwrap();
    let cfg = UNetConfig::from_json(&text, "tests/fixtures/configs/sd15.json").unwrap();
    let unet = UNet2DConditionModel::random(cfg, 0, DType::F32, &dev, WeightMode::Frozen).unwrap();
    let params = unet.param_count();
    let encoder = ClipTextModel::load(
        Path::new("tests/fixtures/tiny-sd/text_encoder"),
        DType::F32,
        &dev,
        WeightMode::Frozen,
    )
    .unwrap();
    let tokenizer = ClipTokenizer::load(Path::new("tests/fixtures/tiny-sd/tokenizer")).unwrap();
    let options = LrmOptions {
        guidance_scale: guidance,
        ..LrmOptions::default()
    };
    let lrm = LatentRewardModel::with_random_projections(
        unet,
        TextSide::Sd { encoder, tokenizer },
        768,
        1,
        options,
        Path::new("random-sd15"),
    )
    .unwrap();
    let mut rng = SeededRng::new(2);
    let cond = TextConditioning {
        hidden: rng.randn((b, 77, 768), &dev).unwrap(),
        uncond_hidden: if guidance > 1.0 {
            Some(rng.randn((b, 77, 768), &dev).unwrap())
        } else {
            None
        },
        features: rng.randn((b, 768), &dev).unwrap(),
        added: None,
        uncond_added: None,
    };
    let x = rng.randn((b, 4, 32, 32), &dev).unwrap();
    let t = Tensor::new(vec![500i64; b], &dev).unwrap();
    let s = time_s(reps, || {
        lrm.score_with(&x, &cond, &t).unwrap();
    });
    println!(
        "SD1.5-shaped LRM ({:.0}M UNet params, random), guidance {guidance}: batch {b}, 32x32 latents: {:.1} ms/batch, {:.2} scores/s",
        params as f64 / 1e6,
        s * 1e3,
        b as f64 / s
    );
}

fn main() {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("{cpus} CPUs available");
    tiny(1.0, 8, 10);
    tiny(7.5, 8, 10);
    sd15(1.0, 2, 2);
    sd15(7.5, 2, 2);
}
