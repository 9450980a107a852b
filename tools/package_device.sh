#!/usr/bin/env bash
# Builds what tools/device_check.sh runs on the lent GPU machine (which has no Rust and no
# network) and packs it into dist/device/ (git-ignored; the device tool's `carry` takes it):
#
#     tools/package_device.sh            # --features cuda, with tools/cuda_toolchain.sh
#     tools/package_device.sh --cpu      # the same package without CUDA: the dry run here
#
# The package: the server, examples/bench, and the parity and batching test binaries (the
# goldens and the batching property, run there with BLIP2_TEST_DEVICE=cuda:0), stripped and
# xz-compressed, plus the one library they link that the GPU machine lacks (libjpeg-turbo).
# The CUDA libraries are not packed: the machine's driver and PyTorch's nvidia-* wheels provide
# the real ones (the link stubs never leave this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
FEATURES=(--features cuda)
TARGET=target/cuda
if [ "${1:-}" = "--cpu" ]; then
  FEATURES=()
  TARGET=target
else
  eval "$(tools/cuda_toolchain.sh "${CUDA_TOOLCHAIN_DIR:-/tmp/cuda-toolchain}")"
fi
export CARGO_TARGET_DIR=$TARGET
OUT=dist/device
rm -rf "$OUT" && mkdir -p "$OUT/lib"
start=$(date +%s)
cargo build --locked --release "${FEATURES[@]}" --bin blip2-server --example bench
# The test binaries' paths come from cargo's own report.
tests=$(cargo test --locked --release "${FEATURES[@]}" --test parity --test batching --no-run \
  --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])')
echo "package_device: built in $(( $(date +%s) - start )) s" >&2
pack() {
  strip -o "$OUT/$2" "$1"
  xz -T0 -6 -f "$OUT/$2"
}
pack "$TARGET/release/blip2-server" blip2-server
pack "$TARGET/release/examples/bench" bench
while read -r name path; do
  pack "$path" "test-$name"
done <<< "$tests"
jpeg=$(ldd "$TARGET/release/blip2-server" | awk '/libjpeg/ {print $3}')
[ -n "$jpeg" ] && cp -L "$jpeg" "$OUT/lib/"
{
  echo "revision $(git rev-parse HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
  echo "features ${FEATURES[*]:-none}"
  echo "built $(date -u +%FT%TZ)"
} > "$OUT/BUILD"
ls -l "$OUT" "$OUT/lib" >&2
du -sh "$OUT" >&2
