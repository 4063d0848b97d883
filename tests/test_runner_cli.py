"""bnbfs-run's command line without a GPU: --help and --version, every bad
option value and bad combination gives one clear error line and exit 2, a
missing or wrong MODEL directory one clear line and exit 1, an over-long
prompt is refused before any model is loaded, and generation on a machine or
build without CUDA says so in one line (the GPU path itself is tested by
tests/test_runner_gpu.py on the GPU machine)."""
import json
import os
import shutil
import subprocess

import pytest
from safetensors.numpy import load_file, save_file

from conftest import gpu_present, tokenizer_dir


@pytest.fixture(scope="module")
def exe(bin_path):
    return str(bin_path("bnbfs-run"))


@pytest.fixture(scope="module")
def tokdir():
    return tokenizer_dir()


def run(exe, *args, stdin=b""):
    return subprocess.run([exe, *map(str, args)], input=stdin, capture_output=True, timeout=120)


def one_error(r, *needles):
    """Exactly one error line (plus the --help hint for usage errors)."""
    err = r.stderr.decode()
    lines = [ln for ln in err.splitlines() if ln]
    errs = [ln for ln in lines if " error: " in ln]
    assert len(errs) == 1, err
    assert all(ln == errs[0] or ln.startswith("Try 'bnbfs-run --help'") for ln in lines), err
    for n in needles:
        assert n in errs[0], (n, errs[0])
    return errs[0]


def test_help_lists_every_option(exe):
    r = run(exe, "--help")
    assert r.returncode == 0 and r.stderr == b""
    out = r.stdout.decode()
    assert out.startswith("Usage: bnbfs-run MODEL [PROMPT]")
    for opt in ["--system", "--date", "--reasoning", "--show-reasoning", "--chat", "--raw",
                "--ids", "--temperature", "--top-p", "--top-k", "--seed", "--max-tokens",
                "--max-context", "--vram-budget", "--device", "--tokenize", "--detokenize",
                "--render", "--logits", "--stats", "--parse-ids", "--conversation", "--check",
                "--help", "--version", "--null"]:
        assert opt in out, opt
    assert run(exe, "-h").stdout == r.stdout


def test_help_wins_over_other_arguments(exe):
    assert run(exe, "/nonexistent", "--tokenize", "--help").returncode == 0


def test_version(exe):
    r = run(exe, "--version")
    assert r.returncode == 0
    out = r.stdout.decode()
    assert out.startswith("bnbfs-run 0.") and "CUDA engine:" in out


@pytest.mark.parametrize("args,needle", [
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "abc"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "0.5x"], "--temperature"),
    (["--top-k", "-1"], "--top-k"),
    (["--top-k", "2.5"], "--top-k"),
    (["--seed", "-1"], "--seed"),
    (["--seed", "18446744073709551616"], "--seed"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--max-context", "1"], "--max-context"),
    (["--max-context", "99999999999"], "--max-context"),
    (["--reasoning", "extreme"], "--reasoning"),
    (["--date", "2025-13-01"], "--date"),
    (["--date", "2023-02-29"], "--date"),
    (["--date", "20250101"], "--date"),
    (["--vram-budget", "lots"], "--vram-budget"),
    (["--vram-budget", "0"], "--vram-budget"),
    (["--device", "-1"], "--device"),
    (["--ids", "1 x 3"], "--ids"),
    (["--ids", ""], "--ids"),
    (["--no-such-option"], "--no-such-option"),
    (["-q"], "-q"),
])
def test_bad_option_values(exe, tokdir, args, needle):
    r = run(exe, tokdir, "Hello", *args)
    assert r.returncode == 2
    one_error(r, needle)
    assert r.stdout == b""


