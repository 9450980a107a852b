#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) under libFuzzer for SECONDS each (default 30),
# with cargo fuzz on the stable toolchain and no sanitizer (-s none: the targets are safe Rust;
# what is looked for is a panic, an abort, a hang or a broken promise in fuzz/src/lib.rs).
# Starts from the committed seeds (fuzz/corpus/<target>), grows a scratch copy of them (the
# checkout is not written), and prints each target's figures. A crash leaves its input in
# fuzz/artifacts/<target>/ and ends this with exit 1: fix it, then commit the input to
# fuzz/regressions/<target>/ (tests/fuzz_corpus.rs replays it in `cargo test`).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH="${1:-30}"
shift || true
CARGO_FUZZ_VERSION=0.13.1
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch"  # the targets' scratch files (fuzz/src/lib.rs `scratch`) go with it
# One build of all the targets (release, debug assertions on, libFuzzer's coverage hooks).
started=$(date +%s)
cargo fuzz build -s none --fuzz-dir fuzz > "$scratch/build.log" 2>&1 || { tail -60 "$scratch/build.log"; exit 1; }
echo "fuzz targets built in $(( $(date +%s) - started )) s"
printf '%-15s %12s %9s %6s %6s %6s  %s\n' target executions exec/s cov ft corpus result
status=0
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  log="$scratch/$t.log"
  if cargo fuzz run -s none --fuzz-dir fuzz "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$SECONDS_EACH" -print_final_stats=1 -timeout=20 -rss_limit_mb=4096 \
      > "$log" 2>&1; then
    result=ok
  else
    result="CRASH: $(grep -o 'Test unit written to .*' "$log" | head -1 || true)"
    status=1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  printf '%-15s %12s %9s %6s %6s %6s  %s\n' "$t" "$execs" "$rate" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result"
  if [ "$result" != ok ]; then
    grep -B2 -A30 -m1 "panicked\|ERROR: libFuzzer\|deadly signal" "$log" | head -60 || tail -40 "$log"
  fi
done
exit $status
