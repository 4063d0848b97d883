#!/usr/bin/env bash
# The 24 GB mode's GPU-machine session (issue 6) in one command (the `run`
# tool): builds bnbfs, bnbfs-run and llm-driver for sm_90 into
# build-gpu-budget, runs the runner's GPU suite (tests/test_runner_gpu.py:
# 4-bit store vs resident, bit for bit) and the mount suite, then the 24 GB
# mode benchmark (tests/bench/bench_budget.py) on the full-size fixture
# (generated into $FULL when absent). Logs and JSON go to $OUT.
#   sh .device/prep.sh && OUT=$OUT FULL=/tmp/full bash tests/gpu/budget_session.sh
# TESTS=0 skips the suites; RUNS= (empty) skips the benchmark; RUNS=... and
# BUDGET_SIZE=... pass through to bench_budget.py (--runs, --budget).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bnbfs-budget-out}
FULL=${FULL:-/tmp/full}
RUNS=${RUNS-q4-gpu,q4-gpu/miss,q4-host,q4-host/miss}
mkdir -p "$OUT"
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"

b=build-gpu-budget
# -Dwerror=false: that machine's gcc may warn where CI's does not.
{ [ -f $b/build.ninja ] || meson setup $b -Dgpu_archs=90 -Dwerror=false; } > "$OUT/build.log" 2>&1 \
  && ninja -C $b runner/llm-driver runner/bnbfs-run fs/bnbfs >> "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(el) s"

if [ "${TESTS:-1}" = 1 ]; then
  BNBFS_BUILD=$PWD/$b PYTHONUNBUFFERED=1 timeout ${TEST_BUDGET:-300} python3 -m pytest -q -rfEs \
    -p no:cacheprovider tests/test_runner_gpu.py tests/test_fs_mount.py \
    > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$? ($(el) s)"
  grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|^E  " "$OUT/pytest.log" | cut -c1-300 | tail -40
fi

if [ -n "$RUNS" ]; then
  PYTHONUNBUFFERED=1 timeout ${BENCH_BUDGET:-400} python3 tests/bench/bench_budget.py --build $b \
    --full "$FULL" --runs "$RUNS" --budget "${BUDGET_SIZE:-24G}" --results "$OUT/RESULTS.md" \
    --out "$OUT" > "$OUT/bench.log" 2>&1
  echo "bench rc=$? ($(el) s)"
  tr '\r' '\n' < "$OUT/bench.log" | grep -v "ETA" | grep -v '^\$ ' | cut -c1-400 | tail -30
  mountpoint -q "$FULL/mnt" && fusermount3 -u "$FULL/mnt"
fi
echo "total: $(el) s"
