#!/usr/bin/env bash
# One GPU-machine session (the `run` tool): verifies the wide FUSE_T kernel
# (BNBFS_KN_FUSE_T=v3) bit for bit against the CPU reference with the whole
# kernel test program, times v2 and v3 with the kernel benchmark, and runs
# the CPU dequantization benchmark on all of that machine's cores.
#   sh .device/prep.sh && bash tests/gpu/verify_fuse_t.sh [BIN_DIR]
# BIN_DIR holds test_kn_dequant, bench_kn_dequant and bench_dequant built
# for sm_90 (default: build them into build-gpu). Logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bnbfs-verify}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda/lib64
bin=${1:-}
if [ -z "$bin" ]; then
  meson setup build-gpu -Dgpu_archs=90 -Dwerror=false > "$OUT/build.log" 2>&1
  ninja -C build-gpu kernels/test_kn_dequant kernels/bench_kn_dequant tests/bench/bench_dequant \
    >> "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  mkdir -p build-gpu/bin
  cp build-gpu/kernels/test_kn_dequant build-gpu/kernels/bench_kn_dequant \
     build-gpu/tests/bench/bench_dequant build-gpu/bin/
  bin=build-gpu/bin
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"
for v in v3 v2; do
  BNBFS_KN_FUSE_T=$v timeout 200 "$bin/test_kn_dequant" > "$OUT/test_$v.log" 2>&1
  echo "test_kn_dequant FUSE_T=$v rc=$?: $(grep -E 'tests, ' "$OUT/test_$v.log")"
  grep -E "^FAIL" "$OUT/test_$v.log" | head -5
done
for v in v2 v3; do
  echo "== kernel benchmark, FUSE_T=$v"
  BNBFS_KN_FUSE_T=$v timeout 120 "$bin/bench_kn_dequant" > "$OUT/bench_$v.log" 2>&1
  grep -E "copy|fuse_t" "$OUT/bench_$v.log" | grep -v RESULT
done
echo "== CPU dequantization, $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
timeout 120 "$bin/bench_dequant" /dev/shm 4 5 | tee "$OUT/bench_dequant.md"
