//! Memory-lean training graphs: fused norm/GEGLU/frozen-layer nodes and block checkpointing
//! give the gradients plain autograd gives, every trainable tensor still gets one, and a
//! backward outside `recompute::backward` is an error rather than a silent loss.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use lpo::models::frozen_layer::{self, LowRank};
use lpo::models::loading::WeightMode;
use lpo::models::lora::{LayerKind, LoraConfig};
use lpo::models::nn::{GroupNorm, LayerNorm};
use lpo::models::unet::UNet2DConditionModel;
use lpo::tensor::grad::{finite_difference_check, vars_without_grad};
use lpo::tensor::recompute::{backward, recompute};
use lpo::tensor::SeededRng;

const SD: &str = "tests/fixtures/tiny-sd/unet";

fn randn(rng: &mut SeededRng, dims: &[usize]) -> Tensor {
    rng.randn(dims, &Device::Cpu).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    let d = d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let s = s.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    d / s.max(1e-12)
}

/// Gradients of <f(x), probe> w.r.t. every var, through `recompute::backward`.
fn grads_of(out: &Tensor, probe: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
    let grads = backward(&(out * probe).unwrap().sum_all().unwrap()).unwrap();
    vars.iter()
        .map(|v| grads.get(v.as_tensor()).expect("gradient").clone())
        .collect()
}

fn vb_from(tensors: Vec<(&str, Tensor)>) -> VarBuilder<'static> {
    let map = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
}

/// The fused GroupNorm(+SiLU) node: same value as the composed ops, and gradients of the input
/// and of trainable weight/bias that agree with central differences.
#[test]
fn group_norm_node_matches_finite_differences() {
    let mut rng = SeededRng::new(1);
    let x = Var::from_tensor(&randn(&mut rng, &[2, 8, 3, 3])).unwrap();
    let weight = Var::from_tensor(&(randn(&mut rng, &[8]) + 1.0).unwrap()).unwrap();
    let bias = Var::from_tensor(&randn(&mut rng, &[8])).unwrap();
    let vb = vb_from(vec![
        ("weight", weight.as_tensor().clone()),
        ("bias", bias.as_tensor().clone()),
    ]);
    let norm = GroupNorm::new(4, 8, 1e-5, vb).unwrap();
    let probe = randn(&mut rng, &[2, 8, 3, 3]);
    for silu in [false, true] {
        let f = || -> anyhow::Result<Tensor> {
            let y = if silu {
                norm.forward_silu(x.as_tensor())?
            } else {
                norm.forward(x.as_tensor())?
            };
            Ok((y * &probe)?.sum_all()?)
        };
        for var in [&x, &weight, &bias] {
            let pairs = finite_difference_check(f, var, &[0, 3, 7], 1e-2).unwrap();
            for (analytic, numeric) in pairs {
                assert!(
                    (analytic - numeric).abs() < 2e-2 * (1.0 + numeric.abs()),
                    "silu {silu}: analytic {analytic} vs numeric {numeric}"
                );
            }
        }
    }
}

