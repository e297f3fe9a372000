//! LRM pieces that need no UNet: the pair loss against the golden PyTorch values and (for
//! loss types "batch" and "both") against a plain-f64 transcription of LPO's
//! `step_clip_criterion`, with finite-difference gradients; projections from PyTorch
//! `state_dict.pt` files.

mod common;
use common::max_diff;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use lpo::reward::pair_loss::{pair_loss, validate_labels, LossType, PairLossOptions};
use lpo::reward::projections::Projections;
use lpo::tensor::grad::finite_difference_check;
use lpo::tensor::SeededRng;

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

/// Random pair-loss inputs: ties, a soft label, unequal prompt weights, pairs at equal and
/// at different timesteps.
struct Case {
    text: Vec<Vec<f64>>,
    image_0: Vec<Vec<f64>>,
    image_1: Vec<Vec<f64>>,
    logit_scale: f64,
    label_0: Vec<f64>,
    label_1: Vec<f64>,
    num_examples: Vec<f64>,
    timesteps: Vec<[i64; 2]>,
}

const N: usize = 6;
const DIM: usize = 5;

fn random_case(seed: u64) -> Case {
    let mut rng = SeededRng::new(seed);
    let mut rows = || -> Vec<Vec<f64>> {
        (0..N)
            .map(|_| rng.normal_vec(DIM).into_iter().map(f64::from).collect())
            .collect()
    };
    let (text, image_0, image_1) = (rows(), rows(), rows());
    let label_0 = vec![1.0, 0.0, 0.5, 0.7, 0.5, 0.0];
    Case {
        text,
        image_0,
        image_1,
        logit_scale: 10f64.ln(),
        label_1: label_0.iter().map(|l| 1.0 - l).collect(),
        label_0,
        num_examples: vec![1.0, 2.0, 3.0, 1.0, 4.0, 2.0],
        timesteps: vec![
            [500, 500],
            [300, 700],
            [10, 10],
            [900, 100],
            [250, 251],
            [0, 0],
        ],
    }
}

/// LPO's `StepCLIPCriterion.calc_loss` (lrm_15/trainer/criterions/step_clip_criterion.py)
/// transcribed loop by loop in f64: (loss, per-pair loss before weighting).
fn official_criterion(
    c: &Case,
    loss_type: &str,
    batch_coeff: f64,
    aux_coeff: f64,
) -> (f64, Vec<f64>) {
    let normalize = |v: &Vec<f64>| {
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / norm).collect::<Vec<f64>>()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    // torch.nn.functional.cross_entropy of one row of logits
    let cross_entropy = |row: &[f64], target: usize| {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln() - row[target]
    };
    let text: Vec<Vec<f64>> = c.text.iter().map(normalize).collect();
    let all_images: Vec<Vec<f64>> = c.image_0.iter().chain(&c.image_1).map(normalize).collect();
    let scale = c.logit_scale.exp();
    let n = text.len();
    // logits_per_image [2N, N], text_logits [N, 2N]
    let logits_per_image: Vec<Vec<f64>> = all_images
        .iter()
        .map(|im| text.iter().map(|t| scale * dot(im, t)).collect())
        .collect();
    let text_logits: Vec<Vec<f64>> = text
        .iter()
        .map(|t| all_images.iter().map(|im| scale * dot(t, im)).collect())
        .collect();
    let mut per_pair = Vec::new();
    for i in 0..n {
        let (l0, l1) = (c.label_0[i], c.label_1[i]);
        let tie = if l0 == l1 { 0.5f64.ln() } else { 0.0 };
        let batch_image_loss = l0 * cross_entropy(&logits_per_image[i], i)
            + l1 * cross_entropy(&logits_per_image[n + i], i);
        let batch_text_loss = l0 * cross_entropy(&text_logits[i], i)
            + l1 * cross_entropy(&text_logits[i], n + i)
            + tie;
        let batch_loss = (batch_image_loss + batch_text_loss) / 2.0;
        let pair_logits = [text_logits[i][i], text_logits[i][n + i]];
        let text_loss =
            l0 * cross_entropy(&pair_logits, 0) + l1 * cross_entropy(&pair_logits, 1) + tie;
        per_pair.push(match loss_type {
            "batch" => batch_loss,
            "pair" => text_loss,
            "both" => text_loss + batch_coeff * batch_loss,
            other => panic!("loss type {other}"),
        });
    }
    let absolute: Vec<f64> = c.num_examples.iter().map(|k| 1.0 / k).collect();
    let denominator: f64 = absolute.iter().sum();
    let loss = (0..n)
        .map(|i| {
            let aux = if c.timesteps[i][0] != c.timesteps[i][1] {
                aux_coeff
            } else {
                1.0
            };
            per_pair[i] * absolute[i] / denominator * aux
        })
        .sum();
    (loss, per_pair)
}

