"""bnbfs mounted on the tiny fixture: the tree, the bytes, the attributes,
reads of every shape (random, boundary-crossing, mmap), read-only behaviour,
the command line and clean exits. Real mounts; see tests/fs_helpers.py."""
import errno
import json
import mmap
import os
import random
import signal
import stat
import subprocess
import time

import numpy as np
import pytest

import fs_helpers as fh

SHARDS = [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]


@pytest.fixture(scope="module")
def exp(tiny):
    return fh.expected(tiny, "f16")


@pytest.fixture(scope="module")
def mnt(tiny, bin_path, tmp_path_factory):
    """One mount shared by the read-only checks of this module."""
    with fh.mounted(bin_path("bnbfs"), tiny / "src", tmp_path_factory.mktemp("m") / "mnt") as m:
        yield m


def src_passthrough(tiny):
    src = tiny / "src"
    return sorted(p.name for p in src.iterdir()
                  if p.is_file() and not p.name.endswith(".safetensors")
                  and p.name not in ("model.safetensors.index.json", "config.json"))


# ------------------------------------------------------------------ tree

def test_listing_shows_the_hf_checkpoint_and_hides_the_source_weights(mnt, tiny, exp):
    names = set(os.listdir(mnt.mnt))
    want = set(src_passthrough(tiny)) | set(SHARDS) | {
        "config.json", "model.safetensors.index.json", "tensors", ".bnbfs"}
    assert names == want
    assert set(os.listdir(mnt.path("tensors"))) == set(exp)
    assert os.listdir(mnt.path(".bnbfs")) == ["stats"]
    for n in names:
        st = os.stat(mnt.path(n))
        if n in ("tensors", ".bnbfs"):
            assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o555
        else:
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444, n


def test_sizes_match_the_content(mnt, tiny, exp):
    for n in src_passthrough(tiny):
        assert os.path.getsize(mnt.path(n)) == os.path.getsize(tiny / "src" / n), n
    for name, a in exp.items():
        assert os.path.getsize(mnt.path("tensors", name)) == a.nbytes, name
    for s in SHARDS:
        hdr, start = fh.read_header(mnt.path(s))
        data = sum(exp[k].nbytes for k in hdr if k != "__metadata__")
        assert os.path.getsize(mnt.path(s)) == start + data, s


def test_config_rewrite_drops_quantization_and_keeps_everything_else(mnt, tiny):
    src_text = (tiny / "src" / "config.json").read_text()
    got_text = mnt.path("config.json").read_text()
    # Numbers keep their spelling: compare literals, not parsed values.
    lit = dict(object_pairs_hook=list, parse_float=str, parse_int=str)
    src = json.loads(src_text, **lit)
    got = json.loads(got_text, **lit)
    assert "quantization_config" in dict(src)
    want = [(k, ("float16" if k in ("torch_dtype", "dtype") else v))
            for k, v in src if k != "quantization_config"]
    assert got == want
    assert dict(got)["torch_dtype"] == "float16"
    assert os.path.getsize(mnt.path("config.json")) == len(got_text.encode())


def test_passthrough_files_are_byte_identical(mnt, tiny):
    files = src_passthrough(tiny)
    assert {"tokenizer.json", "generation_config.json", "chat_template.jinja",
            "README.md"} <= set(files)
    for n in files:
        assert mnt.path(n).read_bytes() == (tiny / "src" / n).read_bytes(), n


# ---------------------------------------------------------------- shards

