#!/usr/bin/env bash
# The runner's GPU-machine session (issue 6) in one command (the `run` tool):
# builds the runner's programs for sm_90 into build-gpu-engine, runs the GPU
# correctness suite (tests/test_runner_gpu.py) and then, while time is left,
# the runner benchmark (tests/bench/bench_runner.py) on the full-size fixture
# (generated into $FULL when absent). Logs and the benchmark JSON go to $OUT;
# a summary to stdout.
#   sh .device/prep.sh && OUT=$OUT FULL=/tmp/full STAGES=resident,budget \
#       bash tests/gpu/llm_run_gpu.sh
# TESTS=0 skips the test suite; STAGES= (empty) skips the benchmark; KBENCH=1
# times each decode kernel alone (llm-bench-kernels); BASE="DIR ..." names
# other builds (e.g. the commit before a change, built elsewhere and carried)
# whose llm-driver the benchmark's `base` stage times in the same run.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bnbfs-engine-out}
FULL=${FULL:-/tmp/full}
STAGES=${STAGES-cold,resident,budget,transformers}
BUDGET=${BUDGET:-560}
mkdir -p "$OUT"
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem \
  --format=csv,noheader | tee "$OUT/card.txt"

b=build-gpu-engine
# -Dwerror=false: that machine's gcc may warn where CI's does not.
{ [ -f $b/build.ninja ] || meson setup $b -Dgpu_archs=90 -Dwerror=false; } > "$OUT/build.log" 2>&1 \
  && ninja -C $b runner/llm-driver runner/bnbfs-run runner/llm-model-check fs/bnbfs \
     runner/llm-bench-kernels \
     >> "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
grep -E "warning:" "$OUT/build.log" | sort -u | head -5
echo "build: $(el) s"

if [ "${TESTS:-1}" = 1 ]; then
  BNBFS_BUILD=$PWD/$b PYTHONUNBUFFERED=1 timeout ${TEST_BUDGET:-300} python3 -m pytest -q -rfEs \
    -p no:cacheprovider tests/test_runner_gpu.py > "$OUT/pytest_runner_gpu.log" 2>&1
  echo "pytest test_runner_gpu rc=$? ($(el) s)"
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|^E  " "$OUT/pytest_runner_gpu.log" | cut -c1-300 | tail -40
fi

if [ "${KBENCH:-0}" = 1 ]; then
  timeout 120 $b/runner/llm-bench-kernels --pin-gib ${PIN_GIB:-8} > "$OUT/kbench.json" 2>&1
  echo "kernels: $(cat "$OUT/kbench.json")" | cut -c1-1500
  echo "kbench: $(el) s"
fi

if [ -n "$STAGES" ]; then
  left=$(( BUDGET - $(el) ))
  PYTHONUNBUFFERED=1 timeout $left python3 tests/bench/bench_runner.py --build $b --full "$FULL" \
    --stages "$STAGES" --results "$OUT/RESULTS.md" --out "$OUT" \
    $(for d in ${BASE:-}; do printf -- '--base-build %s ' "$d"; done) > "$OUT/bench.log" 2>&1
  echo "bench rc=$? ($(el) s)"
  tr '\r' '\n' < "$OUT/bench.log" | grep -v "ETA" | grep -v '^\$ ' | cut -c1-300 | tail -45
  mountpoint -q "$FULL/mnt" && fusermount3 -u "$FULL/mnt"
fi
echo "total: $(el) s"
