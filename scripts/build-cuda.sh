#!/usr/bin/env bash
# Build `lpo` with the `cuda` feature on a machine with no GPU and no CUDA toolkit, for
# Hopper cards (H100/H200: sm_90a) and CUDA 13.0 drivers (>= 580).
#
#   scripts/build-cuda.sh                 # -> $CARGO_TARGET_DIR/release/lpo (default target-cuda/)
#   WITH_CUDNN=1 scripts/build-cuda.sh --features cudnn
#
# The first run downloads ~1.2 GB of CUDA 13.0 wheels from PyPI into $CUDA_TOOLS_DIR
# (default .cuda-tools/, gitignored). Pin 13.0.x: nvcc 13.N writes PTX ISA 9.N, which a 580
# driver refuses for N > 0.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${CUDA_TOOLS_DIR:-.cuda-tools}"
PY="${PYTHON:-python3}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"

if [ ! -x "$TOOLS/nvidia/cu13/bin/nvcc" ]; then
  "$PY" -m pip install --quiet --no-deps --target "$TOOLS" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35
fi
CUDA_HOME="$(cd "$TOOLS/nvidia/cu13" && pwd)"

# The wheels ship only libX.so.N: give the linker unversioned names.
( cd "$CUDA_HOME/lib"
  for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
  ln -sf libcurand.so.10 libcurand.so )

# A libcuda.so link stub (the real libcuda.so.1 comes with the driver on the GPU machine).
if [ ! -f "$CUDA_HOME/lib/stubs/libcuda.so" ]; then
  mkdir -p "$CUDA_HOME/lib/stubs"
  { for d in "" -DCUDA_API_PER_THREAD_DEFAULT_STREAM; do
      gcc -E -P $d -I"$CUDA_HOME/include" -x c "$CUDA_HOME/include/cuda.h"
    done; echo 'cuProfilerInitialize( cuProfilerStart( cuProfilerStop('
  } | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' | sort -u \
    | awk '{print "int " $1 "(void){return 999;}"}' > "$CUDA_HOME/lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib/stubs/libcuda.so" "$CUDA_HOME/lib/stubs/cuda_stub.c"
fi

if [ "${WITH_CUDNN:-0}" = 1 ]; then
  if [ ! -f "$TOOLS/cudnn/nvidia/cudnn/lib/libcudnn.so.9" ]; then
    "$PY" -m pip install --quiet --no-deps --target "$TOOLS/cudnn" nvidia-cudnn-cu13==9.19.0.56
  fi
  ln -sf libcudnn.so.9 "$TOOLS/cudnn/nvidia/cudnn/lib/libcudnn.so"
  export CUDNN_LIB="$(cd "$TOOLS/cudnn/nvidia/cudnn" && pwd)"
fi

export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"   # no nvidia-smi here; 90 becomes sm_90a
export CUDARC_CUDA_VERSION=13000                    # cudarc bindings for CUDA 13.0
cargo build --release --features cuda "$@"
strip "$CARGO_TARGET_DIR/release/lpo" 2>/dev/null || true
ls -la "$CARGO_TARGET_DIR/release/lpo"
