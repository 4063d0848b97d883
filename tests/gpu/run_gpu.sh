#!/usr/bin/env bash
# The GPU-machine session of issue 4 in one command (the `run` tool):
# builds build-gpu for sm_90 (bnbfs and the kernels' programs), runs the
# kernel test program (tests/gpu/test_kn_dequant.c) and the GPU mount suite
# (tests/test_gpu_dequant.py with tests/test_fs_*.py, gpu=auto by default),
# then the benchmark (tests/bench/bench_gpu_dequant.py), with the full-size
# fixture when FULL=DIR is set and time is left. Logs go to $OUT; a summary
# to stdout.
#   sh .device/prep.sh && FULL=/tmp/full bash tests/gpu/run_gpu.sh
# More knobs (environment):
#   BASE=DIR      another source tree (the code before a change): built as
#                 DIR/build-gpu and measured in the same benchmark run (--base)
#   PARTS=...     benchmark parts in this order (default mount,kernels), each
#                 its own invocation and RESULTS section, so a part cut off by
#                 BUDGET leaves the ones before it
#   REPS=N        rounds of mount reads (default 3)
#   KN_TEST=0     skip test_kn_dequant; BUDGET=s: the whole session's limit
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bnbfs-gpu-out}
mkdir -p "$OUT"
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu \
  --format=csv | tee "$OUT/card.txt"

# the full fixture is generated meanwhile (mostly numpy on other cores)
if [ -n "${FULL:-}" ] && [ ! -e "$FULL/.complete" ]; then
  python3 tests/fixtures/gen_fixture.py --size full "$FULL" > "$OUT/fixture.log" 2>&1 &
  fixture=$!
fi

# -Dwerror=false: that machine's gcc warns where this one does not (CI is
# this machine's kind, where -Werror holds)
build() {  # SRC_TREE TARGETS...
  local d=$1/build-gpu; shift
  { if [ -f "$d/build.ninja" ]; then meson configure "$d" -Dwerror=false;
    else meson setup "$d" "$(dirname "$d")" -Dgpu_archs=90 -Dwerror=false; fi; } \
    >> "$OUT/build.log" 2>&1 && ninja -C "$d" "$@" >> "$OUT/build.log" 2>&1
}
targets=(fs/bnbfs kernels/test_kn_dequant kernels/bench_kn_dequant)
build . "${targets[@]}" || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
if [ -n "${BASE:-}" ]; then
  build "$BASE" fs/bnbfs || { echo "BASE BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
fi
grep -E "warning:" "$OUT/build.log" | sort -u | head -5
echo "build: $(el) s"

# the kernel tests (mostly GPU) run beside the mount suite (mostly CPU and FUSE)
if [ "${KN_TEST:-1}" != 0 ]; then
  timeout 240 build-gpu/kernels/test_kn_dequant > "$OUT/test_kn_dequant.log" 2>&1 &
  kntest=$!
fi

# the GPU mount suite and the whole fs suite with the default gpu=auto
BNBFS_BUILD=$PWD/build-gpu timeout 300 python3 -m pytest -q -rs -p no:cacheprovider \
  tests/test_gpu_dequant.py tests/test_fs_*.py > "$OUT/pytest_gpu.log" 2>&1
echo "pytest test_gpu_dequant + test_fs_* rc=$? ($(el) s)"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -10
tail -3 "$OUT/pytest_gpu.log"

if [ -n "${kntest:-}" ]; then
  wait "$kntest"
  echo "test_kn_dequant rc=$? ($(el) s)"
  grep -E "^(ok|FAIL)|tests, |device:" "$OUT/test_kn_dequant.log" | head -14
  grep -E "^FAIL .*:" "$OUT/test_kn_dequant.log" | head -5
fi

[ -n "${fixture:-}" ] && { wait "$fixture"; echo "fixture rc=$? ($(el) s)"; }
sync
for part in $(echo "${PARTS:-mount,kernels}" | tr , ' '); do
  args=(--build build-gpu --results "$OUT/RESULTS.md" --log "$OUT/bench-$part.log"
        --json "$OUT/bench-$part.json" --parts "$part" --reps "${REPS:-3}")
  [ -n "${BASE:-}" ] && args+=(--base "$BASE/build-gpu")
  if [ -n "${FULL:-}" ] && [ "$(el)" -lt "${FULL_IF_BEFORE:-270}" ]; then
    args+=(--full "$FULL")
  fi
  left=$(( ${BUDGET:-570} - $(el) ))
  [ "$left" -gt 10 ] || { echo "bench $part: no time left"; continue; }
  timeout "$left" python3 tests/bench/bench_gpu_dequant.py "${args[@]}" > "$OUT/bench-$part.out" 2>&1
  echo "bench $part rc=$? ($(el) s)"
  grep -v '^\$ ' "$OUT/bench-$part.out" | grep -v '^bnbfs .* rep \|^ceiling .* rep ' | tail -30
done
