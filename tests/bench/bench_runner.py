#!/usr/bin/env python3
"""Runner benchmark (issue 6). Not a test; never gates CI.

    tests/bench/bench_runner.py --build BUILD --full DIR [--stages S,S,...]
                                [--results tests/bench/RESULTS.md] [--out DIR]
                                [--base-build OTHER_BUILD]

On the GPU machine, one card, with the full-size fixture (real gpt-oss-20b
shapes, random weights; generated into DIR by tests/fixtures/gen_fixture.py
--size full when DIR/src is absent) mounted by bnbfs:
  cold         page cache dropped, fresh mount: seconds from starting bnbfs to
               the first generated token (128-token prompt), once through the
               engine alone (llm-driver) and once through bnbfs-run
  resident     decode tokens/s at batch 1 (prompt 128, 256 generated) and
               prefill tokens/s (2048-token prompt), weights all on the GPU;
               the card's measured copy bandwidth, the bytes a decode step
               reads, the roofline (bandwidth / bytes) and the fraction reached
  budget       the same with --vram-budget 24G (experts through the GPU
               cache): tokens/s, hit rate, bytes moved per token, and the rate
               that many bytes allow over PCIe 4 x16 (25 GB/s, an RTX 3090)
  transformers GptOssForCausalLM (fp16, eager attention) on the same mount and
               card: the same decode and prefill shapes
  nopdl        resident decode with BNBFS_PDL=0 (comparison)
  hostpick     resident decode picking on the host (llm-driver --host-pick:
               the 804 KB of logits back and bnbfs-run's sampler each token)
               instead of the GPU's pick (comparison)
  base         resident decode of the builds given by --base-build (e.g. the
               code before a change), same run and card
Prints a table and appends it with the card's name and the date to --results;
raw numbers go to OUT/bench_runner.json. Every stage that fails is reported
as such; the others still run.
"""
import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
PCIE4 = 25e9            # usable PCIe 4.0 x16 host-to-device bytes/s (RTX 3090)


def log(msg):
    print(msg, flush=True)


def run(cmd, timeout=900, check=True):
    log("$ " + " ".join(str(c) for c in cmd))
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if r.stderr.strip():
        log(r.stderr.strip()[-3000:])
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {r.returncode}")
    return r


def drop_caches():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        log(f"cannot drop the page cache ({e}): the cold numbers include cached source bytes")
        return False


def mount(build, src, mnt):
    mnt.mkdir(parents=True, exist_ok=True)
    logf = open(mnt.parent / "bnbfs.log", "a")
    t0 = time.monotonic()
    p = subprocess.Popen([build / "fs" / "bnbfs", src, mnt, "-f"], stdout=logf, stderr=logf,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    while not os.path.ismount(mnt):
        if p.poll() is not None:
            raise RuntimeError(f"bnbfs exited with {p.returncode} before mounting")
        if time.monotonic() - t0 > 120:
            p.kill()
            raise RuntimeError("bnbfs did not mount in 120 s")
        time.sleep(0.01)
    return p, t0


def unmount(mnt, p):
    for _ in range(100):
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    return p.wait(timeout=120)


def ids(n, seed=1):
    import random
    r = random.Random(seed)
    return " ".join(str(r.randrange(199998)) for _ in range(n))


def stage_cold(a, res):
    out = {}
    for tool in ("llm-driver", "bnbfs-run"):
        out[f"{tool}_page_cache_dropped"] = drop_caches()
        p, t0 = mount(a.build, a.full / "src", a.mnt)
        try:
            if tool == "llm-driver":
                cmd = [a.build / "runner" / "llm-driver", a.mnt, "--ids", ids(128), "--greedy", "1",
                       "--progress"]
            else:
                cmd = [a.build / "runner" / "bnbfs-run", a.mnt, "--ids", ids(128), "--raw",
                       "--temperature", "0", "--max-tokens", "1", "--stats"]
            r = run(cmd, timeout=600)
            out[f"{tool}_first_token_s"] = time.monotonic() - t0
        finally:
            unmount(a.mnt, p)
    res["cold"] = out


def driver_bench(a, *extra, env=None, prefill=True, build=None):
    cmd = [(build or a.build) / "runner" / "llm-driver", a.mnt, "--bench-decode", "128:256",
           "--progress"]
    if prefill:
        cmd += ["--bench-prefill", 2048]
    log("$ " + " ".join(str(c) for c in cmd + list(extra)) + (f"  (env {env})" if env else ""))
    r = subprocess.run([str(c) for c in cmd + list(extra)], capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, **(env or {})))
    if r.stderr.strip():
        log(r.stderr.strip()[-3000:])
    if r.returncode != 0:
        raise RuntimeError(f"llm-driver exited with {r.returncode}")
    return json.loads(r.stdout)


