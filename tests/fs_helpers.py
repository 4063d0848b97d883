"""Helpers for the bnbfs mount suites (tests/test_fs_*.py).

`mounted()` runs the built bnbfs in the foreground as a subprocess with its
stderr in a file, waits until MNT is a mount point, and on exit unmounts with
`fusermount3 -u`, waits for the daemon and checks that it exited 0 with no
` error:` line in its log (unless the test expects errors). Tests skip (never
fail) only when FUSE itself is unusable on the machine.

Also: the expected bytes of the tiny fixture (f16 from expected/, bf16/f32
from bnbref), a safetensors header reader, the expected full content of a
virtual shard, and XXH3-128 through libxxhash (ctypes)."""
import contextlib
import ctypes
import ctypes.util
import json
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import tempfile
import time

import numpy as np
import pytest

MOUNT_TIMEOUT = 20.0
EXIT_TIMEOUT = 30.0


# ------------------------------------------------------------------ FUSE

def fuse_unusable_reason():
    """Why FUSE cannot be used here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible to this user"
    if not shutil.which("fusermount3"):
        return "fusermount3 is not installed"
    return None


_UNUSABLE_PATTERNS = ("fuse: device not found", "fusermount3: mount failed: Operation not permitted",
                      "fuse: failed to open /dev/fuse", "fusermount3: fuse device not found",
                      "fusermount3: failed to open /dev/fuse")


class Mount:
    """A running bnbfs: .mnt, .proc, .log() (stderr so far), .stats()."""

    def __init__(self, mnt, proc, logpath, cmd):
        self.mnt = pathlib.Path(mnt)
        self.proc = proc
        self.logpath = logpath
        self.cmd = cmd
        self.rc = None

    def log(self):
        return pathlib.Path(self.logpath).read_text(errors="replace")

    def error_lines(self):
        return [ln for ln in self.log().splitlines() if " error:" in ln]

    def stats(self):
        with open(self.mnt / ".bnbfs" / "stats") as f:
            return json.load(f)

    def path(self, *parts):
        return self.mnt.joinpath(*parts)


def _unmount(mnt, lazy=False):
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mnt)]
    return subprocess.run(args, capture_output=True, text=True)


def start_mount(bnbfs, src, mnt, opts=(), args=(), env=None):
    """Starts bnbfs in the foreground and waits for the mount. Returns a
    Mount; the caller must stop it (stop_mount) - use mounted() instead."""
    why = fuse_unusable_reason()
    if why:
        pytest.skip(f"FUSE is not usable here: {why}")
    mnt = pathlib.Path(mnt)
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = [str(bnbfs), str(src), str(mnt), "-f"]
    if opts:
        cmd += ["-o", ",".join(opts)]
    cmd += list(args)
    fd, logpath = tempfile.mkstemp(prefix="bnbfs-", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=fd, stderr=fd, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    os.close(fd)
    m = Mount(mnt, proc, logpath, cmd)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            log = m.log()
            if any(p in log for p in _UNUSABLE_PATTERNS):
                pytest.skip(f"FUSE is not usable here: {log.strip()}")
            pytest.fail(f"bnbfs exited with {proc.returncode} before mounting:\n"
                        f"{' '.join(cmd)}\n{log}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"bnbfs did not mount within {MOUNT_TIMEOUT} s:\n{m.log()}")
        time.sleep(0.01)
    return m


def stop_mount(m, expect_errors=False, unmount=True):
    """Unmounts (fusermount3 -u, retried while busy, lazily at last), waits
    for the daemon and checks exit code 0 and (unless expected) no error lines."""
    if unmount and os.path.ismount(m.mnt) and m.proc.poll() is None:
        for _ in range(50):
            r = _unmount(m.mnt)
            if r.returncode == 0 or not os.path.ismount(m.mnt):
                break
            time.sleep(0.1)
        else:
            _unmount(m.mnt, lazy=True)
    try:
        m.rc = m.proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        m.proc.kill()
        m.proc.wait()
        _unmount(m.mnt, lazy=True)
        pytest.fail(f"bnbfs did not exit within {EXIT_TIMEOUT} s after unmount:\n{m.log()}")
    log = m.log()
    os.unlink(m.logpath)
    assert m.rc == 0, f"bnbfs exited with {m.rc}:\n{log}"
    if not expect_errors:
        errors = [ln for ln in log.splitlines() if " error:" in ln]
        assert not errors, "bnbfs logged errors:\n" + "\n".join(errors)
    assert not os.path.ismount(m.mnt)
    return log


@contextlib.contextmanager
def mounted(bnbfs, src, mnt, opts=(), args=(), expect_errors=False, env=None):
    """with mounted(bin_path('bnbfs'), src, tmp_path / 'mnt') as m: ..."""
    m = start_mount(bnbfs, src, mnt, opts, args, env)
    ok = False
    try:
        yield m
        ok = True
    finally:
        if ok:
            m.final_log = stop_mount(m, expect_errors)
        else:   # the test failed: clean up without masking its error
            if os.path.ismount(m.mnt):
                _unmount(m.mnt, lazy=True)
            try:
                m.proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(m.proc.pid, signal.SIGKILL)
                m.proc.wait()


def copy_src(src, dst):
    """A private copy of a fixture's source checkpoint (to corrupt or change)."""
    shutil.copytree(src, dst)
    return pathlib.Path(dst)


