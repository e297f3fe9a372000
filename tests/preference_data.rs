//! Preference data readers: bad rows are counted with a reason, bad files named.

use std::sync::Arc;

use lpo::reward::data::{read_manifest, read_pickapic_parquet, read_preferences};
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

enum Col {
    Str(Vec<&'static str>),
    Bytes(Vec<Vec<u8>>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

fn write_parquet(path: &std::path::Path, schema: &str, cols: Vec<Col>) {
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let file = std::fs::File::create(path).unwrap();
    let mut writer =
        SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))
            .unwrap();
    let mut rg = writer.next_row_group().unwrap();
    let mut cols = cols.into_iter();
    while let Some(mut col) = rg.next_column().unwrap() {
        match cols.next().unwrap() {
            Col::Str(v) => {
                let v: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(*s)).collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            Col::Bytes(v) => {
                let v: Vec<ByteArray> = v.into_iter().map(ByteArray::from).collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            Col::F64(v) => {
                col.typed::<DoubleType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            Col::I64(v) => {
                col.typed::<Int64Type>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            Col::Bool(v) => {
                col.typed::<BoolType>().write_batch(&v, None, None).unwrap();
            }
        }
        col.close().unwrap();
    }
    rg.close().unwrap();
    writer.close().unwrap();
}

const FULL: &str = "message s { REQUIRED BINARY caption (UTF8); REQUIRED BINARY jpg_0; REQUIRED BINARY jpg_1;
    REQUIRED DOUBLE label_0; REQUIRED DOUBLE label_1; REQUIRED INT64 num_example_per_prompt; REQUIRED BOOLEAN has_label; }";

#[test]
fn pickapic_shard_reads_and_counts_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("shard.parquet");
    write_parquet(
        &p,
        FULL,
        vec![
            Col::Str(vec!["a cat", "a dog", "a tie", "bad labels", "unlabeled"]),
            Col::Bytes(vec![vec![1, 2], vec![3], vec![4], vec![5], vec![6]]),
            Col::Bytes(vec![vec![7], vec![8], vec![9], vec![10], vec![11]]),
            Col::F64(vec![1.0, 0.0, 0.5, 0.7, 1.0]),
            Col::F64(vec![0.0, 1.0, 0.5, 0.7, 0.0]),
            Col::I64(vec![1, 2, 2, 1, 1]),
            Col::Bool(vec![true, true, true, true, false]),
        ],
    );
    let set = read_pickapic_parquet(&p).unwrap();
    assert_eq!(set.pairs.len(), 3);
    assert_eq!(set.pairs[2].label_0, 0.5);
    assert_eq!(set.pairs[1].num_examples_per_prompt, 2.0);
    assert_eq!(set.skipped.len(), 2);
    let summary = set.skip_summary();
    assert!(
        summary.contains("has_label is false") && summary.contains("must sum to 1"),
        "{summary}"
    );
}

#[test]
fn pickapic_shard_missing_column_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.parquet");
    write_parquet(
        &p,
        "message s { REQUIRED BINARY caption (UTF8); REQUIRED BINARY jpg_0; }",
        vec![Col::Str(vec!["x"]), Col::Bytes(vec![vec![1]])],
    );
    let err = format!("{:#}", read_pickapic_parquet(&p).unwrap_err());
    assert!(
        err.contains("bad.parquet") && err.contains("jpg_1") && err.contains("has_label"),
        "{err}"
    );
    let err = format!(
        "{:#}",
        read_preferences(&dir.path().join("nope.parquet")).unwrap_err()
    );
    assert!(err.contains("nope.parquet"), "{err}");
}

#[test]
fn manifest_reads_resolves_paths_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("pairs.jsonl");
    std::fs::write(
        &m,
        r#"{"prompt": "a red circle", "image_0": "img/a.png", "image_1": "img/b.png", "label_0": 1, "label_1": 0}
{"prompt": "a red circle", "image_0": "img/c.png", "image_1": "img/d.png", "label_0": 0.5, "label_1": 0.5}
{"prompt": "a blue square", "image_0": "img/e.png", "image_1": "img/f.png", "label_0": 0.9, "label_1": 0.9}
"#,
    )
    .unwrap();
    let set = read_manifest(&m).unwrap();
    assert_eq!(set.pairs.len(), 2);
    assert_eq!(set.pairs[0].num_examples_per_prompt, 2.0);
    match &set.pairs[0].image_0 {
        lpo::reward::data::ImageSource::Path(p) => assert_eq!(p, &dir.path().join("img/a.png")),
        other => panic!("{other:?}"),
    }
    assert_eq!(set.skipped.len(), 1);
    assert!(set.skipped[0].location.ends_with("pairs.jsonl:3"));
    std::fs::write(
        &m,
        "{\"prompt\": \"x\", \"image_0\": \"a\", \"label_0\": 1, \"label_1\": 0}\n",
    )
    .unwrap();
    let err = format!("{:#}", read_manifest(&m).unwrap_err());
    assert!(
        err.contains("pairs.jsonl:1") && err.contains("image_1"),
        "{err}"
    );
}
