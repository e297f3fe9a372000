//! Gradients of the UNet and its LoRA adapters: every trainable tensor gets one, sampled entries
//! agree with central finite differences (f64), LoRA-off is the base model bit for bit, adapters
//! round-trip through files and merge, and a frozen forward keeps no graph.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use lpo::models::loading::WeightMode;
use lpo::models::lora::LoraConfig;
use lpo::models::lora_file::Accept;
use lpo::models::unet::UNet2DConditionModel;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};
use lpo::tensor::SeededRng;

const SD: &str = "tests/fixtures/tiny-sd/unet";

/// Tests of this file run one at a time so the RSS measurement sees only its own allocations.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tiny-sd UNet on the CPU.
fn load_sd(dtype: DType, mode: WeightMode) -> UNet2DConditionModel {
    UNet2DConditionModel::load(Path::new(SD), dtype, &Device::Cpu, mode).unwrap()
}

struct Inputs {
    x: Tensor,
    t: Tensor,
    ehs: Tensor,
    w: Tensor,
}

/// Golden inputs (batch 1, 16 tokens to keep it quick) in `dtype`, and fixed loss weights.
fn inputs(dtype: DType) -> Inputs {
    let g = candle_core::safetensors::load(
        "tests/fixtures/golden/unet_tiny_sd.safetensors",
        &Device::Cpu,
    )
    .unwrap();
    let x = g["latents"]
        .narrow(0, 0, 1)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let t = g["timesteps"].narrow(0, 0, 1).unwrap();
    let ehs = g["encoder_hidden_states"]
        .narrow(0, 0, 1)
        .unwrap()
        .narrow(1, 0, 16)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let w = SeededRng::new(7)
        .randn(x.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    Inputs { x, t, ehs, w }
}

fn loss(unet: &UNet2DConditionModel, i: &Inputs) -> Tensor {
    let out = unet.forward(&i.x, &i.t, &i.ehs, None).unwrap();
    (out * &i.w).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Central differences on `picks` entries of each var, against the analytic gradient.
fn finite_difference_check(
    unet: &UNet2DConditionModel,
    i: &Inputs,
    vars: &[(String, Var)],
    picks: usize,
) {
    let grads = loss(unet, i).backward().unwrap();
    let eps = 1e-6;
    let mut rng = SeededRng::new(11);
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let flat: Vec<f64> = orig.flatten_all().unwrap().to_vec1().unwrap();
        // prefer entries with a sizable gradient so the relative check is meaningful
        let mut idx: Vec<usize> = (0..flat.len()).collect();
        idx.sort_by(|a, b| g[*b].abs().partial_cmp(&g[*a].abs()).unwrap());
        let top = idx.len().min(8);
        for _ in 0..picks {
            let k = idx[rng.int_in(0, top as i64) as usize];
            let eval = |delta: f64| {
                let mut v = flat.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                scalar(&loss(unet, i))
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&orig).unwrap();
            let err = (fd - g[k]).abs();
            assert!(
                err <= 1e-6 + 1e-4 * g[k].abs().max(fd.abs()),
                "{name}[{k}]: analytic {} vs finite difference {fd}",
                g[k]
            );
        }
    }
}

#[test]
fn every_trainable_tensor_gets_a_gradient_and_matches_finite_differences() {
    let _serial = serial();
    let unet = load_sd(DType::F64, WeightMode::Trainable);
    let vars = unet.trainable_vars();
    assert!(vars.len() > 100, "{} trainable tensors", vars.len());
    assert_eq!(
        vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
        unet.param_count()
    );
    let i = inputs(DType::F64);
    let grads = loss(&unet, &i).backward().unwrap();
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
    // one tensor of each kind: conv, group norm, layer norm, attention, feed-forward, time MLP
    let wanted = [
        "conv_in.weight",
        "down_blocks.0.resnets.0.norm1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.norm1.bias",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "time_embedding.linear_1.weight",
        "up_blocks.1.resnets.1.conv_shortcut.weight",
        "conv_out.bias",
    ];
    let picked: Vec<(String, Var)> = vars
        .iter()
        .filter(|(n, _)| wanted.contains(&n.as_str()))
        .cloned()
        .collect();
    assert_eq!(picked.len(), wanted.len(), "all sampled tensors exist");
    finite_difference_check(&unet, &i, &picked, 2);
}

fn lora_model(dtype: DType) -> UNet2DConditionModel {
    let unet =
        UNet2DConditionModel::load(Path::new(SD), dtype, &Device::Cpu, WeightMode::Frozen).unwrap();
    let n = unet
        .add_lora(&LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: LoraConfig::default_targets(),
            seed: 3,
        })
        .unwrap();
    // tiny-sd: down 1 + mid 1 + up 2 transformers, each attn1 + attn2 with 4 targets
    assert_eq!(n, 4 * 2 * 4);
    // B starts at zero (A would get no gradient); give it values so every var is exercised
    let mut rng = SeededRng::new(5);
    for (name, var) in unet.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            let b = (rng.randn(var.dims(), &Device::Cpu).unwrap() * 0.1)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            var.set(&b).unwrap();
        }
    }
    unet
}

