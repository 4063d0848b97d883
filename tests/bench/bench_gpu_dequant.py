#!/usr/bin/env python3
"""GPU dequantization benchmark (issue 4). Not a test; never gates CI.

    tests/bench/bench_gpu_dequant.py --build BUILD [--full DIR] [--readers 8]
                                     [--results tests/bench/RESULTS.md] [--log FILE]

On the GPU machine, in one run:
  1. BUILD/kernels/bench_kn_dequant: the card's device-to-device copy
     bandwidth (bytes read + written), pinned H2D and D2H bandwidth, and each
     kernel's throughput (bytes read + written per second) against the copy
     bandwidth (goal >= 80%); with --full, also kn_ctx_compute over the whole
     full-size checkpoint host to host, next to the CPU reference on all cores.
  2. With --full DIR (generated there by tests/fixtures/gen_fixture.py --size
     full when absent): the FUSE ceiling (shared/bench/fuse_ceiling.c, a RAM
     server computing nothing) and a cold read of every virtual shard of a
     fresh bnbfs mount with --readers parallel readers (shared/bench/preader.c,
     1 MiB reads), gpu=off then gpu=auto, in GB/s, with the CPU time the
     daemon used (cores busy on average) and the bytes each engine computed.
Prints a table and appends it, with the card's name and the date, to
--results. The C sources of fuse_ceiling and preader are taken from
.device/ (the GPU machine) or ../shared/bench/ (this machine).
"""
import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]


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
        time.sleep(0.05)


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


def cpu_seconds(pid):
    """utime + stime of a process and its threads, in seconds."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def ceiling(tool, readers, tmp):
    mnt = tmp / "ceiling"
    mnt.mkdir()
    proc = subprocess.Popen([str(tool), str(mnt), str(readers), "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_mount(mnt, proc, "fuse_ceiling")
    gb, s, gbs = preader(tool.parent / "preader", readers,
                         [mnt / f"f{k}" for k in range(readers)])
    unmount(mnt, proc)
    return gbs


def mount_read(bnbfs, pr, src, gpu, readers, tmp, logf):
    mnt = tmp / f"mnt-{gpu}"
    mnt.mkdir()
    errf = open(tmp / f"bnbfs-{gpu}.log", "w")
    proc = subprocess.Popen([str(bnbfs), str(src), str(mnt), "-f", "-o", f"gpu={gpu}"], stdout=errf,
                            stderr=subprocess.STDOUT)
    wait_mount(mnt, proc, "bnbfs")
    shards = sorted(str(mnt / n) for n in os.listdir(mnt)
                    if n.startswith("model-") and n.endswith(".safetensors"))
    c0 = cpu_seconds(proc.pid)
    gb, secs, gbs = preader(pr, readers, shards)
    c1 = cpu_seconds(proc.pid)
    stats = json.loads((mnt / ".bnbfs" / "stats").read_text())
    rc = unmount(mnt, proc)
    errf.close()
    text = (tmp / f"bnbfs-{gpu}.log").read_text()
    logf.write(f"--- bnbfs gpu={gpu} log\n{text}\n--- stats\n{json.dumps(stats, indent=1)}\n")
    if rc != 0 or " error:" in text:
        log(f"warning: bnbfs gpu={gpu} exited {rc}; log:\n{text}")
    return {"gb": gb, "s": secs, "gbs": gbs, "cpu_s": c1 - c0, "cores": (c1 - c0) / secs,
            "cpu_bytes": stats["bytes_computed"]["cpu"], "gpu_bytes": stats["bytes_computed"]["gpu"],
            "p50_us": stats["read_latency_us"]["p50"], "p99_us": stats["read_latency_us"]["p99"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", required=True, type=pathlib.Path)
    ap.add_argument("--full", type=pathlib.Path, help="full-size fixture directory")
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--results", type=pathlib.Path, default=ROOT / "tests" / "bench" / "RESULTS.md")
    ap.add_argument("--log", type=pathlib.Path, help="full logs (bnbfs stderr, stats)")
    a = ap.parse_args()
    build = a.build.resolve()
    logf = open(a.log, "w") if a.log else open(os.devnull, "w")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bnbfs-gpubench-"))

    src = None
    if a.full:
        if not (a.full / ".complete").exists():
            t = time.monotonic()
            run([sys.executable, ROOT / "tests" / "fixtures" / "gen_fixture.py", "--size", "full",
                 a.full])
            log(f"full fixture generated in {time.monotonic() - t:.0f} s")
        src = a.full / "src"

    # 1. device numbers (and kn_ctx over the checkpoint)
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
    res = {}
    for ln in out.splitlines():
        if ln.startswith("RESULT "):
            k, v = ln[7:].split(" ", 1)
            res[k] = v
    card = res["device"]
    table = out[out.index("\n\n") + 2:].rstrip() if "\n\n" in out else out
    log(table)
    if "ctx_gbs" in res:
        log(f"kn_ctx over the checkpoint: {res['ctx_gbs']} GB/s; CPU reference {res['cpu_gbs']} GB/s")

    # 2. cold full-mount reads
    mounts = {}
    ceil = None
    if src:
        pr, fc = build_tools(tmp)
        ceil = ceiling(fc, a.readers, tmp)
        log(f"FUSE ceiling, {a.readers} readers: {ceil:.2f} GB/s")
        bnbfs = build / "fs" / "bnbfs"
        for gpu in ("off", "auto"):
            mounts[gpu] = mount_read(bnbfs, pr, src, gpu, a.readers, tmp, logf)
            log(f"bnbfs gpu={gpu}: {mounts[gpu]}")

    date = datetime.date.today().isoformat()
    lines = ["", f"### GPU dequantization, {date} — {card}, {os.cpu_count()} CPU cores",
             f"Command: `tests/bench/bench_gpu_dequant.py --build {a.build}"
             + (f" --full {a.full}" if a.full else "") + f" --readers {a.readers}`", "",
             "```", table, "```"]
    if "ctx_gbs" in res:
        lines += ["", f"kn_ctx_compute over the full checkpoint ({float(res['ckpt_bytes']) / 1e9:.1f} GB "
                  f"of F16, host memory to host memory, {res['ctx_threads']} threads, "
                  f"{res['ctx_lanes']} lanes): **{res['ctx_gbs']} GB/s**; CPU reference "
                  f"(dq_out_compute, {res['cpu_threads']} cores): {res['cpu_gbs']} GB/s."]
    if mounts:
        lines += ["", f"Cold read of every virtual shard of a fresh mount, {a.readers} readers, "
                  "1 MiB preads (source files in the page cache):", "",
                  "| | GB read | s | GB/s | of FUSE ceiling | daemon CPU s | cores busy | "
                  "computed on CPU | computed on GPU | read p50 / p99 µs |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  f"| FUSE ceiling (RAM server) | | | {ceil:.2f} | 100% | | | | | |"]
        for gpu, m in mounts.items():
            lines.append(f"| bnbfs gpu={gpu} | {m['gb']:.1f} | {m['s']:.1f} | {m['gbs']:.2f} | "
                         f"{100 * m['gbs'] / ceil:.0f}% | {m['cpu_s']:.1f} | {m['cores']:.1f} | "
                         f"{m['cpu_bytes'] / 1e9:.1f} GB | {m['gpu_bytes'] / 1e9:.1f} GB | "
                         f"{m['p50_us']} / {m['p99_us']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(a.results, "a") as f:
        f.write(text)
    logf.close()


if __name__ == "__main__":
    main()
