//! Pick-a-Pic parquet shards: `caption`, `jpg_0`, `jpg_1`, `label_0`, `label_1`,
//! `num_example_per_prompt`, `has_label`, in any codec parquet has (none, snappy, gzip, brotli,
//! lz4, zstd). An image column holds the encoded bytes, or a Hugging Face `datasets` `Image()`
//! struct `{bytes, path}` (a path without bytes is relative to the shard's folder).
//!
//! The schema is checked before any row is read, so a wrong file is one error naming the file
//! and the column; a page that cannot be decoded names the file and its row group. Only a
//! row's own values (a null, a bad label) make a counted skip with its row number.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use parquet::basic::{ConvertedType, LogicalType, Repetition, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::{Type, TypePtr};

use super::data::{ImageSource, PreferencePair, PreferenceSet, Skipped};
use super::pair_loss::validate_labels;

/// The columns a Pick-a-Pic shard must have.
pub const PICKAPIC_COLUMNS: [&str; 7] = [
    "caption",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "num_example_per_prompt",
    "has_label",
];

/// What a column must hold.
#[derive(Clone, Copy)]
enum Expected {
    Text,
    Number,
    Image,
}

impl Expected {
    fn of(column: &str) -> Self {
        match column {
            "caption" => Expected::Text,
            "jpg_0" | "jpg_1" => Expected::Image,
            _ => Expected::Number,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Expected::Text => "a string",
            Expected::Number => "a number (double, float, integer or bool)",
            Expected::Image => {
                "encoded image bytes (binary) or a datasets Image struct {bytes, path}"
            }
        }
    }

    fn accepts(self, ty: &Type) -> bool {
        match self {
            Expected::Text => is_string(ty),
            Expected::Number => is_number(ty),
            Expected::Image => is_binary(ty) || image_struct_bytes(ty).is_some(),
        }
    }
}

fn is_scalar(ty: &Type) -> bool {
    ty.is_primitive() && ty.get_basic_info().repetition() != Repetition::REPEATED
}

fn is_string(ty: &Type) -> bool {
    is_scalar(ty)
        && ty.get_physical_type() == PhysicalType::BYTE_ARRAY
        && (ty.get_basic_info().converted_type() == ConvertedType::UTF8
            || matches!(
                ty.get_basic_info().logical_type_ref(),
                Some(LogicalType::String)
            ))
}

fn is_binary(ty: &Type) -> bool {
    is_scalar(ty)
        && ty.get_physical_type() == PhysicalType::BYTE_ARRAY
        && !is_string(ty)
        && ty.get_basic_info().converted_type() == ConvertedType::NONE
}

fn is_number(ty: &Type) -> bool {
    if !is_scalar(ty) {
        return false;
    }
    let plain = matches!(
        ty.get_basic_info().logical_type_ref(),
        None | Some(LogicalType::Integer { .. })
    ) && matches!(
        ty.get_basic_info().converted_type(),
        ConvertedType::NONE
            | ConvertedType::INT_8
            | ConvertedType::INT_16
            | ConvertedType::INT_32
            | ConvertedType::INT_64
            | ConvertedType::UINT_8
            | ConvertedType::UINT_16
            | ConvertedType::UINT_32
            | ConvertedType::UINT_64
    );
    plain
        && matches!(
            ty.get_physical_type(),
            PhysicalType::BOOLEAN
                | PhysicalType::INT32
                | PhysicalType::INT64
                | PhysicalType::FLOAT
                | PhysicalType::DOUBLE
        )
}

/// The `bytes` field of a `datasets` Image struct column.
fn image_struct_bytes(ty: &Type) -> Option<&TypePtr> {
    if !ty.is_group() || ty.get_basic_info().repetition() == Repetition::REPEATED {
        return None;
    }
    ty.get_fields()
        .iter()
        .find(|f| f.name() == "bytes" && is_binary(f))
}

/// A column's type in words, for errors.
fn describe_type(ty: &Type) -> String {
    if ty.is_group() {
        let fields: Vec<&str> = ty.get_fields().iter().map(|f| f.name()).collect();
        return format!("a group {{{}}}", fields.join(", "));
    }
    let info = ty.get_basic_info();
    let mut out = ty.get_physical_type().to_string();
    if let Some(logical) = info.logical_type_ref() {
        out += &format!(" ({logical:?})");
    } else if info.converted_type() != ConvertedType::NONE {
        out += &format!(" ({})", info.converted_type());
    }
    if info.repetition() == Repetition::REPEATED {
        out = format!("a repeated {out}");
    }
    out
}