#[test]
fn lora_vars_get_gradients_matching_finite_differences() {
    let _serial = serial();
    let unet = lora_model(DType::F64);
    let vars = unet.trainable_vars();
    assert_eq!(vars.len(), 2 * 32);
    assert!(vars.iter().all(|(n, _)| n.starts_with("unet.")
        && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    assert!(vars.windows(2).all(|w| w[0].0 < w[1].0), "sorted by name");
    let i = inputs(DType::F64);
    let grads = loss(&unet, &i).backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(
            scalar(&g.abs().unwrap().sum_all().unwrap()) > 0.0,
            "{name}: zero gradient"
        );
    }
    let picked: Vec<(String, Var)> = vars.iter().step_by(9).cloned().collect();
    finite_difference_check(&unet, &i, &picked, 1);
}

/// Adapters on every linear and conv layer (each kind users train: resnet convs and
/// time_emb_proj, proj_in/out, feed-forward, attention, time embedding, conv_in/out,
/// down/upsamplers): every A and B gets a nonzero gradient, sampled ones match finite
/// differences, and the switch off gives the base output bit for bit.
#[test]
fn adapters_on_every_layer_kind_get_gradients_and_switch_off_exactly() {
    let _serial = serial();
    let unet = load_sd(DType::F64, WeightMode::Frozen);
    let i = inputs(DType::F64);
    let base = unet.forward(&i.x, &i.t, &i.ehs, None).unwrap();
    let n = unet
        .add_lora(&LoraConfig {
            rank: 2,
            alpha: 3.0,
            targets: vec!["all-linear".into(), "all-conv".into()],
            seed: 3,
        })
        .unwrap();
    let mut rng = SeededRng::new(5);
    for (name, var) in unet.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            let b = (rng.randn(var.dims(), &Device::Cpu).unwrap() * 0.05)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            var.set(&b).unwrap();
        }
    }
    let vars = unet.trainable_vars();
    assert_eq!(vars.len(), 2 * n);
    for kind in [
        "resnets.0.conv1",
        "resnets.0.conv2",
        "resnets.0.conv_shortcut",
        "resnets.0.time_emb_proj",
        "attentions.0.proj_in",
        "attentions.0.proj_out",
        "ff.net.0.proj",
        "ff.net.2",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "unet.conv_in",
        "unet.conv_out",
        "downsamplers.0.conv",
        "upsamplers.0.conv",
    ] {
        assert!(
            vars.iter().any(|(name, _)| name.contains(kind)),
            "no adapter on `{kind}`"
        );
    }
    let conv_a = vars
        .iter()
        .find(|(name, _)| name == "unet.down_blocks.0.resnets.0.conv1.lora_A.weight")
        .unwrap();
    assert_eq!(conv_a.1.dims(), &[2, 32, 3, 3]);

    let grads = loss(&unet, &i).backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(
            scalar(&g.abs().unwrap().sum_all().unwrap()) > 0.0,
            "{name}: zero gradient"
        );
    }
    // every conv adapter kind among the sampled vars, plus a spread of the rest
    let picked: Vec<(String, Var)> = vars
        .iter()
        .filter(|(name, _)| {
            name.contains("down_blocks.1.resnets.0.conv")
                || name.contains("downsamplers")
                || name.contains("attentions.0.proj_in")
                || name.contains("time_embedding.linear_1")
        })
        .chain(vars.iter().step_by(23))
        .cloned()
        .collect();
    finite_difference_check(&unet, &i, &picked, 1);

    unet.set_lora_enabled(false);
    let off = unet.forward(&i.x, &i.t, &i.ehs, None).unwrap();
    let diff = scalar(
        &(off - &base)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap(),
    );
    assert_eq!(diff, 0.0, "adapters off must give the base output exactly");
}