fn matrix(rows: &[Vec<f64>], dtype: DType) -> Tensor {
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn vector(v: &[f64], dtype: DType) -> Tensor {
    Tensor::new(v, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn loss_type_opts(name: &str, batch_coeff: f64, aux_loss_coeff: f64) -> PairLossOptions {
    PairLossOptions {
        loss_type: LossType::parse(name).unwrap(),
        batch_coeff,
        aux_loss_coeff,
    }
}

/// Our loss on `c` with the text / image features and logit_scale given as tensors.
fn ours(
    c: &Case,
    features: [&Tensor; 3],
    logit_scale: &Tensor,
    dtype: DType,
    opts: PairLossOptions,
) -> lpo::reward::pair_loss::PairLoss {
    let timesteps: Vec<i64> = c.timesteps.iter().flatten().copied().collect();
    pair_loss(
        features[0],
        features[1],
        features[2],
        logit_scale,
        &vector(&c.label_0, dtype),
        &vector(&c.label_1, dtype),
        &vector(&c.num_examples, dtype),
        &Tensor::from_vec(timesteps, (N, 2), &Device::Cpu).unwrap(),
        opts,
    )
    .unwrap()
}

#[test]
fn every_loss_type_matches_the_official_criterion_in_f64() {
    for seed in [1, 2, 3] {
        let c = random_case(seed);
        for dtype in [DType::F32, DType::F64] {
            let feats = [
                matrix(&c.text, dtype),
                matrix(&c.image_0, dtype),
                matrix(&c.image_1, dtype),
            ];
            let scale = Tensor::new(c.logit_scale, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
            for (loss_type, coeff, aux) in [
                ("pair", 1.0, 0.3),
                ("batch", 1.0, 0.3),
                ("batch", 1.0, 1.0),
                ("both", 0.7, 0.3),
                ("both", 1.0, 2.5),
            ] {
                let (want, want_per_pair) = official_criterion(&c, loss_type, coeff, aux);
                let out = ours(
                    &c,
                    [&feats[0], &feats[1], &feats[2]],
                    &scale,
                    dtype,
                    loss_type_opts(loss_type, coeff, aux),
                );
                let got = out
                    .loss
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let what = format!("seed {seed} {dtype:?} {loss_type} coeff {coeff} aux {aux}");
                assert!(
                    (got - want).abs() <= tol * (1.0 + want.abs()),
                    "{what}: loss {got} vs official {want}"
                );
                let per_pair = out
                    .per_pair
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                for (i, (g, w)) in per_pair.iter().zip(&want_per_pair).enumerate() {
                    assert!(
                        (g - w).abs() <= tol * (1.0 + w.abs()),
                        "{what}: per_pair[{i}] {g} vs official {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn batch_and_both_gradients_match_finite_differences() {
    let c = random_case(4);
    let dtype = DType::F64;
    let vars = [
        Var::from_tensor(&matrix(&c.text, dtype)).unwrap(),
        Var::from_tensor(&matrix(&c.image_0, dtype)).unwrap(),
        Var::from_tensor(&matrix(&c.image_1, dtype)).unwrap(),
        Var::from_tensor(&Tensor::new(c.logit_scale, &Device::Cpu).unwrap()).unwrap(),
    ];
    for (loss_type, coeff) in [("batch", 1.0), ("both", 0.7)] {
        let f = || -> anyhow::Result<Tensor> {
            Ok(ours(
                &c,
                [
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                ],
                vars[3].as_tensor(),
                dtype,
                loss_type_opts(loss_type, coeff, 0.3),
            )
            .loss)
        };
        for (v, var) in vars.iter().enumerate() {
            let indices: Vec<usize> = (0..var.elem_count()).collect();
            let pairs = finite_difference_check(f, var, &indices, 1e-5).unwrap();
            for (i, (analytic, numeric)) in pairs.into_iter().enumerate() {
                assert!(
                    (analytic - numeric).abs() <= 1e-7 * (1.0 + numeric.abs()),
                    "{loss_type}: input {v} element {i}: autograd {analytic} vs finite difference {numeric}"
                );
            }
        }
    }
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
