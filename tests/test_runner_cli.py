"""bnbfs-run's command line without a GPU: --help and --version, every bad
option value and bad combination gives one clear error line and exit 2, a
missing or wrong MODEL directory one clear line and exit 1, an over-long
prompt is refused before any model is loaded, and generation on a machine or
build without CUDA says so in one line (the GPU path itself is tested by
tests/test_runner_gpu.py on the GPU machine)."""
import json
import os
import subprocess

import numpy as np

import pytest

from conftest import gpu_present


@pytest.fixture(scope="module")
def exe(bin_path):
    return str(bin_path("bnbfs-run"))


def run(exe, *args, stdin=b"", env=None):
    return subprocess.run([exe, *map(str, args)], input=stdin, capture_output=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})


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
                "--help", "--version", "--null", "--expert-store", "--expert-source"]:
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
    (["--expert-store", "disk"], "--expert-store"),
    (["--expert-source", ""], "--expert-source"),
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
def tiny_model(tiny_hf):
    return tiny_hf


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
            os.symlink(os.readlink(tiny_model / f), d / f)
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


# ---------------------------------------------------------------- sampling
# --sample-logits replays the sampler on saved logits. The sampler's exact
# procedure is specified in runner/sample.h; SampleRef below re-implements
# that specification with numpy float32/float64 arithmetic (IEEE, no FMA) so
# the picks must agree id for id, and the statistics are checked against an
# independent float64 softmax.

M64 = (1 << 64) - 1


class Xoshiro:
    """xoshiro256** seeded by splitmix64, as sample.h documents."""

    def __init__(self, seed):
        x = seed & M64
        self.s = []
        for _ in range(4):
            x = (x + 0x9E3779B97F4A7C15) & M64
            z = x
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
            self.s.append(z ^ (z >> 31))

    @staticmethod
    def rotl(x, k):
        return ((x << k) | (x >> (64 - k))) & M64

    def next(self):
        s = self.s
        out = (self.rotl((s[1] * 5) & M64, 7) * 9) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = self.rotl(s[3], 45)
        return out

    def uniform(self):
        return (self.next() >> 11) * 2.0 ** -53


F = np.float32


def exp_neg(x):
    """sample.c's float polynomial exp for x in [-87, 0] (float32 array)."""
    ki = -np.trunc(F(0.5) - x * F(1.44269504088896341)).astype(np.int32)
    k = ki.astype(F)
    r = x - k * F(0.693359375)
    r = r + k * F(2.12194440e-4)
    z = r * r
    p = ((((F(1.9875691500e-4) * r + F(1.3981999507e-3)) * r + F(8.3334519073e-3)) * r +
          F(4.1665795894e-2)) * r + F(1.6666665459e-1)) * r + F(5.0000001201e-1)
    p = p * z + r + F(1.0)
    scale = ((ki + 127).astype(np.uint32) << 23).view(F)
    return p * scale


def weights(l, mx, inv_t):
    ok = np.isfinite(l)
    x = np.where(ok, (np.where(ok, l, F(0)) - mx) * inv_t, F(-87.0)).astype(F)
    x = np.maximum(x, F(-87.0))
    return np.where(ok, exp_neg(x), F(0)).astype(F)


def ref_pick(l, rng, temperature, top_p, top_k):
    n = len(l)
    fin = np.isfinite(l)
    best = int(np.argmax(np.where(fin, l, -np.inf)))
    mx = l[best]
    if temperature == 0:
        return best
    inv_t = F(1.0 / temperature)

    def nucleus(cand, total):                      # cand: [(w, id)]
        cand.sort(key=lambda c: (-c[0], c[1]))
        want, run, k = top_p * total, 0.0, 0
        while k < len(cand):
            run += float(cand[k][0])
            k += 1
            if run >= want:
                break
        return cand[:k], run

    def draw(cand, total):
        u, run = rng.uniform() * total, 0.0
        for w, i in cand:
            run += float(w)
            if u < run:
                return i
        return next(i for w, i in reversed(cand) if w > 0)

    if 0 < top_k < n:
        ids = sorted(sorted(np.flatnonzero(fin), key=lambda i: (-l[i], i))[:top_k])
        w = weights(l[ids], F(max(l[ids])), inv_t)
        cand = [(w[j], int(i)) for j, i in enumerate(ids)]
        total = 0.0
        for c in cand:
            total += float(c[0])
        if top_p < 1:
            cand, total = nucleus(cand, total)
        return draw(cand, total)
    w = weights(l, mx, inv_t)
    nb = (n + 63) // 64
    wp = np.zeros(nb * 64, dtype=F)
    wp[:n] = w
    bsum = []
    total = 0.0
    for b in range(nb):
        lanes = [0.0] * 8
        for k in range(0, 64, 8):
            for j in range(8):
                lanes[j] += float(wp[b * 64 + k + j])
        s = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + \
            ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
        bsum.append(s)
        total += s
    if top_p < 1:
        cut = F(0.5 * (1 - top_p) / n * total)
        cand = [(w[i], i) for i in range(n) if w[i] >= cut and w[i] > 0]
        cand, kept = nucleus(cand, total)
        return draw(cand, kept)
    u, run, b = rng.uniform() * total, 0.0, 0
    while b < nb - 1 and u >= run + bsum[b]:
        run += bsum[b]
        b += 1
    last = -1
    for t in range(64):
        i = b * 64 + t
        if i >= n:
            break
        if wp[i] > 0:
            last = i
        run += float(wp[i])
        if u < run and wp[i] > 0:
            return i
    return last if last >= 0 else best


