//! Gradients of a trainable LRM (tests/fixtures/tiny-lrm in f64): the pair loss gives every
//! trainable tensor a gradient (and the decoder half of the UNet is not trainable), and
//! sampled entries of the projections, logit_scale and UNet weights agree with central finite
//! differences.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use lpo::reward::lrm::{LatentRewardModel, LrmOptions, PromptIds};
use lpo::reward::pair_loss::PairLossOptions;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use lpo::tensor::SeededRng;

const LRM: &str = "tests/fixtures/tiny-lrm";

struct Inputs {
    ids: PromptIds,
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    label_0: Tensor,
    label_1: Tensor,
    num: Tensor,
}

fn model() -> LatentRewardModel {
    LatentRewardModel::load(
        Path::new(LRM),
        LrmOptions {
            dtype: DType::F64,
            trainable: true,
            guidance_scale: 3.0,
            ..LrmOptions::default()
        },
        &Device::Cpu,
    )
    .unwrap()
}

fn inputs(lrm: &LatentRewardModel) -> Inputs {
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(3);
    let x0 = rng
        .randn((2, 4, 16, 16), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let x1 = rng
        .randn((2, 4, 16, 16), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    Inputs {
        ids: lrm.tokenize(&["a red circle", "a blue square"]).unwrap(),
        x0,
        x1,
        // pair 1 has its two images at different timesteps (the aux pairs)
        t: Tensor::new(&[[51i64, 51], [501, 901]], &dev).unwrap(),
        label_0: Tensor::new(&[1f32, 0.0], &dev).unwrap(),
        label_1: Tensor::new(&[0f32, 1.0], &dev).unwrap(),
        num: Tensor::new(&[1f32, 2.0], &dev).unwrap(),
    }
}

fn l2n(x: &Tensor) -> Tensor {
    x.broadcast_div(
        &x.sqr()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .sqrt()
            .unwrap(),
    )
    .unwrap()
}

/// The pair loss (pair type, aux coefficient 1) computed in f64 from the LRM's own features,
/// so finite differences are not limited by f32 rounding.
fn loss64(lrm: &LatentRewardModel, i: &Inputs) -> Tensor {
    let cond = lrm.encode_text(&i.ids).unwrap();
    let both = LatentRewardModel::repeat_conditioning(&cond, 2).unwrap();
    let x = Tensor::cat(&[&i.x0, &i.x1], 0).unwrap();
    let t = Tensor::cat(
        &[
            &i.t.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(),
            &i.t.narrow(1, 1, 1).unwrap().squeeze(1).unwrap(),
        ],
        0,
    )
    .unwrap();
    let img = l2n(&lrm.image_features(&x, &t, &both).unwrap());
    let txt = l2n(&cond.features);
    let s0 = (&txt * img.narrow(0, 0, 2).unwrap())
        .unwrap()
        .sum(1)
        .unwrap();
    let s1 = (&txt * img.narrow(0, 2, 2).unwrap())
        .unwrap()
        .sum(1)
        .unwrap();
    let scale = lrm.scale().unwrap().to_dtype(DType::F64).unwrap();
    let logits = Tensor::stack(&[s0, s1], 1)
        .unwrap()
        .broadcast_mul(&scale)
        .unwrap();
    let lsm = logits
        .broadcast_sub(&logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap())
        .unwrap();
    let l0 = i.label_0.to_dtype(DType::F64).unwrap();
    let l1 = i.label_1.to_dtype(DType::F64).unwrap();
    let per = ((l0 * lsm.narrow(1, 0, 1).unwrap().squeeze(1).unwrap()).unwrap()
        + (l1 * lsm.narrow(1, 1, 1).unwrap().squeeze(1).unwrap()).unwrap())
    .unwrap()
    .neg()
    .unwrap();
    let inv = i.num.to_dtype(DType::F64).unwrap().recip().unwrap();
    let w = inv.broadcast_div(&inv.sum_all().unwrap()).unwrap();
    (per * w).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn every_trainable_tensor_gets_a_gradient_and_up_blocks_are_not_trainable() {
    let lrm = model();
    let vars = lrm.trainable_vars();
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"visual_projection.weight"));
    assert!(names.contains(&"text_projection.weight"));
    assert!(names.contains(&"logit_scale"));
    assert!(names.iter().any(|n| n.starts_with("unet.down_blocks.")));
    assert!(names.iter().any(|n| n.starts_with("unet.mid_block.")));
    for n in &names {
        assert!(
            !LatentRewardModel::unused_unet_tensor(n),
            "{n} is never run by the LRM but is listed as trainable"
        );
        assert!(
            !n.starts_with("text_encoder."),
            "text encoder is frozen: {n}"
        );
    }
    let i = inputs(&lrm);
    let out = lrm
        .pair_loss(
            &i.ids,
            &i.x0,
            &i.x1,
            &i.t,
            &i.label_0,
            &i.label_1,
            &i.num,
            PairLossOptions::default(),
        )
        .unwrap();
    // the library's pair loss (f32 logits) and the f64 one used below agree
    let l64 = scalar(&loss64(&lrm, &i));
    let l32 = scalar(&out.loss);
    assert!(
        (l64 - l32).abs() < 1e-5,
        "pair_loss {l32} vs f64 loss {l64}"
    );
    let grads = out.loss.backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = scalar(&g.abs().unwrap().sum_all().unwrap());
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn finite_differences_agree_on_projections_logit_scale_and_unet_weights() {
    let lrm = model();
    let i = inputs(&lrm);
    let vars = lrm.trainable_vars();
    let wanted = [
        "visual_projection.weight",
        "text_projection.weight",
        "logit_scale",
        "unet.conv_in.weight",
        "unet.time_embedding.linear_1.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "unet.down_blocks.3.resnets.1.conv2.weight",
        "unet.mid_block.resnets.1.norm2.weight",
    ];
    let picked: Vec<&(String, Var)> = vars
        .iter()
        .filter(|(n, _)| wanted.contains(&n.as_str()))
        .collect();
    assert_eq!(picked.len(), wanted.len(), "all sampled tensors exist");
    let grads = loss64(&lrm, &i).backward().unwrap();
    let eps = 1e-6;
    let mut rng = SeededRng::new(11);
    for (name, var) in picked {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(var.dtype(), DType::F64, "{name}");
        let orig = var.as_tensor().copy().unwrap();
        let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        // entries with a sizable gradient, so the relative check means something
        let mut idx: Vec<usize> = (0..flat.len()).collect();
        idx.sort_by(|a, b| g[*b].abs().partial_cmp(&g[*a].abs()).unwrap());
        let top = idx.len().min(8);
        for _ in 0..2 {
            let k = idx[rng.int_in(0, top as i64) as usize];
            let eval = |delta: f64| {
                let mut v = flat.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                scalar(&loss64(&lrm, &i))
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&orig).unwrap();
            let err = (fd - g[k]).abs();
            assert!(
                err <= 1e-7 + 1e-4 * g[k].abs().max(fd.abs()),
                "{name}[{k}]: analytic {} vs finite difference {fd}",
                g[k]
            );
            assert!(g[k].abs() > 1e-9, "{name}[{k}]: gradient is zero");
        }
    }
}

#[test]
fn params_binding_feeds_adamw_and_a_step_changes_the_score() {
    let se = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    );
    let script = r#"
        let lrm = load_lrm("tests/fixtures/tiny-lrm", #{trainable: true, guidance_scale: 1.0});
        let p = lrm.params();
        if p.names() != lrm.trainable_names() { throw "params and trainable_names differ"; }
        for n in p.names() {
            if n.starts_with("unet.up_blocks") || n.starts_with("unet.conv_out") { throw `trainable: ${n}`; }
        }
        let opt = adamw(p, #{lr: 1e-3, max_grad_norm: 1.0});
        let r = rng(0);
        let x0 = r.randn([2, 4, 8, 8]);
        let x1 = r.randn([2, 4, 8, 8]);
        let t = tensor([[1, 1], [1, 1]]);
        let prompts = ["a", "b"];
        let before = lrm.score(x0, prompts, 1);
        let out = lrm.pair_loss(prompts, x0, x1, t, tensor([1.0, 0.0]), tensor([0.0, 1.0]), tensor([1.0, 1.0]), #{});
        opt.backward(out.loss);
        let missing = opt.missing_grads();
        if missing.len() != 0 { throw `no gradient: ${missing}`; }
        let info = opt.step();
        let after = lrm.score(x0, prompts, 1);
        max_abs_diff(before, after)
    "#;
    let d = se
        .engine
        .eval::<f64>(script)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(d > 0.0, "a step changed nothing");
}
