//! Scorer throughput (not a test): a batch of 512x512 images scored by the real architectures
//! with random weights, on the CPU in f32 - ViT-H/14 (PickScore, HPSv2) and ViT-L/14 (aesthetic,
//! CLIP score). Reports preprocessing (Pillow-exact bicubic 512 -> 224 + normalisation) and the
//! model (image tower + text tower on 77 tokens) separately. Python counterpart:
//! benches/scorers_reference.py (transformers CLIPModel, same shapes, PIL processor).
//!
//! `cargo bench --bench scorers -- [vit-l|vit-h|all] [batch] [reps]` (default: vit-l 4 2).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use image::RgbImage;
use lpo::eval::scorers::preprocess::{normalize, to_square, Geometry, CLIP_MEAN, CLIP_STD};
use lpo::models::clip::{paired_cosine, ClipConfig, ClipModel};
use lpo::models::clip_text::ClipTextConfig;
use lpo::models::clip_vision::ClipVisionConfig;
use lpo::models::tokenizer::ClipTokenizer;

struct Arch {
    name: &'static str,
    vision: (usize, usize, usize, usize),
    text: (usize, usize, usize, usize),
    proj: usize,
    act: &'static str,
}

const ARCHS: [Arch; 2] = [
    Arch {
        name: "vit-l",
        vision: (1024, 4096, 24, 16),
        text: (768, 3072, 12, 12),
        proj: 768,
        act: "quick_gelu",
    },
    Arch {
        name: "vit-h",
        vision: (1280, 5120, 32, 16),
        text: (1024, 4096, 24, 16),
        proj: 1024,
        act: "gelu",
    },
];

fn config(a: &Arch) -> ClipConfig {
    let (vh, vi, vl, vn) = a.vision;
    let (th, ti, tl, tn) = a.text;
    ClipConfig {
        vision: ClipVisionConfig {
            hidden_size: vh,
            intermediate_size: vi,
            num_hidden_layers: vl,
            num_attention_heads: vn,
            num_channels: 3,
            image_size: 224,
            patch_size: 14,
            hidden_act: a.act.into(),
            layer_norm_eps: 1e-5,
        },
        text: ClipTextConfig {
            vocab_size: 49408,
            hidden_size: th,
            intermediate_size: ti,
            num_hidden_layers: tl,
            num_attention_heads: tn,
            max_position_embeddings: 77,
            hidden_act: a.act.into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
            projection_dim: Some(a.proj),
            architectures: None,
        },
        projection_dim: a.proj,
    }
}

fn images(b: usize) -> Vec<RgbImage> {
    (0..b)
        .map(|i| {
            RgbImage::from_fn(512, 512, |x, y| {
                image::Rgb([
                    ((x * 7 + y * 3 + i as u32 * 11) % 256) as u8,
                    ((x ^ y) % 256) as u8,
                    (((x as f32 / 9.0).sin() * 120.0 + 128.0) as u8),
                ])
            })
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let which = args.first().map(String::as_str).unwrap_or("vit-l");
    let batch: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let dev = Device::Cpu;
    let tok = ClipTokenizer::load(Path::new("tests/fixtures/tiny-sd/tokenizer")).unwrap();
    let imgs = images(batch);
    let prompts: Vec<String> = (0..batch)
        .map(|i| format!("a photo of a cat number {i}, highly detailed"))
        .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    println!(
        "threads: {} (RAYON_NUM_THREADS / all cores)",
        rayon::current_num_threads()
    );

    // Preprocessing alone (the same for every architecture).
    let t0 = Instant::now();
    for _ in 0..reps {
        let sq: Vec<RgbImage> = imgs
            .iter()
            .map(|im| to_square(im, 224, Geometry::HfCrop).unwrap())
            .collect();
        normalize(&sq, CLIP_MEAN, CLIP_STD, &dev).unwrap();
    }
    let pre = t0.elapsed().as_secs_f64() / reps as f64;
    println!(
        "preprocess {batch} x 512x512 -> 224 (Pillow bicubic + crop + normalise): {:.1} ms/batch",
        pre * 1e3
    );

    for a in ARCHS.iter().filter(|a| which == "all" || which == a.name) {
        let t = Instant::now();
        let clip = ClipModel::random(config(a), 0, DType::F32, &dev).unwrap();
        println!(
            "{}: {:.0} M params, built in {:.1} s",
            a.name,
            clip.param_count() as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        let sq: Vec<RgbImage> = imgs
            .iter()
            .map(|im| to_square(im, 224, Geometry::HfCrop).unwrap())
            .collect();
        let px = normalize(&sq, CLIP_MEAN, CLIP_STD, &dev).unwrap();
        let ids = tok.encode(&refs).unwrap();
        let run = || {
            let img = clip.image_embeds(&px).unwrap();
            let txt = clip.text_embeds(&ids).unwrap();
            paired_cosine(&img, &txt).unwrap()
        };
        run(); // warm-up
        let t = Instant::now();
        for _ in 0..reps {
            run();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{}: score batch {batch} (image + text towers): {:.2} s/batch, {:.2} s/image; with preprocessing {:.2} images/s",
            a.name,
            s,
            s / batch as f64,
            batch as f64 / (s + pre)
        );
    }
}