@pytest.fixture
def sample_model(tmp_path):
    def make(vocab):
        d = tmp_path / f"v{vocab}"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps({"vocab_size": vocab}))
        return d
    return make


def sample(exe, model, logits, *args, env=None):
    f = model / "logits.bin"
    np.asarray(logits, dtype=F).tofile(f)
    r = run(exe, model, "--sample-logits", f, *args, env=env)
    assert r.returncode == 0, r.stderr.decode()
    return [int(x) for x in r.stdout.split()]


def random_logits(steps, vocab, seed, specials=True):
    g = np.random.default_rng(seed)
    l = (g.standard_normal((steps, vocab)) * 3).astype(F)
    l[:, g.integers(0, vocab, 3)] += F(6)          # a few likely tokens
    if specials:
        l[:, 5] = np.nan
        l[:, 7] = -np.inf
        l[1::3, 11] = np.inf                       # +inf is never picked either
    return l


@pytest.mark.parametrize("opts", [
    dict(temperature=1.0, top_p=1.0, top_k=0),
    dict(temperature=0.6, top_p=1.0, top_k=0),
    dict(temperature=1.0, top_p=0.9, top_k=0),
    dict(temperature=1.3, top_p=0.5, top_k=0),
    dict(temperature=1.0, top_p=1.0, top_k=40),
    dict(temperature=0.8, top_p=0.7, top_k=25),
    dict(temperature=0.0, top_p=1.0, top_k=0),
])
@pytest.mark.parametrize("vocab", [1003, 4096])
def test_sampler_matches_its_specification(exe, sample_model, opts, vocab):
    steps, seed = 300, 12345
    l = random_logits(steps, vocab, seed=vocab)
    got = sample(exe, sample_model(vocab), l, "--seed", seed,
                 "--temperature", opts["temperature"], "--top-p", opts["top_p"],
                 "--top-k", opts["top_k"])
    rng = Xoshiro(seed)
    want = [ref_pick(l[s], rng, **opts) for s in range(steps)]
    assert got == want


def test_simd_paths_pick_the_same_ids(exe, sample_model):
    """The AVX2 loops (chosen when the CPU has them) and the baseline ones
    (BNBFS_SIMD=scalar) compute the same bits."""
    l = random_logits(200, 2051, seed=4)
    m = sample_model(2051)
    for args in (["--temperature", 0], ["--temperature", 0.9], ["--top-p", 0.8],
                 ["--top-k", 30, "--temperature", 1.1]):
        a = sample(exe, m, l, "--seed", 5, *args)
        assert sample(exe, m, l, "--seed", 5, *args, env={"BNBFS_SIMD": "scalar"}) == a


def test_seed_reproducible_and_varies(exe, sample_model):
    l = random_logits(200, 512, seed=3, specials=False)
    m = sample_model(512)
    a = sample(exe, m, l, "--seed", 7)
    assert sample(exe, m, l, "--seed", 7) == a
    assert sample(exe, m, l, "--seed", 8) != a


def test_sampling_follows_softmax(exe, sample_model):
    """20,000 draws from one distribution: every token's frequency within
    5 sigma of softmax(l / T), computed independently in float64."""
    vocab, steps, temp = 64, 20000, 0.8
    base = np.random.default_rng(5).standard_normal(vocab).astype(F) * F(1.5)
    got = sample(exe, sample_model(vocab), np.tile(base, (steps, 1)), "--seed", 99,
                 "--temperature", temp)
    p = np.exp((base.astype(np.float64) - base.max()) / temp)
    p /= p.sum()
    counts = np.bincount(got, minlength=vocab)
    sigma = np.sqrt(steps * p * (1 - p)) + 1
    assert np.all(np.abs(counts - steps * p) < 5 * sigma), (counts, steps * p)


def test_top_k_and_top_p_cut_the_tail(exe, sample_model):
    vocab, steps = 100, 3000
    base = np.linspace(0, 5, vocab).astype(F)            # token 99 likeliest
    l = np.tile(base, (steps, 1))
    m = sample_model(vocab)
    assert set(sample(exe, m, l, "--seed", 1, "--top-k", 5)) <= set(range(95, 100))
    p = np.exp(base - base.max())
    p /= p.sum()
    order = np.argsort(-p)
    nucleus = set(order[:np.searchsorted(np.cumsum(p[order]), 0.5) + 1].tolist())
    got = set(sample(exe, m, l, "--seed", 1, "--top-p", 0.5))
    assert got <= nucleus and len(got) == len(nucleus)
    assert set(sample(exe, m, l, "--seed", 1, "--top-k", 1, "--temperature", 5)) == {99}


