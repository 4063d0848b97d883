"""Shared pytest fixtures for bnbfs: where the build is, the generated tiny
checkpoint, and whether a GPU is present. Suites add their own helpers in
their own modules (fs_helpers.py, ...); keep this file small."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS / "fixtures"))
sys.path.insert(0, str(TESTS))


def _build_dir():
    return pathlib.Path(os.environ.get("BNBFS_BUILD", ROOT / "build"))


@pytest.fixture(scope="session")
def build_dir():
    d = _build_dir()
    if not (d / "build.ninja").exists():
        pytest.fail(f"no build in {d}: run ./scripts/build.sh first (./test.sh does)")
    return d


@pytest.fixture(scope="session")
def bin_path(build_dir):
    """bin_path('bnbfs-inspect') -> absolute path of a built program."""
    def find(name):
        for sub in ("dequant", "fs", "runner", "kernels", "tests", "."):
            p = build_dir / sub / name
            if p.exists():
                return p
        pytest.fail(f"{name} not built in {build_dir}")
    return find


def fixture_dir(size):
    """Generates (once, cached in .cache/fixtures) the fixture of that size."""
    cache = pathlib.Path(os.environ.get("BNBFS_FIXTURES", ROOT / ".cache" / "fixtures"))
    out = cache / size
    gen = TESTS / "fixtures" / "gen_fixture.py"
    ref = TESTS / "fixtures" / "bnbref.py"
    stamp = out / ".complete"
    newest = max(gen.stat().st_mtime, ref.stat().st_mtime)
    if stamp.exists() and stamp.stat().st_mtime >= newest:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(gen), "--size", size, str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def tiny():
    """Path of the tiny fixture: tiny/src (Unsloth checkpoint), tiny/expected."""
    return fixture_dir("tiny")


def gpu_present():
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False, "no nvidia-smi on this machine"
    r = subprocess.run([smi, "-L"], capture_output=True, text=True)
    if r.returncode != 0 or "GPU" not in r.stdout:
        return False, "nvidia-smi finds no GPU"
    return True, ""


@pytest.fixture(scope="session")
def gpu():
    ok, why = gpu_present()
    if not ok:
        pytest.skip(f"GPU test: {why}")
    return True


def tokenizer_dir():
    """The real gpt-oss tokenizer files (tests/data/gpt-oss-tokenizer, with
    tokenizer.json kept xz-compressed in git), unpacked once into .cache."""
    import lzma
    src = TESTS / "data" / "gpt-oss-tokenizer"
    out = ROOT / ".cache" / "gpt-oss-tokenizer"
    if not (out / "tokenizer.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            name = f.name[:-3] if f.name.endswith(".xz") else f.name
            data = lzma.decompress(f.read_bytes()) if f.name.endswith(".xz") else f.read_bytes()
            tmp = out / f".{name}.{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, out / name)  # atomic: parallel test processes may race here
    return out


@pytest.fixture(scope="session")
def tokdir():
    """Directory of the real gpt-oss tokenizer files (see tokenizer_dir)."""
    return tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_hf(tiny, tmp_path_factory):
    """The tiny fixture as an HF-canonical F16 checkpoint, as a mount would
    show it: expected/'s safetensors and config (no quantization_config) plus
    the source's tokenizer and generation config."""
    d = tmp_path_factory.mktemp("tiny-hf")
    os.symlink(tiny / "expected" / "model.safetensors", d / "model.safetensors")
    os.symlink(tiny / "expected" / "config.json", d / "config.json")
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):
        os.symlink(tiny / "src" / f, d / f)
    return d


def byte_level_map():
    """GPT-2's bytes_to_unicode: byte -> the character the vocab spells it with."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
          list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
