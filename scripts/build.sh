#!/usr/bin/env bash
# Configures (once) and builds bnbfs into build/ (or $1). Extra args go to meson setup.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build}; shift || true
if [ ! -f "$dir/build.ninja" ]; then
  meson setup "$dir" -Dwerror=true "$@" >/dev/null || { cat "$dir/meson-logs/meson-log.txt" | tail -30; exit 1; }
fi
ninja -C "$dir" >/dev/null || ninja -C "$dir"
