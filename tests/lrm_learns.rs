//! An LRM really learns: the tiny LRM (tests/fixtures/tiny-lrm) is trained (8x8 latents: at 16x16 the
//! first block's self-attention makes each step ~10x slower) through the recipe's
//! stdlib (`lrm_train`) on a pair set made here, in latent space, whose preference depends on
//! the prompt ("a bright image" prefers a positive channel-0 offset, "a dark image" the
//! negative one), and evaluated with `lrm_eval` on held-out pairs: accuracy is at chance
//! before, well above it after at t = 1, and lower but still above chance at t = 951 where
//! the noise swamps most of the signal.

use candle_core::Device;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};

const SCRIPT: &str = include_str!("scripts/lrm_learns.rhai");

#[test]
fn tiny_lrm_learns_a_text_dependent_preference_and_accuracy_falls_with_noise() {
    let se = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    );
    let steps = 50;
    let script = SCRIPT
        .replace("STRENGTH", "1.0")
        .replace("SIZE", "8")
        .replace("VAL_PAIRS", "120")
        .replace("STEPS", &steps.to_string());
    let start = std::time::Instant::now();
    let m = se
        .engine
        .eval::<rhai::Map>(&script)
        .unwrap_or_else(|e| panic!("{e}"));
    let get = |k: &str| -> f64 {
        let v = &m[k];
        v.as_float()
            .or_else(|_| v.as_int().map(|i| i as f64))
            .unwrap_or_else(|_| panic!("{k}: {v:?}"))
    };
    let (b1, a1, a951) = (get("before_1"), get("after_1"), get("after_951"));
    eprintln!(
        "accuracy before: t=1 {b1:.3}; after {steps} steps: t=1 {a1:.3}, t=951 {a951:.3}; loss {:.4} -> {:.4}; training {:.1} s, all {:.1} s",
        get("loss_first"),
        get("loss_last"),
        get("train_s"),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(
        get("counted"),
        120.0,
        "no ties in this set: every pair counts"
    );
    assert_eq!(get("steps"), steps as f64);
    assert!(get("loss_last") < get("loss_first"), "the loss went down");
    // Untrained, the model knows nothing about the rule: near chance.
    assert!(
        (0.3..0.7).contains(&b1),
        "before training: t=1 accuracy {b1}"
    );
    assert!(a1 >= 0.85, "after training: t=1 accuracy {a1}");
    assert!(
        a951 > 0.56,
        "after training: t=951 accuracy {a951} is not above chance"
    );
    assert!(
        a951 < a1,
        "noise at t=951 should cost accuracy: {a951} vs {a1}"
    );
}