#[test]
fn fresh_adapters_start_at_zero_and_a_has_std_one_over_rank() {
    let _serial = serial();
    let unet =
        UNet2DConditionModel::load(Path::new(SD), DType::F32, &Device::Cpu, WeightMode::Frozen)
            .unwrap();
    let i = inputs(DType::F32);
    let base = unet.forward(&i.x, &i.t, &i.ehs, None).unwrap();
    unet.add_lora(&LoraConfig {
        rank: 4,
        alpha: 4.0,
        targets: vec!["to_q".into()],
        seed: 1,
    })
    .unwrap();
    let on = unet.forward(&i.x, &i.t, &i.ehs, None).unwrap();
    assert_eq!(
        scalar(&(on - &base).unwrap().abs().unwrap().max_all().unwrap()),
        0.0
    );
    let a: Vec<f32> = unet
        .trainable_vars()
        .iter()
        .filter(|(n, _)| n.ends_with("lora_A.weight"))
        .flat_map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    let std = (a.iter().map(|v| (v * v) as f64).sum::<f64>() / a.len() as f64).sqrt();
    assert!((std - 0.25).abs() < 0.05, "A std {std}");
    assert!(unet
        .trainable_vars()
        .iter()
        .all(|(n, _)| n.contains(".to_q.")));
}

#[test]
fn lora_off_is_base_bit_for_bit_and_round_trips_and_merges() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let se = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    );
    let script = format!(
        r#"
        let g = load_safetensors("tests/fixtures/golden/unet_tiny_sd.safetensors");
        let x = g.latents; let t = g.timesteps; let e = g.encoder_hidden_states;
        let unet = load_unet("{SD}");
        let base = unet.forward(x, t, e);
        let n = unet.add_lora(#{{rank: 4, alpha: 8, seed: 1}});
        unet.save_lora("{d}/fresh.safetensors");
        let m = load_safetensors("{d}/fresh.safetensors");
        let r = rng(9);
        for k in m.keys() {{ m[k] = m[k] + r.randn(m[k].shape) * 0.05; }}
        save_safetensors(m, "{d}/noisy.safetensors");
        unet.load_lora("{d}/noisy.safetensors");
        let on = unet.forward(x, t, e);
        unet.lora_enabled = false;
        let off = unet.forward(x, t, e);
        let was_off = !unet.lora_enabled;
        unet.set_lora_enabled(true);
        unet.save_lora("{d}/trained.safetensors");
        let other = load_unet("{SD}");
        other.load_lora("{d}/trained.safetensors");
        let on2 = other.forward(x, t, e);
        let names = unet.trainable_names();
        unet.merge_lora();
        let merged = unet.forward(x, t, e);
        #{{
            n: n, was_off: was_off, names: names,
            off_vs_base: max_abs_diff(off, base), on_vs_base: max_abs_diff(on, base),
            reload: max_abs_diff(on2, on), merged: max_abs_diff(merged, on),
            trainable_after_merge: unet.trainable_names().len(),
            keys: load_safetensors("{d}/trained.safetensors").keys(),
        }}
        "#
    );
    let r: rhai::Map = se.engine.eval(&script).unwrap_or_else(|e| panic!("{e}"));
    let f = |k: &str| r[k].as_float().unwrap();
    assert_eq!(r["n"].as_int().unwrap(), 32);
    assert!(r["was_off"].as_bool().unwrap());
    assert_eq!(
        f("off_vs_base"),
        0.0,
        "LoRA off must equal the base bit for bit"
    );
    assert!(
        f("on_vs_base") > 1e-4,
        "adapters change the output: {}",
        f("on_vs_base")
    );
    assert_eq!(f("reload"), 0.0, "save -> load round trip");
    assert!(f("merged") < 1e-5, "merge: {}", f("merged"));
    assert_eq!(r["trainable_after_merge"].as_int().unwrap(), 0);
    let keys: Vec<String> = r["keys"]
        .clone()
        .cast::<rhai::Array>()
        .into_iter()
        .map(|k| k.into_string().unwrap())
        .collect();
    assert!(keys.contains(
        &"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
            .to_string()
    ));
    assert!(keys.contains(
        &"unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.lora_B.weight"
            .to_string()
    ));
    assert_eq!(keys.len(), 64);
    let names: Vec<String> = r["names"]
        .clone()
        .cast::<rhai::Array>()
        .into_iter()
        .map(|k| k.into_string().unwrap())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(names, sorted);
}

