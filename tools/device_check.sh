#!/usr/bin/env bash
# The one prepared run for the lent GPU machine (README, "GPU"; within 8 minutes):
#
#     tools/package_device.sh                      # here: build and pack dist/device/
#     # on the GPU machine (the device tool, carry ["dist/device"]):
#     tools/device_check.sh "$OUT"
#
#     tools/package_device.sh --cpu && DEVICE=cpu tools/device_check.sh /tmp/dry   # dry run
#
# Steps, each logged to OUT/<step>.txt, results as JSON in OUT, a table printed at the end:
#   1. nvidia-smi;
#   2. the parity goldens (tests/parity.rs) and the batching property (tests/batching.rs) on
#      $DEVICE in f32: the very test binaries CI runs, with BLIP2_TEST_DEVICE. cuBLAS f32 GEMMs
#      without TF32 (candle's default), so the tests' own tolerances hold (activations 1e-4,
#      greedy tokens exact, alone == batched);
#   3. the server on $DEVICE: /info and one caption of the tiny checkpoint over HTTP;
#   4. speed on random-weight blip2-opt-2.7b built on the device (no 15 GB upload: only its
#      tensor shapes, from tools/make_large_checkpoint.py --shapes-only): vision at batch 1 and 8,
#      prefill, decode step at batch 1, 8 and 32, one caption, in each of $DTYPES; then
#      transformers on the same device and shapes (fp16, the docs' recipe).
# A step that fails is recorded and the next runs; the exit status is that of the parity and
# batching tests. Variables: DEVICE (cuda:0), DTYPES ("f32 f16 bf16"), ARCH (opt-2.7b), RUNS (3),
# BATCHES ("8 32"), VISION_BATCH (8), TF_DTYPE (float16), PYTHON (python3).
set -uo pipefail
OUT=${1:?usage: tools/device_check.sh OUT_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PKG=$ROOT/dist/device
DEVICE=${DEVICE:-cuda:0}
DTYPES=${DTYPES:-f32 f16 bf16}
ARCH=${ARCH:-opt-2.7b}
RUNS=${RUNS:-3}
BATCHES=${BATCHES:-8 32}
VISION_BATCH=${VISION_BATCH:-8}
TF_DTYPE=${TF_DTYPE:-float16}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STATUS=0
started=$(date +%s)
step() { echo "== $1 (+$(( $(date +%s) - started )) s)"; }

step "package"
[ -f "$PKG/BUILD" ] || { echo "no $PKG: run tools/package_device.sh first"; exit 2; }
cat "$PKG/BUILD" | tee "$OUT/build.txt"
for f in "$PKG"/*.xz; do
  xz -dc "$f" > "$WORK/$(basename "$f" .xz)" && chmod +x "$WORK/$(basename "$f" .xz)"
done
# The CUDA libraries of the machine's PyTorch (nvidia-* wheels), then libjpeg from the package.
cuda_libs=$("$PYTHON" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})))
EOF
)
export LD_LIBRARY_PATH="$PKG/lib${cuda_libs:+:$cuda_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$OUT/env.txt"
ldd "$WORK/blip2-server" > "$OUT/ldd.txt" 2>&1
if grep -q "not found" "$OUT/ldd.txt"; then
  echo "unresolved libraries:"; grep "not found" "$OUT/ldd.txt"
fi

step "nvidia-smi"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/nvidia-smi.txt"
else
  echo "no nvidia-smi on this machine" | tee "$OUT/nvidia-smi.txt"
fi

for test in parity batching; do
  step "$test on $DEVICE"
  BLIP2_TEST_DEVICE=$DEVICE BLIP2_TEST_ROOT=$ROOT timeout 240 "$WORK/test-$test" \
    --test-threads 1 --nocapture > "$OUT/$test.txt" 2>&1
  rc=$?
  echo "{\"test\": \"$test\", \"device\": \"$DEVICE\", \"exit\": $rc}" > "$OUT/$test.json"
  grep -E "^test |test result|panicked|Error|error" "$OUT/$test.txt" | tail -n 40
  [ $rc -eq 0 ] || STATUS=1
  if grep -qE "built without CUDA|cannot open cuda|error while loading shared libraries" "$OUT/$test.txt"; then
    # The first CUDA step: past it nothing can run. (On the CPU package this is where the dry
    # run of the packaging and paths ends.)
    grep -m1 -oE "(cuda:[0-9]+ was asked for|cannot open cuda|error while loading shared libraries)[^(]*" "$OUT/$test.txt"
    echo "device_check: $DEVICE cannot be opened; stopping after $(( $(date +%s) - started )) s"
    exit 3
  fi
done

step "serve on $DEVICE"
"$WORK/blip2-server" serve --model "$ROOT/tests/fixtures/models/opt-tiny" --device "$DEVICE" \
  --host 127.0.0.1 --port 18080 --shutdown-delay-s 0 > "$OUT/serve.txt" 2>&1 &
server=$!
"$PYTHON" - "$OUT/serve.json" "$ROOT" "$server" <<'EOF' 2>&1 | tee -a "$OUT/serve-client.txt"
import base64, json, os, sys, time, urllib.request
out, root, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = "http://127.0.0.1:18080"
result = {"ready": False}
for _ in range(600):
    if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
        break  # the server exited (its log says why)
    try:
        if urllib.request.urlopen(base + "/ready", timeout=2).status == 200:
            result["ready"] = True
            break
    except Exception:
        time.sleep(0.1)
if result["ready"]:
    result["info"] = json.load(urllib.request.urlopen(base + "/info"))
    image = base64.b64encode(open(root + "/tests/fixtures/images/photo_320x240.jpg", "rb").read()).decode()
    body = json.dumps({"image": image, "parameters": {"max_new_tokens": 8}}).encode()
    req = urllib.request.Request(base + "/v1/caption", body, {"content-type": "application/json"})
    result["caption"] = json.load(urllib.request.urlopen(req, timeout=120))
json.dump(result, open(out, "w"), indent=1)
print(json.dumps({k: result.get(k) for k in ["ready", "caption"]}))
print("device", result.get("info", {}).get("device"), result.get("info", {}).get("device_name"))
EOF
kill "$server" 2> /dev/null; wait "$server" 2> /dev/null

step "speed: random $ARCH"
SHAPES=$WORK/$ARCH
"$PYTHON" "$ROOT/tools/make_large_checkpoint.py" --arch "$ARCH" --shapes-only --out "$SHAPES" \
  > "$OUT/shapes.txt" 2>&1 || { echo "make_large_checkpoint failed:"; tail -n 5 "$OUT/shapes.txt"; }
batch_flags=$(for b in $BATCHES; do printf -- "--batch %s " "$b"; done)
for dtype in $DTYPES; do
  step "ours $dtype"
  # shellcheck disable=SC2086
  (cd "$ROOT" && timeout 300 "$WORK/bench" --model "$SHAPES" --random-weights --device "$DEVICE" \
    --dtype "$dtype" --runs "$RUNS" --steps 20 $batch_flags --vision-batch "$VISION_BATCH") \
    > "$OUT/ours-$dtype.json" 2> "$OUT/ours-$dtype.txt" || { echo "failed:"; tail -n 5 "$OUT/ours-$dtype.txt"; }
done
step "transformers $TF_DTYPE"

# shellcheck disable=SC2086
(cd "$ROOT" && timeout 300 "$PYTHON" tools/bench_gpu_transformers.py --model "$SHAPES" \
  --device "$DEVICE" --dtype "$TF_DTYPE" --runs "$RUNS" --steps 20 --batch $BATCHES \
  --vision-batch "$VISION_BATCH" --out "$OUT/transformers-$TF_DTYPE.json") \
  > "$OUT/transformers.txt" 2>&1 || { echo "failed:"; tail -n 5 "$OUT/transformers.txt"; }

step "table"
"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/table.md"
import glob, json, os, sys
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "ours-*.json")) + glob.glob(os.path.join(out, "transformers-*.json"))):
    try:
        r = json.load(open(path))
    except Exception:
        continue
    side = "transformers" if r.get("side") == "transformers" else "ours"
    rows.append((f"{side} {r.get('dtype')}", r))
keys = ["vision_s", "vision_batch_s", "qformer_s", "prefill_s", "decode_step_s"]
if rows:
    batches = rows[0][1].get("batches", [])
    keys += [f"decode_step_b{b}_s" for b in batches] + ["caption_s"]
    print("| phase (s) | " + " | ".join(name for name, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for k in keys:
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), (int, float)) else "-" for _, r in rows]
        print(f"| {k} | " + " | ".join(cells) + " |")
    for k in ["decode_floor_s", "vision_floor_s", "bandwidth_gb_s", "matmul_gflops"]:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "-" for _, r in rows]
        print(f"| {k} | " + " | ".join(cells) + " |")
for t in ["parity", "batching"]:
    p = os.path.join(out, t + ".json")
    if os.path.exists(p):
        print(t, "exit", json.load(open(p))["exit"])
EOF
echo "device_check: $(( $(date +%s) - started )) s, status $STATUS"
exit $STATUS
