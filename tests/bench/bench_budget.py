#!/usr/bin/env python3
"""The 24 GB mode's benchmark (issue 6). Not a test; never gates CI.

    tests/bench/bench_budget.py --build BUILD --full DIR [--budget 24G]
                                [--runs q4-gpu,q4-gpu/miss,q4-host,q4-host/miss]
                                [--results tests/bench/RESULTS.md] [--out DIR]

On the GPU machine, with the full-size fixture (gpt-oss-20b shapes, generated
into DIR by tests/fixtures/gen_fixture.py --size full when DIR/src is absent)
mounted by bnbfs, llm-driver decodes (prompt 128, 256 generated) and
prefills (2048 tokens) under --vram-budget with each expert store of the
run list: STORE (q4-gpu, q4-host, f16-host) with the fixture's routing, or
STORE/miss with every expert use a miss (--expert-nocache: the store's
worst case, whatever the routing). For each: tokens/s, the timed decode's
hit rate, and per decode token the bytes copied over PCIe and the bytes
dequantized on the GPU — what a projection to another card needs. The
projection printed for an RTX 3090 (PCIe 4 x16 at 25 GB/s, 936 GB/s of
memory) is arithmetic on those measured bytes, not a measurement: copy time
plus memory time (weights a token + 4-bit read + F16 written a miss) at the
fraction of its bandwidth this card's resident decode reaches, serialized.
Prints a table and appends it with the card's name and the date to
--results; raw numbers go to OUT/bench_budget.json.
"""
import argparse
import datetime
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_runner as br  # noqa: E402  (mount, unmount, run, driver_bench)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PCIE4 = 25e9            # usable PCIe 4.0 x16 host-to-device bytes/s
RTX3090_BW = 936e9      # RTX 3090 memory bandwidth, bytes/s (spec sheet)
EXPERT_F16 = (2880 * 5760 + 2880 * 2880) * 2
DECODE_G = 256          # generated tokens of bench_runner.driver_bench's decode run


def bench(a, store, miss):
    extra = ["--repeat", 1, "--vram-budget", a.budget, "--expert-store", store]
    if miss:
        extra.append("--expert-nocache")
    return br.driver_bench(a, *extra, prefill=True)


def table(res, runs):
    rows = ["| expert store (--vram-budget %s) | routing | decode tok/s | prefill tok/s | "
            "slots of 768 | decode hit rate | per decode token: over PCIe, dequantized | "
            "RTX 3090 projection |" % res["budget"],
            "|---|---|---|---|---|---|---|---|"]
    R = res.get("resident") or {}
    eff = 0.0
    if R.get("bandwidth_copy_Bps") and R.get("decode_bytes_per_token"):
        eff = R["decode_tok_s"] * R["decode_bytes_per_token"] / R["bandwidth_copy_Bps"]
        rows.insert(0, f"Resident decode on this card: {R['decode_tok_s']:.1f} tok/s, "
                       f"{R['decode_bytes_per_token'] / 1e9:.2f} GB a token, "
                       f"{eff:.0%} of its {R['bandwidth_copy_Bps'] / 1e12:.2f} TB/s.\n")
    for key in runs:
        X = res.get(key)
        if not X:
            continue
        s = X["stats"]
        dh, dm = X.get("decode_hits", 0), X.get("decode_misses", 0)
        moved = X.get("decode_moved_per_token", 0.0)
        deq = X.get("decode_dequant_per_token", 0.0)
        proj = ""
        if eff and R:
            # memory: the resident bytes, plus each miss reading its 4-bit
            # record (~1/3.9 of F16) and writing F16
            nmiss = deq / EXPERT_F16 if deq else 0.0
            mem = R["decode_bytes_per_token"] + nmiss * EXPERT_F16 * (1 + 1 / 3.9)
            t = moved / PCIE4 + mem / (RTX3090_BW * eff)
            proj = f"{1 / t:.1f} tok/s"
        rows.append(f"| {s.get('store', '?')} | {'every use a miss' if key.endswith('/miss') else 'fixture'} "
                    f"| {X['decode_tok_s']:.1f} | {X['prefill_tok_s']:.0f} "
                    f"| {s['expert_slots']} | {dh / max(dh + dm, 1):.1%} ({dm / DECODE_G:.0f} misses a token) "
                    f"| {moved / 1e9:.3f} GB, {deq / 1e9:.2f} GB | {proj} |")
    for k, v in res.get("failed", {}).items():
        rows.append(f"| {k} | FAILED: {v} | | | | | | |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=pathlib.Path, required=True)
    ap.add_argument("--full", type=pathlib.Path, required=True)
    ap.add_argument("--mnt", type=pathlib.Path)
    ap.add_argument("--budget", default="24G")
    ap.add_argument("--runs", default="q4-gpu,q4-gpu/miss,q4-host,q4-host/miss")
    ap.add_argument("--no-resident", action="store_true",
                    help="skip the resident run (no projection then)")
    ap.add_argument("--results", type=pathlib.Path, default=ROOT / "tests" / "bench" / "RESULTS.md")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."))
    a = ap.parse_args()
    a.build = a.build.resolve()
    a.mnt = (a.mnt or a.full / "mnt").resolve()
    a.runs = [r for r in a.runs.split(",") if r]
    a.out.mkdir(parents=True, exist_ok=True)
    br.ensure_full(a.full)
    card = br.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                   "--format=csv,noheader"]).stdout.strip()
    res = {"card": card, "budget": a.budget, "failed": {},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    p, _ = br.mount(a.build, a.full / "src", a.mnt)
    try:
        if not a.no_resident:
            try:
                res["resident"] = br.driver_bench(a, "--repeat", 1, "--bandwidth", prefill=False)
            except Exception as e:  # noqa: BLE001 - report and go on
                res["failed"]["resident"] = str(e)[:300]
        for key in a.runs:
            store, _, miss = key.partition("/")
            try:
                res[key] = bench(a, store, bool(miss))
            except Exception as e:  # noqa: BLE001
                res["failed"][key] = str(e)[:300]
                br.log(f"run {key} failed: {e}")
            (a.out / "bench_budget.json").write_text(json.dumps(res, indent=1))
    finally:
        br.unmount(a.mnt, p)
    t = table(res, a.runs)
    print(t)
    with open(a.results, "a") as f:
        f.write(f"\n### bench_budget.py — {card} — {res['date'][:16]}Z\n\n"
                f"`tests/bench/bench_budget.py --budget {a.budget} --runs {','.join(a.runs)}`\n\n"
                f"{t}\n")
    (a.out / "bench_budget.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
