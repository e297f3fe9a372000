#!/usr/bin/env bash
# The optional interop checks: every tests/interop/check_*.py (or the checks named as
# arguments) run with $PYTHON (default python3) against the lpo binary $LPO_BIN (default
# target/release/lpo; this script builds nothing). When $PYTHON cannot import diffusers, peft
# and torch, one line says the checks were skipped and why, and the exit status is 0.
# Exit status: 0 all passed (or skipped), 1 a check failed, 2 no lpo binary.
#
#   PYTHON=/path/to/venv/bin/python bash tests/interop/run_python_checks.sh
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
LPO_BIN="${LPO_BIN:-target/release/lpo}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "interop checks skipped: no Python at PYTHON=$PYTHON"
    exit 0
fi
if ! why=$("$PYTHON" -c "import diffusers, peft, torch" 2>&1); then
    echo "interop checks skipped: $PYTHON cannot import diffusers, peft and torch ($(printf '%s\n' "$why" | tail -n 1))"
    exit 0
fi

# The checks may change folders: hand them an absolute path (a bare name is looked up on PATH).
case "$LPO_BIN" in
    */*) [ -x "$LPO_BIN" ] && LPO_BIN="$(cd "$(dirname "$LPO_BIN")" && pwd)/$(basename "$LPO_BIN")" ;;
    *) LPO_BIN="$(command -v "$LPO_BIN" || echo "$LPO_BIN")" ;;
esac
if [ ! -x "$LPO_BIN" ]; then
    echo "interop checks: no lpo binary at LPO_BIN=$LPO_BIN (build it first: cargo build --release)" >&2
    exit 2
fi
export LPO_BIN

if [ "$#" -gt 0 ]; then
    checks=("$@")
else
    shopt -s nullglob
    checks=(tests/interop/check_*.py)
fi
if [ "${#checks[@]}" -eq 0 ]; then
    echo "interop checks: none found (tests/interop/check_*.py)"
    exit 0
fi

failed=()
for check in "${checks[@]}"; do
    echo "== $check"
    if "$PYTHON" "$check"; then
        echo "-- passed: $check"
    else
        echo "-- FAILED (exit $?): $check"
        failed+=("$check")
    fi
done
passed=$((${#checks[@]} - ${#failed[@]}))
if [ "${#failed[@]}" -gt 0 ]; then
    echo "interop checks: $passed passed, ${#failed[@]} failed: ${failed[*]}"
    exit 1
fi
echo "interop checks: all $passed passed (with $PYTHON, LPO_BIN=$LPO_BIN)"
