#!/usr/bin/env bash
# One GPU-machine session (the `run` tool) for the FUSE_T kernels of
# kernels/dequant.cu: times them with the kernel benchmark (the first
# variant twice, for the run-to-run spread) and compares every output at the
# benchmark's gpt-oss shapes with the first variant's (an XXH3 hash of each),
# verifies each variant bit for bit against the CPU with the kernel test
# program (all at once), checks the memory accesses of the MEMCHECK
# variants (default: the last) with compute-sanitizer, and profiles one
# launch (by default the first down F16 one: NCU_SKIP launches of the
# benchmark's FUSE_T kernels come before it) of the first and of the
# fastest other variant (by down F16) with Nsight Compute. The table comes
# last; logs go to $LOGS, and into $OUT/logs.tgz when OUT is set.
#   sh .device/prep.sh && bash tests/gpu/fuse_t_session.sh [BIN_DIR]
# BIN_DIR holds test_kn_dequant and bench_kn_dequant built for sm_90
# (default: built here into build-gpu-fuset). VARIANTS (default "current")
# are values of BNBFS_KN_FUSE_T, one per run: the committed kernel ignores
# it; a candidate kernel reads it until verified (as commit 5772855 did, and
# the uncommitted FUSE_T v5 candidates: tests/bench/NOTES-kernels.md). The variant
# "head" runs the programs in HEAD_BIN instead (built from an earlier
# commit), so a committed kernel can be the reference of the hashes.
set -uo pipefail
cd "$(dirname "$0")/../.."
LOGS=${LOGS:-/tmp/bnbfs-fuset}
mkdir -p "$LOGS"
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda/lib64
VARIANTS=${VARIANTS:-current}
ref=${VARIANTS%% *}
last=${VARIANTS##* }
T_TEST=${T_TEST:-80}
T_NCU=${T_NCU:-40}
NCU_SKIP=${NCU_SKIP:-2112}   # 3 dtypes x (2 warm-ups + 20 runs) x 32 gate_up experts
HEAD_BIN=${HEAD_BIN:-}
MEMCHECK=${MEMCHECK:-$last}  # variants whose device ops run under compute-sanitizer
binof() { if [ "$1" = head ] && [ -n "$HEAD_BIN" ]; then echo "$HEAD_BIN"; else echo "$bin"; fi; }
t0=$(date +%s)
el() { echo $(( $(date +%s) - t0 )); }
pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null; true; }

bin=${1:-}
if [ -z "$bin" ]; then
  b=build-gpu-fuset
  { meson setup $b -Dgpu_archs=90 -Dwerror=false &&
    ninja -C $b kernels/test_kn_dequant kernels/bench_kn_dequant; } > "$LOGS/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -30 "$LOGS/build.log"; exit 1; }
  bin=$b/kernels
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader \
  | tee "$LOGS/card.txt"

# 1. timings (nothing else on the GPU meanwhile)
for v in $VARIANTS $ref; do
  log="$LOGS/bench_$v.log"
  [ -e "$log" ] && log="$LOGS/bench_${v}_again.log"
  BNBFS_KN_FUSE_T=$v timeout 60 "$(binof $v)/bench_kn_dequant" --hash > "$log" 2>&1 || echo "bench $v: rc $?"
done
echo "benchmarks done: $(el) s"
pack

# 2. bit-exactness, every variant at once; memcheck of the MEMCHECK
# variants' device ops beside them
for v in $VARIANTS; do
  ( BNBFS_KN_FUSE_T=$v timeout "$T_TEST" "$(binof $v)/test_kn_dequant" > "$LOGS/test_$v.log" 2>&1
    echo $? > "$LOGS/test_$v.rc" ) &
done
for v in $MEMCHECK; do
  ( BNBFS_KN_FUSE_T=$v timeout "$T_TEST" compute-sanitizer --tool memcheck --print-limit 5 \
      "$(binof $v)/test_kn_dequant" ops_deq4 > "$LOGS/memcheck_$v.log" 2>&1
    echo $? > "$LOGS/memcheck_$v.rc" ) &
done
wait
echo "tests done: $(el) s"
pack

