//! Sliced attention (queries in blocks) gives the unsliced result: the golden UNet outputs hold
//! with a slice so small that every attention layer is cut into many blocks. Its own test
//! binary, since the slice size is process-wide.

use candle_core::{DType, Device};
use lpo::models::loading::WeightMode;
use lpo::models::unet::attention::set_attention_slice;
use lpo::models::unet::UNet2DConditionModel;

#[test]
fn sliced_attention_matches_golden_and_unsliced() {
    let g = candle_core::safetensors::load(
        "tests/fixtures/golden/unet_tiny_lrm.safetensors",
        &Device::Cpu,
    )
    .unwrap();
    let unet = UNet2DConditionModel::load(
        std::path::Path::new("tests/fixtures/tiny-lrm/unet"),
        DType::F32,
        &Device::Cpu,
        WeightMode::Frozen,
    )
    .unwrap();
    let run = || {
        unet.forward(
            &g["latents"],
            &g["timesteps"],
            &g["encoder_hidden_states"],
            None,
        )
        .unwrap()
    };
    let whole = run();
    // 2 rows x heads x 256 keys per query: a slice of 700 elements is one query row at a time.
    set_attention_slice(700);
    let sliced = run();
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(diff(&whole, &sliced) < 1e-5, "sliced differs from unsliced");
    assert!(
        diff(&sliced, &g["noise_pred"]) < 1e-4,
        "sliced differs from the reference"
    );
}
