#!/usr/bin/env python3
"""GPU dequantization benchmark (issue 4). Not a test; never gates CI.

    tests/bench/bench_gpu_dequant.py --build BUILD [--base BUILD] [--full DIR]
        [--readers 8] [--reps 3] [--parts kernels,mount]
        [--results tests/bench/RESULTS.md] [--log FILE] [--json FILE]

On the GPU machine, in one run:
  1. kernels: BUILD/kernels/bench_kn_dequant: the card's device-to-device copy
     bandwidth (bytes read + written), pinned H2D and D2H bandwidth, and each
     kernel's throughput (bytes read + written per second) against the copy
     bandwidth (goal >= 80%); with --full, also kn_ctx_compute over the whole
     full-size checkpoint host to host, next to the CPU reference on all cores.
  2. mount (needs --full DIR; generated there by tests/fixtures/gen_fixture.py
     --size full when absent): a cold read of every virtual shard of a fresh
     bnbfs mount with --readers parallel readers (preader: 1 MiB preads, file
     k read by reader k % readers; the source read once before, so it is in
     the page cache), gpu=off and gpu=auto, each --reps times in alternating
     order, next to the FUSE ceiling measured the same way, once per round: the
     RAM-backed server of ../shared/bench (computing nothing) serving as many
     files as there are shards, of the same total size, read by the same
     readers, with the mount's read-ahead raised to 4 MiB (1 MiB requests) and
     64 background requests (congestion threshold 48), as bnbfs asks for its
     own mount. That ceiling (median of the rounds) is the 100% of the table;
     the server's own setting (12 background requests) and 8 files of 2 GiB
     are measured once too. Per bnbfs run: GB/s, the daemon's CPU seconds split by
     thread (FUSE workers, GPU engine, CPU engine, CUDA's own threads), the
     bytes each engine computed, read latency, and the GPU engine's lane
     times (.bnbfs/stats "engine_gpu"). --base BUILD measures a second build
     (the code before a change) in the same run.
Prints a table and appends it, with the card's name and the date, to
--results. Needs root (read-ahead and background limits of a FUSE mount are
set through /sys). fuse_ceiling.c and preader.c are taken from .device/ (the
GPU machine) or ../shared/bench/ (this machine).
"""
import argparse
import datetime
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
HZ = os.sysconf("SC_CLK_TCK")
FUSECTL = pathlib.Path("/sys/fs/fuse/connections")


def log(msg):
    print(msg, flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def find_c(name):
    for d in (ROOT / ".device", ROOT.parent / "shared" / "bench"):
        if (d / name).exists():
            return d / name
    sys.exit(f"{name} not found in .device/ or ../shared/bench/")


def build_tools(tmp):
    cflags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], check=True,
                            capture_output=True, text=True).stdout.split()
    run(["cc", "-O2", find_c("preader.c"), "-o", tmp / "preader", "-lpthread"])
    run(["cc", "-O2", find_c("fuse_ceiling.c"), "-o", tmp / "fuse_ceiling"] + cflags)
    return tmp / "preader", tmp / "fuse_ceiling"


def wait_mount(mnt, proc, what, timeout=120):
    t = time.monotonic()
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} before mounting")
        if time.monotonic() - t > timeout:
            proc.kill()
            sys.exit(f"{what} did not mount in {timeout} s")
        time.sleep(0.02)


def unmount(mnt, proc):
    for _ in range(100):
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    return proc.wait(timeout=120)


def preader(tool, readers, files):
    out = run([tool, readers, 1 << 20] + files).stdout
    m = re.search(r"([\d.]+) GB in ([\d.]+) s = ([\d.]+) GB/s", out)
    if not m:
        sys.exit(f"preader said: {out}")
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


# ------------------------------------------------------ mount settings

def conn_minor(mnt):
    return os.minor(os.stat(mnt).st_dev)


def write_sys(path, value):
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        log(f"cannot write {path}: {e}")
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def set_readahead(mnt, kb):
    return write_sys(pathlib.Path(f"/sys/class/bdi/0:{conn_minor(mnt)}/read_ahead_kb"), kb)


