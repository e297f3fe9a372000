//! An LRM really learns: the tiny LRM (tests/fixtures/tiny-lrm) is trained through the recipe's
//! stdlib (`lrm_train`) on a pair set made here, in latent space, whose preference depends on
//! the prompt ("a bright image" prefers a positive channel-0 offset, "a dark image" the
//! negative one), and evaluated with `lrm_eval` on held-out pairs: accuracy is at chance
//! before, well above it after at t = 1, and lower but still above chance at t = 951 where
//! the noise swamps most of the signal.

use candle_core::Device;
use lpo::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};

const SCRIPT: &str = r#"
import "lrm_train" as lt;
import "lrm_eval" as le;

// n pairs; pair i is for prompt A ("bright") when i is even, B ("dark") otherwise; the winner
// is the image whose channel-0 offset has the sign the prompt names; it sits in slot 0 or 1 at
// random.
fn make_pairs(n, seed, strength) {
    let r = rng(seed);
    let offset = tensor([strength, 0.0, 0.0, 0.0]).reshape([1, 4, 1, 1]);
    let prompts = [];
    let signs = [];
    let label_0 = [];
    let label_1 = [];
    for i in 0..n {
        let bright_wanted = i % 2 == 0;
        let first_bright = r.int(0, 2) == 1;
        prompts.push(if bright_wanted { "a bright image" } else { "a dark image" });
        signs.push(if first_bright { 1.0 } else { -1.0 });
        let first_wins = first_bright == bright_wanted;
        label_0.push(if first_wins { 1.0 } else { 0.0 });
        label_1.push(if first_wins { 0.0 } else { 1.0 });
    }
    let sign = tensor(signs).reshape([n, 1, 1, 1]);
    latent_pairs(#{
        prompts: prompts,
        latents_0: r.randn([n, 4, 16, 16]) + sign * offset,
        latents_1: r.randn([n, 4, 16, 16]) - sign * offset,
        label_0: tensor(label_0),
        label_1: tensor(label_1),
    })
}

let strength = STRENGTH;
let train = make_pairs(64, 1, strength);
let val = make_pairs(VAL_PAIRS, 2, strength);
let lrm = load_lrm("tests/fixtures/tiny-lrm", #{trainable: true, guidance_scale: 1.0});
let ev = #{timesteps: [1, 951], batch_size: 40};
let before = le::accuracy(lrm, val, ev);
let out = lt::train(lrm, train, #{steps: STEPS, batch_size: 8, lr: 1e-3, log_every: 0, quiet: true});
let after = le::accuracy(lrm, val, ev);
print(le::table(after));
let h = out.history;
let first = 0.0;
let last = 0.0;
for i in 0..5 { first += h[i].loss / 5.0; last += h[h.len() - 1 - i].loss / 5.0; }
#{
    before_1: le::at(before, 1), before_951: le::at(before, 951),
    after_1: le::at(after, 1), after_951: le::at(after, 951),
    counted: after.results[0].counted, loss_first: first, loss_last: last, steps: out.step,
}
"#;

#[test]
fn tiny_lrm_learns_a_text_dependent_preference_and_accuracy_falls_with_noise() {
    let se = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    );
    let steps = 100;
    let script = SCRIPT
        .replace("STRENGTH", "0.5")
        .replace("VAL_PAIRS", "200")
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
    let (b1, b951, a1, a951) = (
        get("before_1"),
        get("before_951"),
        get("after_1"),
        get("after_951"),
    );
    eprintln!(
        "accuracy before: t=1 {b1:.3}, t=951 {b951:.3}; after {steps} steps: t=1 {a1:.3}, t=951 {a951:.3}; loss {:.4} -> {:.4}; {:.1} s",
        get("loss_first"),
        get("loss_last"),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(get("counted"), 200.0, "no ties in this set: every pair counts");
    assert_eq!(get("steps"), steps as f64);
    assert!(get("loss_last") < get("loss_first"), "the loss went down");
    // Untrained, the model knows nothing about the rule: near chance.
    assert!((0.3..0.7).contains(&b1), "before training: t=1 accuracy {b1}");
    assert!(a1 >= 0.85, "after training: t=1 accuracy {a1}");
    assert!(a951 > 0.56, "after training: t=951 accuracy {a951} is not above chance");
    assert!(a951 < a1, "noise at t=951 should cost accuracy: {a951} vs {a1}");
}
