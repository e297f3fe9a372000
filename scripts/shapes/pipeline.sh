#!/usr/bin/env bash
# The shapes world from scratch: pretrain -> pairs -> LRM -> LPO + evaluation, with the settings
# of the shipped checkpoints. Everything lands in OUT (default runs/shapes-pipeline).
#   scripts/shapes/pipeline.sh [OUT] [--device cuda:0]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/shapes-pipeline}"; shift || true
LPO="${LPO:-cargo run --release --quiet --}"
mkdir -p "$OUT"
stage() { local name=$1; shift; local t0=$(date +%s)
  $LPO run "$@" --run-dir "$OUT/$name"
  echo "$name: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"; }
stage pretrain scripts/shapes/pretrain.rhai --set out="$OUT/base" --set steps=500 --set batch=128 \
  --set warmup=100 --set ckpt_every=100 --set save_dtype=f16 --set seed=0 --allow-write "$OUT/base" "$@"
stage pairs scripts/shapes/make_pairs.rhai --set base="$OUT/base" --set groups=400 --set group=8 \
  --set steps=10 --set chunk=25 --set seed=1 --set out="$OUT/pairs-data" --allow-write "$OUT/pairs-data" "$@"
stage lrm scripts/shapes/train_lrm.rhai --set base="$OUT/base" --set pairs="$OUT/pairs-data/pairs.jsonl" \
  --set steps=1500 --set batch=16 --set warmup=50 --set seed=0 --set out="$OUT/lrm-model" --allow-write "$OUT/lrm-model" "$@"
stage lpo scripts/shapes/lpo.rhai --set base="$OUT/base" --set lrm="$OUT/lrm-model" --allow-write "$OUT/base" "$@"
cat "$OUT/times.txt"
