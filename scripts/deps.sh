#!/usr/bin/env bash
# Installs what building and testing bnbfs needs, when it is missing:
# Debian packages (root or sudo) and a Python venv in .venv with the test
# packages. Safe to run again; does nothing when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(meson ninja-build pkg-config gcc libfuse3-dev fuse3 libcjson-dev libxxhash-dev
      libpcre2-dev libedit-dev python3-venv python3-pip attr xz-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

py_pkgs=(numpy safetensors pytest tokenizers)
if [ ! -x .venv/bin/python ]; then
  echo "deps: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import numpy, safetensors, pytest, tokenizers" 2>/dev/null; then
  echo "deps: pip install ${py_pkgs[*]}"
  .venv/bin/python -m pip install -q --disable-pip-version-check "${py_pkgs[@]}"
fi
