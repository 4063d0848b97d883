#!/usr/bin/env bash
# The whole suite on the GPU machine in one command (the `run` tool): builds
# everything for sm_90, runs the C tests (kernel vs CPU included), every
# pytest suite (GPU tests run instead of skipping), then the quick start's
# main job by hand (no network there for scripts/deps.sh): mount a generated
# tiny checkpoint and run bnbfs-run on it. Logs under $OUT.
#   sh .device/prep.sh && bash tests/gpu/full_session.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bnbfs-full}
mkdir -p "$OUT"
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
b=build-gpu-full
{ meson setup $b -Dgpu_archs=90 -Dwerror=false && ninja -C $b; } > "$OUT/build.log" 2>&1 \
  || { echo "BUILD FAILED"; tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(el) s"
meson test -C $b -q > "$OUT/meson_test.log" 2>&1
echo "meson test rc=$?: $(grep -E '^(Ok|Fail|Skipped):' "$OUT/meson_test.log" | tr -s ' ' | tr '\n' ' ')"
BNBFS_BUILD=$PWD/$b PYTHONUNBUFFERED=1 timeout ${PYTEST_BUDGET:-330} python3 -m pytest -q -rfEs \
  -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? ($(el) s)"
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/pytest.log" | cut -c1-250 | tail -25
mnt=$(mktemp -d)
$b/fs/bnbfs -f .cache/fixtures/tiny/src "$mnt" 2> "$OUT/bnbfs.log" &
pid=$!
for i in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.05; done
$b/runner/bnbfs-run "$mnt" "Say hello." --temperature 0 --max-tokens 24 --stats --show-reasoning \
  > "$OUT/run.out" 2> "$OUT/run.err"
echo "bnbfs-run rc=$?"; head -c 600 "$OUT/run.out"; echo; grep -iE "tok/s|load|hit" "$OUT/run.err" | head -8
grep -m1 '"engines"' "$mnt/.bnbfs/stats"; grep -m1 '"bytes_computed"' "$mnt/.bnbfs/stats"
fusermount3 -u "$mnt"; wait $pid; echo "bnbfs exit $?"; grep -c " error:" "$OUT/bnbfs.log"
echo "total: $(el) s"