def test_greedy_skips_nan_and_inf_and_empty_step_is_an_error(exe, sample_model):
    m = sample_model(4)
    nan, inf = float("nan"), float("inf")
    assert sample(exe, m, [[nan, 1, 3, inf], [2, 2, -inf, 1]], "--temperature", 0) == [2, 0]
    np.asarray([[nan, nan, -inf, inf]], dtype=F).tofile(m / "bad.bin")
    r = run(exe, m, "--sample-logits", m / "bad.bin", "--seed", 1)
    assert r.returncode == 1
    one_error(r, "step 0", "no finite logit")


def test_sample_logits_file_errors(exe, sample_model, tmp_path):
    m = sample_model(10)
    (m / "short.bin").write_bytes(b"\0" * 36)
    r = run(exe, m, "--sample-logits", m / "short.bin")
    assert r.returncode == 1
    one_error(r, "36 bytes", "10 float32")
    r = run(exe, tmp_path, "--sample-logits", m / "short.bin")
    assert r.returncode == 1
    one_error(r, "config.json")


# ------------------------------------------------------------- on a GPU
# Generation end to end on the tiny fixture (random weights: the output is
# no harmony, so these also exercise the plain-text fallback). Skipped
# without a GPU; run on the GPU machine.

V = 201088


def logit_rows(path):
    return np.fromfile(path, dtype=np.float32).reshape(-1, V)


def test_gpu_chat_second_turn_equals_a_fresh_prompt(gpu, exe, tiny_model, tmp_path):
    """Turn 2 of --chat re-runs only what changed in the KV cache; its first
    logits equal a fresh run on the same rendered prompt."""
    one, two = tmp_path / "one.f32", tmp_path / "two.f32"
    args = ["--chat", "--temperature", "0", "--max-tokens", "3"]
    r1 = run(exe, tiny_model, *args, "--logits", one, stdin=b"Hello\n")
    assert r1.returncode == 0, r1.stderr.decode()
    r2 = run(exe, tiny_model, *args, "--logits", two, stdin=b"Hello\nAnd again?\n")
    assert r2.returncode == 0, r2.stderr.decode()
    n1 = logit_rows(one).shape[0]
    rows = logit_rows(two)
    assert np.array_equal(rows[:n1], logit_rows(one))
    assert rows.shape[0] > n1
    # three random tokens make no complete harmony message, so the history
    # is the two user messages
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"role": "user", "content": "Hello"}) + "\n")
    ids = run(exe, tiny_model, "--render", "--conversation", conv, "And again?").stdout.decode()
    fresh = tmp_path / "fresh.f32"
    r3 = run(exe, tiny_model, "--ids", ids, "--temperature", "0", "--max-tokens", "1",
             "--logits", fresh)
    assert r3.returncode == 0, r3.stderr.decode()
    a, b = rows[n1].astype(np.float64), logit_rows(fresh)[0].astype(np.float64)
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-2
    assert int(np.argmax(a)) == int(np.argmax(b))


def test_gpu_seeded_sampling_is_reproducible(gpu, exe, tiny_model, tmp_path):
    outs = []
    for k in range(2):
        f = tmp_path / f"s{k}.f32"
        r = run(exe, tiny_model, "--raw", "Once upon a time", "--seed", 11, "--top-k", 50,
                "--temperature", 1.2, "--max-tokens", 12, "--logits", f)
        assert r.returncode == 0, r.stderr.decode()
        outs.append((r.stdout, logit_rows(f)))
    assert outs[0][0] == outs[1][0] and np.array_equal(outs[0][1], outs[1][1])


def test_gpu_full_context_stops_cleanly(gpu, exe, tiny_model, tmp_path):
    f = tmp_path / "c.f32"
    ids = " ".join(str(i) for i in range(1000, 1015))      # 15 ids
    r = run(exe, tiny_model, "--ids", ids, "--raw", "--temperature", 0, "--max-context", 20,
            "--logits", f)
    assert r.returncode == 0, r.stderr.decode()
    n = logit_rows(f).shape[0]
    assert n <= 6
    if n == 6:
        assert "context full" in r.stderr.decode()


def test_gpu_harmony_generation_with_stats(gpu, exe, tiny_model):
    r = run(exe, tiny_model, "Hello", "--show-reasoning", "--max-tokens", 8, "--seed", 1,
            "--stats", "--reasoning", "low", "--date", "2025-01-31")
    assert r.returncode == 0, r.stderr.decode()
    err = r.stderr.decode()
    for key in ("load", "prefill", "decode", "sampling", "seed 1"):
        assert key in err
    assert " error:" not in err
