//! LRM training data through the script API: batches from an image manifest (decode, resize,
//! crop, optional VAE, noise), bad input (an undecodable image, labels that do not sum to 1,
//! a parquet shard with a missing column) as counted skips or clear errors, `read_csv` and the
//! consistency filter, and the recipe's train/eval functions end to end.

use std::sync::Arc;

use candle_core::Device;
use lpo::runtime::control::RunControl;
use lpo::script::{build_engine, EngineOptions, Host};

fn engine() -> lpo::script::ScriptEngine {
    build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
}

fn eval<T: Clone + Send + Sync + 'static>(script: &str) -> T {
    engine()
        .engine
        .eval::<T>(script)
        .unwrap_or_else(|e| panic!("{e}\n{script}"))
}

fn eval_err(script: &str) -> String {
    match engine().engine.eval::<rhai::Dynamic>(script) {
        Ok(v) => panic!("expected an error, got {v:?}\n{script}"),
        Err(e) => e.to_string(),
    }
}

/// A manifest with 3 pairs of real PNGs, one pair whose image_1 is not an image, and one
/// pair with labels 0.7/0.7.
fn image_manifest(dir: &std::path::Path) -> std::path::PathBuf {
    for (name, (w, h), v) in [
        ("a.png", (24, 16), 200u8),
        ("b.png", (16, 24), 30),
        ("c.png", (20, 20), 120),
    ] {
        image::RgbImage::from_pixel(w, h, image::Rgb([v, v / 2, 255 - v]))
            .save(dir.join(name))
            .unwrap();
    }
    std::fs::write(dir.join("broken.png"), b"this is not a png").unwrap();
    let m = dir.join("pairs.jsonl");
    std::fs::write(
        &m,
        r#"{"prompt": "red", "image_0": "a.png", "image_1": "b.png", "label_0": 1, "label_1": 0}
{"prompt": "blue", "image_0": "b.png", "image_1": "broken.png", "label_0": 0, "label_1": 1}
{"prompt": "red", "image_0": "c.png", "image_1": "a.png", "label_0": 0.5, "label_1": 0.5}
{"prompt": "green", "image_0": "a.png", "image_1": "c.png", "label_0": 0.7, "label_1": 0.7}
{"prompt": "green", "image_0": "c.png", "image_1": "b.png", "label_0": 0, "label_1": 1}
"#,
    )
    .unwrap();
    m
}