def test_every_tensor_of_every_shard_loads_with_safetensors_bit_exact(mnt, exp):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    seen = {}
    for s in SHARDS:
        with safe_open(str(mnt.path(s)), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
        for name, a in load_file(str(mnt.path(s))).items():
            assert name not in seen, f"{name} in {seen.get(name)} and {s}"
            seen[name] = s
            e = exp[name]
            assert a.dtype == e.dtype and a.shape == e.shape, name
            assert a.tobytes() == e.tobytes(), f"{name} differs"
    assert set(seen) == set(exp)


def test_sharding_policy_and_header_layout(mnt, exp):
    def layer(n):
        p = n.split(".")
        return int(p[2]) if p[:2] == ["model", "layers"] else None
    groups = []
    for s in SHARDS:
        hdr, start = fh.read_header(mnt.path(s))
        assert start % 8 == 0, f"{s}: data does not start at a multiple of 8"
        raw = mnt.path(s).read_bytes()[8:start]
        assert raw.rstrip(b" ").endswith(b"}") and json.loads(raw) == hdr   # space padding
        names = [k for k in hdr if k != "__metadata__"]
        assert names == sorted(names), f"{s}: tensors not sorted by name"
        off = 0
        for k in names:     # sorted by name == sorted by offset, tiling the buffer
            a, b = hdr[k]["data_offsets"]
            assert a == off and b - a == exp[k].nbytes
            assert hdr[k]["dtype"] == "F16" and hdr[k]["shape"] == list(exp[k].shape)
            off = b
        groups.append(names)
    assert groups[0] == ["model.embed_tokens.weight"]
    for i, names in enumerate(groups[1:4]):
        assert {layer(n) for n in names} == {i}
    assert set(groups[4]) == {"lm_head.weight", "model.norm.weight"}


def test_index_maps_every_tensor_to_its_shard(mnt, exp):
    idx = json.loads(mnt.path("model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == sum(a.nbytes for a in exp.values())
    assert set(idx["weight_map"]) == set(exp)
    for name, shard in idx["weight_map"].items():
        assert name in fh.read_header(mnt.path(shard))[0], name


# --------------------------------------------------------------- tensors/

def test_tensor_files_hold_the_raw_tensor(mnt, exp):
    for name, a in exp.items():
        assert mnt.path("tensors", name).read_bytes() == a.tobytes(), name


def test_tensor_xattrs(mnt, tiny, exp):
    for name, a in exp.items():
        p = mnt.path("tensors", name)
        attrs = set(os.listxattr(p))
        assert attrs == {"user.bnbfs.dtype", "user.bnbfs.shape", "user.bnbfs.source",
                         "user.bnbfs.quant", "user.bnbfs.xxh3"}
        assert os.getxattr(p, "user.bnbfs.dtype") == b"F16"
        assert json.loads(os.getxattr(p, "user.bnbfs.shape")) == list(a.shape)
        assert os.getxattr(p, "user.bnbfs.xxh3").decode() == fh.xxh3_128_hex(a.tobytes()), name
        assert os.getxattr(p, "user.bnbfs.source")
    src = lambda n: os.getxattr(mnt.path("tensors", n), "user.bnbfs.source").decode()
    quant = lambda n: os.getxattr(mnt.path("tensors", n), "user.bnbfs.quant").decode()
    assert src("model.layers.0.mlp.experts.gate_up_proj") == \
        "model.layers.0.mlp.experts.gate_up_projs.{0..4}.weight (4-bit)"
    assert src("model.layers.2.mlp.experts.down_proj_bias") == \
        "model.layers.2.mlp.experts.down_projs.{0..4}.bias"
    assert src("model.layers.1.mlp.router.weight") == "model.layers.1.mlp.router.linear.weight"
    assert quant("model.layers.2.self_attn.k_proj.weight") == "fp4 bs=64 nested=256"
    assert quant("model.layers.0.self_attn.q_proj.weight") == "nf4 bs=64 nested=256"
    assert quant("model.layers.1.self_attn.o_proj.weight") == "nf4 bs=128 nested=256"
    assert quant("model.layers.0.self_attn.v_proj.weight") == "nf4 bs=64"
    assert quant("lm_head.weight") == "none (BF16)"
    with pytest.raises(OSError) as e:
        os.getxattr(mnt.path("tensors", "lm_head.weight"), "user.bnbfs.nope")
    assert e.value.errno == errno.ENODATA


def test_root_names_its_source_directory(mnt, tiny):
    # bnbfs-run's 24 GB mode reads the 4-bit experts from here.
    root = mnt.path()
    assert "user.bnbfs.source" in os.listxattr(root)
    assert os.getxattr(root, "user.bnbfs.source").decode() == os.path.realpath(tiny / "src")
    assert "user.bnbfs.source" not in os.listxattr(mnt.path("config.json"))


def test_xxh3_of_every_virtual_file_is_its_content_hash(mnt, tiny):
    for n in ["config.json", "model.safetensors.index.json", "README.md"] + SHARDS[1:]:
        p = mnt.path(n)
        assert "user.bnbfs.xxh3" in os.listxattr(p)
        got = os.getxattr(p, "user.bnbfs.xxh3").decode()
        assert got == fh.xxh3_128_hex(p.read_bytes()), n
        assert os.getxattr(p, "user.bnbfs.xxh3").decode() == got     # remembered
    assert os.listxattr(mnt.path(".bnbfs", "stats")) == []


# ----------------------------------------------------------------- reads

def boundaries(mount_file):
    hdr, start = fh.read_header(mount_file)
    cuts = {0, 8, start}
    for k, v in hdr.items():
        if k != "__metadata__":
            cuts |= {start + v["data_offsets"][0], start + v["data_offsets"][1]}
    return sorted(cuts)


def test_random_reads_across_tensor_and_header_boundaries(mnt, exp):
    rng = random.Random(1234)
    for s in SHARDS:
        p = mnt.path(s)
        want = fh.expected_file_bytes(p, exp)
        size = len(want)
        fd = os.open(p, os.O_RDONLY)
        try:
            reads = []
            for c in boundaries(p):     # straddle every cut, small and large
                for ln in (1, 7, 4096, 65537):
                    reads.append((max(0, c - ln // 2), ln))
            for _ in range(60):
                ln = int(2 ** rng.uniform(0, 22))          # 1 B .. 4 MiB
                reads.append((rng.randrange(0, size), ln))
            reads.append((size - 3, 100))                   # short read at EOF
            reads.append((size, 10))                        # at EOF
            for off, ln in reads:
                got = os.pread(fd, ln, off)
                assert got == want[off:off + ln], f"{s} [{off}, +{ln})"
        finally:
            os.close(fd)


def test_mmap_reads_equal_the_expected_bytes(mnt, exp):
    p = mnt.path(SHARDS[2])
    want = fh.expected_file_bytes(p, exp)
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        rng = random.Random(7)
        for _ in range(200):
            off = rng.randrange(len(want))
            ln = rng.randrange(1, 100000)
            assert m[off:off + ln] == want[off:off + ln]
        assert m[:] == want
    hdr, start = fh.read_header(mnt.path(SHARDS[0]))
    a, b = hdr["model.embed_tokens.weight"]["data_offsets"]
    with open(mnt.path(SHARDS[0]), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        arr = np.frombuffer(m, dtype=np.float16, count=(b - a) // 2, offset=start + a)
        assert np.array_equal(arr.view(np.uint16),
                              exp["model.embed_tokens.weight"].reshape(-1).view(np.uint16))
        del arr


# ------------------------------------------------------------ stats, fs

def test_stats_file_is_live_json(mnt):
    s1 = mnt.stats()
    mnt.path("tensors", "model.norm.weight").read_bytes()
    with open(mnt.path("tensors", "model.layers.1.mlp.experts.down_proj"), "rb",
              buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.read()
    s2 = mnt.stats()
    for k in ("bytes_served", "bytes_computed", "cache", "read_latency_us", "errors",
              "request_sizes", "plan"):
        assert k in s2
    assert s2["requests"] > s1["requests"]
    assert s2["bytes_served"] > s1["bytes_served"]
    done = [sum(s["bytes_computed"].values()) for s in (s1, s2)]   # cpu + gpu engines
    assert done[1] >= done[0] > 0
    assert s2["cache"]["limit"] == 2 << 30
    assert 0 < s2["cache"]["bytes_held"] <= s2["cache"]["limit"]
    assert s2["read_latency_us"]["p50"] <= s2["read_latency_us"]["p99"] <= \
        max(s2["read_latency_us"]["max"], s2["read_latency_us"]["p99"])
    assert s2["errors"]["eio"] == 0
    assert s2["dtype"] == "F16"


def test_statfs_reports_a_read_only_filesystem(mnt):
    sv = os.statvfs(mnt.mnt)
    assert sv.f_flag & os.ST_RDONLY
    assert sv.f_blocks > 0


def test_writes_creates_renames_chmod_get_erofs(mnt):
    f = mnt.path("config.json")
    ops = [
        lambda: open(f, "r+b"),
        lambda: open(f, "wb"),
        lambda: open(mnt.path("new.txt"), "wb"),
        lambda: os.mkdir(mnt.path("d")),
        lambda: os.rename(f, mnt.path("c2.json")),
        lambda: os.rename(mnt.path("tensors", "lm_head.weight"), mnt.path("x")),
        lambda: os.unlink(f),
        lambda: os.rmdir(mnt.path("tensors")),
        lambda: os.chmod(f, 0o644),
        lambda: os.truncate(f, 0),
        lambda: os.symlink("config.json", mnt.path("l")),
        lambda: os.link(f, mnt.path("h")),
        lambda: os.setxattr(f, "user.x", b"1"),
        lambda: os.removexattr(mnt.path("tensors", "lm_head.weight"), "user.bnbfs.dtype"),
    ]
    for i, op in enumerate(ops):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EROFS, f"op {i}: {e.value}"
    assert not os.access(f, os.W_OK)


# ----------------------------------------------------------- command line

def test_help_and_version(bin_path):
    r = subprocess.run([bin_path("bnbfs"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for word in ("SRC MNT", "dtype=f16|bf16|f32", "cache=SIZE", "threads=N", "gpu=auto|off|N",
                 "-f", "-d", "fusermount3 -u", "allow_other"):
        assert word in r.stdout, word
    r = subprocess.run([bin_path("bnbfs"), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "bnbfs 0.1.0" in r.stdout and "libfuse 3." in r.stdout


def test_ls_and_cat_use_the_core_without_mounting(bin_path, tiny, mnt, exp):
    r = subprocess.run([bin_path("bnbfs"), "--ls", tiny / "src"], capture_output=True, text=True,
                       check=True)
    listed = {}
    for line in r.stdout.splitlines():
        size, path = line.split(None, 1)
        if size != "-":
            listed[path] = int(size)
    assert listed["tensors/lm_head.weight"] == exp["lm_head.weight"].nbytes
    for s in SHARDS:
        assert listed[s] == os.path.getsize(mnt.path(s))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    r = subprocess.run([bin_path("bnbfs"), "--cat", tiny / "src", f"tensors/{name}"],
                       capture_output=True, check=True)
    assert r.stdout == exp[name].tobytes()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly_and_exits_0(bin_path, tiny, tmp_path, sig):
    m = fh.start_mount(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt")
    assert m.path("tensors", "model.norm.weight").read_bytes()
    m.proc.send_signal(sig)
    log = fh.stop_mount(m, unmount=False)
    assert " error:" not in log
    assert not os.path.ismount(m.mnt)


def test_daemonizes_and_exits_0_after_fusermount(bin_path, tiny, tmp_path, exp):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([bin_path("bnbfs"), tiny / "src", mnt], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""
    assert os.path.ismount(mnt)
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()
            and str(mnt).encode() in open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")]
    assert len(pids) == 1
    try:
        got = (mnt / "tensors" / "model.norm.weight").read_bytes()
        assert got == exp["model.norm.weight"].tobytes()
    finally:
        subprocess.run(["fusermount3", "-u", mnt], check=True)
    deadline = time.monotonic() + 20
    while os.path.exists(f"/proc/{pids[0]}") and time.monotonic() < deadline:
        with open(f"/proc/{pids[0]}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                break
        time.sleep(0.05)
    assert not os.path.ismount(mnt)
    assert not os.path.exists(f"/proc/{pids[0]}") or \
        open(f"/proc/{pids[0]}/stat").read().split(")")[-1].split()[0] == "Z"


def test_standard_fuse_options_pass_through(bin_path, tiny, tmp_path):
    with fh.mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt",
                    opts=["allow_other", "default_permissions", "fsname=mymodel"]) as m:
        line = next(ln for ln in open("/proc/self/mountinfo") if f" {m.mnt} " in ln)
        assert "ro" in line.split()[5].split(",")                  # per-mount flags
        fields = line.split(" - ")[1].split()
        assert fields[0] == "fuse.bnbfs" and fields[1] == "mymodel"
        assert {"allow_other", "default_permissions"} <= set(fields[2].split(","))
        assert m.path("tensors", "model.norm.weight").read_bytes()


@pytest.mark.parametrize("opt", ["splice_write", "clone_fd", "kernel_readahead=0", "threads=1",
                                 "readahead=0", "max_threads=2"])
def test_tuning_options_serve_the_same_bytes(bin_path, tiny, tmp_path, exp, opt):
    with fh.mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt", opts=[opt]) as m:
        for s in SHARDS[1:4]:
            assert m.path(s).read_bytes() == fh.expected_file_bytes(m.path(s), exp), s
        name = "model.embed_tokens.weight"
        assert m.path("tensors", name).read_bytes() == exp[name].tobytes()
        fuse = m.stats()["fuse"]
        if opt == "splice_write":
            assert fuse["splice_write"]
        if opt == "clone_fd":
            assert fuse["clone_fd"]
        if opt == "kernel_readahead=0":
            assert fuse["kernel_readahead_kb"] == 128
        if opt == "readahead=0":
            assert m.stats()["cache"]["prefetch_issued"] == 0
        else:
            assert m.stats()["cache"]["prefetch_issued"] > 0
