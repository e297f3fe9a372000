//! LRM pieces that need no UNet: the pair loss against the golden PyTorch values, and
//! projections from PyTorch `state_dict.pt` files.

mod common;
use common::max_diff;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use lpo::reward::pair_loss::{pair_loss, validate_labels, LossType, PairLossOptions};
use lpo::reward::projections::Projections;

fn golden(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("tests/fixtures/golden/{name}"), &Device::Cpu).unwrap()
}

#[test]
fn pair_loss_matches_golden_including_ties_weights_aux_and_gradient() {
    let g = golden("lrm_pair_loss.safetensors");
    let proj = golden("../tiny-lrm/projections.safetensors");
    let logit_scale = Var::from_tensor(&proj["logit_scale"]).unwrap();
    let run = |aux: f64| {
        pair_loss(
            &g["text_features_normed"],
            &g["image_0_features_normed"],
            &g["image_1_features_normed"],
            logit_scale.as_tensor(),
            &g["label_0"],
            &g["label_1"],
            &g["num_examples_per_prompt"],
            &g["timesteps"],
            PairLossOptions {
                aux_loss_coeff: aux,
                ..PairLossOptions::default()
            },
        )
        .unwrap()
    };
    let out = run(1.0);
    assert!(max_diff(&out.logits, &g["pair_logits"]) < 1e-4);
    assert!(max_diff(&out.per_pair, &g["loss_per_pair"]) < 1e-4);
    assert!(max_diff(&out.weight, &g["weight"]) < 1e-6);
    assert!(max_diff(&out.loss, &g["loss"]) < 1e-4);
    let grads = out.loss.backward().unwrap();
    let grad = grads
        .get(logit_scale.as_tensor())
        .expect("logit_scale gets a gradient");
    assert!(
        max_diff(grad, &g["grad_logit_scale"]) < 1e-4,
        "{grad} vs {}",
        g["grad_logit_scale"]
    );
    let aux = run(0.5);
    assert!(max_diff(&aux.loss, &g["loss_aux_coeff_0p5"]) < 1e-4);
    // The tie (pair 2) costs exactly 0 when its two logits are equal.
    let same = g["text_features_normed"].narrow(0, 2, 1).unwrap();
    let tie = pair_loss(
        &same,
        &same,
        &same,
        logit_scale.as_tensor(),
        &Tensor::new(&[0.5f32], &Device::Cpu).unwrap(),
        &Tensor::new(&[0.5f32], &Device::Cpu).unwrap(),
        &Tensor::new(&[1f32], &Device::Cpu).unwrap(),
        &Tensor::new(&[[1i64, 1]], &Device::Cpu).unwrap(),
        PairLossOptions::default(),
    )
    .unwrap();
    assert!(tie.loss.to_scalar::<f32>().unwrap().abs() < 1e-6);
}

#[test]
fn batch_and_both_loss_types_are_finite_and_ordered() {
    let g = golden("lrm_pair_loss.safetensors");
    let ls = Tensor::new(2.6592f32, &Device::Cpu).unwrap();
    let run = |loss_type| {
        pair_loss(
            &g["text_features_normed"],
            &g["image_0_features_normed"],
            &g["image_1_features_normed"],
            &ls,
            &g["label_0"],
            &g["label_1"],
            &g["num_examples_per_prompt"],
            &g["timesteps"],
            PairLossOptions {
                loss_type,
                batch_coeff: 0.5,
                aux_loss_coeff: 1.0,
            },
        )
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap()
    };
    let (pair, batch, both) = (
        run(LossType::Pair),
        run(LossType::Batch),
        run(LossType::Both),
    );
    assert!(batch.is_finite() && batch > 0.0);
    assert!((both - (pair + 0.5 * batch)).abs() < 1e-5);
}

#[test]
fn labels_must_sum_to_one() {
    assert!(validate_labels(&[1.0, 0.5], &[0.0, 0.5]).is_ok());
    let err = validate_labels(&[1.0, 0.7], &[0.0, 0.5]).unwrap_err();
    assert!(err.contains("pair 1"), "{err}");
}

#[test]
fn official_state_dict_loads_with_float_and_tensor_logit_scale() {
    let base = Path::new("tests/fixtures/state_dict");
    let f = Projections::load(
        &base.join("float_logit"),
        "visual_projection.weight",
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(f.visual.dims(), [2, 3]);
    assert_eq!(f.visual.to_vec2::<f32>().unwrap()[1], vec![0.3, 0.4, 0.5]);
    assert_eq!(f.text.as_ref().unwrap().dims(), [2, 4]);
    assert_eq!(f.logit_scale.to_scalar::<f32>().unwrap(), 2.5);
    let t = Projections::load(
        &base.join("tensor_logit"),
        "visual_projection.weight",
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(t.logit_scale.to_scalar::<f32>().unwrap(), 3.25);
    let err = format!(
        "{:#}",
        Projections::load(base, "visual_projection.weight", DType::F32, &Device::Cpu).unwrap_err()
    );
    assert!(
        err.contains("state_dict.pt") || err.contains("projections.safetensors"),
        "{err}"
    );
}
