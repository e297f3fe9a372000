//! Preference parquet files as other tools write them (tests/interop/make_parquet_fixtures.py):
//! every codec pyarrow writes, Hugging Face `datasets` Image structs `{bytes, path}`, and files
//! that fail as a whole (wrong column types, a corrupt page) with errors naming the file.

use std::path::{Path, PathBuf};

use lpo::reward::data::{read_pickapic_parquet, read_preferences, ImageSource};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop")
}

const WIDTH: u32 = 6;
const HEIGHT: u32 = 4;
const CAPTIONS: [&str; 3] = ["a red circle", "a blue square", "a tie"];
const LABELS: [(f32, f32); 3] = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)];

/// The fixture script's `pixel(row, side, x, y)`.
fn pixel(row: u32, side: u32, x: u32, y: u32) -> [u8; 3] {
    [
        (40 * x + 7 * row) as u8,
        (50 * y + 100 * side) as u8,
        (10 * (x + y) + 60 * row) as u8,
    ]
}

fn decode(source: &ImageSource) -> image::RgbImage {
    match source {
        ImageSource::Bytes(b) => image::load_from_memory(b).unwrap().to_rgb8(),
        ImageSource::Path(p) => image::open(p).unwrap().to_rgb8(),
    }
}

/// The three pairs of a fixture file, pixels included.
fn assert_fixture_rows(path: &Path) {
    let set = read_pickapic_parquet(path).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(set.skipped.is_empty(), "{:?}", set.skipped);
    assert_eq!(set.pairs.len(), 3, "{}", path.display());
    for (row, pair) in set.pairs.iter().enumerate() {
        assert_eq!(pair.prompt, CAPTIONS[row]);
        assert_eq!((pair.label_0, pair.label_1), LABELS[row]);
        assert_eq!(pair.num_examples_per_prompt, 1.0);
        for (side, source) in [&pair.image_0, &pair.image_1].into_iter().enumerate() {
            let img = decode(source);
            assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
            for (x, y, p) in img.enumerate_pixels() {
                assert_eq!(
                    p.0,
                    pixel(row as u32, side as u32, x, y),
                    "{} row {row} image {side} pixel ({x}, {y})",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn every_codec_reads_rows_and_pixels() {
    for codec in ["none", "snappy", "gzip", "brotli", "lz4", "zstd"] {
        assert_fixture_rows(&fixtures().join(format!("parquet/pairs_{codec}.parquet")));
    }
}

#[test]
fn datasets_image_structs_read_bytes_and_relative_paths() {
    let path = fixtures().join("parquet/pairs_hf_image.parquet");
    assert_fixture_rows(&path);
    let set = read_pickapic_parquet(&path).unwrap();
    assert!(matches!(set.pairs[0].image_0, ImageSource::Bytes(_)));
    match &set.pairs[2].image_1 {
        ImageSource::Path(p) => assert_eq!(p, &fixtures().join("parquet/images/row2_1.png")),
        other => panic!("row 2's jpg_1 has only a path: {other:?}"),
    }
}

#[test]
fn a_folder_of_shards_reads_every_file() {
    let set = read_preferences(&fixtures().join("parquet")).unwrap();
    assert_eq!(set.pairs.len(), 7 * 3);
    assert!(set.skipped.is_empty());
}

/// A schema that cannot hold Pick-a-Pic pairs is one error naming the file and column, not a
/// skip of every row.
#[test]
fn wrong_column_types_are_one_error_naming_file_and_column() {
    for (file, column, held) in [
        ("label_as_string.parquet", "`label_0`", "String"),
        ("image_as_string.parquet", "`jpg_1`", "String"),
    ] {
        let path = fixtures().join("parquet_bad").join(file);
        let err = format!("{:#}", read_pickapic_parquet(&path).unwrap_err());
        assert!(
            err.contains(file) && err.contains(column) && err.contains(held),
            "{err}"
        );
        assert!(
            !err.contains("row"),
            "a whole-file error names no row: {err}"
        );
    }
}

/// A page that does not decompress fails the file's row group, not "row 0".
#[test]
fn a_corrupt_page_names_the_file_and_row_group_not_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.parquet");
    let mut bytes = std::fs::read(fixtures().join("parquet/pairs_zstd.parquet")).unwrap();
    // inside the zstd-compressed dictionary page of the jpg_0 column chunk
    for b in &mut bytes[600..680] {
        *b ^= 0xff;
    }
    std::fs::write(&path, bytes).unwrap();
    let err = format!("{:#}", read_pickapic_parquet(&path).unwrap_err());
    assert!(
        err.contains("corrupt.parquet") && err.contains("row group 0"),
        "{err}"
    );
    assert!(!err.contains("row 0"), "{err}");
}

#[test]
fn a_truncated_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.parquet");
    let bytes = std::fs::read(fixtures().join("parquet/pairs_gzip.parquet")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", read_preferences(&path).unwrap_err());
    assert!(
        err.contains("truncated.parquet") && err.contains("not a readable parquet file"),
        "{err}"
    );
    assert!(!err.contains("row 0"), "{err}");
}

/// Through the script API: every pair of the folder decodes, the path-only image included (it
/// passes the file gate as a manifest's paths do).
#[test]
fn script_batches_decode_every_fixture_pair() {
    use candle_core::Device;
    use lpo::runtime::control::RunControl;
    use lpo::script::{build_engine, EngineOptions, Host};
    let engine = build_engine(
        Host::new(RunControl::new(), Device::Cpu, 0),
        &EngineOptions::default(),
    )
    .engine;
    let script = format!(
        r#"
        let data = read_preferences("{}");
        let idx = [];
        for i in 0..data.len {{ idx.push(i); }}
        let b = data.batch(idx, #{{rng: rng(0), resolution: 4, clean: true}});
        [data.len, b.n, data.skipped]
        "#,
        fixtures().join("parquet").display()
    );
    let out: rhai::Array = engine.eval(&script).unwrap_or_else(|e| panic!("{e}"));
    let out: Vec<i64> = out.into_iter().map(|v| v.as_int().unwrap()).collect();
    assert_eq!(out, vec![21, 21, 0]);
}

/// A null label is the row's own problem: counted as a skip that names its row, numbered
/// across row groups.
#[test]
fn a_skipped_row_is_numbered_across_row_groups() {
    let path = fixtures().join("parquet_rows/row_groups.parquet");
    let set = read_pickapic_parquet(&path).unwrap();
    assert_eq!(set.pairs.len(), 3);
    assert_eq!(
        set.pairs[2].prompt, CAPTIONS[2],
        "row 2 sits in the second row group"
    );
    assert_eq!(set.skipped.len(), 1);
    assert!(
        set.skipped[0]
            .location
            .ends_with("row_groups.parquet row 3"),
        "{:?}",
        set.skipped[0]
    );
    assert_eq!(set.skipped[0].reason, "label_0/label_1 null");
}