/// LayerNorm as one node: gradients equal the composed autograd ones.
#[test]
fn layer_norm_node_matches_autograd() {
    let mut rng = SeededRng::new(2);
    let x = Var::from_tensor(&randn(&mut rng, &[3, 5, 16])).unwrap();
    let w = Var::from_tensor(&randn(&mut rng, &[16])).unwrap();
    let b = Var::from_tensor(&randn(&mut rng, &[16])).unwrap();
    let probe = randn(&mut rng, &[3, 5, 16]);
    let ln = LayerNorm::from_tensors(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
    let fused = grads_of(&ln.forward(x.as_tensor()).unwrap(), &probe, &[&x, &w, &b]);
    // The same formula as plain ops.
    let xt = x.as_tensor();
    let mean = xt.mean_keepdim(2).unwrap();
    let c = xt.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(2).unwrap();
    let plain = c
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(w.as_tensor())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    let expected = grads_of(&plain, &probe, &[&x, &w, &b]);
    for (name, (f, e)) in ["x", "weight", "bias"]
        .iter()
        .zip(fused.iter().zip(&expected))
    {
        let d = max_rel_diff(f, e);
        assert!(d < 1e-5, "{name}: relative difference {d}");
    }
}

/// A frozen linear / conv layer with an adapter as one node: dx, dA and dB equal the plain
/// autograd ones (where candle also computes the frozen weight's gradient), and the frozen
/// weight gets none.
#[test]
fn frozen_layer_node_matches_autograd() {
    let mut rng = SeededRng::new(3);
    // (kind, x, weight, A, B) shapes
    type Case = (LayerKind, Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>);
    let cases: Vec<Case> = vec![
        (
            LayerKind::Linear,
            vec![2, 5, 6],
            vec![7, 6],
            vec![3, 6],
            vec![7, 3],
        ),
        (
            LayerKind::Conv {
                stride: 1,
                padding: 1,
            },
            vec![2, 4, 5, 5],
            vec![6, 4, 3, 3],
            vec![2, 4, 3, 3],
            vec![6, 2, 1, 1],
        ),
        (
            LayerKind::Conv {
                stride: 2,
                padding: 1,
            },
            vec![2, 4, 6, 6],
            vec![3, 4, 3, 3],
            vec![2, 4, 3, 3],
            vec![3, 2, 1, 1],
        ),
        (
            LayerKind::Conv {
                stride: 1,
                padding: 0,
            },
            vec![3, 4, 4, 4],
            vec![5, 4, 1, 1],
            vec![2, 4, 1, 1],
            vec![5, 2, 1, 1],
        ),
    ];
    for (kind, xd, wd, ad, bd) in cases {
        let x = Var::from_tensor(&randn(&mut rng, &xd)).unwrap();
        let weight = randn(&mut rng, &wd);
        let bias = randn(&mut rng, &[wd[0]]);
        let a = Var::from_tensor(&randn(&mut rng, &ad)).unwrap();
        let b = Var::from_tensor(&randn(&mut rng, &bd)).unwrap();
        let low_rank = LowRank {
            a: a.as_tensor(),
            b: b.as_tensor(),
            scale: 1.5,
        };
        let fused =
            frozen_layer::forward(kind, &weight, Some(&bias), Some(&low_rank), x.as_tensor())
                .unwrap();
        let wv = Var::from_tensor(&weight).unwrap();
        let plain = frozen_layer::eval(
            kind,
            wv.as_tensor(),
            Some(&bias),
            Some(&low_rank),
            x.as_tensor(),
        )
        .unwrap();
        assert!(max_rel_diff(&fused, &plain) < 1e-6, "{kind:?}: forward");
        let probe = randn(&mut rng, fused.dims());
        let grads = backward(&(&fused * &probe).unwrap().sum_all().unwrap()).unwrap();
        assert!(
            grads.get(&weight).is_none(),
            "{kind:?}: frozen weight got a gradient"
        );
        let expected = grads_of(&plain, &probe, &[&x, &a, &b]);
        for (name, (var, e)) in ["x", "A", "B"]
            .iter()
            .zip([&x, &a, &b].iter().zip(&expected))
        {
            let g = grads.get(var.as_tensor()).expect("gradient");
            let d = max_rel_diff(g, e);
            assert!(d < 1e-5, "{kind:?} {name}: relative difference {d}");
        }
    }
}

/// Recomputation of a function that captures a variable: the captured variable's gradient
/// arrives through the side store, and a raw `backward()` says it would lose it.
#[test]
fn captured_variables_get_gradients_only_through_recompute_backward() {
    let mut rng = SeededRng::new(4);
    let w = Var::from_tensor(&randn(&mut rng, &[4, 4])).unwrap();
    let x = randn(&mut rng, &[3, 4]);
    let captured = w.clone();
    let f = Arc::new(move |t: &[Tensor]| t[0].matmul(captured.as_tensor())?.tanh());
    let out = recompute("test-block", &[&x], f).unwrap();
    let probe = randn(&mut rng, &[3, 4]);
    let loss = (&out * &probe).unwrap().sum_all().unwrap();
    let grads = backward(&loss).unwrap();
    let plain = x.matmul(w.as_tensor()).unwrap().tanh().unwrap();
    let expected = grads_of(&plain, &probe, &[&w]);
    let d = max_rel_diff(
        grads.get(w.as_tensor()).expect("captured gradient"),
        &expected[0],
    );
    assert!(d < 1e-6, "captured gradient differs by {d}");
    let err = loss
        .backward()
        .expect_err("raw backward must fail")
        .to_string();
    assert!(err.contains("recompute::backward"), "{err}");
}

fn tiny_unet(mode: WeightMode) -> UNet2DConditionModel {
    UNet2DConditionModel::load(Path::new(SD), DType::F32, &Device::Cpu, mode).unwrap()
}

struct Inputs {
    x: Tensor,
    t: Tensor,
    ehs: Tensor,
    probe: Tensor,
}

fn inputs() -> Inputs {
    // tiny-sd: 4 latent channels, text width 32.
    let mut rng = SeededRng::new(5);
    let x = randn(&mut rng, &[2, 4, 16, 16]);
    let ehs = randn(&mut rng, &[2, 7, 32]);
    let probe = randn(&mut rng, &[2, 4, 16, 16]);
    let t = Tensor::new(&[10f32, 700.], &Device::Cpu).unwrap();
    Inputs { x, t, ehs, probe }
}

/// LPO's pattern: policy forward with adapters on, reference forward with adapters off (no
/// graph), then backward of the policy's loss. Returns the trainable vars' gradients.
fn policy_step_grads(unet: &UNet2DConditionModel, i: &Inputs) -> Vec<(String, Tensor)> {
    unet.set_lora_enabled(true);
    let policy = unet.forward(&i.x, &i.t, &i.ehs, None).unwrap();
    unet.set_lora_enabled(false);
    let reference = unet.forward(&i.x, &i.t, &i.ehs, None).unwrap().detach();
    let loss = ((policy - reference).unwrap() * &i.probe)
        .unwrap()
        .sum_all()
        .unwrap();
    // Backward with the adapters still off: recomputed blocks must see them as their forward did.
    let grads = backward(&loss).unwrap();
    unet.set_lora_enabled(true);
    let vars = unet.trainable_vars();
    let missing = vars_without_grad(&vars, &grads, true).unwrap();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    vars.iter()
        .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect()
}

fn assert_same_grads(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    assert_eq!(a.len(), b.len());
    for ((name, ga), (_, gb)) in a.iter().zip(b) {
        let d = max_rel_diff(ga, gb);
        assert!(d < 1e-4, "{what}: {name} differs by {d} (relative)");
    }
}

/// Gradient checkpointing gives the gradients of the plain graph (within f32 rounding), for
/// LoRA on every layer and for a fully trainable UNet, and every trainable tensor gets one.
#[test]
fn gradient_checkpointing_keeps_every_gradient() {
    let i = inputs();
    let unet = tiny_unet(WeightMode::Frozen);
    unet.add_lora(&LoraConfig {
        rank: 2,
        alpha: 3.0,
        targets: vec!["all-linear".into(), "all-conv".into()],
        seed: 9,
    })
    .unwrap();
    // Adapters start with B = 0; step B away from zero so A gets gradients too.
    let mut rng = SeededRng::new(6);
    for (name, var) in unet.trainable_vars() {
        if name.contains("lora_B") {
            let noise = (randn(&mut rng, var.dims()) * 0.1).unwrap();
            var.set(&noise).unwrap();
        }
    }
    let plain = policy_step_grads(&unet, &i);
    unet.set_gradient_checkpointing(true);
    let checkpointed = policy_step_grads(&unet, &i);
    assert_same_grads(&plain, &checkpointed, "LoRA all layers");

    let full = tiny_unet(WeightMode::Trainable);
    let fi = Inputs {
        x: i.x.clone(),
        t: i.t.clone(),
        ehs: i.ehs.clone(),
        probe: i.probe.clone(),
    };
    let loss_grads = |unet: &UNet2DConditionModel| {
        let out = unet.forward(&fi.x, &fi.t, &fi.ehs, None).unwrap();
        let grads = backward(&(out * &fi.probe).unwrap().sum_all().unwrap()).unwrap();
        let vars = unet.trainable_vars();
        let missing = vars_without_grad(&vars, &grads, false).unwrap();
        assert!(missing.is_empty(), "no gradient for {missing:?}");
        vars.iter()
            .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
            .collect::<Vec<_>>()
    };
    let plain = loss_grads(&full);
    full.set_gradient_checkpointing(true);
    let checkpointed = loss_grads(&full);
    assert_same_grads(&plain, &checkpointed, "trainable UNet");
}

/// Checkpointing changes nothing without a graph: the reference (adapters off) and a frozen
/// forward give the same output bit for bit.
#[test]
fn gradient_checkpointing_leaves_inference_unchanged() {
    let i = inputs();
    let unet = tiny_unet(WeightMode::Frozen);
    let plain = unet.forward(&i.x, &i.t, &i.ehs, None).unwrap();
    unet.set_gradient_checkpointing(true);
    let checkpointed = unet.forward(&i.x, &i.t, &i.ehs, None).unwrap();
    assert_eq!(max_rel_diff(&plain, &checkpointed), 0.0);
    assert!(!checkpointed.track_op(), "a frozen forward keeps no graph");
}

mod common;

/// Scripts switch checkpointing on the UNet (`load_unet` option or property), the policy
/// (`lpo_policy` option) and the LRM (`load_lrm` option); a non-boolean value is an error
/// naming the option.
#[test]
fn scripts_switch_gradient_checkpointing() {
    let engine = common::engine();
    let on: bool = engine
        .eval(&format!(
            r#"let u = load_unet("{SD}", #{{gradient_checkpointing: true}}); u.gradient_checkpointing"#
        ))
        .unwrap();
    assert!(on);
    let toggled: bool = engine
        .eval(&format!(
            r#"let u = load_unet("{SD}"); let before = u.gradient_checkpointing;
               u.gradient_checkpointing = true; !before && u.gradient_checkpointing"#
        ))
        .unwrap();
    assert!(toggled);
    let policy_on: bool = engine
        .eval(&format!(
            r#"let u = load_unet("{SD}");
               let p = lpo_policy(u, #{{lora: #{{rank: 2}}, gradient_checkpointing: true}});
               p.unet.gradient_checkpointing"#
        ))
        .unwrap();
    assert!(policy_on);
    let err = engine
        .eval::<bool>(&format!(
            r#"load_unet("{SD}", #{{gradient_checkpointing: "yes"}}).gradient_checkpointing"#
        ))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gradient_checkpointing"), "{err}");
    let lrm: lpo::script::bindings::lrm::ScriptLrm = engine
        .eval(r#"load_lrm("tests/fixtures/tiny-lrm", #{gradient_checkpointing: true})"#)
        .unwrap();
    assert!(lrm.unet.gradient_checkpointing());
}

/// Attention whose backward recomputes the scores (in one block of queries or several) gives
/// the gradients of plain autograd through the head split, softmax and head merge.
#[test]
fn recomputed_attention_matches_autograd() {
    use lpo::models::unet::checkpointed_attention::{attend, multi_head_attention, HeadsConfig};
    let mut rng = SeededRng::new(8);
    let (heads, d) = (3, 4);
    let q = Var::from_tensor(&randn(&mut rng, &[2, 10, heads * d])).unwrap();
    let k = Var::from_tensor(&randn(&mut rng, &[2, 7, heads * d])).unwrap();
    let v = Var::from_tensor(&randn(&mut rng, &[2, 7, heads * d])).unwrap();
    let probe = randn(&mut rng, &[2, 10, heads * d]);
    let split = |x: &Tensor| {
        let (b, n, _) = x.dims3().unwrap();
        x.reshape((b, n, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let plain = attend(
        &split(q.as_tensor()),
        &split(k.as_tensor()).t().unwrap().contiguous().unwrap(),
        &split(v.as_tensor()),
        0.5,
    )
    .unwrap()
    .transpose(1, 2)
    .unwrap()
    .reshape((2, 10, heads * d))
    .unwrap();
    let expected = grads_of(&plain, &probe, &[&q, &k, &v]);
    for rows in [10, 3] {
        let cfg = HeadsConfig {
            heads,
            scale: 0.5,
            rows,
            upcast: false,
        };
        let out = multi_head_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), cfg).unwrap();
        assert!(max_rel_diff(&out, &plain) < 1e-6, "rows {rows}: forward");
        let got = grads_of(&out, &probe, &[&q, &k, &v]);
        for (name, (g, e)) in ["q", "k", "v"].iter().zip(got.iter().zip(&expected)) {
            let diff = max_rel_diff(g, e);
            assert!(
                diff < 1e-5,
                "rows {rows} {name}: relative difference {diff}"
            );
        }
    }
}

/// A frozen layer with an added residual or per-channel bias as one node: the gradients of the
/// input and of the added tensor equal plain autograd's.
#[test]
fn frozen_layer_with_added_tensor_matches_autograd() {
    let mut rng = SeededRng::new(11);
    let conv = LayerKind::Conv {
        stride: 1,
        padding: 1,
    };
    // (layer, input dims, weight dims, added tensor dims)
    type Case = (LayerKind, Vec<usize>, Vec<usize>, Vec<usize>);
    let cases: Vec<Case> = vec![
        (conv, vec![2, 4, 5, 5], vec![6, 4, 3, 3], vec![2, 6, 1, 1]),
        (conv, vec![2, 4, 5, 5], vec![6, 4, 3, 3], vec![2, 6, 5, 5]),
        (LayerKind::Linear, vec![2, 5, 6], vec![7, 6], vec![2, 5, 7]),
    ];
    for (kind, xd, wd, addd) in cases {
        let x = Var::from_tensor(&randn(&mut rng, &xd)).unwrap();
        let add = Var::from_tensor(&randn(&mut rng, &addd)).unwrap();
        let weight = randn(&mut rng, &wd);
        let bias = randn(&mut rng, &[wd[0]]);
        let fused =
            frozen_layer::forward_add(kind, &weight, Some(&bias), x.as_tensor(), add.as_tensor())
                .unwrap();
        let plain = frozen_layer::eval(kind, &weight, Some(&bias), None, x.as_tensor())
            .unwrap()
            .broadcast_add(add.as_tensor())
            .unwrap();
        assert_eq!(
            max_rel_diff(&fused, &plain),
            0.0,
            "{kind:?} {addd:?}: forward"
        );
        let probe = randn(&mut rng, fused.dims());
        let got = grads_of(&fused, &probe, &[&x, &add]);
        let expected = grads_of(&plain, &probe, &[&x, &add]);
        for (name, (g, e)) in ["x", "add"].iter().zip(got.iter().zip(&expected)) {
            let d = max_rel_diff(g, e);
            assert!(
                d < 1e-5,
                "{kind:?} {addd:?} {name}: relative difference {d}"
            );
        }
    }
}