def stage_resident(a, res):
    res["resident"] = driver_bench(a, "--repeat", 3, "--bandwidth")


def stage_budget(a, res):
    res["budget"] = driver_bench(a, "--repeat", 1, "--vram-budget", "24G")


def stage_nopdl(a, res):
    """Resident decode without programmatic dependent launch (comparison)."""
    res["nopdl"] = driver_bench(a, "--repeat", 3, env={"BNBFS_PDL": "0"}, prefill=False)


def stage_hostpick(a, res):
    res["hostpick"] = driver_bench(a, "--repeat", 3, "--host-pick", prefill=False)


def stage_base(a, res):
    """Resident decode of other builds (--base-build, once or more: e.g. the
    commit before a change), in the same run on the same card."""
    if not a.base_build:
        raise RuntimeError("--base-build not given")
    for i, b in enumerate(a.base_build):
        key = "base" if i == 0 else f"base{i + 1}"
        res[key] = driver_bench(a, "--repeat", 3, prefill=False, build=b)
        res[key]["build"] = b.name


def stage_stream(a, res):
    """--vram-budget 24G with every expert use a miss (--expert-nocache): the
    copy path's throughput, whatever the routing's locality (the random
    fixture's router picks nearly the same experts every token)."""
    res["stream"] = driver_bench(a, "--repeat", 1, "--vram-budget", "24G", "--expert-nocache")


TRANSFORMERS = r'''
import json, sys, time, torch, transformers
mnt = sys.argv[1]
kw = dict(attn_implementation="eager")
try:
    m = transformers.GptOssForCausalLM.from_pretrained(mnt, dtype=torch.float16, **kw)
except TypeError:
    m = transformers.GptOssForCausalLM.from_pretrained(mnt, torch_dtype=torch.float16, **kw)
m = m.to("cuda").eval()
g = torch.Generator().manual_seed(1)
out = {"transformers": transformers.__version__, "torch": torch.__version__}
def sync(): torch.cuda.synchronize()
with torch.no_grad():
    x = torch.randint(0, 199998, (1, 2048), generator=g).cuda()
    ts = []
    for r in range(3):
        sync(); t0 = time.perf_counter(); m(x, use_cache=False); sync()
        ts.append(time.perf_counter() - t0)
    out["prefill_tok_s"] = 2048 / sorted(ts)[1]
    p = torch.randint(0, 199998, (1, 128), generator=g).cuda()
    ts = []
    for r in range(2):
        o = m(p, use_cache=True)
        pkv, tok = o.past_key_values, o.logits[:, -1:].argmax(-1)
        sync(); t0 = time.perf_counter()
        for i in range(256):
            o = m(tok, past_key_values=pkv, use_cache=True)
            pkv, tok = o.past_key_values, o.logits[:, -1:].argmax(-1)
        sync(); ts.append(time.perf_counter() - t0)
    out["decode_tok_s"] = 256 / min(ts)
print(json.dumps(out))
'''


def stage_transformers(a, res):
    r = run([sys.executable, "-c", TRANSFORMERS, a.mnt], timeout=900)
    res["transformers"] = json.loads(r.stdout.strip().splitlines()[-1])


