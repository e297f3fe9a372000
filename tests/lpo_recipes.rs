//! The paper recipes and the sampling script on the tiny fixtures: `lpo check` passes on each,
//! their `--help` lists the shared loop's params with their own defaults, lpo_sd15.rhai with
//! tiny params writes checkpoints, metrics, a validation PNG and both LoRA files; sample.rhai
//! writes PNGs with and without a LoRA; prompt files (JSON / text) parse.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use candle_core::Device;
use lpo::runtime::control::RunControl;
use lpo::runtime::run_dir::RunDir;
use lpo::script::{build_engine, EngineOptions, Host};
use rhai::{Dynamic, Map, Scope};

fn engine_with(run: Option<&Path>) -> rhai::Engine {
    let mut host = Host::new(RunControl::new(), Device::Cpu, 0);
    if let Some(dir) = run {
        host = host.with_run_dir(Arc::new(RunDir::open(dir).unwrap()));
    }
    build_engine(host, &EngineOptions::default()).engine
}

fn run_script(path: &str, run: &Path, params: Map) -> Map {
    let src = std::fs::read_to_string(path).unwrap();
    let mut scope = Scope::new();
    scope.push_constant("params", params);
    engine_with(Some(run))
        .eval_with_scope::<Map>(&mut scope, &src)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn lpo_check_passes_on_every_recipe() {
    for s in [
        "scripts/lpo_sd15.rhai",
        "scripts/lpo_sd21.rhai",
        "scripts/lpo_sdxl.rhai",
        "scripts/lpo_tiny.rhai",
        "scripts/sample.rhai",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_lpo"))
            .args(["check", s])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{s}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The recipes declare the loop's parameters once (stdlib/lpo_recipe.rhai, named by
/// `PARAMS_FROM`) and replace a few defaults: `lpo run SCRIPT --help` lists both.
#[test]
fn recipes_list_the_loops_params_with_their_own_defaults() {
    let help = |script: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_lpo"))
            .args(["run", script, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let row = |text: &str, name: &str| -> String {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no `{name}` in\n{text}"))
            .to_string()
    };
    let sd15 = help("scripts/lpo_sd15.rhai");
    let sdxl = help("scripts/lpo_sdxl.rhai");
    let tiny = help("scripts/lpo_tiny.rhai");
    let shared = ["model", "lrm", "k", "beta", "lr", "lora_rank", "epochs"];
    for name in shared {
        row(&sd15, name);
        row(&sdxl, name);
        row(&tiny, name);
    }
    assert!(row(&sd15, "lora_rank").ends_with("= 4"));
    assert!(row(&sdxl, "lora_rank").ends_with("= 64"));
    assert!(row(&sdxl, "threshold_min").ends_with("= 0.45"));
    assert!(row(&tiny, "epochs").ends_with("= 2"));
    assert!(row(&tiny, "max_grad_norm").ends_with("= 1.0"));
    assert!(row(&sd15, "max_grad_norm").ends_with("= ()"));
}

#[test]
fn sd15_recipe_on_tiny_fixtures_writes_checkpoints_metrics_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.json");
    std::fs::write(
        &prompts,
        r#"[{"caption": "a red circle"}, {"caption": "a blue square"}]"#,
    )
    .unwrap();
    let run = dir.path().join("run");
    let mut p = Map::new();
    p.insert("model".into(), Dynamic::from("tests/fixtures/tiny-sd"));
    p.insert("lrm".into(), Dynamic::from("tests/fixtures/tiny-lrm"));
    p.insert(
        "prompt_file".into(),
        Dynamic::from(prompts.display().to_string()),
    );
    p.insert("epochs".into(), Dynamic::from(1_i64));
    p.insert("steps".into(), Dynamic::from(4_i64));
    p.insert("threshold_mode".into(), Dynamic::from("static"));
    p.insert("threshold".into(), Dynamic::from(0.0_f64));
    let out = run_script("scripts/lpo_sd15.rhai", &run, p);
    assert_eq!(out["epoch"].as_int().unwrap(), 1);
    assert!(!out["stopped"].as_bool().unwrap());
    assert!(out["global_step"].as_int().unwrap() >= 1);
    // the paper's SD1.5 LoRA: rank 4 on the attention projections
    let params = out["params"].clone().cast::<Map>();
    assert!(!params.is_empty());
    for (k, t) in &params {
        let t = t.clone().cast::<candle_core::Tensor>();
        if k.ends_with("lora_A.weight") {
            assert_eq!(t.dims()[0], 4, "{k}");
        }
    }
    let ck = run.join("checkpoints/step-1");
    assert!(ck.join("tensors.safetensors").is_file());
    assert!(ck.join("state.json").is_file());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    for key in ["loss", "valid_pairs", "score_mean", "pairs_t501_751", "lr"] {
        assert!(first.get(key).is_some(), "metrics lack {key}: {first}");
    }
    assert!((first["lr"].as_f64().unwrap() - 6e-5).abs() < 1e-12);
    let png = std::fs::read(run.join("validation/epoch-1.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(run.join("lora.safetensors").is_file());
    let kohya =
        candle_core::safetensors::load(run.join("lora_kohya.safetensors"), &Device::Cpu).unwrap();
    assert!(kohya.keys().all(|k| k.starts_with("lora_unet_")));
}

#[test]
fn sample_script_writes_pngs_with_and_without_lora() {
    let dir = tempfile::tempdir().unwrap();
    // a LoRA with nonzero B, in kohya naming
    let lora = dir.path().join("k.safetensors");
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
        lora.display()
    );
    engine_with(None).run(&script).unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(
        &prompts,
        "a red circle\n\n  a blue square  \na green triangle\n",
    )
    .unwrap();

    let sample = |name: &str, with_lora: bool| {
        let mut p = Map::new();
        p.insert(
            "prompt_file".into(),
            Dynamic::from(prompts.display().to_string()),
        );
        p.insert("steps".into(), Dynamic::from(3_i64));
        p.insert("batch".into(), Dynamic::from(2_i64));
        if with_lora {
            p.insert("lora".into(), Dynamic::from(lora.display().to_string()));
            p.insert("lora_format".into(), Dynamic::from("kohya"));
        }
        let run = dir.path().join(name);
        let out = run_script("scripts/sample.rhai", &run, p);
        assert_eq!(out["n"].as_int().unwrap(), 3);
        run.join("samples")
    };
    let plain = sample("plain", false);
    let plain2 = sample("plain2", false);
    let lora_out = sample("lora", true);
    let mut pngs: Vec<_> = std::fs::read_dir(&plain)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".png"))
        .collect();
    pngs.sort();
    assert_eq!(pngs.len(), 4, "{pngs:?}"); // 3 images + grid
    let read = |d: &Path| std::fs::read(d.join("grid.png")).unwrap();
    // seeded: the same run twice gives the same images; the LoRA changes them
    assert_eq!(read(&plain), read(&plain2));
    assert_ne!(read(&plain), read(&lora_out));
    let names: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(plain.join("prompts.json")).unwrap())
            .unwrap();
    assert_eq!(names, ["a red circle", "a blue square", "a green triangle"]);
}

#[test]
fn prompt_files_parse_and_empty_ones_fail() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("a.json");
    std::fs::write(&j, r#"[{"caption": "x y"}, "z", {"prompt": "w"}]"#).unwrap();
    let e = dir.path().join("e.txt");
    std::fs::write(&e, "\n  \n").unwrap();
    let b = dir.path().join("b.json");
    std::fs::write(&b, r#"[{"text": 1}]"#).unwrap();
    let script = format!(
        r#"
        let a = read_prompts("{}");
        let e1 = ""; let e2 = "";
        try {{ read_prompts("{}"); }} catch (err) {{ e1 = `${{err}}`; }}
        try {{ read_prompts("{}"); }} catch (err) {{ e2 = `${{err}}`; }}
        [a, e1, e2]
    "#,
        j.display(),
        e.display(),
        b.display()
    );
    let out: rhai::Array = engine_with(None).eval(&script).unwrap();
    let a: Vec<String> = out[0]
        .clone()
        .into_array()
        .unwrap()
        .into_iter()
        .map(|v| v.into_string().unwrap())
        .collect();
    assert_eq!(a, ["x y", "z", "w"]);
    assert!(out[1].to_string().contains("no prompts"), "{}", out[1]);
    assert!(out[2].to_string().contains("caption"), "{}", out[2]);
}
