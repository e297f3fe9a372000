//! CLIP tokenizer against the reference ids (tests/fixtures/golden/tokenizer_check.json and
//! clip_text.safetensors `input_ids`), through tokenizer.json AND through the diffusers
//! vocab.json + merges.txt layout (a copy of the folder without tokenizer.json).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lpo::models::tokenizer::{ClipTokenizer, TokenizerSource};
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tok_dir() -> PathBuf {
    fixtures().join("tiny-sd/tokenizer")
}

struct Case {
    prompt: String,
    slow: Vec<u32>,
    fast: Vec<u32>,
    matches: bool,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("golden/tokenizer_check.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    };
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Case {
            prompt: r["prompt"].as_str().unwrap().to_string(),
            slow: ids(&r["slow"]),
            fast: ids(&r["fast"]),
            matches: r["match"].as_bool().unwrap(),
        })
        .collect()
}

/// A copy of the tokenizer folder, minus `drop` files.
fn copy_without(drop: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tok_dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().to_string();
        if !drop.contains(&name.as_str()) {
            std::fs::copy(entry.path(), tmp.path().join(&name)).unwrap();
        }
    }
    tmp
}

fn golden_input_ids() -> Vec<Vec<i64>> {
    let t = candle_core::safetensors::load(
        fixtures().join("golden/clip_text.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    t["input_ids"].to_vec2::<i64>().unwrap()
}

fn check_all(tok: &ClipTokenizer) {
    let cases = cases();
    assert_eq!(cases.len(), 8);
    for c in &cases {
        let ids = tok.encode_one(&c.prompt).unwrap();
        assert_eq!(ids.len(), 77);
        // We match the fast tokenizer (tokenizer.json) everywhere, the slow one where they agree.
        assert_eq!(ids, c.fast, "prompt {:?}", c.prompt);
        if c.matches {
            assert_eq!(ids, c.slow, "prompt {:?}", c.prompt);
        }
    }
    // The one documented slow/fast difference: html entities (slow unescapes them).
    let html = cases.iter().find(|c| !c.matches).unwrap();
    assert!(html.prompt.contains("&amp;"));
    assert_ne!(tok.encode_one(&html.prompt).unwrap(), html.slow);

    // Batched tensor equals clip_text.safetensors input_ids (the first 7 prompts).
    let prompts: Vec<&str> = cases.iter().take(7).map(|c| c.prompt.as_str()).collect();
    let t = tok.encode(&prompts).unwrap();
    assert_eq!(t.dims(), &[7, 77]);
    assert_eq!(t.dtype(), candle_core::DType::I64);
    assert_eq!(t.to_vec2::<i64>().unwrap(), golden_input_ids());
}

#[test]
fn tokenizer_json_matches_reference() {
    let tok = ClipTokenizer::load(&tok_dir()).unwrap();
    assert!(matches!(tok.source(), TokenizerSource::TokenizerJson(_)));
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
        (49406, 49407, 49407, 77)
    );
    check_all(&tok);
}

#[test]
fn vocab_merges_layout_matches_reference() {
    let tmp = copy_without(&["tokenizer.json"]);
    let tok = ClipTokenizer::load(tmp.path()).unwrap();
    assert!(matches!(tok.source(), TokenizerSource::VocabMerges { .. }));
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_length()),
        (49406, 49407, 49407, 77)
    );
    check_all(&tok);
}

#[test]
fn truncation_keeps_eos_last_and_counts() {
    let tok = ClipTokenizer::load(&tok_dir()).unwrap();
    let long = "a very long prompt with many words ".repeat(12);
    let ids = tok.encode_one(&long).unwrap();
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert!(ids[1..76].iter().all(|&i| i != 49407));
    assert_eq!(tok.token_count(&long).unwrap(), 77);
    assert_eq!(tok.token_count("a photo of a cat").unwrap(), 7);
    assert_eq!(
        tok.decode(&tok.encode_one("a photo of a cat").unwrap())
            .unwrap()
            .trim(),
        "a photo of a cat"
    );
}

/// SD2.1 and SDXL's second tokenizer pad with `!` (id 0): read from tokenizer_config.json.
#[test]
fn pad_token_from_config() {
    for drop_json in [false, true] {
        let tmp = copy_without(if drop_json { &["tokenizer.json"] } else { &[] });
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = tmp.path().join(name);
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            v["pad_token"] = serde_json::Value::String("!".into());
            std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
        }
        let tok = ClipTokenizer::load(tmp.path()).unwrap();
        assert_eq!(tok.pad_id(), 0, "drop tokenizer.json: {drop_json}");
        let ids = tok.encode_one("a photo of a cat!").unwrap();
        // "!" inside the text is the ordinary token `!</w>` (256), padding is `!` (0).
        assert_eq!(&ids[..8], &[49406, 320, 1125, 539, 320, 2368, 256, 49407]);
        assert!(ids[8..].iter().all(|&i| i == 0));
    }
}

#[test]
fn missing_merges_is_a_clear_error() {
    let tmp = copy_without(&["tokenizer.json", "merges.txt"]);
    let err = ClipTokenizer::load(tmp.path()).err().expect("must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("merges.txt"), "{msg}");
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");

    // The same through the script API: a catchable error, not a panic.
    let engine = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
    .engine;
    let script = format!("load_tokenizer({:?})", tmp.path().display().to_string());
    let err = engine
        .eval::<rhai::Dynamic>(&script)
        .expect_err("must fail");
    assert!(err.to_string().contains("merges.txt"), "{err}");

    // A missing folder and a corrupt tokenizer.json are errors too.
    assert!(ClipTokenizer::load(&tmp.path().join("nope")).is_err());
    let bad = copy_without(&[]);
    std::fs::write(bad.path().join("tokenizer.json"), "{ not json").unwrap();
    let msg = format!("{:#}", ClipTokenizer::load(bad.path()).err().unwrap());
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn script_api_encode() {
    let engine = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
    .engine;
    let dir = tok_dir().display().to_string();
    let ids: Tensor = engine
        .eval(&format!(
            r#"let tok = load_tokenizer({dir:?}); tok.encode(["a photo of a cat", "A majestic lion, standing on a rock at sunset; highly detailed, 8k!"])"#
        ))
        .unwrap();
    assert_eq!(ids.dims(), &[2, 77]);
    let golden = golden_input_ids();
    assert_eq!(ids.to_vec2::<i64>().unwrap(), golden[..2].to_vec());
    let one: Tensor = engine
        .eval(&format!(
            r#"let tok = load_tokenizer({dir:?}); tok.encode("a photo of a cat")"#
        ))
        .unwrap();
    assert_eq!(one.to_vec2::<i64>().unwrap(), golden[..1].to_vec());
    let ints: rhai::Array = engine
        .eval(&format!(r#"let tok = load_tokenizer({dir:?}); [tok.pad_id, tok.bos_id, tok.eos_id, tok.max_length]"#))
        .unwrap();
    let ints: Vec<i64> = ints.into_iter().map(|v| v.as_int().unwrap()).collect();
    assert_eq!(ints, vec![49407, 49406, 49407, 77]);
    let err = engine
        .eval::<Tensor>(&format!(
            r#"let tok = load_tokenizer({dir:?}); tok.encode([1, 2])"#
        ))
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a string"), "{err}");
}