def set_background(mnt, n):
    """The connection's max_background and congestion_threshold (fusectl),
    as bnbfs's INIT reply sets them for its own mount."""
    if not FUSECTL.exists() or not any(FUSECTL.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], capture_output=True)
    d = FUSECTL / str(conn_minor(mnt))
    if not d.exists():
        log(f"no {d}: cannot set max_background")
        return None, None
    return write_sys(d / "max_background", n), write_sys(d / "congestion_threshold", n * 3 // 4)


# ------------------------------------------------------------ per thread

def thread_cpu(pid):
    """{tid: (comm, cpu seconds)} for the threads alive now."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[tid] = (comm, (int(f[11]) + int(f[12])) / HZ)
    return out


def proc_cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ


def group_of(comm):
    if comm == "bnbfs-gpu":
        return "gpu"
    if comm == "bnbfs-cpu":
        return "cpu"
    if comm.startswith("cuda"):
        return "cuda"
    return "fuse"   # the main thread, libfuse's workers, the watcher


def cpu_split(before, after, total):
    g = {"fuse": 0.0, "gpu": 0.0, "cpu": 0.0, "cuda": 0.0}
    for tid, (comm, t) in after.items():
        g[group_of(comm)] += t - before.get(tid, (comm, 0.0))[1]
    g["exited"] = max(0.0, total - sum(g.values()))  # threads that ended meanwhile
    g["named"] = any(c.startswith("bnbfs-") for c, _ in after.values())
    return g


# ---------------------------------------------------------------- runs

def ceiling(tool, pr, readers, nfiles, size_gb, background, tmp, tag):
    mnt = tmp / f"ceiling-{tag}"
    mnt.mkdir(exist_ok=True)
    proc = subprocess.Popen([str(tool), str(mnt), str(nfiles), f"{size_gb * 1e9 / (1 << 30):.6f}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_mount(mnt, proc, "fuse_ceiling")
    ra = set_readahead(mnt, 4096)
    mb = set_background(mnt, background) if background else (None, None)
    gb, s, gbs = preader(pr, readers, [mnt / f"f{k}" for k in range(nfiles)])
    unmount(mnt, proc)
    return {"gb": gb, "s": s, "gbs": gbs, "ra_kb": ra, "max_background": mb[0],
            "congestion": mb[1]}


def mount_read(bnbfs, pr, src, gpu, readers, tmp, logf, tag):
    mnt = tmp / f"mnt-{tag}"
    mnt.mkdir(exist_ok=True)
    logp = tmp / f"bnbfs-{tag}.log"
    errf = open(logp, "w")
    proc = subprocess.Popen([str(bnbfs), str(src), str(mnt), "-f", "-o", f"gpu={gpu}"],
                            stdout=errf, stderr=subprocess.STDOUT)
    wait_mount(mnt, proc, "bnbfs")
    shards = sorted(str(mnt / n) for n in os.listdir(mnt)
                    if n.startswith("model-") and n.endswith(".safetensors"))
    time.sleep(0.5)     # the GPU engine starts after the mount: let it come up
    t0, c0 = thread_cpu(proc.pid), proc_cpu(proc.pid)
    gb, secs, gbs = preader(pr, readers, shards)
    t1, c1 = thread_cpu(proc.pid), proc_cpu(proc.pid)
    stats = json.loads((mnt / ".bnbfs" / "stats").read_text())
    rc = unmount(mnt, proc)
    errf.close()
    text = logp.read_text()
    logf.write(f"--- bnbfs {tag} log\n{text}\n--- stats\n{json.dumps(stats, indent=1)}\n")
    if rc != 0 or " error:" in text:
        log(f"warning: bnbfs {tag} exited {rc}; log:\n{text}")
    eng = stats.get("engine_gpu", {})
    return {"gb": gb, "s": secs, "gbs": gbs, "cpu_s": c1 - c0, "cores": (c1 - c0) / secs,
            "split": cpu_split(t0, t1, c1 - c0),
            "cpu_bytes": stats["bytes_computed"]["cpu"], "gpu_bytes": stats["bytes_computed"]["gpu"],
            "p50_us": stats["read_latency_us"]["p50"], "p99_us": stats["read_latency_us"]["p99"],
            "hits": stats["cache"]["hits"], "joins": stats["cache"]["joins"],
            "misses": stats["cache"]["misses"], "peak": stats["cache"]["bytes_held_peak"],
            "wakeups": stats.get("wakeups"), "engine_gpu": eng, "fuse": stats.get("fuse")}


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", required=True, type=pathlib.Path)
    ap.add_argument("--base", type=pathlib.Path, help="a build of the code before the change")
    ap.add_argument("--full", type=pathlib.Path, help="full-size fixture directory")
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parts", default="kernels,mount")
    ap.add_argument("--results", type=pathlib.Path, default=ROOT / "tests" / "bench" / "RESULTS.md")
    ap.add_argument("--log", type=pathlib.Path, help="full logs (bnbfs stderr, stats)")
    ap.add_argument("--json", type=pathlib.Path, help="every number, as JSON")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    build = a.build.resolve()
    logf = open(a.log, "w") if a.log else open(os.devnull, "w")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bnbfs-gpubench-"))
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                           capture_output=True, text=True)
        card = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
    except FileNotFoundError:
        card = ""
    card = card or "no GPU"
    # an exported tree (git archive) has no .git: git would name an enclosing repository's commit
    commit = (subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
              if (ROOT / ".git").exists() else "") or "unknown (exported tree)"

    src = None
    if a.full:
        if not (a.full / ".complete").exists():
            t = time.monotonic()
            run([sys.executable, ROOT / "tests" / "fixtures" / "gen_fixture.py", "--size", "full",
                 a.full])
            log(f"full fixture generated in {time.monotonic() - t:.0f} s")
        src = a.full / "src"

    # 1. device numbers (and kn_ctx over the checkpoint)
    res, table = {}, ""
    if "kernels" in parts:
        cmd = [build / "kernels" / "bench_kn_dequant"]
        if src:
            cmd += ["--ckpt", src, "--threads", a.readers, "--lanes", 8]
        log("$ " + " ".join(str(c) for c in cmd))
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        out = r.stdout
        logf.write(out + r.stderr)
        if r.returncode == 77:
            out = "RESULT device none (" + out.strip() + ")\n"
        elif r.returncode != 0:
            sys.exit(f"bench_kn_dequant failed ({r.returncode}):\n{out}\n{r.stderr}")
        for ln in out.splitlines():
            if ln.startswith("RESULT "):
                k, v = ln[7:].split(" ", 1)
                res[k] = v
        table = out[out.index("\n\n") + 2:].rstrip() if "\n\n" in out else out
        table = "\n".join(ln for ln in table.splitlines() if not ln.startswith("RESULT "))
        log(table)

    # 2. cold full-mount reads
    ceil, runs = {}, {}
    if src and "mount" in parts:
        pr, fc = build_tools(tmp)
        # the shards' layout: how many files, how many bytes
        probe = tmp / "probe"
        probe.mkdir()
        p = subprocess.Popen([str(build / "fs" / "bnbfs"), str(src), str(probe), "-f", "-o",
                              "gpu=off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mount(probe, p, "bnbfs")
        sizes = [os.path.getsize(probe / n) for n in os.listdir(probe)
                 if n.startswith("model-") and n.endswith(".safetensors")]
        unmount(probe, p)
        nsh, total = len(sizes), sum(sizes) / 1e9
        os.sync()   # no writeback of a just-written fixture during the runs
        preader(pr, a.readers, sorted(src.glob("*.safetensors")))
        cfgs = [("off", build, "off"), ("auto", build, "auto")]
        if a.base:
            cfgs = [("base off", a.base.resolve(), "off"),
                    ("base auto", a.base.resolve(), "auto")] + cfgs
        cceil = [("like", nsh, total / nsh, 64), ("mb12", nsh, total / nsh, 0),
                 ("8x2GiB", a.readers, 2 * (1 << 30) / 1e9, 0)]
        for rep in range(a.reps):
            order = cfgs if rep % 2 == 0 else cfgs[::-1]
            for item in order[:len(order) // 2] + [None] + order[len(order) // 2:]:
                if item is None:    # the ceiling in the middle of each round
                    for tag, nf, sz, mb in (cceil if rep == 0 else cceil[:1]):
                        c = ceiling(fc, pr, a.readers, nf, sz, mb, tmp, tag)
                        ceil.setdefault(tag, []).append(c)
                        log(f"ceiling {tag} rep {rep}: {c}")
                    continue
                label, b, gpu = item
                t = f"{label.replace(' ', '_')}-{rep}"
                m = mount_read(b / "fs" / "bnbfs", pr, src, gpu, a.readers, tmp, logf, t)
                runs.setdefault(label, []).append(m)
                log(f"bnbfs {label} rep {rep}: {json.dumps(m)}")

    date = datetime.date.today().isoformat()
    cmdline = " ".join(["tests/bench/bench_gpu_dequant.py"] + sys.argv[1:])
    lines = ["", f"### GPU dequantization, {date} — {card}, {os.cpu_count()} CPU cores",
             f"Commit {commit}; command: `{cmdline}`", ""]
    if table:
        lines += ["```", table, "```"]
    if "ctx_gbs" in res:
        lines += ["", f"kn_ctx_compute over the full checkpoint ({float(res['ckpt_bytes']) / 1e9:.1f} GB "
                  f"of F16, host memory to host memory, {res['ctx_threads']} threads, "
                  f"{res['ctx_lanes']} lanes): **{res['ctx_gbs']} GB/s**; CPU reference "
                  f"(dq_out_compute, {res['cpu_threads']} cores): {res['cpu_gbs']} GB/s."]
    if runs:
        like = med([c["gbs"] for c in ceil["like"]])
        c0 = ceil["like"][0]
        lines += ["", f"Cold read of every virtual shard ({nsh} files, {total:.1f} GB) of a fresh "
                  f"mount, {a.readers} readers, 1 MiB preads, source files in the page cache; "
                  f"{a.reps} runs each, alternating order (GB/s: each run, median):", "",
                  "| read | GB/s | median | of ceiling | daemon CPU s (cores) | by thread: FUSE / "
                  "GPU eng. / CPU eng. / CUDA / exited | computed CPU / GPU GB | read p50 / p99 µs "
                  "| GPU lanes, s: stage / wait / copy-out / register; direct GB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for tag, what in (("like", f"FUSE ceiling: {nsh} files of {total / nsh:.2f} GB, read-ahead "
                           f"{c0['ra_kb']} KiB, max_background {c0['max_background']} (as bnbfs)"),
                          ("mb12", f"FUSE ceiling: same, the server's max_background (12)"),
                          ("8x2GiB", f"FUSE ceiling: {a.readers} files of 2 GiB, read-ahead "
                           "4 MiB, max_background 12 (bench_mount.py's layout)")):
            xs = [c["gbs"] for c in ceil[tag]]
            lines.append(f"| {what} | {' / '.join(f'{x:.2f}' for x in xs)} | {med(xs):.2f} | "
                         f"{100 * med(xs) / like:.0f}% | | | | | |")
        for label, ms in runs.items():
            xs = [m["gbs"] for m in ms]
            m = ms[-1]
            sp = m["split"]
            split = (f"{sp['fuse']:.1f} / {sp['gpu']:.1f} / {sp['cpu']:.1f} / {sp['cuda']:.1f} / "
                     f"{sp['exited']:.1f}" if sp["named"] else
                     f"unnamed threads ({sp['fuse']:.1f} + {sp['exited']:.1f} exited)")
            eng = m["engine_gpu"]
            lanes = "-"
            if eng.get("lane_s"):
                ls = eng["lane_s"]
                lanes = (f"{ls['stage']:.1f} / {ls['wait']:.1f} / {ls['copyout']:.1f} / "
                         f"{ls['register']:.1f}; {eng['bytes_direct'] / 1e9:.1f}")
            lines.append(f"| bnbfs {label} | {' / '.join(f'{x:.2f}' for x in xs)} | {med(xs):.2f} | "
                         f"**{100 * med(xs) / like:.0f}%** | {m['cpu_s']:.1f} ({m['cores']:.1f}) | "
                         f"{split} | {m['cpu_bytes'] / 1e9:.1f} / {m['gpu_bytes'] / 1e9:.1f} | "
                         f"{m['p50_us']} / {m['p99_us']} | {lanes} |")
        lines += ["", "Per-thread CPU and the other columns are from the last run of each row. "
                  "\"wait\": a lane's time from its upload's issue to its download's end."]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.results, "a") as f:
        f.write(text)
    if a.json:
        a.json.write_text(json.dumps({"card": card, "kernels": res, "ceiling": ceil, "runs": runs},
                                     indent=1, default=str))
    logf.close()


if __name__ == "__main__":
    main()