@pytest.mark.parametrize("args,needle", [
    (["--tokenize", "--render", "Hi"], "cannot be combined"),
    (["--chat", "--detokenize"], "cannot be combined"),
    (["--tokenize", "Hi"], "takes no PROMPT"),
    (["--raw", "--system", "x", "Hi"], "--raw"),
    (["--raw", "--show-reasoning", "Hi"], "--raw"),
    (["--ids", "1 2", "Hi"], "--ids"),
    (["--render"], "--render needs a PROMPT"),
    (["--render", "--raw", "Hi"], "--render"),
    (["--chat", "--raw"], "--chat"),
    (["-z", "--render", "Hi"], "-z"),
    ([], "missing PROMPT"),
    (["Hi", "extra"], "unexpected argument 'extra'"),
])
def test_bad_combinations(exe, tokdir, args, needle):
    r = run(exe, tokdir, *args)
    assert r.returncode == 2
    one_error(r, needle)


def test_missing_model_argument(exe):
    r = run(exe)
    assert r.returncode == 2
    one_error(r, "missing MODEL")


def test_option_needing_a_value_at_the_end(exe, tokdir):
    r = run(exe, tokdir, "Hi", "--seed")
    assert r.returncode == 2
    one_error(r, "--seed needs a value")


def test_model_dir_errors(exe, tmp_path):
    r = run(exe, tmp_path / "nope", "--tokenize")
    assert r.returncode == 1
    one_error(r, str(tmp_path / "nope"), "No such file or directory")
    f = tmp_path / "file"
    f.write_text("x")
    r = run(exe, f, "Hi")
    assert r.returncode == 1
    one_error(r, "not a directory")
    r = run(exe, tmp_path, "Hi")
    assert r.returncode == 1
    one_error(r, f"{tmp_path}/tokenizer.json", "not found")


def test_over_long_prompt_is_refused_before_loading(exe, tokdir):
    """No model weights in tokdir: the refusal must come first."""
    r = run(exe, tokdir, "word " * 200, "--max-context", "100")
    assert r.returncode == 1
    one_error(r, "the prompt is", "--max-context")
    r = run(exe, tokdir, "--raw", "-", "--max-context", "10", stdin=b"a b c d e f g h i j k l")
    assert r.returncode == 1
    one_error(r, "the prompt is 12 tokens")


def test_bad_prompt_is_refused_before_loading(exe, tokdir):
    r = run(exe, tokdir, "-", stdin=b"\xff")
    assert r.returncode == 1
    one_error(r, "invalid UTF-8")


@pytest.fixture(scope="module")
def tiny_model(tiny, tmp_path_factory, tokdir):
    """An HF-canonical model directory from the tiny fixture."""
    d = tmp_path_factory.mktemp("tiny_model")
    t = load_file(str(tiny / "expected" / "model.safetensors"))
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tiny / "expected" / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))
    for f in os.listdir(tokdir):
        shutil.copy(tokdir / f, d / f)
    return d


def test_check_summarizes_the_model(exe, tiny_model):
    r = run(exe, tiny_model, "--check")
    if b"no model loader" in r.stderr:
        pytest.skip("this build has no runner/model.c")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "3 layers" in out and "vocab 201088" in out and "tokenizer 199998 tokens" in out


def test_missing_weights_are_one_clear_error(exe, tiny_model, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for f in os.listdir(tiny_model):
        if f != "model.safetensors":
            shutil.copy(tiny_model / f, d / f)
    r = run(exe, d, "Hello", "--max-tokens", "1")
    assert r.returncode == 1
    line = one_error(r)
    assert "model.safetensors" in line or "no CUDA" in line


def test_generation_without_gpu_says_so(exe, tiny_model):
    ok, why = gpu_present()
    if ok:
        pytest.skip("a GPU is present: generation is tested by test_runner_gpu.py")
    r = run(exe, tiny_model, "Hello", "--max-tokens", "2")
    assert r.returncode == 1 and r.stdout == b""
    line = one_error(r)
    assert "CUDA" in line or "GPU" in line


def test_chat_reads_stdin_lines_and_fails_cleanly_without_gpu(exe, tiny_model):
    ok, _ = gpu_present()
    if ok:
        pytest.skip("a GPU is present")
    r = run(exe, tiny_model, "--chat", stdin=b"Hello\n/exit\n")
    assert r.returncode == 1
    one_error(r)
