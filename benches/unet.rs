//! UNet forward and forward+backward timings (not a test): the tiny-lrm UNet (batch 4, 16x16)
//! and an SD1.5-shaped random UNet at 32x32 latents (batch 1). `cargo bench --bench unet`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lpo::bench::timed;
use lpo::models::loading::WeightMode;
use lpo::models::unet::{UNet2DConditionModel, UNetConfig};
use lpo::tensor::SeededRng;

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs available (nproc), {model}")
}

fn bench(
    name: &str,
    unet: &UNet2DConditionModel,
    trainable: &UNet2DConditionModel,
    b: usize,
    hw: usize,
    tokens: usize,
    reps: usize,
) {
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(0);
    let x = rng.randn((b, 4, hw, hw), &dev).unwrap();
    let cross = unet.config.plan().unwrap().cross_dims[0];
    let ehs = rng.randn((b, tokens, cross), &dev).unwrap();
    let t = Tensor::new(vec![500i64; b], &dev).unwrap();
    let fwd = timed(&dev, reps, || unet.forward(&x, &t, &ehs, None)).unwrap();
    let feat = timed(&dev, reps, || unet.features(&x, &t, &ehs, None)).unwrap();
    let fb = timed(&dev, reps, || {
        let out = trainable.forward(&x, &t, &ehs, None)?;
        Ok(out.sqr()?.mean_all()?.backward()?)
    })
    .unwrap();
    println!(
        "{name}: batch {b}, {hw}x{hw} latents, {tokens} tokens, {:.1}M params: forward {fwd:.1} ms, features {feat:.1} ms, forward+backward (all weights trainable) {fb:.1} ms",
        unet.param_count() as f64 / 1e6
    );
}

fn main() {
    println!("machine: {}", machine());
    let dev = Device::Cpu;
    let dir = Path::new("tests/fixtures/tiny-lrm/unet");
    let frozen = UNet2DConditionModel::load(dir, DType::F32, &dev, WeightMode::Frozen).unwrap();
    let trainable =
        UNet2DConditionModel::load(dir, DType::F32, &dev, WeightMode::Trainable).unwrap();
    bench("tiny-lrm UNet", &frozen, &trainable, 4, 16, 77, 10);

    let text = std::fs::read_to_string("tests/fixtures/configs/sd15.json").unwrap();
    let cfg = UNetConfig::from_json(&text, "tests/fixtures/configs/sd15.json").unwrap();
    let frozen =
        UNet2DConditionModel::random(cfg.clone(), 0, DType::F32, &dev, WeightMode::Frozen).unwrap();
    let trainable =
        UNet2DConditionModel::random(cfg, 0, DType::F32, &dev, WeightMode::Trainable).unwrap();
    bench(
        "SD1.5-shaped UNet (random weights)",
        &frozen,
        &trainable,
        1,
        32,
        77,
        2,
    );
}
