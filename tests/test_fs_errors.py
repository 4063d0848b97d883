"""bnbfs facing bad input: corrupt source tensors fail only themselves with
EIO, sources changed under the mount are detected (EIO and a log line,
never stale bytes), and an invalid SRC, MNT or option is refused before
anything is mounted."""
import errno
import os
import subprocess
import time

import numpy as np
import pytest

import fs_helpers as fh

SHARDS = [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]


@pytest.fixture(scope="module")
def exp(tiny):
    return fh.expected(tiny, "f16")


def read_eio(path):
    with pytest.raises(OSError) as e:
        with open(path, "rb") as f:
            f.read()
    return e.value.errno


def shard_of(m, name):
    for s in SHARDS:
        hdr, start = fh.read_header(m.path(s))
        if name in hdr:
            return s, hdr, start
    raise KeyError(name)


# ------------------------------------------------------------- corruption

CORRUPTIONS = {
    # tensor, source tensor to patch, element, value
    "nan-nested-absmax": ("model.layers.1.self_attn.q_proj.weight",
                          "model.layers.1.self_attn.q_proj.weight.nested_absmax", 0, np.nan),
    "wrong-quant-map": ("model.layers.0.self_attn.o_proj.weight",
                        "model.layers.0.self_attn.o_proj.weight.quant_map", 5, 0.25),
    "inf-absmax": ("model.layers.0.self_attn.v_proj.weight",
                   "model.layers.0.self_attn.v_proj.weight.absmax", 3, np.inf),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_source_tensor_fails_only_that_tensor(bin_path, tiny, tmp_path, exp, case):
    bad, src_name, index, value = CORRUPTIONS[case]
    src = fh.copy_src(tiny / "src", tmp_path / "src")
    fh.patch_tensor(src, src_name, index, value)
    with fh.mounted(bin_path("bnbfs"), src, tmp_path / "mnt", expect_errors=True) as m:
        assert read_eio(m.path("tensors", bad)) == errno.EIO
        assert read_eio(m.path("tensors", bad)) == errno.EIO        # and again, no crash
        for name, a in exp.items():
            if name != bad:
                assert m.path("tensors", name).read_bytes() == a.tobytes(), name
        # In the shard: every other tensor reads back, except the pages it
        # shares with the corrupt one (the kernel reads whole pages).
        s, hdr, start = shard_of(m, bad)
        lo = (start + hdr[bad]["data_offsets"][0]) // 4096 * 4096
        hi = -(-(start + hdr[bad]["data_offsets"][1]) // 4096) * 4096
        want = fh.expected_file_bytes(m.path(s), {**exp, bad: np.zeros_like(exp[bad])})
        with open(m.path(s), "rb") as f:
            assert f.read(lo) == want[:lo]
            f.seek(hi)
            assert f.read() == want[hi:]
        from safetensors.numpy import load_file
        for other in SHARDS:
            if other != s:
                got = load_file(str(m.path(other)))
                assert all(got[k].tobytes() == exp[k].tobytes() for k in got)
        assert m.stats()["errors"]["eio"] >= 2
    errors = [ln for ln in m.final_log.splitlines() if " error:" in ln]
    assert any(bad in ln for ln in errors), m.final_log
    assert all(bad in ln or src_name in ln for ln in errors), m.final_log


# ---------------------------------------------------------- source changes

def change_touch(p):
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def change_rewrite(p):
    with open(p, "r+b") as f:      # same size, new bytes in the data
        f.seek(os.path.getsize(p) - 64)
        f.write(bytes(range(64)))


def change_truncate(p):
    os.truncate(p, os.path.getsize(p) // 2)


def change_replace(p):
    tmp = p.with_name(p.name + ".new")
    tmp.write_bytes(p.read_bytes())
    os.replace(tmp, p)


CHANGES = {"touch": change_touch, "rewrite": change_rewrite, "truncate": change_truncate,
           "replace": change_replace}


def wait_for_eio(path, timeout=5.0):
    """Reads until EIO; returns the number of successful reads before."""
    deadline = time.monotonic() + timeout
    ok = 0
    while True:
        try:
            with open(path, "rb") as f:
                f.read()
            ok += 1
        except OSError as e:
            assert e.errno == errno.EIO
            return ok
        assert time.monotonic() < deadline, f"{path}: still readable after the source changed"
        time.sleep(0.02)


@pytest.mark.parametrize("how", sorted(CHANGES))
def test_source_shard_changed_under_the_mount(bin_path, tiny, tmp_path, exp, how):
    src = fh.copy_src(tiny / "src", tmp_path / "src")
    victim = "model-00003-of-00003.safetensors"
    hit = fh.hf_outputs_of_source_file(src, victim)
    assert {"lm_head.weight", "model.layers.1.self_attn.q_proj.weight"} <= hit
    with fh.mounted(bin_path("bnbfs"), src, tmp_path / "mnt", expect_errors=True) as m:
        for name in exp:        # everything in the page cache and the slice cache
            assert m.path("tensors", name).read_bytes() == exp[name].tobytes()
        CHANGES[how](src / victim)
        for name in sorted(hit):
            wait_for_eio(m.path("tensors", name))
            assert read_eio(m.path("tensors", name)) == errno.EIO
        for s in (SHARDS[2], SHARDS[4]):     # shards holding them fail too
            assert read_eio(m.path(s)) == errno.EIO
        for name in sorted(set(exp) - hit):
            assert m.path("tensors", name).read_bytes() == exp[name].tobytes(), name
        assert m.stats()["errors"]["stale_sources"] == 1
    errors = [ln for ln in m.final_log.splitlines() if " error:" in ln]
    assert any(victim in ln and "EIO" in ln for ln in errors), m.final_log


@pytest.mark.parametrize("name", ["README.md", "config.json"])
def test_passthrough_file_changed_under_the_mount(bin_path, tiny, tmp_path, name):
    src = fh.copy_src(tiny / "src", tmp_path / "src")
    with fh.mounted(bin_path("bnbfs"), src, tmp_path / "mnt", expect_errors=True) as m:
        before = m.path(name).read_bytes()
        assert before
        with open(src / name, "ab") as f:
            f.write(b"\n")
        wait_for_eio(m.path(name))
        assert m.path("tokenizer_config.json").read_bytes() == \
            (src / "tokenizer_config.json").read_bytes()
    assert any(name in ln for ln in m.final_log.splitlines() if " error:" in ln)


# ------------------------------------------------------------ bad input

def run_bnbfs(bin_path, *args, timeout=30):
    return subprocess.run([str(bin_path("bnbfs")), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def make_missing_companion(src):
    fh.drop_tensor(src, "model.layers.0.self_attn.q_proj.weight.absmax")
    return "model.layers.0.self_attn.q_proj.weight"


def make_malformed_shard(src):
    p = src / "model-00002-of-00003.safetensors"
    with open(p, "r+b") as f:
        f.seek(8)
        f.write(b"{\"oops\": ")
    return "model-00002-of-00003.safetensors"


def make_truncated_shard(src):
    p = src / "model-00001-of-00003.safetensors"
    os.truncate(p, os.path.getsize(p) - 100)
    return "model-00001-of-00003.safetensors"


def make_missing_shard(src):
    os.unlink(src / "model-00003-of-00003.safetensors")
    return "model-00003-of-00003.safetensors"


def make_bad_config(src):
    (src / "config.json").write_text("{\"model_type\": \"gpt_oss\",")
    return "config.json"


def make_no_checkpoint(src):
    for p in src.glob("*.safetensors*"):
        p.unlink()
    return str(src)


BROKEN = {"missing-companion": make_missing_companion, "malformed-shard": make_malformed_shard,
          "truncated-shard": make_truncated_shard, "missing-shard": make_missing_shard,
          "bad-config": make_bad_config, "no-checkpoint": make_no_checkpoint}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_invalid_src_is_refused_before_mounting(bin_path, tiny, tmp_path, case):
    src = fh.copy_src(tiny / "src", tmp_path / "src")
    what = BROKEN[case](src)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_bnbfs(bin_path, src, mnt, "-f")
    assert r.returncode != 0
    assert not os.path.ismount(mnt)
    assert what in r.stderr, r.stderr
    assert "nothing was mounted" in r.stderr


def test_missing_or_file_src_is_refused(bin_path, tmp_path, tiny):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_bnbfs(bin_path, tmp_path / "nope", mnt)
    assert r.returncode != 0 and "nope: No such file or directory" in r.stderr
    r = run_bnbfs(bin_path, tiny / "src" / "config.json", mnt)
    assert r.returncode != 0 and "not a directory" in r.stderr
    assert not os.path.ismount(mnt)


def test_invalid_mount_point_is_refused(bin_path, tiny, tmp_path):
    r = run_bnbfs(bin_path, tiny / "src", tmp_path / "absent")
    assert r.returncode != 0 and "absent: No such file or directory" in r.stderr
    f = tmp_path / "file"
    f.write_text("x")
    r = run_bnbfs(bin_path, tiny / "src", f)
    assert r.returncode != 0 and "not a directory" in r.stderr


@pytest.mark.parametrize("opt,msg", [
    ("dtype=f8", "dtype=f8: expected f16, bf16 or f32"),
    ("cache=lots", "cache=lots: expected a size"),
    ("threads=0", "threads=0: expected a number"),
    ("gpu=maybe", "gpu=maybe: expected auto, off or a device number"),
    ("gpu=256", "gpu=256: expected auto, off or a device number"),
    ("no_such_option", "unknown option"),
])
def test_invalid_options_are_refused(bin_path, tiny, tmp_path, opt, msg):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = run_bnbfs(bin_path, tiny / "src", mnt, "-f", "-o", opt)
    assert r.returncode != 0
    assert msg in r.stderr, r.stderr
    assert not os.path.ismount(mnt)
