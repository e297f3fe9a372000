//! The LRM through the script API against the PyTorch reference (tests/fixtures/golden/lrm*.safetensors).

use candle_core::Device;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};

fn eval_f64(script: &str) -> f64 {
    let se = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    );
    se.engine
        .eval::<f64>(script)
        .unwrap_or_else(|e| panic!("{e}\n{script}"))
}

const TOL: f64 = 1e-4;

#[test]
fn scores_match_golden_multiscale_single_scale_and_cfg_on_all_stages() {
    for (opts, key) in [
        (
            "#{multi_scale: true, guidance_scale: 7.5, multi_scale_cfg: false}",
            "score_multiscale",
        ),
        (
            "#{multi_scale: false, guidance_scale: 7.5}",
            "score_single_scale",
        ),
        (
            "#{multi_scale: true, guidance_scale: 7.5, multi_scale_cfg: true}",
            "score_multiscale_cfgall",
        ),
    ] {
        let d = eval_f64(&format!(
            r#"let g = load_safetensors("tests/fixtures/golden/lrm.safetensors");
               let lrm = load_lrm("tests/fixtures/tiny-lrm", {opts});
               let s = lrm.score(g.latents, g.input_ids, g.timesteps);
               max_abs_diff(s, g.{key}) / (g.{key}.abs().max().item() + 1e-6)"#
        ));
        assert!(d < TOL, "{key}: relative diff {d}");
    }
}

#[test]
fn features_match_golden_and_prompt_strings_tokenize_the_same() {
    let d = eval_f64(
        r#"let g = load_safetensors("tests/fixtures/golden/lrm.safetensors");
           let lrm = load_lrm("tests/fixtures/tiny-lrm");
           let a = max_abs_diff(lrm.text_features(g.input_ids), g.text_features);
           let b = max_abs_diff(lrm.image_features(g.latents, g.input_ids, g.timesteps), g.image_features_multiscale);
           let s1 = lrm.score(g.latents, g.input_ids, g.timesteps);
           let s2 = lrm.score(g.latents, ["a photo of a cat", "A majestic lion, standing on a rock at sunset; highly detailed, 8k!"], g.timesteps);
           [a, b, max_abs_diff(s1, s2)].reduce(|m, x| if x > m { x } else { m }, 0.0)"#,
    );
    assert!(d < TOL, "{d}");
}

#[test]
fn pair_loss_matches_golden_with_ties_and_aux_coefficient() {
    let d = eval_f64(
        r#"let g = load_safetensors("tests/fixtures/golden/lrm_pair_loss.safetensors");
           let lrm = load_lrm("tests/fixtures/tiny-lrm", #{multi_scale: true, guidance_scale: 7.5});
           let out = lrm.pair_loss(g.input_ids, g.latents_0, g.latents_1, g.timesteps, g.label_0, g.label_1, g.num_examples_per_prompt, #{});
           let aux = lrm.pair_loss(g.input_ids, g.latents_0, g.latents_1, g.timesteps, g.label_0, g.label_1, g.num_examples_per_prompt, #{aux_loss_coeff: 0.5});
           let diffs = [
               max_abs_diff(out.logits, g.pair_logits),
               max_abs_diff(out.per_pair, g.loss_per_pair),
               max_abs_diff(out.weight, g.weight),
               max_abs_diff(out.loss, g.loss),
               max_abs_diff(aux.loss, g.loss_aux_coeff_0p5),
           ];
           diffs.reduce(|m, x| if x > m { x } else { m }, 0.0)"#,
    );
    assert!(d < TOL, "{d}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let se = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    );
    let err = se
        .engine
        .eval::<rhai::Dynamic>(
            r#"load_lrm("tests/fixtures/tiny-lrm", #{multi_scale: true, guidance: 2})"#,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`guidance`") && err.contains("guidance_scale"),
        "{err}"
    );
    let err = se
        .engine
        .eval::<rhai::Dynamic>(
            r#"let g = load_safetensors("tests/fixtures/golden/lrm_pair_loss.safetensors");
               let lrm = load_lrm("tests/fixtures/tiny-lrm");
               lrm.pair_loss(g.input_ids, g.latents_0, g.latents_1, g.timesteps, g.label_0, g.label_0, g.num_examples_per_prompt, #{})"#,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("sum to 1"), "{err}");
    let err = se
        .engine
        .eval::<rhai::Dynamic>(r#"load_lrm("tests/fixtures/tiny-sd")"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("projections") || err.contains("state_dict.pt"),
        "{err}"
    );
}