# ------------------------------------------------------------ safetensors

def read_header(path):
    """(header dict, data start offset) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


_NP = {"F16": np.float16, "F32": np.float32, "BF16": np.uint16, "F64": np.float64,
       "U8": np.uint8, "I8": np.int8, "I32": np.int32, "I64": np.int64, "U16": np.uint16,
       "I16": np.int16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}


def read_tensors_raw(path):
    """name -> ndarray from a safetensors file without the safetensors
    library (it has no numpy bfloat16): BF16 comes back as uint16 bits."""
    hdr, start = read_header(path)
    data = pathlib.Path(path).read_bytes()
    out = {}
    for name, v in hdr.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[name] = np.frombuffer(data[start + a:start + b], dtype=_NP[v["dtype"]]).reshape(v["shape"])
    return out


_EXPECTED = {}


def expected(tiny, dtype="f16"):
    """The fixture's expected output tensors (cached per session)."""
    key = (str(tiny), dtype)
    if key not in _EXPECTED:
        if dtype == "f16":
            from safetensors.numpy import load_file
            _EXPECTED[key] = load_file(str(pathlib.Path(tiny) / "expected" / "model.safetensors"))
        else:
            import bnbref
            _EXPECTED[key] = bnbref.expected_tensors(str(pathlib.Path(tiny) / "src"), dtype)
    return _EXPECTED[key]


def expected_file_bytes(mount_file, exp):
    """The full content a virtual shard must have: its header as served
    (checked separately) followed by the expected tensors at its offsets."""
    hdr, start = read_header(mount_file)
    size = os.path.getsize(mount_file)
    buf = bytearray(size)
    with open(mount_file, "rb") as f:
        buf[:start] = f.read(start)
    for name, v in hdr.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        raw = np.ascontiguousarray(exp[name]).tobytes()
        assert len(raw) == b - a, name
        buf[start + a:start + b] = raw
    return bytes(buf)


# ------------------------------------------------------------------ xxh3

class _XXH128(ctypes.Structure):
    _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]


_xxh = None


def xxh3_128_hex(data):
    """XXH3-128 of bytes as xxh128sum prints it (high 64 bits first)."""
    global _xxh
    if _xxh is None:
        name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
        _xxh = ctypes.CDLL(name)
        _xxh.XXH3_128bits.restype = _XXH128
        _xxh.XXH3_128bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    h = _xxh.XXH3_128bits(bytes(data), len(data))
    return f"{h.high64:016x}{h.low64:016x}"


# ------------------------------------------------- building broken sources

def tensor_location(src, name):
    """(absolute file path, byte offset, byte length, dtype) of a source tensor."""
    import json as _json
    idx = _json.loads((pathlib.Path(src) / "model.safetensors.index.json").read_text())
    path = pathlib.Path(src) / idx["weight_map"][name]
    hdr, start = read_header(path)
    a, b = hdr[name]["data_offsets"]
    return path, start + a, b - a, hdr[name]["dtype"]


def patch_tensor(src, name, index, value):
    """Writes one element (np scalar of the tensor's dtype) in place."""
    path, off, ln, dt = tensor_location(src, name)
    raw = np.asarray(value, dtype=_NP[dt]).tobytes()
    assert (index + 1) * len(raw) <= ln
    with open(path, "r+b") as f:
        f.seek(off + index * len(raw))
        f.write(raw)


def write_safetensors_raw(path, tensors, metadata=None):
    """tensors: name -> (dtype string, shape, bytes), written in name order."""
    import json as _json
    hdr = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for name in sorted(tensors):
        dt, shape, raw = tensors[name]
        hdr[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    js = _json.dumps(hdr, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js)
        for name in sorted(tensors):
            f.write(tensors[name][2])


def drop_tensor(src, name):
    """Rewrites the source shard holding `name` without it (index unchanged)."""
    path, _, _, _ = tensor_location(src, name)
    hdr, start = read_header(path)
    data = path.read_bytes()
    keep = {k: (v["dtype"], v["shape"], data[start + v["data_offsets"][0]:start + v["data_offsets"][1]])
            for k, v in hdr.items() if k not in ("__metadata__", name)}
    write_safetensors_raw(path, keep)


def hf_outputs_of_source_file(src, shard_name):
    """HF-canonical names of the outputs computed from one source shard."""
    import json as _json
    import bnbref
    idx = _json.loads((pathlib.Path(src) / "model.safetensors.index.json").read_text())
    out = set()
    for name, shard in idx["weight_map"].items():
        if shard != shard_name:
            continue
        m = bnbref.COMPANION_RE.match(name)
        owner = m["w"] if m else name
        out.add(bnbref.hf_name(owner)[0])
    return out
