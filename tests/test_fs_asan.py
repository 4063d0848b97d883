"""The mount suite's core paths under AddressSanitizer + UBSan: the bnbfs of
the sanitizer build (BNBFS_BUILD_ASAN, made by ./test.sh) serves every shard,
16 concurrent readers with a small cache, xattrs, a corrupt tensor and a
changed source, then exits 0 (a sanitizer report makes it exit non-zero and
fails the test). Skips when no sanitizer build is given."""
import concurrent.futures as cf
import errno
import os
import pathlib

import pytest

import fs_helpers as fh
from test_fs_load import odirect_read_all


@pytest.fixture(scope="module")
def asan_bnbfs():
    d = os.environ.get("BNBFS_BUILD_ASAN")
    if not d:
        pytest.skip("no sanitizer build: BNBFS_BUILD_ASAN is not set (./test.sh sets it)")
    exe = pathlib.Path(d) / "fs" / "bnbfs"
    if not exe.exists():
        pytest.skip(f"no sanitizer build of bnbfs in {d}")
    return exe


@pytest.fixture
def asan_env():
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:exitcode=66"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=67"
    return env


def test_sanitized_mount_serves_everything_and_exits_clean(asan_bnbfs, asan_env, tiny, tmp_path):
    exp = fh.expected(tiny, "f16")
    src = fh.copy_src(tiny / "src", tmp_path / "src")
    fh.patch_tensor(src, "model.layers.2.self_attn.q_proj.weight.absmax", 1, 255)
    fh.patch_tensor(src, "model.layers.2.self_attn.q_proj.weight.nested_absmax", 0, float("nan"))
    bad = "model.layers.2.self_attn.q_proj.weight"
    with fh.mounted(asan_bnbfs, src, tmp_path / "mnt", opts=["cache=6M"], env=asan_env,
                    expect_errors=True) as m:
        names = sorted(n for n in exp if n != bad)

        def reader(i):
            for name in names[i::4]:
                got = odirect_read_all(m.path("tensors", name), [4096, 1 << 20][i % 2], i)
                assert got == exp[name].tobytes(), name
                assert os.getxattr(m.path("tensors", name), "user.bnbfs.xxh3").decode() == \
                    fh.xxh3_128_hex(got)

        with cf.ThreadPoolExecutor(16) as ex:
            list(ex.map(reader, range(16)))
        with pytest.raises(OSError) as e:
            m.path("tensors", bad).read_bytes()
        assert e.value.errno == errno.EIO
        assert m.stats()["cache"]["bytes_held_peak"] <= 6 << 20
        with open(src / "model-00003-of-00003.safetensors", "ab") as f:
            f.write(b"\0")
        for _ in range(200):
            try:
                m.path("tensors", "lm_head.weight").read_bytes()
            except OSError as err:
                assert err.errno == errno.EIO
                break
        else:
            pytest.fail("a changed source was not detected")