# 3. Nsight Compute on one launch (NCU_SKIP: the first down F16 launch)
gbs() { grep -m1 "RESULT $2 " "$LOGS/bench_$1.log" 2>/dev/null | awk '{print $3}'; }
best=$(for v in $VARIANTS; do [ "$v" = "$ref" ] || echo "$(gbs $v fuse_down_f16_gbs) $v"; done \
       | sort -rn | head -1 | awk '{print $2}')
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
for v in $ref $best; do
  BNBFS_KN_FUSE_T=$v timeout "$T_NCU" "$ncu" --clock-control none --kernel-name regex:fuse \
    --launch-skip "$NCU_SKIP" --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts.sum \
    "$(binof $v)/bench_kn_dequant" > "$LOGS/ncu_$v.txt" 2>&1
  echo "ncu $v: rc $? ($(el) s)"
done
pack

# 4. summary
for v in $ref $best; do
  echo "== ncu $v (one launch, $NCU_SKIP skipped)"
  grep -E "^\s+(Duration|Grid Size|Waves Per SM|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|L1/TEX Hit Rate|L2 Hit Rate|Mem Busy|Max Bandwidth|Mem Pipes Busy|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Issued Warp Per Scheduler|No Eligible|Active Warps Per Scheduler|Eligible Warps Per Scheduler|Warp Cycles Per Issued Instruction|dram__bytes_read.sum|dram__bytes_write.sum|smsp__inst_executed.sum|l1tex__data_pipe_lsu_wavefronts.sum)\b" \
    "$LOGS/ncu_$v.txt" | sed -E 's/ +/ /g' | head -26
  grep -E "(OPT|WRN) .*(stall|Stall|latency|bandwidth|coalesc|sector)" "$LOGS/ncu_$v.txt" | cut -c1-300 | head -4
done
for v in $MEMCHECK; do
  echo "== memcheck $v (test_kn_dequant ops_deq4): rc $(cat "$LOGS/memcheck_$v.rc" 2>/dev/null)" \
       "$(grep -m1 'ERROR SUMMARY' "$LOGS/memcheck_$v.log")"
done
printf '\n%-14s %-30s %8s' variant test copy
for k in gate_up_f16 gate_up_bf16 gate_up_f32 down_f16 down_bf16 down_f32; do printf ' %13s' "$k"; done
echo
for v in $VARIANTS ${ref}_again; do
  tst="$(cat "$LOGS/test_${v%_again}.rc" 2>/dev/null) $(grep -m1 -E 'tests, ' "$LOGS/test_${v%_again}.log" 2>/dev/null)"
  [ "$v" = "${ref}_again" ] && tst="(same binary)"
  c=$(gbs $v d2d_gbs)
  printf '%-14s %-30s %8s' "$v" "$tst" "$c"
  for k in gate_up_f16 gate_up_bf16 gate_up_f32 down_f16 down_bf16 down_f32; do
    x=$(gbs $v fuse_${k}_gbs)
    printf ' %7s %4s%%' "$x" "$(awk -v x="$x" -v c="$c" 'BEGIN{if (c > 0 && x != "") printf "%.0f", 100 * x / c}')"
  done
  echo
done
echo "(GB/s read + written, % of the same run's device-to-device copy; test: rc and tu summary)"
for v in $VARIANTS ${ref}_again; do
  same=0 diff=0
  for k in gate_up_f16 gate_up_bf16 gate_up_f32 down_f16 down_bf16 down_f32; do
    a=$(gbs $v fuse_${k}_xxh3) b=$(gbs $ref fuse_${k}_xxh3)
    if [ -n "$a" ] && [ "$a" = "$b" ]; then same=$((same + 1)); else diff=$((diff + 1)); fi
  done
  echo "outputs at the benchmark shapes, $v vs $ref: $same of 6 hashes equal$([ $diff -gt 0 ] && echo ", $diff DIFFER")"
done
for v in $VARIANTS; do grep -m3 "^FAIL" "$LOGS/test_$v.log" 2>/dev/null | sed "s/^/$v: /"; done
echo "total: $(el) s"
pack
