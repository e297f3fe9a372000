#!/usr/bin/env bash
# LPO's training step, ours (`lpo bench --phase train`) vs diffusers + peft
# (benches/train_step_torch.py), on the CPU, with and without gradient checkpointing.
#
# Builds nothing: uses target/release/lpo, or the binary in $LPO. Needs a Python with torch,
# diffusers, peft and psutil in $PYTHON (default python3; see benches/README.md).
#
#   benches/side_by_side.sh [OUT.jsonl]
#
# Environment: LPO, PYTHON, THREADS (both sides; default nproc), CONFIGS (default
# "tiny-16-b2 sd15-32-b1 sd15-32-b2"; a tag is MODEL-LATENT-bBATCH), TINY_REPEATS (default 5),
# SD15_REPEATS (default 2), MIN_AVAIL_MB (default 1024: a side is stopped when the machine's
# MemAvailable falls below it, rather than waking the OOM killer on shared work; its rc is then
# 143 and its result null). Each side of each configuration runs in its own process, one after
# the other, so RSS numbers are that process's own and the two never compete for cores.
# Writes one JSON line per configuration and checkpointing setting to OUT (default
# benches/results/cpu-side-by-side-<date>.jsonl) and prints the Markdown table.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
LPO=${LPO:-$root/target/release/lpo}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
CONFIGS=${CONFIGS:-"tiny-16-b2 sd15-32-b1 sd15-32-b2"}
TINY_REPEATS=${TINY_REPEATS:-5}
SD15_REPEATS=${SD15_REPEATS:-2}
out=${1:-$root/benches/results/cpu-side-by-side-$(date +%F).jsonl}

if [[ ! -x $LPO ]]; then
    echo "error: no lpo binary at $LPO (cargo build --release --bin lpo, or set LPO)" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import torch, diffusers, peft' 2>/dev/null; then
    echo "error: $PYTHON cannot import torch, diffusers and peft (set PYTHON; see benches/README.md)" >&2
    exit 2
fi
mkdir -p "$(dirname "$out")"
: >"$out"
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

# Run "$@" in the background; stop it (its pid only) if MemAvailable drops under MIN_AVAIL_MB.
run_guarded() {
    "$@" &
    local pid=$! avail
    while kill -0 "$pid" 2>/dev/null; do
        avail=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo 2>/dev/null || echo "")
        if [[ -n $avail && $avail -lt ${MIN_AVAIL_MB:-1024} ]]; then
            echo "stopping $1 (pid $pid): only $avail MB of memory left" >&2
            kill "$pid" 2>/dev/null || true
        fi
        sleep 0.5
    done
    wait "$pid"
}

# Compact one JSON document from a file to one line ("null" if it has none).
compact() {
    "$PYTHON" -c 'import json,sys
try: print(json.dumps(json.loads(open(sys.argv[1]).read())))
except Exception: print("null")' "$1"
}

host=$("$PYTHON" -c 'import json,os,platform
cpu=next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),platform.processor())
print(json.dumps({"cpu":cpu,"nproc":os.cpu_count(),"kernel":platform.release()}))')

for tag in $CONFIGS; do
    IFS=- read -r model latent batch <<<"$tag"
    batch=${batch#b}
    case $model in
        tiny) repeats=$TINY_REPEATS ;;
        sd15) repeats=$SD15_REPEATS ;;
        *) echo "error: CONFIGS: unknown model in '$tag' (tiny or sd15)" >&2; exit 2 ;;
    esac
    config=$root/benches/configs/${model}_unet.json
    name="$model ${latent}x${latent} b$batch"
    for ckpt in 0 1; do
        flag=()
        [[ $ckpt == 1 ]] && flag=(--gradient-checkpointing)
        echo "== $name${flag[*]:+ ${flag[*]}}" >&2
        set +e
        RAYON_NUM_THREADS=$THREADS run_guarded "$LPO" bench --model "$model" --device cpu --dtype f32 \
            --phase train --latent-size "$latent" --train-batch "$batch" --repeats "$repeats" \
            "${flag[@]}" >"$log/ours.json" 2>"$log/ours.err"
        ours_rc=$?
        run_guarded "$PYTHON" "$root/benches/train_step_torch.py" --config "$config" --latent-size "$latent" \
            --train-batch "$batch" --repeats "$repeats" --threads "$THREADS" "${flag[@]}" \
            >"$log/torch.json" 2>"$log/torch.err"
        torch_rc=$?
        set -e
        [[ $ours_rc == 0 ]] || { echo "ours failed (rc $ours_rc):" >&2; tail -5 "$log/ours.err" >&2; }
        [[ $torch_rc == 0 ]] || { echo "torch failed (rc $torch_rc):" >&2; tail -5 "$log/torch.err" >&2; }
        printf '{"config": "%s", "gradient_checkpointing": %s, "date": "%s", "load_avg": "%s", "host": %s, "ours_rc": %d, "torch_rc": %d, "ours": %s, "torch": %s}\n' \
            "$name" "$([[ $ckpt == 1 ]] && echo true || echo false)" "$(date -Iseconds)" \
            "$(cut -d' ' -f1-3 /proc/loadavg)" "$host" "$ours_rc" "$torch_rc" \
            "$(compact "$log/ours.json")" "$(tail -n 1 "$log/torch.json" | "$PYTHON" -c 'import json,sys
try: print(json.dumps(json.loads(sys.stdin.read())))
except Exception: print("null")')" >>"$out"
    done
done

echo "results: $out" >&2
"$PYTHON" "$root/benches/side_by_side_table.py" "$out"
