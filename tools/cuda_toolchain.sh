#!/usr/bin/env bash
# A CUDA 13.0 toolchain for building `--features cuda` on a machine without a GPU or a CUDA
# install, from PyPI wheels only:
#
#     eval "$(tools/cuda_toolchain.sh /tmp/cuda)"
#     cargo build --release --features cuda
#
# Installs NVIDIA's pinned compiler wheels (nvcc, NVVM, the CRT headers, CCCL, the runtime;
# about 105 MB) into DIR/venv, lays them out as a CUDA_HOME (DIR/cuda: bin, include, nvvm, lib64),
# and makes link-time stubs for the libraries candle's cudarc links (-lcuda -lnvrtc -lcurand
# -lcublas -lcublasLt): shared objects with the real sonames that define every function name
# cudarc declares, each returning an error code. They exist only so the linker is satisfied;
# they are never shipped or put on a runtime path: on a GPU machine the driver and the CUDA
# libraries (e.g. PyTorch's nvidia-* wheels) are the real ones. Prints `export NAME=value` lines
# on stdout; everything else goes to stderr.
#
# The pins: the H200 machines' driver is 580 (CUDA 13.0). PTX newer than the driver does not
# load, and an unpinned nvcc (13.5) breaks cudarc's build, so the compiler is exactly 13.0.
# CUDA_COMPUTE_CAP=90 builds for Hopper (H100/H200), the machine this project is lent.
set -euo pipefail

DIR=${1:?usage: tools/cuda_toolchain.sh DIR}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
log() { echo "cuda_toolchain: $*" >&2; }

if [ ! -x "$DIR/venv/bin/python" ]; then
  "$PYTHON" -m venv "$DIR/venv" >&2
fi
log "installing the compiler wheels into $DIR/venv"
"$DIR/venv/bin/pip" install -q --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 >&2
CU=$("$DIR/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$CU/bin/nvcc" ] || { log "no nvcc under $CU/bin"; exit 1; }

HOME_DIR=$DIR/cuda
mkdir -p "$HOME_DIR/lib64/stubs"
for part in bin include nvvm; do
  ln -sfn "$CU/$part" "$HOME_DIR/$part"
done
# The runtime (libcudart) is real: nvcc links against it. cudaforge looks for lib64.
for lib in "$CU"/lib/libcudart.so*; do
  ln -sfn "$lib" "$HOME_DIR/lib64/$(basename "$lib")"
done
ln -sfn "$(ls "$CU"/lib/libcudart.so.* | head -n1)" "$HOME_DIR/lib64/libcudart.so"

# cudarc's declarations: from the cargo registry (fetched if need be).
find_cudarc() {
  { ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null || true; } \
    | sort -V | tail -n1
}
CUDARC=$(find_cudarc)
if [ -z "$CUDARC" ]; then
  log "fetching crates (cudarc's sources name the symbols to stub)"
  (cd "$ROOT" && cargo fetch --locked >&2)
  CUDARC=$(find_cudarc)
fi
[ -n "$CUDARC" ] || { log "cudarc 0.19 not found in the cargo registry"; exit 1; }

# name soname cudarc-module
stub() {
  local name=$1 soname=$2 module=$3 out=$4
  local src=$DIR/stub-$name.c
  {
    echo "/* Link-time stub of $soname: every function cudarc declares returns an error. */"
    grep -rhoE '\bfn (cu|nvrtc|curand|cublas)[A-Za-z0-9_]*\(' "$CUDARC/src/$module/sys" \
      | sed -E 's/^fn ([A-Za-z0-9_]+)\($/\1/' | sort -u | sed 's/.*/int &(void) { return 34; }/'
  } > "$src"
  [ "$(grep -c 'return 34' "$src")" -gt 10 ] || { log "too few symbols for $soname"; exit 1; }
  gcc -shared -fPIC -o "$out/$soname" -Wl,-soname,"$soname" "$src"
  ln -sfn "$soname" "$out/lib$name.so"
}
stub cuda libcuda.so.1 driver "$HOME_DIR/lib64/stubs"
stub nvrtc libnvrtc.so.13 nvrtc "$HOME_DIR/lib64/stubs"
stub curand libcurand.so.10 curand "$HOME_DIR/lib64/stubs"
stub cublas libcublas.so.13 cublas "$HOME_DIR/lib64/stubs"
stub cublasLt libcublasLt.so.13 cublaslt "$HOME_DIR/lib64/stubs"
log "CUDA_HOME=$HOME_DIR ($("$HOME_DIR/bin/nvcc" --version | tail -n2 | head -n1))"

echo "export CUDA_HOME=$HOME_DIR"
echo "export CUDA_PATH=$HOME_DIR"
echo "export CUDA_COMPUTE_CAP=90"
echo "export PATH=$HOME_DIR/bin:\$PATH"
echo "export LIBRARY_PATH=$HOME_DIR/lib64/stubs:$HOME_DIR/lib64\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
