"""Round trip: preference parquet files written by pyarrow read in lpo, pair for pair.

    pip install pyarrow pillow
    LPO_BIN=target/release/lpo python tests/interop/check_parquet.py

Writes, into a temporary folder, Pick-a-Pic shards of 10 pairs each in every codec pyarrow
has, with the layouts other tools produce: polars' large_string / large_binary columns and
zstd, small row groups (several per file), dictionary-encoded captions, a null label (a row
lpo must skip and count), and Hugging Face `datasets` Image
structs `{bytes, path}`. lpo reads each with `read_preferences`, decodes every pair with
`data.batch` and reports prompts, labels and skips; this script compares them with what it
wrote. Exits non-zero on the first failure.
"""

import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[2]
LPO_BIN = os.environ.get("LPO_BIN", str(REPO / "target" / "release" / "lpo"))
ROWS = 10
NULL_ROW = 7

SCRIPT = r"""
let out = [];
for f in params.files.split(",") {
    let data = read_preferences(params.dir + "/" + f);
    let idx = [];
    for i in 0..data.len { idx.push(i); }
    let b = data.batch(idx, #{rng: rng(0), resolution: 4, clean: true});
    out.push(#{file: f, n: data.len, decoded: b.n, prompts: b.prompts,
               labels: b.label_0.to_array(), skips: data.skip_summary()});
}
write_json(out, run_dir() + "/read.json");
"""


def png(row, side):
    img = Image.new("RGB", (5, 3), (20 * row, 100 * side, 7))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def table(string_type, binary_type, image_struct):
    captions = [f"prompt {r % 3}" for r in range(ROWS)]
    label_0 = [float(r % 2) for r in range(ROWS)]
    label_0[NULL_ROW] = None
    cols = {
        "caption": pa.array(captions, string_type),
        "label_0": pa.array(label_0, pa.float64()),
        "label_1": pa.array([None if l is None else 1.0 - l for l in label_0], pa.float64()),
        "num_example_per_prompt": pa.array([1] * ROWS, pa.int64()),
        "has_label": pa.array([True] * ROWS, pa.bool_()),
        "best_image_uid": pa.array([f"uid{r}" for r in range(ROWS)], string_type),
    }
    for side in (0, 1):
        images = [png(r, side) for r in range(ROWS)]
        if image_struct:
            struct = pa.struct([("bytes", binary_type), ("path", pa.string())])
            cols[f"jpg_{side}"] = pa.array(
                [{"bytes": b, "path": f"{r}_{side}.png"} for r, b in enumerate(images)], struct)
        else:
            cols[f"jpg_{side}"] = pa.array(images, binary_type)
    return pa.table(cols)


def write_files(folder):
    files = {}
    for codec in ["none", "snappy", "gzip", "brotli", "lz4", "zstd"]:
        name = f"arrow_{codec}.parquet"
        pq.write_table(table(pa.string(), pa.binary(), False), folder / name,
                       compression=codec, row_group_size=3)
        files[name] = "pyarrow, 4 row groups"
    pq.write_table(table(pa.large_string(), pa.large_binary(), False), folder / "polars.parquet",
                   compression="zstd", use_dictionary=["caption"])
    files["polars.parquet"] = "large_string / large_binary, zstd"
    pq.write_table(table(pa.string(), pa.binary(), True), folder / "hf_image.parquet",
                   row_group_size=4)
    files["hf_image.parquet"] = "datasets Image structs"
    return files


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data = tmp / "data"
        data.mkdir()
        files = write_files(data)
        script = tmp / "read.rhai"
        script.write_text(SCRIPT)
        run_dir = tmp / "run"
        cmd = [LPO_BIN, "run", str(script), "--run-dir", str(run_dir),
               "--set", f"dir={data}", "--set", f"files={','.join(files)}"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            fail(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        results = json.loads((run_dir / "read.json").read_text())
        kept = [r for r in range(ROWS) if r != NULL_ROW]
        for result in results:
            what = f"{result['file']} ({files[result['file']]})"
            expected_prompts = [f"prompt {r % 3}" for r in kept]
            expected_labels = [float(r % 2) for r in kept]
            if result["n"] != len(kept) or result["decoded"] != len(kept):
                fail(f"{what}: {result['n']} pairs, {result['decoded']} decoded; expected {len(kept)}")
            if result["prompts"] != expected_prompts or result["labels"] != expected_labels:
                fail(f"{what}: read {result['prompts']} {result['labels']}")
            if "1 skipped: label_0/label_1 null" not in result["skips"]:
                fail(f"{what}: the null-label row is not counted: {result['skips']!r}")
            print(f"ok: {what}: {len(kept)} pairs read and decoded, the null-label row counted")
    print("check_parquet: all checks passed")


if __name__ == "__main__":
    main()
