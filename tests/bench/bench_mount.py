#!/usr/bin/env python3
"""bench_mount.py - bnbfs read throughput on the full-size fixture, next to
the FUSE ceiling and a regular file in the page cache, all measured in the
same run. Not a test: it prints a table and appends it to
tests/bench/RESULTS.md (or --results).

Measured, each with the same parallel reader (preader, 1 MiB preads):
  - mount time (spawn of `bnbfs SRC MNT -f` until MNT is a mount point, and
    the daemon's own "ready in" figure);
  - the core without FUSE: `bnbfs --cat SRC SHARD... > /dev/null` (one
    process, one reader, all compute threads, open time included);
  - bnbfs cold (fresh mount: nothing computed, nothing in the page cache)
    and warm (same mount, second pass: the kernel's page cache), with one
    reader over all shards and with N readers (file k read by thread k % N);
    cold with N readers again with the kernel's 128 KiB read-ahead, with
    clone_fd and with splice_write;
  - the FUSE ceiling (a RAM-backed low-level server computing nothing:
    /work/shared/bench/fuse_ceiling.c) with the kernel's default read-ahead
    (128 KiB requests), with 4 MiB read-ahead (1 MiB requests, what bnbfs
    sets), and with 4 MiB + clone_fd; cold and warm;
  - regular files in the page cache (on a disk filesystem, read once
    before), 1 and N readers.

  tests/bench/bench_mount.py [--src DIR] [--build DIR] [--readers 8] [--threads N]
                             [--shards K] [--results FILE] [--tools DIR]

--src defaults to the full fixture (generated into .cache/fixtures/full by
tests/fixtures/gen_fixture.py when missing). The source shards are read once
first so that "cold" means cold for bnbfs, not for the disk. Run as root (the
kernel read-ahead of a FUSE mount can only be raised by root)."""
import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
GiB = 1 << 30


def log(*a):
    print(*a, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ------------------------------------------------------------------ tools

def build_tools(tools_dir, out):
    """Compiles fuse_ceiling.c and preader.c from tools_dir into out."""
    cflags = sh(["pkg-config", "--cflags", "--libs", "fuse3"]).stdout.split()
    for name, extra in (("fuse_ceiling", cflags), ("preader", ["-lpthread"])):
        src = pathlib.Path(tools_dir) / f"{name}.c"
        r = sh(["cc", "-O2", str(src), "-o", str(out / name)] + extra)
        if r.returncode:
            sys.exit(f"bench: cannot build {src}:\n{r.stderr}")
    return out / "fuse_ceiling", out / "preader"


def preader(tool, nthreads, files, chunk=1 << 20):
    r = sh([str(tool), str(nthreads), str(chunk)] + [str(f) for f in files])
    m = re.search(r"([\d.]+) GB in ([\d.]+) s = ([\d.]+) GB/s", r.stdout)
    if r.returncode or not m:
        raise RuntimeError(f"preader failed: {r.stdout}{r.stderr}")
    return {"gb": float(m[1]), "s": float(m[2]), "gbps": float(m[3])}


def wait_mount(mnt, proc, timeout=60):
    t0 = time.monotonic()
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before mounting")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("mount timed out")
        time.sleep(0.002)
    return time.monotonic() - t0


def unmount(mnt, proc):
    for _ in range(100):
        if sh(["fusermount3", "-u", str(mnt)]).returncode == 0 or not os.path.ismount(mnt):
            break
        time.sleep(0.1)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def bdi_of(mnt):
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        if f[4].encode().decode("unicode_escape") == str(mnt):
            dev = f[2]
    return pathlib.Path(f"/sys/class/bdi/{dev}/read_ahead_kb")


def set_readahead(mnt, kb):
    p = bdi_of(mnt)
    try:
        p.write_text(f"{kb}\n")
    except OSError as e:
        log(f"bench: cannot set {p} to {kb}: {e}")
    return int(p.read_text())


# ----------------------------------------------------------------- bnbfs

class Bnbfs:
    def __init__(self, exe, src, mnt, opts):
        self.exe, self.src, self.mnt, self.opts = exe, src, mnt, opts

    def __enter__(self):
        self.log = tempfile.TemporaryFile("w+")
        cmd = [str(self.exe), str(self.src), str(self.mnt), "-f"]
        if self.opts:
            cmd += ["-o", ",".join(self.opts)]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)
        self.mount_s = wait_mount(self.mnt, self.proc)
        self.ready_ms = None
        for _ in range(100):    # the daemon logs "ready in N ms" right after mounting
            self.log.seek(0)
            m = re.search(r"ready in (\d+) ms", self.log.read())
            if m:
                self.ready_ms = int(m[1])
                break
            time.sleep(0.01)
        self.t0 = t0
        return self

    def stats(self):
        return json.loads((self.mnt / ".bnbfs" / "stats").read_text())

    def shards(self):
        return sorted(p for p in self.mnt.iterdir() if p.name.endswith(".safetensors"))

    def __exit__(self, *exc):
        rc = unmount(self.mnt, self.proc)
        self.log.seek(0)
        text = self.log.read()
        errors = [ln for ln in text.splitlines() if " error:" in ln]
        if rc != 0 or errors:
            raise RuntimeError(f"bnbfs exited {rc}:\n{text}")


