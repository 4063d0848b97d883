#!/usr/bin/env bash
# A final verification on the GPU machine in one command (the `run` tool):
# builds everything for sm_90, runs the C tests (GPU kernels bit-exact
# against the CPU), the GPU pytest suites (runner, GPU mount, mount), then
# the runner benchmark (tests/bench/bench_runner.py: cold mount to first
# token, resident decode/prefill with the roofline, the 24 GB mode,
# transformers on the same card). Each step has a time budget so the call
# ends under the tool's limit; logs and the benchmark's table go to $OUT.
#   sh .device/prep.sh && OUT=$OUT FULL=/tmp/full bash tests/gpu/verify_session.sh
# STAGES= (empty) skips the benchmark.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bnbfs-verify}
FULL=${FULL:-/tmp/full}
STAGES=${STAGES-resident,budget,transformers,cold}
LIMIT=${LIMIT:-560}
mkdir -p "$OUT"
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
b=build-gpu-verify
{ meson setup $b -Dgpu_archs=90 -Dwerror=false && timeout 200 ninja -C $b; } > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(el) s"
timeout 120 meson test -C $b -q > "$OUT/meson_test.log" 2>&1
echo "meson test rc=$?: $(grep -E '^(Ok|Fail|Skipped|Timeout):' "$OUT/meson_test.log" | tr -s ' ' | tr '\n' ' ') ($(el) s)"
BNBFS_BUILD=$PWD/$b PYTHONUNBUFFERED=1 timeout ${PYTEST_BUDGET:-170} python3 -m pytest -q -rfEs \
  -p no:cacheprovider tests/test_runner_gpu.py tests/test_gpu_dequant.py tests/test_fs_mount.py \
  > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($(el) s)"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | cut -c1-250 | tail -15
left=$(( LIMIT - $(el) ))
if [ "$left" -gt 60 ] && [ -n "$STAGES" ]; then
  PYTHONUNBUFFERED=1 timeout $left python3 tests/bench/bench_runner.py --build $b --full "$FULL" \
    --stages "$STAGES" --results "$OUT/RESULTS.md" --out "$OUT" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? ($(el) s)"
  tr '\r' '\n' < "$OUT/bench.log" | grep -E '^\|' | cut -c1-300 | tail -40
  mountpoint -q "$FULL/mnt" && fusermount3 -u "$FULL/mnt"
fi
echo "total: $(el) s"
