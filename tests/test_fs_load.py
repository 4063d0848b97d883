"""bnbfs under concurrent load: 16 readers get the right bytes, concurrent
readers of one slice compute it once, the cache bound holds with a small
-o cache, and unmounting while readers are busy ends cleanly."""
import concurrent.futures as cf
import errno
import mmap
import os
import random
import signal
import subprocess
import threading
import time

import pytest

import fs_helpers as fh

SHARDS = [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]


@pytest.fixture(scope="module")
def exp(tiny):
    return fh.expected(tiny, "f16")


def odirect_read_all(path, chunk, seed):
    """Reads a whole file with O_DIRECT (every byte from the daemon, none
    from the page cache) in chunks at shuffled offsets."""
    size = os.path.getsize(path)
    offs = list(range(0, size, chunk))
    random.Random(seed).shuffle(offs)
    buf = mmap.mmap(-1, chunk)
    out = bytearray(size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for off in offs:
            n = os.preadv(fd, [buf], off)
            assert n == min(chunk, size - off)
            out[off:off + n] = buf[:n]
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def test_16_concurrent_readers_get_the_right_bytes(bin_path, tiny, tmp_path, exp):
    with fh.mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt") as m:
        want = {s: fh.expected_file_bytes(m.path(s), exp) for s in SHARDS}
        names = sorted(exp)

        def reader(i):
            rng = random.Random(i)
            if i % 2:   # whole shards through the page cache, odd chunk sizes
                s = SHARDS[i % len(SHARDS)]
                with open(m.path(s), "rb", buffering=0) as f:
                    got = bytearray()
                    while chunk := f.read(rng.choice([4096, 65536 + 17, 1 << 20, 3 << 20])):
                        got += chunk
                assert bytes(got) == want[s], s
            else:       # tensors/ files with O_DIRECT, random order
                for name in rng.sample(names, 12):
                    got = odirect_read_all(m.path("tensors", name), 1 << 20, i)
                    assert got == exp[name].tobytes(), name
            return i

        with cf.ThreadPoolExecutor(16) as ex:
            assert sorted(ex.map(reader, range(16))) == list(range(16))
        assert m.stats()["errors"]["eio"] == 0


def test_concurrent_readers_of_a_slice_compute_it_once(bin_path, tiny, tmp_path, exp):
    """16 readers read every tensor at the same time with O_DIRECT: each
    slice is computed exactly once (single flight; the 2 GiB cache evicts
    nothing)."""
    with fh.mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt") as m:
        names = sorted(exp, key=lambda n: -exp[n].nbytes)
        start = threading.Barrier(16)

        def reader(i):
            start.wait()
            for name in names:
                assert odirect_read_all(m.path("tensors", name), 1 << 20, i) == \
                    exp[name].tobytes(), name

        with cf.ThreadPoolExecutor(16) as ex:
            list(ex.map(reader, range(16)))
        s = m.stats()
        assert sum(s["slices_computed"].values()) == s["plan"]["slices"]   # cpu + gpu
        assert s["cache"]["evictions"] == 0
        assert s["cache"]["joins"] + s["cache"]["hits"] > 15 * s["plan"]["slices"]


def test_cache_bound_holds_under_load(bin_path, tiny, tmp_path, exp):
    limit = 6 << 20     # three 2 MiB slices: constant eviction
    with fh.mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt",
                    opts=["cache=6M", "threads=2"]) as m:
        stop = threading.Event()
        seen = []

        def watch():
            while not stop.is_set():
                seen.append(m.stats()["cache"]["bytes_held"])
                time.sleep(0.005)

        w = threading.Thread(target=watch)
        w.start()
        big = ["model.embed_tokens.weight", "lm_head.weight",
               "model.layers.1.mlp.experts.gate_up_proj"]

        def reader(i):
            name = big[i % len(big)]
            return odirect_read_all(m.path("tensors", name), [4096, 1 << 20, 3 << 20][i % 3], i) \
                == exp[name].tobytes()

        try:
            with cf.ThreadPoolExecutor(16) as ex:
                assert all(ex.map(reader, range(16)))
        finally:
            stop.set()
            w.join()
        s = m.stats()
        assert s["cache"]["limit"] == limit
        assert s["cache"]["bytes_held_peak"] <= limit
        assert max(seen) <= limit
        assert s["cache"]["evictions"] > 0
        assert sum(s["slices_computed"].values()) > s["plan"]["slices"]  # evicted, computed again


def test_cache_smaller_than_two_slices_is_refused(bin_path, tiny, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([bin_path("bnbfs"), tiny / "src", mnt, "-f", "-o", "cache=1M"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "cache=1.00 MiB: must hold at least two slices" in r.stderr
    assert not os.path.ismount(mnt)


def busy_readers(m, names, n=8):
    """Threads that read with O_DIRECT until they fail; returns (stop, threads, errors)."""
    stop = threading.Event()
    errors = []

    def loop(i):
        while not stop.is_set():
            try:
                odirect_read_all(m.path("tensors", names[i % len(names)]), 1 << 20, i)
            except OSError as e:
                errors.append(e.errno)
                return

    ts = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    return stop, ts, errors


@pytest.mark.parametrize("how", ["sigterm", "lazy-unmount"])
def test_unmount_under_load_exits_0(bin_path, tiny, tmp_path, exp, how):
    m = fh.start_mount(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt", opts=["cache=8M"])
    stop, ts, errors = busy_readers(m, ["model.embed_tokens.weight", "lm_head.weight"])
    time.sleep(0.5)
    assert m.stats()["requests"] > 0
    if how == "sigterm":
        m.proc.send_signal(signal.SIGTERM)
    else:
        subprocess.run(["fusermount3", "-u", "-z", m.mnt], check=True)
    log = fh.stop_mount(m, unmount=False)
    stop.set()
    for t in ts:
        t.join(timeout=30)
        assert not t.is_alive()
    assert " error:" not in log
    assert set(errors) <= {errno.ENOTCONN, errno.ENOENT, errno.EIO, errno.ECONNABORTED}


def thread_names(pid):
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(open(f"/proc/{pid}/task/{tid}/comm").read().strip())
        except FileNotFoundError:   # a thread that just exited
            pass
    return names


def test_engine_threads_are_named_and_woken_only_for_work(bin_path, tiny, tmp_path, exp):
    """Engine threads carry names (the benchmarks split the daemon's CPU
    time by them), and a queued job wakes one thread, not every idle one:
    CPU threads are woken at most twice per slice they compute (the job's own
    signal, one passed on after a pull) plus once each when a GPU engine
    raises their threshold. Broadcasting every job to idle CPU threads, as
    with a GPU engine before, breaks the bound by a factor of the thread
    count."""
    with fh.mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt") as m:
        for s in SHARDS:
            with open(m.path(s), "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass
        st = m.stats()
        names = thread_names(m.proc.pid)
    assert names.count("bnbfs-cpu") == st["threads"], names
    assert names.count("bnbfs-watch") == 1, names
    assert names.count("bnbfs-gpu") == (8 if "gpu" in st["engines"] else 0), names
    computed = sum(st["slices_computed"].values())
    assert computed >= st["plan"]["slices"]
    assert st["wakeups"]["cpu"] <= st["threads"] + 2 * st["slices_computed"]["cpu"], st["wakeups"]
    assert st["wakeups"]["engine"] <= 2 * computed + 8, st["wakeups"]