#[test]
fn image_batches_decode_crop_noise_and_count_bad_images_once() {
    let dir = tempfile::tempdir().unwrap();
    let m = image_manifest(dir.path());
    let out: rhai::Map = eval(&format!(
        r#"
        let data = read_preferences("{m}");
        let n0 = data.len;
        let s0 = data.skipped;
        let r = rng(0);
        let b = data.batch([0, 1, 2, 3], #{{rng: r, resolution: 8, timesteps: 1}});
        let clean = data.batch([0, 2], #{{rng: r, resolution: 8, clean: true}});
        let again = data.batch([1, 3], #{{rng: r, resolution: 8}});
        let vae = load_vae("tests/fixtures/tiny-sd/vae");
        let z = data.batch([0, 3], #{{rng: r, resolution: 16, vae: vae, per_image_t: true}});
        #{{n0: n0, s0: s0, n: b.n, skipped: b.skipped, shape: b.latents_0.shape,
           t: b.t.to_array(), idx: b.indices, prompts: b.prompts,
           clean_max: clean.latents_0.abs().max().item(), clean_min: clean.latents_1.min().item(),
           again_n: again.n, total_skipped: data.skipped, summary: data.skip_summary(),
           zshape: z.latents_0.shape, zt: z.t.shape, scale: vae.downscale,
           labels: b.label_0.to_array(), num: b.num_examples.to_array()}}
        "#,
        m = m.display()
    ));
    let get = |k: &str| m_get(&out, k);
    assert_eq!(get("n0"), "4", "the 0.7/0.7 pair is skipped at read");
    assert_eq!(get("s0"), "1");
    assert_eq!(get("n"), "3", "the pair with the broken image is left out");
    assert_eq!(get("skipped"), "1");
    assert_eq!(
        get("shape"),
        "[3, 3, 8, 8]",
        "pixel space: images are the latents"
    );
    assert_eq!(get("t"), "[[1, 1], [1, 1], [1, 1]]");
    assert_eq!(get("idx"), "[0, 2, 3]");
    assert_eq!(get("prompts"), r#"["red", "red", "green"]"#);
    assert_eq!(get("labels"), "[1.0, 0.5, 0.0]");
    assert_eq!(
        get("num"),
        "[2.0, 2.0, 1.0]",
        "pairs per prompt after the skip at read"
    );
    // clean images are in [-1, 1]
    let clean_max: f64 = get("clean_max").parse().unwrap();
    let clean_min: f64 = get("clean_min").parse().unwrap();
    assert!(clean_max <= 1.0 && clean_min >= -1.0);
    // the broken pair is counted once, however often it is asked for
    assert_eq!(get("again_n"), "1");
    assert_eq!(get("total_skipped"), "2");
    let summary = get("summary");
    assert!(
        summary.contains("1 skipped: an image failed to decode")
            && summary.contains("must sum to 1"),
        "{summary}"
    );
    let scale: usize = get("scale").parse().unwrap();
    assert_eq!(get("zshape"), format!("[2, 4, {0}, {0}]", 16 / scale));
    assert_eq!(get("zt"), "[2, 2]");
}

fn m_get(m: &rhai::Map, k: &str) -> String {
    m.get(k).unwrap_or_else(|| panic!("no key {k}")).to_string()
}

#[test]
fn bad_input_is_a_clear_error() {
    let err = eval_err(
        r#"latent_pairs(#{prompts: ["a"], latents_0: zeros([1, 4, 2, 2]), latents_1: zeros([1, 4, 2, 2]),
                         label_0: [0.7], label_1: [0.7]})"#,
    );
    assert!(err.contains("must sum to 1"), "{err}");
    let err = eval_err(r#"let d = read_preferences("tests/fixtures/tiny-lrm/unet"); d"#);
    assert!(err.contains("tests/fixtures/tiny-lrm/unet"), "{err}");
    let err = eval_err(
        r#"let d = latent_pairs(#{prompts: ["a"], latents_0: zeros([1, 4, 2, 2]), latents_1: zeros([1, 4, 2, 2]),
                                label_0: [1.0], label_1: [0.0]});
           d.batch([0], #{})"#,
    );
    assert!(err.contains("rng"), "{err}");
    let err = eval_err(
        r#"let d = latent_pairs(#{prompts: ["a"], latents_0: zeros([1, 4, 2, 2]), latents_1: zeros([1, 4, 2, 2]),
                                label_0: [1.0], label_1: [0.0]});
           d.batch([3], #{rng: rng(0)})"#,
    );
    assert!(err.contains("out of range"), "{err}");

    // a parquet shard without the label columns: the file and the columns are named
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shard.parquet");
    {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        let schema = Arc::new(
            parquet::schema::parser::parse_message_type(
                "message s { REQUIRED BINARY caption (UTF8); REQUIRED BINARY jpg_0; REQUIRED BINARY jpg_1; }",
            )
            .unwrap(),
        );
        let file = std::fs::File::create(&p).unwrap();
        let mut w =
            SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))
                .unwrap();
        let mut rg = w.next_row_group().unwrap();
        while let Some(mut col) = rg.next_column().unwrap() {
            col.typed::<ByteArrayType>()
                .write_batch(&[ByteArray::from("x")], None, None)
                .unwrap();
            col.close().unwrap();
        }
        rg.close().unwrap();
        w.close().unwrap();
    }
    let err = eval_err(&format!(r#"read_preferences("{}")"#, p.display()));
    assert!(
        err.contains("shard.parquet") && err.contains("label_0") && err.contains("has_label"),
        "{err}"
    );
}

#[test]
fn read_csv_and_the_consistency_filter_strategies() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("gaps.csv");
    std::fs::write(
        &csv,
        "different_flag,aesthetic_gap,clipscore_gap,vqascore_gap,note\n\
         1,0.5,0.1,0.2,all agree\n\
         1,0.5,-0.1,0.2,\"clip, disagrees\"\n\
         1,-0.3,0.1,0.2,aesthetic disagrees\n\
         0,0.0,0.0,0.0,tie\n\
         1,0.2,0.3,-0.4,vqa disagrees\n",
    )
    .unwrap();
    let out: rhai::Map = eval(&format!(
        r#"
        import "consistency_filter" as cf;
        let rows = read_csv("{c}");
        #{{
            first: rows[0], note: rows[1].note,
            s0: cf::filter_csv("{c}", 0, #{{}}).kept,
            s1: cf::filter_csv("{c}", 1, #{{}}).kept,
            s2: cf::filter_csv("{c}", 2, #{{}}).kept,
            s3: cf::filter_csv("{c}", 3, #{{}}).kept,
            s3_drop_ties: cf::filter_csv("{c}", 3, #{{ties: "drop"}}).kept,
            counts: cf::filter_csv("{c}", 2, #{{}}).counts,
        }}
        "#,
        c = csv.display()
    ));
    assert_eq!(
        m_get(&out, "first"),
        r#"#{"aesthetic_gap": 0.5, "clipscore_gap": 0.1, "different_flag": 1, "note": "all agree", "vqascore_gap": 0.2}"#
    );
    assert_eq!(m_get(&out, "note"), "clip, disagrees");
    assert_eq!(m_get(&out, "s0"), "[0, 1, 2, 3, 4]");
    assert_eq!(m_get(&out, "s1"), "[0, 1, 3, 4]");
    assert_eq!(m_get(&out, "s2"), "[0, 3, 4]");
    assert_eq!(m_get(&out, "s3"), "[0, 3]");
    assert_eq!(m_get(&out, "s3_drop_ties"), "[0]");
    let counts = m_get(&out, "counts");
    assert!(
        counts.contains("\"kept_preferred\": 2") && counts.contains("\"ties\": 1"),
        "{counts}"
    );
    std::fs::write(&csv, "different_flag,aesthetic_gap\n1,0.5\n").unwrap();
    let err = eval_err(&format!(
        r#"import "consistency_filter" as cf; cf::filter_csv("{}", 3, #{{}})"#,
        csv.display()
    ));
    assert!(
        err.contains("gaps.csv") && err.contains("clipscore_gap") && err.contains("vqascore_gap"),
        "{err}"
    );
}

#[test]
fn recipe_trains_with_accumulation_and_both_loss_and_evaluates() {
    let out: rhai::Map = eval(
        r#"
        import "lrm_train" as lt;
        import "lrm_eval" as le;
        let lrm = load_lrm("tests/fixtures/tiny-lrm", #{trainable: true, guidance_scale: 1.0});
        let data = lt::synthetic_pairs(8, 3, #{size: 8});
        let out = lt::train(lrm, data, #{steps: 2, batch_size: 2, grad_accum: 2, lr: 1e-4,
                                         loss_type: "both", per_image_t: true, aux_loss_coeff: 0.5,
                                         train_unet: false, log_every: 0, quiet: true});
        let res = le::accuracy(lrm, data, #{timesteps: [1, 800], batch_size: 4});
        let bad = "";
        try { lt::train(lrm, data, #{stepz: 1}); } catch (e) { bad = `${e}`; }
        #{steps: out.step, n_params: out.params.len, pairs: out.history[0].pairs,
          table: le::table(res), n_results: res.results.len(), counted: res.results[1].counted,
          bad: bad}
        "#,
    );
    assert_eq!(m_get(&out, "steps"), "2");
    assert_eq!(
        m_get(&out, "n_params"),
        "3",
        "projections only with train_unet: false"
    );
    assert_eq!(m_get(&out, "pairs"), "4", "2 micro-batches of 2 pairs");
    assert_eq!(m_get(&out, "n_results"), "2");
    assert_eq!(m_get(&out, "counted"), "8");
    let table = m_get(&out, "table");
    assert!(
        table.contains("accuracy") && table.contains("800"),
        "{table}"
    );
    let bad = m_get(&out, "bad");
    assert!(
        bad.contains("unknown parameter `stepz` (did you mean `steps`?)"),
        "{bad}"
    );
}

/// `lpo run scripts/train_lrm.rhai` with checkpoints; a copy cut back to its step-2
/// checkpoint and resumed with `lpo run --resume` logs the same losses for steps 3 and 4.
#[test]
fn train_recipe_checkpoints_and_resumes_exactly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lpo"))
        .current_dir(root)
        .args(["run", "scripts/train_lrm.rhai", "--run-dir"])
        .arg(&a)
        .args([
            "--set",
            "steps=4",
            "--set",
            "checkpoint_every=2",
            "--set",
            "batch_size=2",
        ])
        .args(["--set", "synthetic_pairs=16"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(a.join("eval.json").is_file() && a.join("lrm/projections.safetensors").is_file());
    let losses = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{}:{}", v["step"], v["loss"])
            })
            .collect()
    };
    let full = losses(&a);
    assert_eq!(full.len(), 4);
    // cut a copy back to step 2
    let b = dir.path().join("b");
    std::fs::create_dir_all(b.join("checkpoints")).unwrap();
    for e in std::fs::read_dir(&a).unwrap() {
        let e = e.unwrap();
        // Not the lock, nor exit.json: the copy stands for a run cut short, not a finished one.
        if e.path().is_file() && e.file_name() != "lock" && e.file_name() != "exit.json" {
            std::fs::copy(e.path(), b.join(e.file_name())).unwrap();
        }
    }
    let ck = a.join("checkpoints/step-2");
    let to = b.join("checkpoints/step-2");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&ck).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    std::fs::write(b.join("metrics.jsonl"), {
        let text = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
        text.lines()
            .take(2)
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    })
    .unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lpo"))
        .current_dir(root)
        .args(["run", "--resume"])
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(
        losses(&b),
        full,
        "resumed steps 3 and 4 match the uninterrupted run"
    );
}