def table(res, card):
    rows = []

    def add(k, v):
        rows.append(f"| {k} | {v} |")

    R, B, T, C = (res.get(k) or {} for k in ("resident", "budget", "transformers", "cold"))
    if R:
        bw = R.get("bandwidth_copy_Bps", 0)
        bpt = R.get("decode_bytes_per_token", 0)
        roof = bw / bpt if bpt else 0
        add("measured copy bandwidth (read + write)", f"{bw / 1e12:.2f} TB/s")
        add("decode bytes read per token (weights + KV, prompt 128, 256 generated)",
            f"{bpt / 1e9:.2f} GB")
        add("decode roofline (bandwidth / bytes)", f"{roof:.0f} tok/s")
        add("decode, resident (batch 1, prompt 128, 256 generated"
            + (f", greedy pick on the {R['decode_pick']}" if "decode_pick" in R else "") + ")",
            f"{R['decode_tok_s']:.1f} tok/s = {R['decode_tok_s'] / roof:.0%} of the roofline, "
            f"{1e3 / R['decode_tok_s']:.3f} ms a token")
        if "decode_engine_s_per_token" in R:
            add("decode, resident: time a token inside the engine (without the host's pick)",
                f"{R['decode_engine_s_per_token'] * 1e3:.3f} ms")
        add("prefill, resident (2048-token prompt)", f"{R['prefill_tok_s']:.0f} tok/s")
        add("pinned host-to-device copy", f"{R.get('h2d_pinned_Bps', 0) / 1e9:.1f} GB/s")
    if T:
        add(f"transformers {T.get('transformers')} decode (fp16, eager)",
            f"{T['decode_tok_s']:.1f} tok/s")
        add("transformers prefill (2048 tokens)", f"{T['prefill_tok_s']:.0f} tok/s")
        if R:
            add("bnbfs-run vs transformers", f"decode {R['decode_tok_s'] / T['decode_tok_s']:.1f}x, "
                f"prefill {R['prefill_tok_s'] / T['prefill_tok_s']:.1f}x")
    if B:
        s = B["stats"]
        hits, miss = s["expert_hits"], s["expert_misses"]
        add("--vram-budget 24G: engine memory, expert slots",
            f"{s['vram_bytes'] / 2**30:.1f} GiB, {s['expert_slots']} of 768 experts")
        add("--vram-budget 24G decode", f"{B['decode_tok_s']:.1f} tok/s")
        add("--vram-budget 24G prefill (2048 tokens)", f"{B['prefill_tok_s']:.0f} tok/s")
        add("--vram-budget 24G expert hit rate (whole run)",
            f"{hits / max(hits + miss, 1):.1%} ({hits} hits, {miss} misses)")
        if "decode_hits" in B:
            dh, dm = B["decode_hits"], B["decode_misses"]
            add("--vram-budget 24G expert hit rate (timed decode)", f"{dh / max(dh + dm, 1):.1%}")
        if "decode_moved_per_token" in B:
            mpt = B["decode_moved_per_token"]
            add("--vram-budget 24G bytes moved per decode token", f"{mpt / 1e9:.2f} GB")
            add("PCIe 4 x16 (25 GB/s) bound for that traffic",
                f"{PCIE4 / mpt:.1f} tok/s" if mpt else "none (no bytes over PCIe)")
    cmp = [(k, f"build {res[k].get('build', '')} (--base-build)")
           for k in sorted(res) if k.startswith("base") and res[k]]
    cmp = [("hostpick", "greedy pick on the host (--host-pick)")] + cmp
    for key, what in cmp:
        X = res.get(key) or {}
        if X and R:
            eng = X.get("decode_engine_s_per_token")
            st = X.get("stats") or {}
            if eng is None and st.get("decode_tokens"):
                eng = st["decode_s"] / st["decode_tokens"]     # older drivers: whole run
            add(f"decode, resident, {what}",
                f"{X['decode_tok_s']:.1f} tok/s = {X['decode_tok_s'] / roof:.0%} of the roofline"
                + (f" (engine {eng * 1e3:.3f} ms a token)" if eng else ""))
    N = res.get("nopdl") or {}
    if N:
        add("decode, resident, without programmatic dependent launch (BNBFS_PDL=0)",
            f"{N['decode_tok_s']:.1f} tok/s")
    S = res.get("stream") or {}
    if S:
        s = S["stats"]
        dh, dm = S.get("decode_hits", 0), S.get("decode_misses", 0)
        mpt = S.get("decode_moved_per_token", 0)
        add("--vram-budget 24G --expert-nocache (every expert use a miss) decode",
            f"{S['decode_tok_s']:.1f} tok/s, hit rate {dh / max(dh + dm, 1):.1%}, "
            f"{mpt / 1e9:.2f} GB moved per token"
            + (f" = {mpt * S['decode_tok_s'] / 1e9:.1f} GB/s of copies" if mpt else ""))
        add("--vram-budget 24G --expert-nocache prefill (2048 tokens)",
            f"{S['prefill_tok_s']:.0f} tok/s")
    if B or S:
        # Uniform routing (no locality): a layer with q of its E experts
        # cached misses topk * (1 - q/E) a token. What a miss moves over
        # PCIe depends on the expert store the engine chose (the run's own
        # bytes a miss): 49.8 MB of F16, ~12.8 MB of 4-bit, or nothing when
        # the 4-bit store is on the GPU.
        X = B or S
        st = X["stats"]
        slots = st["expert_slots"]
        miss = 96 * (1 - slots / 768)
        per_miss = st["bytes_moved"] / st["expert_misses"] if st.get("expert_misses") else 49766400
        mb = miss * per_miss
        h2d = (res.get("resident") or {}).get("h2d_pinned_Bps", 0)
        if mb == 0:
            line = (f"{miss:.0f} misses a token, 0 bytes over PCIe (store {st.get('store', '?')}: "
                    f"a miss is a dequantization on the GPU)")
        else:
            line = (f"{miss:.0f} misses x {per_miss / 1e6:.1f} MB = {mb / 1e9:.2f} GB a token "
                    f"(store {st.get('store', '?')}): copies alone allow "
                    f"{PCIE4 / mb:.1f} tok/s at 25 GB/s (PCIe 4 x16)")
            if h2d:
                line += f", {h2d / mb:.1f} tok/s at this machine's {h2d / 1e9:.0f} GB/s"
            if S and S.get("decode_moved_per_token"):
                eff = S["decode_moved_per_token"] * S["decode_tok_s"]
                line += f"; at the copy rate the all-miss run reached ({eff / 1e9:.0f} GB/s): " \
                        f"{eff / mb:.1f} tok/s"
        add(f"uniform-routing projection, 24G ({slots} of 768 experts cached)", line)
    if C:
        for tool in ("llm-driver", "bnbfs-run"):
            if f"{tool}_first_token_s" in C:
                add(f"cold mount to first token ({tool}, 128-token prompt"
                    f"{'' if C.get(f'{tool}_page_cache_dropped') else ', page cache not dropped'})",
                    f"{C[f'{tool}_first_token_s']:.1f} s")
    for k, v in res.get("failed", {}).items():
        add(f"stage {k}", f"FAILED: {v}")
    head = ["| measurement | value |", "|---|---|"]
    return "\n".join(head + rows)


