#!/usr/bin/env bash
# CPU dequantization throughput at gpt-oss-20b expert shapes (issue 2's
# benchmark): runs build/tests/bench/bench_dequant on one thread and all
# cores, prints the table and appends it to tests/bench/RESULTS.md with the
# machine and date. Not a test; never gates CI.
#   tests/bench/bench_dequant.sh [BUILD_DIR] [SCRATCH_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
build=${1:-build}
scratch=${2:-/dev/shm}
bin="$build/tests/bench/bench_dequant"
[ -x "$bin" ] || { echo "build first: ./scripts/build.sh $build" >&2; exit 1; }
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
table=$("$bin" "$scratch" 4 5)
{
  echo
  echo "### CPU dequantization, $(date -u +%Y-%m-%d) — $(nproc) cores, $cpu"
  echo "Command: \`tests/bench/bench_dequant.sh $build $scratch\` (4 experts per shape, best of 5)."
  echo
  echo "$table"
} | tee -a tests/bench/RESULTS.md
