#!/usr/bin/env bash
# The device check (issue 8), for one call on a GPU machine with the carried binary:
#   1. the golden parity suite on cuda:0 in f32 and in bf16;
#   2. SD1.5-shaped LPO sampling / training steps at 512 px in f32 and bf16, with the
#      reference as adapters-off vs a second UNet copy (peak memory of each process);
#   3. the same at SDXL shape, 1024 px, in bf16.
# Each bench process is stopped after STEP_TIMEOUT seconds (default 120).
# Writes $OUT/gpu_report.json (+ logs). Usage (from the repo root, on the GPU machine):
#   scripts/gpu_check.sh ./lpo-cuda [OUT_DIR]
set -uo pipefail
BIN="${1:?usage: gpu_check.sh LPO_BINARY [OUT_DIR]}"
OUT="${2:-${OUT:-gpu-check-out}}"
mkdir -p "$OUT"
FINAL="$OUT"
OUT="$(mktemp -d)"   # details go here; FINAL gets the report, the log and one archive
RUN="$(dirname "$0")/run-on-gpu.sh"
LOG="$OUT/gpu_check.log"
: > "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
echo "GPU: $(cat "$OUT/gpu.txt")" | tee -a "$LOG"

# Peak memory.used (MiB) on GPU 0 while a command runs: nvidia-smi sampled every 50 ms.
peak_of() {
  local tag="$1"; shift
  local memlog="$OUT/mem-$tag.csv"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$memlog" 2>/dev/null &
  local smi=$!
  local start=$(date +%s.%N)
  timeout "${STEP_TIMEOUT:-120}" "$RUN" "$BIN" "$@" > "$OUT/$tag.json" 2>> "$LOG"
  local rc=$?
  local end=$(date +%s.%N)
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  local peak=$(sort -n "$memlog" | tail -1)
  echo "{\"tag\": \"$tag\", \"rc\": $rc, \"wall_s\": $(awk "BEGIN {print $end - $start}"), \"peak_mib\": ${peak:-null}}" > "$OUT/$tag.meta.json"
  echo "$tag: rc=$rc peak=${peak}MiB $(tr -d '\n ' < "$OUT/$tag.json" | cut -c1-300)" | tee -a "$LOG"
}

# 1. Parity.
for dt in f32 bf16; do
  timeout 120 "$RUN" "$BIN" run scripts/gpu/parity.rhai --device cuda:0 --set dtype=$dt --set out="$OUT/parity-$dt.json" \
     --allow-write "$OUT" --run-dir "$OUT/run-parity-$dt" >> "$LOG" 2>&1
  echo "parity $dt: rc=$?" | tee -a "$LOG"
done

# 2. SD1.5 at 512 px, the paper's batches: sampling 5 prompts x K 4 (20 candidates, 40 LRM rows),
#    training 10 records, gradients accumulated over micro-batches of 2 (sliced attention keeps
#    the sampling step's score matrices bounded; training keeps each slice for backward).
for dt in bf16 f32; do
  reps=3; [ $dt = f32 ] && reps=1
  peak_of "sd15-$dt-sample" bench --model sd15 --device cuda:0 --dtype $dt --phase sample --repeats $reps
  peak_of "sd15-$dt-train-loraoff" bench --model sd15 --device cuda:0 --dtype $dt --phase train --reference lora-off --micro-batch 2 --repeats $reps
  [ $dt = bf16 ] && peak_of "sd15-$dt-train-copy" bench --model sd15 --device cuda:0 --dtype $dt --phase train --reference copy --micro-batch 2 --repeats $reps
done

# 2b. The issue #16 targets: the paper batch (10 records) in one pass in bf16 (<= 30 GB), and
#     with gradient checkpointing.
peak_of "sd15-bf16-train-onepass" bench --model sd15 --device cuda:0 --dtype bf16 --phase train --reference lora-off --repeats 3
peak_of "sd15-bf16-train-onepass-ckpt" bench --model sd15 --device cuda:0 --dtype bf16 --phase train --reference lora-off --gradient-checkpointing --repeats 3

# 3. SDXL at 1024 px in bf16: sampling 4 prompts x K 4, training 4 records one at a time, and
#    the #16 target: LoRA r64, batch 4 in one pass with gradient checkpointing (<= 70 GB).
peak_of "sdxl-bf16-train-b4-ckpt" bench --model sdxl --device cuda:0 --dtype bf16 --phase train --reference lora-off --gradient-checkpointing --repeats 1
peak_of "sdxl-bf16-sample" bench --model sdxl --device cuda:0 --dtype bf16 --phase sample --repeats 2
peak_of "sdxl-bf16-train-loraoff" bench --model sdxl --device cuda:0 --dtype bf16 --phase train --reference lora-off --micro-batch 1 --repeats 1
peak_of "sdxl-bf16-train-copy" bench --model sdxl --device cuda:0 --dtype bf16 --phase train --reference copy --micro-batch 1 --repeats 1

# One JSON report.
python3 - "$OUT" <<'PY'
import json, os, sys, glob
out = sys.argv[1]
report = {"gpu": open(os.path.join(out, "gpu.txt")).read().strip(), "parity": {}, "bench": {}}
for dt in ("f32", "bf16"):
    p = os.path.join(out, f"parity-{dt}.json")
    report["parity"][dt] = json.load(open(p)) if os.path.exists(p) else None
for meta in sorted(glob.glob(os.path.join(out, "*.meta.json"))):
    m = json.load(open(meta)); tag = m["tag"]
    try:
        m["result"] = json.load(open(os.path.join(out, f"{tag}.json")))
    except Exception as e:
        m["result"] = None; m["error"] = str(e)
    report["bench"][tag] = m
json.dump(report, open(os.path.join(out, "gpu_report.json"), "w"), indent=1)
print(json.dumps({k: (v or {}).get("max_rel_diff") for k, v in report["parity"].items()}))
PY
cp "$OUT/gpu_report.json" "$OUT/gpu_check.log" "$FINAL/" 2>/dev/null
tar -czf "$FINAL/gpu_check_details.tar.gz" -C "$OUT" . 2>/dev/null
