#!/usr/bin/env bash
# The main job, end to end: installs what is missing, builds, then mounts
# SRC (a bitsandbytes 4-bit checkpoint directory; default: a small
# generated Unsloth-format gpt-oss checkpoint), shows the FP16 checkpoint
# bnbfs presents (listing, rewritten config, a tensor's attributes, the
# plan), loads it with the safetensors library, runs bnbfs-run on it when a
# GPU is present, and unmounts.
#   ./demo.sh [SRC] [PROMPT]
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)
./scripts/deps.sh
./scripts/build.sh build

src=${1:-}
prompt=${2:-"Say hello in one sentence."}
if [ -z "$src" ]; then
  echo "== no checkpoint given: generating a tiny Unsloth-format gpt-oss checkpoint"
  .venv/bin/python tests/fixtures/gen_fixture.py --size tiny .cache/demo >/dev/null
  src=.cache/demo/src
fi
src=$(cd "$src" && pwd)
mnt=$(mktemp -d /tmp/bnbfs-demo-XXXXXX)
log=$mnt.log
cleanup() {
  mountpoint -q "$mnt" && fusermount3 -u "$mnt"
  rmdir "$mnt" 2>/dev/null || true
}
trap cleanup EXIT

echo "== plan (bnbfs-inspect $src)"
build/dequant/bnbfs-inspect "$src" | tail -n 8

echo "== mounting: bnbfs -f $src $mnt (foreground, in the background of this script)"
t0=$(date +%s%N)
build/fs/bnbfs -f "$src" "$mnt" 2>"$log" &
pid=$!
for i in $(seq 200); do mountpoint -q "$mnt" && break; kill -0 $pid 2>/dev/null || break; sleep 0.05; done
mountpoint -q "$mnt" || { echo "mount failed:"; cat "$log"; exit 1; }
echo "   mounted in $(( ($(date +%s%N) - t0) / 1000000 )) ms"

echo "== ls -l $mnt"
ls -l "$mnt"
echo "== config.json (rewritten)"
grep -E '"(torch_dtype|dtype|quantization_config)"' "$mnt/config.json" || true
t=$(ls "$mnt/tensors" | grep -m1 'gate_up_proj$')
echo "== getfattr $mnt/tensors/$t"
getfattr -d "$mnt/tensors/$t" | sed 's/^/   /'
echo "== loading every tensor with the safetensors library"
.venv/bin/python - "$mnt" <<'PY'
import sys, time, glob
from safetensors import safe_open
t0, n, b = time.time(), 0, 0
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    with safe_open(f, "np") as s:
        for k in s.keys():
            a = s.get_tensor(k); n += 1; b += a.nbytes
print(f"   {n} tensors, {b/1e6:.1f} MB of {a.dtype} in {time.time()-t0:.2f} s")
PY
echo "== .bnbfs/stats"
sed 's/^/   /' "$mnt/.bnbfs/stats" | head -n 30

if nvidia-smi -L >/dev/null 2>&1 && [ -x build/runner/bnbfs-run ]; then
  echo "== bnbfs-run $mnt \"$prompt\""
  build/runner/bnbfs-run "$mnt" "$prompt" --max-tokens 64 --stats || echo "(runner failed)"
else
  echo "== no GPU here: skipping bnbfs-run (the tokenizer still works:)"
  echo "$prompt" | build/runner/bnbfs-run "$mnt" --tokenize 2>/dev/null | head -c 300 || true
  echo
fi
echo "== unmounting"
fusermount3 -u "$mnt"
rc=0; wait $pid || rc=$?
[ $rc = 0 ] || { echo "bnbfs exited with $rc"; cat "$log"; exit 1; }
if grep -q " error:" "$log"; then echo "daemon log has errors:"; cat "$log"; exit 1; fi
echo "done."