/// The shard's top-level columns we read, checked against what each must hold; the projection
/// leaves every other column (Pick-a-Pic has urls, user ids, ...) unread.
fn checked_projection(path: &Path, root: &Type) -> Result<Type> {
    let fields = root.get_fields();
    let missing: Vec<&str> = PICKAPIC_COLUMNS
        .iter()
        .copied()
        .filter(|c| !fields.iter().any(|f| f.name() == *c))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: missing column(s) {}; a Pick-a-Pic shard needs {}",
            path.display(),
            missing.join(", "),
            PICKAPIC_COLUMNS.join(", ")
        );
    }
    let mut picked = Vec::new();
    for field in fields {
        if !PICKAPIC_COLUMNS.contains(&field.name()) {
            continue;
        }
        let expected = Expected::of(field.name());
        if !expected.accepts(field) {
            bail!(
                "{}: column `{}` holds {}; a Pick-a-Pic shard needs {} there",
                path.display(),
                field.name(),
                describe_type(field),
                expected.describe()
            );
        }
        picked.push(field.clone());
    }
    Type::group_type_builder(root.name())
        .with_fields(picked)
        .build()
        .with_context(|| format!("{}: cannot select the Pick-a-Pic columns", path.display()))
}

fn number(field: &Field) -> Option<f64> {
    Some(match field {
        Field::Double(v) => *v,
        Field::Float(v) => *v as f64,
        Field::Long(v) => *v as f64,
        Field::Int(v) => *v as f64,
        Field::Short(v) => *v as f64,
        Field::Byte(v) => *v as f64,
        Field::ULong(v) => *v as f64,
        Field::UInt(v) => *v as f64,
        Field::UShort(v) => *v as f64,
        Field::UByte(v) => *v as f64,
        Field::Bool(b) => *b as i32 as f64,
        _ => return None,
    })
}

/// An image cell: bytes, or a `datasets` Image struct's bytes, else its path (relative to `base`).
fn image(field: &Field, base: &Path) -> Option<ImageSource> {
    match field {
        Field::Bytes(b) => Some(ImageSource::Bytes(Arc::new(b.data().to_vec()))),
        Field::Group(row) => {
            let mut bytes = None;
            let mut path = None;
            for (name, value) in row.get_column_iter() {
                match (name.as_str(), value) {
                    ("bytes", Field::Bytes(b)) => bytes = Some(b.data().to_vec()),
                    ("path", Field::Str(p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                    _ => {}
                }
            }
            match (bytes, path) {
                (Some(b), _) => Some(ImageSource::Bytes(Arc::new(b))),
                (None, Some(p)) if p.is_absolute() => Some(ImageSource::Path(p)),
                (None, Some(p)) => Some(ImageSource::Path(base.join(p))),
                (None, None) => None,
            }
        }
        _ => None,
    }
}

/// One row's pair, or the reason it is skipped.
fn pair_of(fields: &HashMap<&str, &Field>, base: &Path) -> Result<PreferencePair, String> {
    let num = |k: &str| fields.get(k).and_then(|f| number(f));
    if num("has_label") == Some(0.0) {
        return Err("has_label is false".into());
    }
    let Some(Field::Str(caption)) = fields.get("caption") else {
        return Err("caption is null".into());
    };
    let (Some(label_0), Some(label_1)) = (num("label_0"), num("label_1")) else {
        return Err("label_0/label_1 null".into());
    };
    validate_labels(&[label_0 as f32], &[label_1 as f32])
        .map_err(|reason| reason.replace("pair 0", "pair"))?;
    let cell = |k: &str| fields.get(k).and_then(|f| image(f, base));
    let (Some(image_0), Some(image_1)) = (cell("jpg_0"), cell("jpg_1")) else {
        return Err("jpg_0/jpg_1 null (no image bytes or path)".into());
    };
    Ok(PreferencePair {
        prompt: caption.clone(),
        image_0,
        image_1,
        label_0: label_0 as f32,
        label_1: label_1 as f32,
        num_examples_per_prompt: num("num_example_per_prompt").unwrap_or(0.0) as f32,
        group: None,
    })
}

/// Read a Pick-a-Pic parquet shard (rows without a label are skipped and counted).
pub fn read_pickapic_parquet(path: &Path) -> Result<PreferenceSet> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open parquet shard {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{} is not a readable parquet file", path.display()))?;
    let projection = checked_projection(path, reader.metadata().file_metadata().schema())?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut set = PreferenceSet::default();
    let mut row_index = 0usize;
    for group in 0..reader.num_row_groups() {
        // Errors past the schema check come from decoding a page (codec, corruption): they
        // belong to the row group, not to the row the iterator happened to be on.
        let first_row = row_index;
        let cannot_read = || {
            format!(
                "{}: cannot read row group {group} (rows from {first_row})",
                path.display()
            )
        };
        let row_group = reader.get_row_group(group).with_context(cannot_read)?;
        let rows = row_group
            .get_row_iter(Some(projection.clone()))
            .with_context(cannot_read)?;
        for row in rows {
            let row = row.with_context(cannot_read)?;
            let fields: HashMap<&str, &Field> = row
                .get_column_iter()
                .map(|(name, field)| (name.as_str(), field))
                .collect();
            match pair_of(&fields, base) {
                Ok(pair) => set.pairs.push(pair),
                Err(reason) => set.skipped.push(Skipped {
                    location: format!("{} row {row_index}", path.display()),
                    reason,
                }),
            }
            row_index += 1;
        }
    }
    set.fill_missing_counts();
    Ok(set)
}
