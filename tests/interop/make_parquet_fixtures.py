"""Write the parquet fixtures of tests/interop_parquet.rs into tests/fixtures/interop/parquet/.

    pip install pyarrow==26.0.1 pillow
    python tests/interop/make_parquet_fixtures.py

Each file is a three-row Pick-a-Pic shard (caption, jpg_0, jpg_1, label_0, label_1,
num_example_per_prompt, has_label) whose images are small PNGs with the pixel pattern of
`pixel()` below (the Rust test recomputes it):

- `pairs_<codec>.parquet` for each codec pyarrow writes (polars defaults to zstd, pandas and
  `datasets` to snappy), jpg_0/jpg_1 plain binary columns as in yuvalkirstain/pickapic_v2;
- `pairs_hf_image.parquet`: jpg_0/jpg_1 as Hugging Face `datasets` writes an `Image()` feature,
  a struct `{bytes: binary, path: string}` with the feature recorded in the schema's
  `huggingface` metadata; row 2's jpg_1 has no bytes, only a path relative to the file
  (`images/row2_1.png`, also written), as `datasets` stores images kept on disk.

`parquet_rows/row_groups.parquet`: the three pairs and a fourth row whose labels are null,
written in row groups of two rows (the skip must name row 3, counted across row groups);

and, in tests/fixtures/interop/parquet_bad/, files the reader must refuse as a whole:

- `label_as_string.parquet`: label_0 written as strings ("1.0"), a schema error;
- `image_as_string.parquet`: jpg_1 holding file names as strings instead of image bytes.
"""

import io
import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "interop"
OUT = FIXTURES / "parquet"
BAD = FIXTURES / "parquet_bad"
WIDTH, HEIGHT = 6, 4
CODECS = ["none", "snappy", "gzip", "brotli", "lz4", "zstd"]
CAPTIONS = ["a red circle", "a blue square", "a tie"]
LABELS = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]


def pixel(row, side, x, y):
    """RGB of pixel (x, y) of image `side` (0 or 1) of `row`."""
    return (40 * x + 7 * row, 50 * y + 100 * side, 10 * (x + y) + 60 * row)


def png(row, side):
    img = Image.new("RGB", (WIDTH, HEIGHT))
    for y in range(HEIGHT):
        for x in range(WIDTH):
            img.putpixel((x, y), pixel(row, side, x, y))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def common_columns():
    return {
        "caption": pa.array(CAPTIONS, pa.string()),
        "label_0": pa.array([l[0] for l in LABELS], pa.float64()),
        "label_1": pa.array([l[1] for l in LABELS], pa.float64()),
        "num_example_per_prompt": pa.array([1, 1, 1], pa.int64()),
        "has_label": pa.array([True, True, True], pa.bool_()),
    }


def plain_table():
    cols = common_columns()
    for side in (0, 1):
        cols[f"jpg_{side}"] = pa.array([png(r, side) for r in range(3)], pa.binary())
    return pa.table(cols)


def hf_image_table():
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = common_columns()
    for side in (0, 1):
        cells = [{"bytes": png(r, side), "path": f"row{r}_{side}.png"} for r in range(3)]
        if side == 1:
            cells[2] = {"bytes": None, "path": "images/row2_1.png"}
        cols[f"jpg_{side}"] = pa.array(cells, image_type)
    features = {
        "caption": {"dtype": "string", "_type": "Value"},
        "jpg_0": {"_type": "Image"},
        "jpg_1": {"_type": "Image"},
        "label_0": {"dtype": "float64", "_type": "Value"},
        "label_1": {"dtype": "float64", "_type": "Value"},
        "num_example_per_prompt": {"dtype": "int64", "_type": "Value"},
        "has_label": {"dtype": "bool", "_type": "Value"},
    }
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.table(cols).replace_schema_metadata(meta)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    table = plain_table()
    for codec in CODECS:
        pq.write_table(table, OUT / f"pairs_{codec}.parquet", compression=codec)
    pq.write_table(hf_image_table(), OUT / "pairs_hf_image.parquet")
    (OUT / "images").mkdir(exist_ok=True)
    (OUT / "images" / "row2_1.png").write_bytes(png(2, 1))
    rows = FIXTURES / "parquet_rows"
    rows.mkdir(exist_ok=True)
    four = pa.concat_tables([table, table.slice(0, 1)])
    nulls = pa.array([l[0] for l in LABELS] + [None], pa.float64())
    four = four.set_column(four.schema.get_field_index("label_0"), "label_0", nulls)
    nulls = pa.array([l[1] for l in LABELS] + [None], pa.float64())
    four = four.set_column(four.schema.get_field_index("label_1"), "label_1", nulls)
    pq.write_table(four, rows / "row_groups.parquet", row_group_size=2)
    BAD.mkdir(exist_ok=True)
    table = plain_table()
    labels = pa.array([str(l[0]) for l in LABELS], pa.string())
    pq.write_table(table.set_column(1, "label_0", labels), BAD / "label_as_string.parquet")
    names = pa.array([f"row{r}_1.png" for r in range(3)], pa.string())
    jpg_1 = table.schema.get_field_index("jpg_1")
    pq.write_table(table.set_column(jpg_1, "jpg_1", names), BAD / "image_as_string.parquet")
    for path in sorted(FIXTURES.rglob("*.p*")):
        print(f"{path.relative_to(FIXTURES)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
