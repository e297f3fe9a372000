#!/usr/bin/env python3
"""Print the Markdown table of a `benches/side_by_side.sh` results file (JSON lines).

Usage: python3 benches/side_by_side_table.py benches/results/cpu-side-by-side-<date>.jsonl

One row per configuration and checkpointing setting: ms per training step and activation
memory (RSS peak over the steps minus RSS after loading), ours vs diffusers + peft, and the
ratio ours / torch (below 1: ours is faster / smaller). Standard library only.
"""

import json
import sys


def fmt(x, digits=0, missing="n/a"):
    return missing if x is None else f"{x:.{digits}f}"


def missing_because(rc):
    """What a side without a result shows: 143 is side_by_side.sh's low-memory stop."""
    if rc in (None, 0):
        return "n/a"
    return "stopped: out of memory" if rc == 143 else f"failed (rc {rc})"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def field(side, key):
    return (side or {}).get(key)


def table(rows):
    lines = [
        "| config | ours ms | torch ms | ratio | ours act MB | torch act MB | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ours, torch = row.get("ours"), row.get("torch")
        name = row["config"] + (" +ckpt" if row.get("gradient_checkpointing") else "")
        o_ms, t_ms = field(ours, "ms_per_training_step"), field(torch, "ms_per_training_step")
        o_mb, t_mb = field(ours, "activation_mb"), field(torch, "activation_mb")
        o_na, t_na = missing_because(row.get("ours_rc")), missing_because(row.get("torch_rc"))
        lines.append(
            f"| {name} | {fmt(o_ms, missing=o_na)} | {fmt(t_ms, missing=t_na)} "
            f"| {fmt(ratio(o_ms, t_ms), 2)} "
            f"| {fmt(o_mb, missing=o_na)} | {fmt(t_mb, missing=t_na)} | {fmt(ratio(o_mb, t_mb), 2)} |"
        )
    return "\n".join(lines)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().split("\n\n")[1])
    path = sys.argv[1]
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: {path}: {e}")
    print(table(rows))


if __name__ == "__main__":
    main()