def summarize_stats(s):
    req = s.get("request_sizes", {})
    top = max(req, key=lambda k: req[k]) if req else "-"
    return (f"requests mostly {int(top) >> 10} KiB, read p50/p99 "
            f"{s['read_latency_us']['p50']}/{s['read_latency_us']['p99']} us, cache peak "
            f"{s['cache']['bytes_held_peak'] / GiB:.2f} GiB, computed "
            f"{s['bytes_computed']['cpu'] / 1e9:.1f} GB")


# ------------------------------------------------------------------- main

def machine():
    cpu = "?"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) * 1024
    gpu = ""
    if shutil.which("nvidia-smi"):
        r = sh(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
        if r.returncode == 0 and r.stdout.strip():
            gpu = ", " + r.stdout.strip().splitlines()[0]
    fuse = sh(["pkg-config", "--modversion", "fuse3"]).stdout.strip()
    return (f"{socket.gethostname()}: {os.cpu_count()} x {cpu}, {mem / GiB:.0f} GiB RAM{gpu}, "
            f"kernel {platform.release()}, libfuse {fuse}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=pathlib.Path, help="Unsloth checkpoint (default: full fixture)")
    ap.add_argument("--build", type=pathlib.Path,
                    default=pathlib.Path(os.environ.get("BNBFS_BUILD", ROOT / "build")))
    ap.add_argument("--tools", type=pathlib.Path, default=None,
                    help="folder with fuse_ceiling.c and preader.c "
                         "(default: /work/shared/bench, else .device/)")
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="bnbfs -o threads (default: all)")
    ap.add_argument("--opts", default="", help="more bnbfs -o options, comma-separated")
    ap.add_argument("--shards", type=int, default=0, help="read only the first K shards")
    ap.add_argument("--ceiling-gib", type=float, default=16.0,
                    help="bytes the ceiling and regular-file runs read (default 16 GiB)")
    ap.add_argument("--regular-dir", type=pathlib.Path, default=ROOT / ".cache",
                    help="where the regular files go (default .cache/, a disk filesystem; "
                         "/dev/shm gives tmpfs)")
    ap.add_argument("--skip", default="",
                    help="phases to skip: core,variants,ceiling,regular,warm")
    ap.add_argument("--results", type=pathlib.Path, default=ROOT / "tests" / "bench" / "RESULTS.md")
    ap.add_argument("--json", type=pathlib.Path, help="also write the raw numbers here")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))

    if a.src is None:
        sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fixtures")]
        import conftest
        t0 = time.monotonic()
        a.src = conftest.fixture_dir("full") / "src"
        log(f"bench: fixture {a.src} ready in {time.monotonic() - t0:.1f} s")
    exe = a.build / "fs" / "bnbfs"
    if not exe.exists():
        sys.exit(f"bench: {exe} not built")
    tools = a.tools or next((p for p in (pathlib.Path("/work/shared/bench"), ROOT / ".device")
                             if (p / "fuse_ceiling.c").exists()), None)
    if not tools:
        sys.exit("bench: fuse_ceiling.c / preader.c not found (--tools)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="bnbfs-bench-"))
    ceiling, pread_tool = build_tools(tools, work)
    mnt = work / "mnt"
    mnt.mkdir()
    opts = [o for o in a.opts.split(",") if o]
    if a.threads:
        opts.append(f"threads={a.threads}")
    N = a.readers
    res = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "commit": sh(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip(),
           "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
           "readers": N}
    log(f"bench: {res['machine']}")

    # The source in the page cache: "cold" is about bnbfs, not the disk.
    t0 = time.monotonic()
    src_files = sorted(a.src.glob("*.safetensors"))
    preader(pread_tool, len(src_files), src_files)
    log(f"bench: source read into the page cache in {time.monotonic() - t0:.1f} s")

    # Mount time.
    times, ready = [], []
    for _ in range(3):
        with Bnbfs(exe, a.src, mnt, opts) as b:
            times.append(b.mount_s * 1e3)
            ready.append(b.ready_ms)
            shards = b.shards()
            if a.shards:
                shards = shards[:a.shards]
            total = sum(p.stat().st_size for p in shards)
            names = [p.name for p in shards]
            threads = b.stats()["threads"]
    res["mount_ms"] = statistics.median(times)
    res["ready_ms"] = statistics.median([r for r in ready if r is not None] or [0])
    res["bytes"] = total
    res["threads"] = threads
    log(f"bench: mount {res['mount_ms']:.0f} ms (daemon: ready in {res['ready_ms']} ms); "
        f"{len(names)} shards, {total / 1e9:.1f} GB, {threads} compute threads")

    # The core without FUSE: one process writes every shard to /dev/null.
    if "core" not in skip:
        t0 = time.monotonic()
        with open(os.devnull, "wb") as null:
            subprocess.run([str(exe), "--cat", str(a.src)] + names +
                           (["-o", ",".join(opts)] if opts else []),
                           stdout=null, stderr=subprocess.DEVNULL, check=True)
        dt = time.monotonic() - t0
        res["core_1"] = {"gb": total / 1e9, "s": dt, "gbps": total / 1e9 / dt}
        log(f"bench: core without FUSE, 1 reader: {res['core_1']['gbps']:.2f} GB/s")

    # bnbfs cold and warm.
    for key, nthr in (("1", 1), ("N", N)):
        with Bnbfs(exe, a.src, mnt, opts) as b:
            files = [mnt / n for n in names]
            res[f"bnbfs_cold_{key}"] = r = preader(pread_tool, nthr, files)
            res[f"bnbfs_cold_{key}"]["stats"] = summarize_stats(b.stats())
            log(f"bench: bnbfs cold, {nthr} reader(s): {r['gbps']:.2f} GB/s ({r['stats']})")
            if "warm" not in skip:
                res[f"bnbfs_warm_{key}"] = r = preader(pread_tool, nthr, files)
                log(f"bench: bnbfs warm, {nthr} reader(s): {r['gbps']:.2f} GB/s")
            res["stats_" + key] = b.stats()

    # bnbfs variants, cold with N readers: what request size, clone_fd and
    # splice do to it.
    if "variants" not in skip:
        for var, extra in (("kra128k", ["kernel_readahead=0"]), ("clone_fd", ["clone_fd"]),
                           ("splice", ["splice_write"])):
            with Bnbfs(exe, a.src, mnt, opts + extra) as b:
                r = preader(pread_tool, N, [mnt / n for n in names])
                r["stats"] = summarize_stats(b.stats())
                res[f"bnbfs_{var}_cold_N"] = r
                log(f"bench: bnbfs cold, {N} readers, -o {','.join(extra)}: {r['gbps']:.2f} GB/s "
                    f"({r['stats']})")

    # The FUSE ceiling.
    if "ceiling" not in skip:
        nfiles = max(len(names), N)
        size_gib = a.ceiling_gib / nfiles
        for var, ra, clone in (("ra128k", 128, False), ("ra4m", 4096, False),
                               ("ra4m_clone", 4096, True)):
            for key, nthr in (("1", 1), ("N", N)):
                env = dict(os.environ)
                if clone:
                    env["CLONE_FD"] = "1"
                p = subprocess.Popen([str(ceiling), str(mnt), str(nfiles), f"{size_gib:.4f}"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                wait_mount(mnt, p)
                got = set_readahead(mnt, ra)
                files = [mnt / f"f{i}" for i in range(nfiles)]
                r = preader(pread_tool, nthr, files)
                r["ra_kb"] = got
                res[f"ceiling_{var}_cold_{key}"] = r
                log(f"bench: ceiling {var} cold, {nthr} reader(s): {r['gbps']:.2f} GB/s")
                if "warm" not in skip and key == "N":
                    r = preader(pread_tool, nthr, files)
                    res[f"ceiling_{var}_warm_{key}"] = r
                    log(f"bench: ceiling {var} warm, {nthr} reader(s): {r['gbps']:.2f} GB/s")
                unmount(mnt, p)

    # Regular files in the page cache.
    if "regular" not in skip:
        a.regular_dir.mkdir(parents=True, exist_ok=True)
        d = pathlib.Path(tempfile.mkdtemp(prefix="bnbfs-bench-", dir=a.regular_dir))
        res["regular_fs"] = sh(["stat", "-f", "-c", "%T", str(d)]).stdout.strip()
        try:
            nfiles = max(N, 8)
            per = int(a.ceiling_gib * GiB / nfiles)
            block = os.urandom(64 << 20)
            files = []
            for i in range(nfiles):
                f = d / f"r{i}"
                with open(f, "wb") as w:
                    left = per
                    while left > 0:
                        w.write(block[:min(left, len(block))])
                        left -= len(block)
                files.append(f)
            preader(pread_tool, N, files)       # in the page cache for sure
            for key, nthr in (("1", 1), ("N", N)):
                res[f"regular_{key}"] = r = preader(pread_tool, nthr, files)
                log(f"bench: regular file (page cache), {nthr} reader(s): {r['gbps']:.2f} GB/s")
        finally:
            shutil.rmtree(d, ignore_errors=True)

    shutil.rmtree(work, ignore_errors=True)
    table = render(res, N)
    print(table, flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))
    with open(a.results, "a") as f:
        f.write(table + "\n")
    log(f"bench: appended to {a.results}")


def render(res, N):
    def g(key):
        r = res.get(key)
        return f"{r['gbps']:.2f}" if r else "-"

    def pct(a, b):
        ra, rb = res.get(a), res.get(b)
        return f"{100 * ra['gbps'] / rb['gbps']:.0f}%" if ra and rb else "-"

    t = res.get("threads")
    rows = [
        ("bnbfs cold: fresh mount, CPU compute", "bnbfs_cold_1", "bnbfs_cold_N",
         f"{t} threads; 1 reader: {res.get('bnbfs_cold_1', {}).get('stats', '')}"),
        ("bnbfs warm: second pass, kernel page cache", "bnbfs_warm_1", "bnbfs_warm_N", ""),
        ("bnbfs cold, -o kernel_readahead=0 (kernel's 128 KiB)", None, "bnbfs_kra128k_cold_N",
         res.get("bnbfs_kra128k_cold_N", {}).get("stats", "")),
        ("bnbfs cold, -o clone_fd", None, "bnbfs_clone_fd_cold_N", ""),
        ("bnbfs cold, -o splice_write", None, "bnbfs_splice_cold_N",
         "libfuse writes memory buffers into a pipe first: one more copy"),
        ("bnbfs core without FUSE (`bnbfs --cat`)", "core_1", None,
         "compute + one copy to a buffer, no FUSE"),
        ("FUSE ceiling cold, kernel read-ahead 128 KiB", "ceiling_ra128k_cold_1",
         "ceiling_ra128k_cold_N", "the kernel's default: 128 KiB requests"),
        ("FUSE ceiling cold, read-ahead 4 MiB", "ceiling_ra4m_cold_1", "ceiling_ra4m_cold_N",
         "1 MiB requests, as bnbfs sets it"),
        ("FUSE ceiling cold, read-ahead 4 MiB + clone_fd", "ceiling_ra4m_clone_cold_1",
         "ceiling_ra4m_clone_cold_N", ""),
        ("FUSE ceiling warm (page cache)", None, "ceiling_ra4m_warm_N", ""),
        ("regular file in the page cache", "regular_1", "regular_N",
         f"{res.get('regular_fs', '')}, read once before"),
    ]
    out = [f"\n## bnbfs mount: read throughput ({res['date']})\n",
           f"- machine: {res['machine']}",
           f"- commit {res['commit']}; command: `tests/bench/{res['command']}`",
           f"- {res['bytes'] / 1e9:.1f} GB of virtual shards (FP16), read with preader "
           f"(1 MiB preads); mount: {res['mount_ms']:.0f} ms until MNT is mounted, daemon "
           f"ready in {res['ready_ms']} ms",
           "",
           f"| read | 1 reader GB/s | {N} readers GB/s | notes |",
           "|---|---|---|---|"]
    for name, k1, kn, note in rows:
        out.append(f"| {name} | {g(k1) if k1 else '-'} | {g(kn) if kn else '-'} | {note} |")
    out += ["",
            f"- cold, {N} readers: bnbfs at {pct('bnbfs_cold_N', 'ceiling_ra4m_cold_N')} of the "
            f"FUSE ceiling with the same read-ahead ({pct('bnbfs_cold_N', 'ceiling_ra128k_cold_N')} "
            f"of the ceiling at the kernel's default read-ahead); goal 70%",
            f"- cold, 1 reader: {pct('bnbfs_cold_1', 'ceiling_ra4m_cold_1')} of the ceiling",
            f"- warm, {N} readers: bnbfs at {pct('bnbfs_warm_N', 'regular_N')} of a regular file; "
            f"1 reader: {pct('bnbfs_warm_1', 'regular_1')}; goal 80%"]
    return "\n".join(out)


if __name__ == "__main__":
    main()