def ensure_full(full):
    """Generates the full-size fixture into FULL/src unless it is there."""
    if (full / "src" / "config.json").exists():
        return
    t0 = time.monotonic()
    run([sys.executable, ROOT / "tests" / "fixtures" / "gen_fixture.py", "--size", "full",
         full / "src.tmp"], timeout=1200)
    (full / "src.tmp" / "src").rename(full / "src")
    log(f"full fixture generated in {time.monotonic() - t0:.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=pathlib.Path, required=True)
    ap.add_argument("--full", type=pathlib.Path, required=True)
    ap.add_argument("--mnt", type=pathlib.Path)
    ap.add_argument("--stages", default="cold,resident,budget,transformers")
    ap.add_argument("--results", type=pathlib.Path, default=ROOT / "tests" / "bench" / "RESULTS.md")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."))
    ap.add_argument("--base-build", type=pathlib.Path, action="append",
                    help="another build dir whose llm-driver the 'base' stage times "
                         "(may be given more than once)")
    a = ap.parse_args()
    a.build = a.build.resolve()
    a.base_build = [b.resolve() for b in a.base_build or []]
    a.mnt = (a.mnt or a.full / "mnt").resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    ensure_full(a.full)
    card = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                "--format=csv,noheader"]).stdout.strip()
    res = {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "failed": {}}
    stages = {"cold": stage_cold, "resident": stage_resident, "budget": stage_budget,
              "transformers": stage_transformers, "nopdl": stage_nopdl, "stream": stage_stream,
              "base": stage_base, "hostpick": stage_hostpick}
    p = None
    for st in a.stages.split(","):
        try:
            if st != "cold" and p is None:
                p, _ = mount(a.build, a.full / "src", a.mnt)
            if st == "cold" and p is not None:
                unmount(a.mnt, p)
                p = None
            stages[st](a, res)
        except Exception as e:  # noqa: BLE001 - report and go on
            res["failed"][st] = str(e)[:300]
            log(f"stage {st} failed: {e}")
        (a.out / "bench_runner.json").write_text(json.dumps(res, indent=1))
    if p is not None:
        unmount(a.mnt, p)
    t = table(res, card)
    head = (f"\n### Runner, {res['date'][:10]} — {card}\n"
            f"Command: `tests/bench/bench_runner.py --build {a.build.name} --full {a.full} "
            f"--stages {a.stages}` (full-size fixture, random weights, mounted by bnbfs).\n\n")
    log(head + t)
    with open(a.results, "a") as f:
        f.write(head + t + "\n")


if __name__ == "__main__":
    main()
