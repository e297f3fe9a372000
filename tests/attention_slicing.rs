//! Sliced attention (queries in blocks) gives the unsliced result: the golden UNet outputs hold
//! with a slice so small that every attention layer is cut into many blocks, and with a graph
//! (sliced attention then recomputes its slices in backward) every weight's gradient equals the
//! unsliced one. Its own test binary, since the slice size is process-wide.

mod common;

use candle_core::{DType, Device};
use common::{max_abs, max_diff};
use lpo::models::loading::WeightMode;
use lpo::models::unet::attention::set_attention_slice;
use lpo::models::unet::UNet2DConditionModel;

/// The slice size is process-wide: the tests take turns.
static SLICE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

type Golden = std::collections::HashMap<String, candle_core::Tensor>;

/// The golden tiny-lrm UNet tensors and the UNet itself, loaded `mode`.
fn golden_unet(mode: WeightMode) -> (Golden, UNet2DConditionModel) {
    let g = candle_core::safetensors::load(
        "tests/fixtures/golden/unet_tiny_lrm.safetensors",
        &Device::Cpu,
    )
    .unwrap();
    let unet = UNet2DConditionModel::load(
        std::path::Path::new("tests/fixtures/tiny-lrm/unet"),
        DType::F32,
        &Device::Cpu,
        mode,
    )
    .unwrap();
    (g, unet)
}

#[test]
fn sliced_attention_matches_golden_and_unsliced() {
    let _turn = SLICE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    set_attention_slice(lpo::models::unet::attention::ATTENTION_SLICE_ELEMENTS);
    let (g, unet) = golden_unet(WeightMode::Frozen);
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
    assert!(
        max_diff(&whole, &sliced) < 1e-5,
        "sliced differs from unsliced"
    );
    assert!(
        max_diff(&sliced, &g["noise_pred"]) < 1e-4,
        "sliced differs from the reference"
    );
}

#[test]
fn recomputed_attention_gradients_equal_the_unsliced_ones() {
    use lpo::models::unet::checkpointed_attention::recomputed_backwards;
    let _turn = SLICE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (g, unet) = golden_unet(WeightMode::Trainable);
    let vars = unet.trainable_vars();
    // A loss that weights every output element differently, so no gradient cancels by symmetry.
    let w = g["noise_pred"].clone();
    let grads = || {
        let out = unet
            .forward(
                &g["latents"],
                &g["timesteps"],
                &g["encoder_hidden_states"],
                None,
            )
            .unwrap();
        let loss = (out * &w).unwrap().sum_all().unwrap();
        let store = lpo::tensor::recompute::backward(&loss).unwrap();
        vars.iter()
            .map(|(name, v)| {
                let gr = store
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name} has no gradient"))
                    .clone();
                (name.clone(), gr)
            })
            .collect::<Vec<_>>()
    };
    set_attention_slice(lpo::models::unet::attention::ATTENTION_SLICE_ELEMENTS);
    let before = recomputed_backwards();
    let whole = grads();
    let after_whole = recomputed_backwards();
    assert!(
        after_whole > before,
        "attention with a graph kept its scores instead of recomputing them"
    );
    set_attention_slice(700);
    let recomputed = grads();
    assert!(
        recomputed_backwards() > after_whole,
        "sliced attention with a graph did not recompute"
    );
    let mut attention_grads = 0;
    for ((name, a), (_, b)) in whole.iter().zip(&recomputed) {
        let scale = max_abs(a).max(1e-6);
        let rel = max_abs(&(a - b).unwrap()) / scale;
        assert!(
            rel < 1e-4,
            "{name}: recomputed gradient differs by {rel} (relative)"
        );
        if name.contains("attn1.to_q") || name.contains("attn1.to_k") {
            assert!(
                max_abs(b) > 0.0,
                "{name}: zero gradient through the recomputed attention"
            );
            attention_grads += 1;
        }
    }
    assert!(attention_grads > 0, "no self-attention weights checked");
}
