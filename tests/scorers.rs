//! Built-in scorers against their Python references (tests/fixtures/scorers, made by
//! tests/interop/make_scorer_fixtures.py): Pillow-exact preprocessing in the three reference
//! geometries, tiny random PickScore / CLIP score / aesthetic (transformers CLIPModel) and HPSv2
//! (open_clip, converted by scripts/convert_scorer_weights.py) scores within 1e-4, the script
//! API (`load_scorer`, `scorer.score` with tensors and PNG paths) and bad input.

mod common;
use common::{engine, fixtures};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lpo::eval::scorers::preprocess::{channel_major, to_square, Geometry};
use lpo::eval::scorers::{read_image, Scorer, ScorerKind};

const PROMPTS: [&str; 3] = [
    "a photo of a cat",
    "a red car on a street",
    "A painting of a DOG, 8k!",
];
const IMAGES: [&str; 3] = ["a.png", "b.png", "a.png"];

fn dir() -> PathBuf {
    fixtures().join("scorers")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn images() -> Vec<image::RgbImage> {
    IMAGES
        .iter()
        .map(|n| read_image(&dir().join("images").join(n)).unwrap())
        .collect()
}

fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn load(kind: &str) -> Scorer {
    Scorer::load(
        ScorerKind::parse(kind).unwrap(),
        &dir().join(kind),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn preprocessing_matches_pillow_torchvision_and_transformers_exactly() {
    let exp = expected();
    let cases = [("photo58", "photo.png", 58), ("tiny45", "tiny.png", 45)];
    for (mode, g) in [
        ("hf", Geometry::HfCrop),
        ("torchvision", Geometry::TorchvisionCrop),
        ("hpsv2", Geometry::LongestPad),
    ] {
        for (case, file, size) in cases {
            let img = read_image(&dir().join("images").join(file)).unwrap();
            let ours = channel_major(&to_square(&img, size, g).unwrap());
            let theirs: Vec<u8> = exp[&format!("pre_{mode}_{case}")]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(ours.len(), theirs.len(), "{mode} {case}: size");
            let worst = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (*a as i32 - *b as i32).abs())
                .max()
                .unwrap();
            let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            eprintln!("preprocess {mode} {case}: max |u8 diff| = {worst}, {differing} differ");
            assert_eq!(worst, 0, "{mode} {case}: {differing} values differ");
        }
    }
    // The crop offsets of the two crop geometries really differ on these sizes (margin 31:
    // HF floors to 15, torchvision rounds 15.5 to 16), so the test tells them apart.
    assert_ne!(
        exp["pre_hf_photo58"].to_vec3::<u8>().unwrap(),
        exp["pre_torchvision_photo58"].to_vec3::<u8>().unwrap()
    );
}

#[test]
fn model_inputs_match_the_reference_pixels() {
    let exp = expected();
    for (kind, key) in [
        ("pickscore", "pixels_hf"),
        ("aesthetic", "pixels_torchvision"),
        ("hpsv2", "pixels_hpsv2"),
    ] {
        let s = load(kind);
        let px = s.pixels(&images()).unwrap();
        let err = max_err(&vec_f64(&px), &vec_f64(&exp[key]));
        eprintln!("{kind} pixels: max |diff| = {err:.2e}");
        assert!(err < 1e-5, "{kind}: pixels differ by {err}");
    }
}

#[test]
fn prompts_tokenize_as_transformers_does() {
    let exp = expected();
    let s = load("pickscore");
    let tok = lpo::models::tokenizer::ClipTokenizer::load(&dir().join("pickscore")).unwrap();
    let ids = tok.encode(&PROMPTS).unwrap();
    assert_eq!(
        ids.to_vec2::<i64>().unwrap(),
        exp["ids"].to_vec2::<i64>().unwrap()
    );
    assert_eq!(s.kind(), ScorerKind::PickScore);
}

#[test]
fn scores_match_the_python_references() {
    let exp = expected();
    for kind in ["pickscore", "clip_score", "aesthetic", "hpsv2"] {
        let s = load(kind);
        let ours = s.score(&images(), &PROMPTS, 2).unwrap();
        let theirs = vec_f64(&exp[&format!("{kind}_scores")]);
        let err = max_err(&ours, &theirs);
        eprintln!("{kind}: ours {ours:?} reference {theirs:?} max |diff| {err:.2e}");
        assert!(err < 1e-4, "{kind}: {ours:?} vs {theirs:?}");
        // Batching does not change scores.
        let one = s.score(&images(), &PROMPTS, 1).unwrap();
        assert!(max_err(&one, &ours) < 1e-5, "{kind}: batch 1 vs 2");
    }
}

#[test]
fn score_semantics_follow_the_formulas() {
    // clip_score clamps at 0 and is 100 * cos; the fixture has one negative cosine.
    let exp = expected();
    let cs = vec_f64(&exp["clip_score_scores"]);
    assert!(cs.contains(&0.0) && cs.iter().any(|&v| v > 1.0), "{cs:?}");
    // The aesthetic score ignores prompts.
    let a = load("aesthetic");
    let with = a.score(&images(), &PROMPTS, 8).unwrap();
    let without = a.score(&images(), &[], 8).unwrap();
    assert_eq!(with, without);
    // Prompts matter for the others: swapping them changes the scores.
    let p = load("pickscore");
    let swapped = [PROMPTS[1], PROMPTS[0], PROMPTS[2]];
    let s1 = p.score(&images(), &PROMPTS, 8).unwrap();
    let s2 = p.score(&images(), &swapped, 8).unwrap();
    assert!((s1[0] - s2[0]).abs() > 1e-3);
}

fn png_paths() -> Vec<String> {
    IMAGES
        .iter()
        .map(|n| dir().join("images").join(n).to_string_lossy().to_string())
        .collect()
}

#[test]
fn script_scores_tensors_and_png_paths_alike() {
    let exp = expected();
    let e = engine();
    let paths = png_paths();
    for kind in ["pickscore", "hpsv2", "aesthetic", "clip_score"] {
        let script = format!(
            r#"
            let s = load_scorer("{kind}", "{d}");
            let paths = {paths:?};
            let prompts = {prompts:?};
            s.score(paths, prompts, #{{batch_size: 2}})
            "#,
            d = dir().join(kind).display(),
            paths = paths,
            prompts = PROMPTS,
        );
        let out: rhai::Array = e.eval(&script).unwrap();
        let got: Vec<f64> = out.iter().map(|v| v.as_float().unwrap()).collect();
        let theirs = vec_f64(&exp[&format!("{kind}_scores")]);
        assert!(
            max_err(&got, &theirs) < 1e-4,
            "{kind}: {got:?} vs {theirs:?}"
        );
    }
    // Tensor input: build [N, 3, H, W] in [-1, 1] from the PNG bytes; equal sizes needed in
    // one tensor, so use image a twice with two prompts.
    let a = read_image(&dir().join("images/a.png")).unwrap();
    let (w, h) = (a.width() as usize, a.height() as usize);
    let mut v = Vec::new();
    for _ in 0..2 {
        for c in 0..3 {
            for p in 0..w * h {
                v.push(a.as_raw()[p * 3 + c] as f32 / 255.0 * 2.0 - 1.0);
            }
        }
    }
    let t = Tensor::from_vec(v, (2, 3, h, w), &Device::Cpu).unwrap();
    let mut scope = rhai::Scope::new();
    scope.push("images", t);
    let out: rhai::Array = e
        .eval_with_scope(
            &mut scope,
            &format!(
                r#"let s = load_scorer("pickscore", "{}"); s.score(images, ["{}", "{}"])"#,
                dir().join("pickscore").display(),
                PROMPTS[0],
                PROMPTS[2]
            ),
        )
        .unwrap();
    let got: Vec<f64> = out.iter().map(|v| v.as_float().unwrap()).collect();
    let theirs = vec_f64(&exp["pickscore_scores"]);
    assert!(
        max_err(&got, &[theirs[0], theirs[2]]) < 1e-4,
        "{got:?} vs {theirs:?}"
    );
}

fn script_err(script: &str) -> String {
    engine()
        .eval::<rhai::Dynamic>(script)
        .expect_err("script should fail")
        .to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let d = dir();
    let pick = d.join("pickscore").display().to_string();
    let e = script_err(&format!(r#"load_scorer("nope", "{pick}")"#));
    assert!(
        e.contains("unknown scorer kind `nope`") && e.contains("pickscore"),
        "{e}"
    );
    let e = script_err(&format!(r#"load_scorer("imagereward", "{pick}")"#));
    assert!(e.contains("imagereward") && e.contains("BLIP"), "{e}");
    let e = script_err(r#"load_scorer("pickscore", "/no/such/folder")"#);
    assert!(e.contains("/no/such/folder"), "{e}");
    // A CLIP folder without the aesthetic head.
    let e = script_err(&format!(r#"load_scorer("aesthetic", "{pick}")"#));
    assert!(
        e.contains("aesthetic_mlp.safetensors") && e.contains("convert_scorer_weights.py"),
        "{e}"
    );
    // An HF folder given as hpsv2.
    let e = script_err(&format!(r#"load_scorer("hpsv2", "{pick}")"#));
    assert!(e.contains("open_clip_config.json"), "{e}");
    // Prompt count, image shape, missing file, wrong prompt type.
    let load = format!(r#"let s = load_scorer("pickscore", "{pick}");"#);
    let a = d.join("images/a.png").display().to_string();
    let e = script_err(&format!(r#"{load} s.score(["{a}", "{a}"], ["one"])"#));
    assert!(e.contains("2 images but 1 prompts"), "{e}");
    let e = script_err(&format!(
        r#"{load} s.score(zeros([2, 4, 8, 8]), ["a", "b"])"#
    ));
    assert!(e.contains("3 channels"), "{e}");
    let e = script_err(&format!(r#"{load} s.score(["{a}.missing"], ["a"])"#));
    assert!(e.contains("a.png.missing"), "{e}");
    let e = script_err(&format!(r#"{load} s.score(["{a}"], [1])"#));
    assert!(e.contains("prompt 0"), "{e}");
    let e = script_err(&format!(r#"{load} s.score(42, ["a"])"#));
    assert!(e.contains("images"), "{e}");

    // A missing tensor is named with its file.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&d.join("pickscore"), tmp.path());
    let f = tmp.path().join("model.safetensors");
    let mut w = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    w.remove("vision_model.post_layernorm.weight");
    candle_core::safetensors::save(&w, &f).unwrap();
    let err = Scorer::load(ScorerKind::PickScore, tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("vision_model.post_layernorm.weight") && msg.contains("model.safetensors"),
        "{msg}"
    );

    // Only pytorch_model.bin: refused with a hint.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        d.join("pickscore/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(tmp.path().join("pytorch_model.bin"), b"not read").unwrap();
    let msg = format!(
        "{:#}",
        Scorer::load(ScorerKind::ClipScore, tmp.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("safetensors"),
        "{msg}"
    );

    // An open_clip state dict with an unexpected tensor (another architecture).
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&d.join("hpsv2"), tmp.path());
    let f = tmp.path().join("open_clip_model.safetensors");
    let mut w = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    w.insert(
        "visual.transformer.resblocks.0.ls_1.gamma".into(),
        Tensor::ones(16, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, &f).unwrap();
    let msg = format!(
        "{:#}",
        Scorer::load(ScorerKind::HpsV2, tmp.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(msg.contains("ls_1.gamma"), "{msg}");

    // An aesthetic head of the wrong width.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&d.join("aesthetic"), tmp.path());
    let f = tmp.path().join("aesthetic_mlp.safetensors");
    let mut w = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    w.insert(
        "layers.0.weight".into(),
        Tensor::ones((24, 7), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, &f).unwrap();
    let msg = format!(
        "{:#}",
        Scorer::load(ScorerKind::Aesthetic, tmp.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        msg.contains("layers.0.weight") && msg.contains("7 inputs"),
        "{msg}"
    );
}

// ---- the evaluation recipe (stdlib/eval.rhai via scripts/eval_scorers.rhai) ----

fn engine_in_run(run: &Path) -> rhai::Engine {
    use lpo::runtime::control::RunControl;
    use lpo::runtime::run_dir::RunDir;
    use lpo::script::{build_engine, EngineOptions, Host};
    let host = Host::new(RunControl::new(), Device::Cpu, 0)
        .with_run_dir(std::sync::Arc::new(RunDir::open(run).unwrap()));
    build_engine(host, &EngineOptions::default()).engine
}

/// A kohya LoRA for tiny-sd with nonzero weights (so it changes the images).
fn make_lora(path: &Path) {
    let script = format!(
        r#"
        let u = load_unet("tests/fixtures/tiny-sd");
        let policy = lpo_policy(u, #{{lora: #{{rank: 2, seed: 1}}}});
        let m = policy.params.to_map();
        let r = rng(3);
        for k in m.keys() {{ m[k] = r.randn(m[k].shape) * 0.5; }}
        policy.params.load_map(m);
        u.export_lora("{}", #{{format: "kohya"}});
    "#,
        path.display()
    );
    engine().run(&script).unwrap();
}

fn run_eval(run: &Path, params: rhai::Map) -> Result<rhai::Map, String> {
    let src = std::fs::read_to_string("scripts/eval_scorers.rhai").unwrap();
    let mut scope = rhai::Scope::new();
    scope.push_constant("params", params);
    engine_in_run(run)
        .eval_with_scope::<rhai::Map>(&mut scope, &src)
        .map_err(|e| e.to_string())
}

fn eval_params(lora: &Path, metrics: serde_json::Value) -> rhai::Map {
    let v = serde_json::json!({
        "lora": lora.display().to_string(),
        "steps": 2,
        "seeds": [0, 1],
        "prompts": ["a red circle", "a blue square", "a green triangle"],
        "batch": 2,
        "primary": "pickscore",
        "metrics": metrics,
    });
    rhai::serde::to_dynamic(v).unwrap().cast::<rhai::Map>()
}

#[test]
fn eval_recipe_writes_report_summary_and_consistent_scores() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lpo"))
        .args(["check", "scripts/eval_scorers.rhai"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let tmp = tempfile::tempdir().unwrap();
    let lora = tmp.path().join("k.safetensors");
    make_lora(&lora);
    let d = dir();
    let metrics = serde_json::json!({
        "pickscore": d.join("pickscore").display().to_string(),
        "hpsv2": d.join("hpsv2").display().to_string(),
        "aesthetic": d.join("aesthetic").display().to_string(),
        "clip": {"kind": "clip_score", "dir": d.join("clip_score").display().to_string()},
    });
    let run = tmp.path().join("run");
    let res = run_eval(&run, eval_params(&lora, metrics.clone())).unwrap();
    assert_eq!(res["n"].as_int().unwrap(), 6);

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["n"], 6);
    assert_eq!(summary["metric"], "pickscore");
    let rows = summary["metrics"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    for needle in [
        "<th>win_rate</th>",
        "<td>clip_score</td>",
        "<td>hpsv2</td>",
        "eval_grid.png",
    ] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
    assert!(run.join("eval_grid.png").is_file());

    // scores.json agrees with scoring the saved PNGs directly, and the row numbers follow.
    let scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("scores.json")).unwrap()).unwrap();
    let prompts: Vec<String> = serde_json::from_value(scores["prompts"].clone()).unwrap();
    let base_paths: Vec<String> = serde_json::from_value(scores["base_images"].clone()).unwrap();
    assert_eq!((prompts.len(), base_paths.len()), (6, 6));
    let imgs: Vec<_> = base_paths
        .iter()
        .map(|p| read_image(Path::new(p)).unwrap())
        .collect();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let direct = load("pickscore").score(&imgs, &refs, 4).unwrap();
    let recorded: Vec<f64> = serde_json::from_value(scores["pickscore"]["base"].clone()).unwrap();
    assert!(
        max_err(&direct, &recorded) < 1e-9,
        "{direct:?} vs {recorded:?}"
    );
    let mut changed = 0;
    for row in rows {
        let name = row["metric"].as_str().unwrap();
        let b: Vec<f64> = serde_json::from_value(scores[name]["base"].clone()).unwrap();
        let a: Vec<f64> = serde_json::from_value(scores[name]["lora"].clone()).unwrap();
        let delta = a.iter().zip(&b).map(|(x, y)| x - y).sum::<f64>() / 6.0;
        assert!(
            (row["delta"].as_f64().unwrap() - delta).abs() < 1e-9,
            "{name}"
        );
        let wins = a
            .iter()
            .zip(&b)
            .map(|(x, y)| {
                if x > y {
                    1.0
                } else if x == y {
                    0.5
                } else {
                    0.0
                }
            })
            .sum::<f64>()
            / 6.0;
        assert!(
            (row["win_rate"].as_f64().unwrap() - wins).abs() < 1e-12,
            "{name}"
        );
        let (lo, hi) = (
            row["ci95_low"].as_f64().unwrap(),
            row["ci95_high"].as_f64().unwrap(),
        );
        assert!(lo <= delta && delta <= hi, "{name}: {lo} {delta} {hi}");
        if max_err(&a, &b) > 1e-6 {
            changed += 1;
        }
    }
    assert!(changed >= 3, "the LoRA should change the scores");

    // Bad settings fail with clear messages.
    let e = run_eval(
        &tmp.path().join("r2"),
        eval_params(&lora, serde_json::json!({})),
    )
    .unwrap_err();
    assert!(e.contains("set `metrics`"), "{e}");
    let e = run_eval(
        &tmp.path().join("r3"),
        eval_params(
            &lora,
            serde_json::json!({"nope": d.join("pickscore").display().to_string()}),
        ),
    )
    .unwrap_err();
    assert!(e.contains("unknown scorer kind `nope`"), "{e}");
}

/// Why Pillow's resampling is reimplemented: the `image` crate's CatmullRom (the same cubic,
/// float weights, no rounding between passes) misses the reference pixels. Measured, printed.
#[test]
fn image_crate_catmull_rom_differs_from_pillow() {
    let exp = expected();
    let img = read_image(&dir().join("images/photo.png")).unwrap();
    // HF geometry at 58: 150x97 -> 89x58, crop left (89 - 58) / 2 = 15.
    let resized = image::imageops::resize(&img, 89, 58, image::imageops::FilterType::CatmullRom);
    let sq = image::imageops::crop_imm(&resized, 15, 0, 58, 58).to_image();
    let ours = channel_major(&sq);
    let theirs: Vec<u8> = exp["pre_hf_photo58"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
    eprintln!(
        "image CatmullRom vs Pillow bicubic (photo -> 58): max |u8 diff| = {worst}, {differing} of {} differ",
        ours.len()
    );
    assert!(worst > 0);
}
