#!/usr/bin/env bash
# Runs every bnbfs test on this machine: installs what is missing, builds
# build/ (warnings are errors) and build-asan/ (AddressSanitizer +
# UndefinedBehaviorSanitizer, CUDA off), runs the C suites of both with
# meson test and the Python suites with pytest (real FUSE mounts), then
# prints one line "N passed, N failed". GPU tests skip with a reason when no
# GPU is present. Exit status 0 only when nothing failed.
#   ./test.sh            everything
#   ./test.sh -k EXPR    only pytest tests matching EXPR (C suites still run)
set -uo pipefail
cd "$(dirname "$0")"
root=$(pwd)

./scripts/deps.sh || { echo "0 passed, 1 failed"; exit 1; }
./scripts/build.sh build || { echo "build failed"; echo "0 passed, 1 failed"; exit 1; }
./scripts/build.sh build-asan -Dcuda=disabled -Db_sanitize=address,undefined \
    -Db_lundef=false -Dbuildtype=debugoptimized \
  || { echo "asan build failed"; echo "0 passed, 1 failed"; exit 1; }

mkdir -p .cache/results
rm -f .cache/results/*.xml
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
meson test -C build --print-errorlogs -q
cp build/meson-logs/testlog.junit.xml .cache/results/c.xml 2>/dev/null
meson test -C build-asan --print-errorlogs -q
cp build-asan/meson-logs/testlog.junit.xml .cache/results/c-asan.xml 2>/dev/null

BNBFS_BUILD="$root/build" BNBFS_BUILD_ASAN="$root/build-asan" \
  .venv/bin/python -m pytest -q -rs tests --junitxml=.cache/results/py.xml "$@"

.venv/bin/python - <<'PY'
import glob, sys, xml.etree.ElementTree as ET
p = f = s = 0
for x in sorted(glob.glob(".cache/results/*.xml")):
    for tc in ET.parse(x).getroot().iter("testcase"):
        kinds = {c.tag for c in tc}
        if kinds & {"failure", "error"}: f += 1
        elif "skipped" in kinds: s += 1
        else: p += 1
print(f"({s} skipped)")
print(f"{p} passed, {f} failed")
sys.exit(1 if f or p == 0 else 0)
PY