#[test]
fn lora_on_trainable_base_is_refused_and_bad_lora_files_error() {
    let _serial = serial();
    let unet = UNet2DConditionModel::load(
        Path::new(SD),
        DType::F32,
        &Device::Cpu,
        WeightMode::Trainable,
    )
    .unwrap();
    let err = unet
        .add_lora(&LoraConfig {
            rank: 2,
            alpha: 2.0,
            targets: LoraConfig::default_targets(),
            seed: 0,
        })
        .unwrap_err();
    assert!(format!("{err:#}").contains("frozen"), "{err:#}");
    let frozen =
        UNet2DConditionModel::load(Path::new(SD), DType::F32, &Device::Cpu, WeightMode::Frozen)
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    let t = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    let mut m = std::collections::HashMap::new();
    m.insert(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight".to_string(),
        t.clone(),
    );
    m.insert(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight".to_string(),
        t,
    );
    candle_core::safetensors::save(&m, &p).unwrap();
    let err = format!("{:#}", frozen.load_lora(&p, Accept::Any, None).unwrap_err());
    assert!(
        err.contains("attn1.to_q") && err.contains("[2, 5]"),
        "{err}"
    );
    m.clear();
    m.insert(
        "unet.no_such.lora_A.weight".to_string(),
        Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&m, &p).unwrap();
    let err = format!("{:#}", frozen.load_lora(&p, Accept::Any, None).unwrap_err());
    assert!(err.contains("unet.no_such.lora_A.weight"), "{err}");
}

fn resident_kb() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

#[test]
fn frozen_forward_keeps_no_graph() {
    let _serial = serial();
    let unet =
        UNet2DConditionModel::load(Path::new(SD), DType::F32, &Device::Cpu, WeightMode::Frozen)
            .unwrap();
    assert!(unet.trainable_vars().is_empty());
    let i = inputs(DType::F32);
    let out = loss(&unet, &i);
    let grads = out.backward().unwrap();
    // only the root itself: no weight (nor anything else) is on a graph
    assert!(
        grads.get_ids().count() <= 1,
        "{} gradients",
        grads.get_ids().count()
    );
    // warm up the allocator (thread pools, gemm buffers) before measuring
    for _ in 0..30 {
        drop(unet.forward(&i.x, &i.t, &i.ehs, None).unwrap());
    }
    let before = resident_kb();
    let mut kept = Vec::new();
    for _ in 0..40 {
        // keeping the outputs alive would keep a graph alive if there were one
        kept.push(unet.forward(&i.x, &i.t, &i.ehs, None).unwrap());
    }
    let grown = resident_kb().saturating_sub(before);
    eprintln!("RSS growth over 40 kept frozen outputs: {grown} KiB");
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB over 40 frozen forwards"
    );
    drop(kept);

    // the same loop on a trainable model keeps every graph alive: the measure can tell
    let trainable = load_sd(DType::F32, WeightMode::Trainable);
    let before = resident_kb();
    let kept: Vec<Tensor> = (0..40)
        .map(|_| trainable.forward(&i.x, &i.t, &i.ehs, None).unwrap())
        .collect();
    let grown_trainable = resident_kb().saturating_sub(before);
    eprintln!("RSS growth over 40 kept trainable outputs: {grown_trainable} KiB");
    assert!(
        grown_trainable > grown + 16 * 1024,
        "trainable graphs should cost memory: {grown_trainable} KiB"
    );
    drop(kept);
}

#[test]
fn frozen_view_shares_the_trained_weights_and_keeps_no_graph() {
    let _serial = serial();
    let trainable = load_sd(DType::F32, WeightMode::Trainable);
    let view = trainable.frozen_view().unwrap();
    assert!(view.trainable_vars().is_empty());
    let i = inputs(DType::F32);
    let max_diff =
        |a: &Tensor, b: &Tensor| scalar(&(a - b).unwrap().abs().unwrap().max_all().unwrap());
    let out = |u: &UNet2DConditionModel| u.forward(&i.x, &i.t, &i.ehs, None).unwrap();
    let before = out(&view);
    assert_eq!(max_diff(&out(&trainable), &before), 0.0);

    // An in-place update of a trained weight (as the optimizer makes) shows through the view.
    let vars = trainable.trainable_vars();
    let (name, var) = vars.iter().find(|(n, _)| n == "conv_out.bias").unwrap();
    var.set(&(var.as_tensor() + 0.5).unwrap()).unwrap();
    let after = out(&view);
    assert!(max_diff(&after, &before) > 0.1, "{name} change not seen");
    assert_eq!(max_diff(&out(&trainable), &after), 0.0);

    // Its outputs hang on no graph: no trained weight gets a gradient through them.
    let grads = (after * &i.w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in &vars {
        assert!(
            grads.get(var).is_none(),
            "{name} got a gradient through the view"
        );
    }
}
