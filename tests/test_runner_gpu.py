"""The CUDA forward pass of bnbfs-run (runner/engine*.c, kernels/llm*.cu)
against the numpy reference (tests/ref/gptoss_ref.py) on the tiny fixture
(and, for the attention kernels, a checkpoint with gpt-oss-20b's head
geometry):
prefill and step-by-step decode logits within 1e-2 relative error (max
|a - b| / max |b| per position), positions past the sliding window (8),
greedy generation of 32 tokens with the same ids, the 24 GB mode (expert
cache with forced misses) giving the same logits as resident mode, the
runner on a real bnbfs mount, and transformers' GptOssForCausalLM on the same
weights where torch is installed.

Needs a CUDA GPU: skipped with the reason otherwise (the `gpu` fixture). The
engine is driven by llm-driver (tests/gpu/llm_driver.c), which feeds exact
ids and writes float32 logits; bnbfs-run's --logits path is checked too.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "ref"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import bnbref  # noqa: E402
import gen_fixture  # noqa: E402
import gptoss_ref  # noqa: E402

TOL = 1e-2
V = 201088


@pytest.fixture(scope="module")
def model_dir(tiny_hf):
    return tiny_hf


@pytest.fixture(scope="module")
def ref(model_dir):
    return gptoss_ref.Model(model_dir)


def prompt(n, seed):
    return [int(x) for x in np.random.default_rng(seed).integers(0, 199998, n)]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b).max(axis=-1) / np.abs(b).max(axis=-1)).max())


def drive(bin_path, model, ids, tmp_path, *args, expect_fail=False):
    """Runs llm-driver; returns (its JSON, logits rows [k, V])."""
    out = tmp_path / f"logits-{len(os.listdir(tmp_path))}.f32"
    cmd = [str(bin_path("llm-driver")), str(model), "--ids", " ".join(map(str, ids)),
           "--logits", str(out), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if expect_fail:
        assert r.returncode != 0, r.stdout
        return r
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    rows = np.fromfile(out, dtype=np.float32).reshape(-1, V)
    return json.loads(r.stdout), rows


def ref_prefill_last(ref, ids):
    """Logits of the last position of a prefill into the reference's KV cache
    (its lm_head on one row only: 2000+ rows of 201088 would not fit)."""
    ids = np.asarray(ids)
    ref.reset()
    x = ref.w["model.embed_tokens.weight"][ids]
    pos = np.arange(ids.size)
    for L in range(ref.nlayers):
        x = ref.layer(L, x, pos, ref.cache[L])
    ref.pos = ids.size
    return ref.hidden_to_logits(x[-1:])[0]


@pytest.mark.parametrize("n", [1, 5, 9, 20])
def test_prefill_logits_match_reference(gpu, bin_path, model_dir, ref, tmp_path, n):
    ids = prompt(n, seed=n)
    info, rows = drive(bin_path, model_dir, ids, tmp_path)
    assert rows.shape == (1, V)
    assert rel_err(rows[0], ref.forward(ids)[-1]) < TOL
    assert info["stats"]["resident"] is True


def test_stepwise_decode_matches_reference_past_the_window(gpu, bin_path, model_dir, ref,
                                                           tmp_path):
    """One token at a time through the decode kernels (and, from the second
    step, the captured CUDA graph): every position, 24 > window 8."""
    ids = prompt(24, seed=7)
    _, rows = drive(bin_path, model_dir, ids, tmp_path, "--stepwise")
    want = ref.forward(ids)
    assert rows.shape == (24, V)
    errs = [rel_err(rows[i], want[i]) for i in range(24)]
    assert max(errs) < TOL, errs


def test_prefill_in_pieces_matches_reference(gpu, bin_path, model_dir, ref, tmp_path):
    """Prefills that start at a position > 0 read the earlier pieces from the
    KV cache (through the sliding window on layers 0 and 2)."""
    ids = prompt(23, seed=11)
    _, rows = drive(bin_path, model_dir, ids, tmp_path, "--feed", 7)
    want = ref.forward(ids)
    assert rows.shape == (4, V)
    for row, pos in zip(rows, (6, 13, 20, 22)):
        assert rel_err(row, want[pos]) < TOL, pos


def test_greedy_32_tokens_match_reference(gpu, bin_path, model_dir, ref, tmp_path):
    """Same 32 greedy ids. The prompt is one whose reference run has no
    near-tie (top-2 gap above 0.4% of the logit scale at every step): with a
    tie, 1e-3 of fp16 rounding may rightly pick either token."""
    for seed in range(3, 60):
        ids = prompt(12, seed=seed)
        want_ids, want_rows = ref.greedy(ids, 32)
        top2 = np.sort(want_rows, axis=1)[:, -2:]
        if (top2[:, 1] - top2[:, 0]).min() > 0.004 * np.abs(want_rows).max():
            break
    else:
        pytest.fail("no prompt without near-ties among 57 seeds")
    info, rows = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 32)
    assert info["generated"] == [int(t) for t in want_ids]
    assert rows.shape == (32, V)
    assert rel_err(rows, want_rows) < TOL
    # the engine's GPU pick (rn_engine_forward_pick) chose what the sampler
    # chose from the same logits, at every one of the 32 steps
    assert (info["picks"], info["pick_mismatches"]) == (32, 0)


def test_gpu_pick_is_the_samplers_pick_on_crafted_logits(gpu, bin_path):
    """kn_llm_argmax against bnbfs-run's temperature-0 sampler where an
    argmax can go wrong: ties across blocks (lowest id), -0 before +0, NaN
    and +inf ahead of the maximum (never picked), no finite logit (-1),
    denormals, lengths that are not multiples of 4; each twice (the first
    launch must leave its scratch clear)."""
    r = subprocess.run([str(bin_path("llm-driver")), "--pick-selftest"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    res = json.loads(r.stdout)
    assert res["pick_cases"] >= 11 and res["pick_mismatches"] == 0


def test_bnbfs_run_greedy_picks_on_the_gpu(gpu, bin_path, model_dir, tmp_path):
    """bnbfs-run --temperature 0 without --logits takes the GPU's pick (4
    bytes back a token); with --logits it samples on the host. Same text."""
    ids = prompt(14, seed=11)

    def run(*extra):
        cmd = [str(bin_path("bnbfs-run")), str(model_dir), "--ids", " ".join(map(str, ids)),
               "--raw", "--temperature", "0", "--max-tokens", "24", *extra]
        r = subprocess.run(cmd, capture_output=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr.decode(errors='replace')}"
        return r.stdout

    gpu_out = run()
    host_out = run("--logits", str(tmp_path / "l.f32"))
    assert gpu_out == host_out


def test_graphs_and_eager_launches_agree_bitwise(gpu, bin_path, model_dir, tmp_path):
    ids = prompt(10, seed=5)
    _, a = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 12)
    _, b = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 12, "--no-graphs")
    assert np.array_equal(a, b)


def test_repeated_runs_are_deterministic(gpu, bin_path, model_dir, tmp_path):
    ids = prompt(40, seed=9)
    _, a = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 6)
    _, b = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 6)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("slots,nocache", [(2, False), (3, False), (7, False), (7, True)])
def test_expert_cache_gives_resident_logits(gpu, bin_path, model_dir, tmp_path, slots, nocache):
    """The 24 GB mode with fewer GPU slots than experts (15): one LRU over all
    layers (2, 3 slots), per-layer shares (7), or every use a miss
    (--expert-nocache). Misses are copied from host memory, and the logits
    are bit-identical to resident."""
    ids = prompt(12, seed=21)
    _, want = drive(bin_path, model_dir, ids, tmp_path, "--feed", 5, "--greedy", 16)
    info, rows = drive(bin_path, model_dir, ids, tmp_path, "--feed", 5, "--greedy", 16,
                       "--expert-slots", slots, *(["--expert-nocache"] if nocache else []))
    s = info["stats"]
    assert s["resident"] is False and s["expert_slots"] == slots
    assert s["expert_misses"] > 0
    if nocache:
        assert s["expert_hits"] == 0
    expert_bytes = (64 * 272 + 136 * 64) * 2
    assert s["bytes_moved"] == s["expert_misses"] * expert_bytes
    assert np.array_equal(rows, want)


def test_prefill_with_hundreds_of_rows_an_expert(gpu, bin_path, model_dir, ref, tmp_path):
    """700 tokens put ~280 rows on each of the 5 experts (the full model's
    2048-token chunk gives its 32 experts ~256 each): prefill and the next
    step match the reference."""
    ids = prompt(700, seed=31)
    _, rows = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 2)
    assert rel_err(rows[0], ref_prefill_last(ref, ids)) < TOL
    assert rel_err(rows[1], ref.step(int(np.argmax(rows[0])))) < TOL


def test_expert_cache_gives_resident_logits_over_many_rows(gpu, bin_path, model_dir, tmp_path):
    """The 24 GB mode with hundreds of rows an expert in its prefill: the
    logits are still bit-identical to resident."""
    ids = prompt(700, seed=33)
    _, want = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 3)
    info, rows = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 3, "--expert-slots", 7)
    assert info["stats"]["resident"] is False and info["stats"]["expert_misses"] > 0
    assert np.array_equal(rows, want)


def offload_base(resident_info):
    """Device bytes of the 24 GB mode without slots, from a resident run's:
    mirrors runner/engine_load.c's layout. Resident, it also holds the
    embedding (read from the host in the 24 GB mode), the 3 layers' stacked
    experts, and 3 more prefill expert streams' scratch (2048 rows of 2I
    and I, fp16). A change there shows here as a wrong slot count."""
    embed = V * 64 * 2
    experts = 3 * 5 * (64 * 272 + 136 * 64) * 2
    side = 3 * (2048 * 272 * 2 + 2048 * 136 * 2)
    return resident_info["stats"]["vram_bytes"] - embed - experts - side


def test_vram_budget_selects_the_expert_cache(gpu, bin_path, model_dir, tmp_path):
    """--vram-budget just above what everything but the experts needs: the
    engine caches experts (4 slots here) and computes the same logits."""
    ids = prompt(9, seed=4)
    res, want = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 10)
    budget = (512 << 20) + offload_base(res) + 4 * 52224 + 1000
    info, rows = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 10,
                       "--vram-budget", budget)
    assert info["stats"]["resident"] is False
    assert info["stats"]["expert_slots"] == 4
    assert np.array_equal(rows, want)
    r = drive(bin_path, model_dir, ids, tmp_path, "--vram-budget", (512 << 20) + 1000,
              expect_fail=True)
    assert "VRAM budget too small" in r.stderr


def test_bnbfs_run_logits_and_budget(gpu, bin_path, model_dir, ref, tmp_path):
    """bnbfs-run --logits (greedy, raw ids) matches the reference, and with a
    budget that forces the expert cache writes the same bytes."""
    ids = prompt(14, seed=8)

    def run(*extra):
        out = tmp_path / f"run-{len(os.listdir(tmp_path))}.f32"
        cmd = [str(bin_path("bnbfs-run")), str(model_dir), "--ids", " ".join(map(str, ids)),
               "--raw", "--temperature", "0", "--max-tokens", "6", "--logits", str(out),
               "--stats", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
        return np.fromfile(out, dtype=np.float32).reshape(-1, V), r.stderr

    rows, _ = run()
    assert rows.shape[0] >= 1
    assert rel_err(rows[0], ref.forward(ids)[-1]) < TOL
    # Greedy steps: the same engine through llm-driver (argmax) gives the
    # same rows, as long as bnbfs-run did not stop early at an eos id.
    info, drv = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 6)
    k = min(rows.shape[0], drv.shape[0])
    assert np.array_equal(rows[:k], drv[:k])
    budget = (512 << 20) + offload_base(info) + 3 * 52224 + 1000
    rows_b, err = run("--vram-budget", str(budget))
    assert np.array_equal(rows, rows_b)


def test_runner_on_a_bnbfs_mount(gpu, bin_path, model_dir, tiny, tmp_path):
    """The runner on a real mount of the 4-bit source computes the same
    logits as on the assembled F16 checkpoint (the mount serves those bytes)."""
    from fs_helpers import mounted
    ids = prompt(20, seed=12)
    _, want = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 4)
    (tmp_path / "out").mkdir()
    with mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt") as m:
        _, rows = drive(bin_path, m.mnt, ids, tmp_path / "out", "--greedy", 4)
    assert np.array_equal(rows, want)


EXPERT_F16 = (64 * 272 + 136 * 64) * 2     # bytes of one tiny expert in F16


@pytest.mark.parametrize("store", ["q4-gpu", "q4-host"])
@pytest.mark.parametrize("slots,nocache", [(2, False), (7, False), (7, True)])
def test_4bit_expert_store_gives_resident_logits(gpu, bin_path, model_dir, tiny, tmp_path,
                                                 store, slots, nocache):
    """The 24 GB mode with the experts' 4-bit source: misses are dequantized
    on the GPU (from the GPU's copy, or from a 4-bit record copied from host
    memory) by the mount's kernel, and the logits are bit-identical to
    resident (global LRU, per-layer shares, every use a miss)."""
    ids = prompt(12, seed=31)
    _, want = drive(bin_path, model_dir, ids, tmp_path, "--feed", 5, "--greedy", 16)
    info, rows = drive(bin_path, model_dir, ids, tmp_path, "--feed", 5, "--greedy", 16,
                       "--expert-slots", slots, "--expert-source", tiny / "src",
                       "--expert-store", store, *(["--expert-nocache"] if nocache else []))
    s = info["stats"]
    assert s["store"] == store and s["expert_slots"] == slots
    assert s["expert_misses"] > 0
    assert s["bytes_dequant"] == s["expert_misses"] * EXPERT_F16
    if store == "q4-gpu":
        assert s["bytes_moved"] == 0
    else:
        assert 0 < s["bytes_moved"] < s["expert_misses"] * EXPERT_F16 / 2
    assert np.array_equal(rows, want)


def test_4bit_store_found_through_the_mount(gpu, bin_path, model_dir, tiny, tmp_path):
    """On a bnbfs mount the runner finds the 4-bit source by itself (the
    root's user.bnbfs.source) and gives the resident logits; f16-host still
    works there and reads the mount's F16 experts."""
    from fs_helpers import mounted
    ids = prompt(10, seed=33)
    _, want = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 8)
    (tmp_path / "out").mkdir()
    with mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt") as m:
        a, rows_a = drive(bin_path, m.mnt, ids, tmp_path / "out", "--greedy", 8,
                          "--expert-slots", 4)
        b, rows_b = drive(bin_path, m.mnt, ids, tmp_path / "out", "--greedy", 8,
                          "--expert-slots", 4, "--expert-store", "f16-host")
    assert a["stats"]["store"] == "q4-gpu" and b["stats"]["store"] == "f16-host"
    assert b["stats"]["bytes_moved"] == b["stats"]["expert_misses"] * EXPERT_F16
    assert np.array_equal(rows_a, want) and np.array_equal(rows_b, want)


def copy_source(tiny, dst):
    shutil.copytree(tiny / "src", dst)
    return dst


def poke(src, tensor, offset, change):
    """Rewrites bytes of one tensor of a copied source checkpoint:
    change(old bytes) -> new bytes of the same length."""
    from fs_helpers import read_header
    for f in sorted(src.glob("*.safetensors")):
        hdr, start = read_header(f)
        if tensor in hdr:
            with open(f, "r+b") as fp:
                fp.seek(start + hdr[tensor]["data_offsets"][0] + offset)
                new = change(fp.read(4))
                fp.seek(start + hdr[tensor]["data_offsets"][0] + offset)
                fp.write(new)
            return
    raise KeyError(tensor)


def test_4bit_source_that_is_not_the_models_is_refused(gpu, bin_path, model_dir, tiny,
                                                        tmp_path):
    """A source whose experts differ from the model dir's F16 experts (one
    code byte of the last expert changed) fails at load with the tensor and
    element named, instead of computing other numbers."""
    src = copy_source(tiny, tmp_path / "src")
    poke(src, "model.layers.2.mlp.experts.down_projs.4.weight", 0,
         lambda b: bytes([b[0] ^ 0xFF]))
    r = drive(bin_path, model_dir, prompt(4, seed=1), tmp_path, "--expert-slots", 3,
              "--expert-source", src, expect_fail=True)
    assert "does not hold the experts" in r.stderr
    assert "model.layers.2.mlp.experts.down_proj" in r.stderr


def test_4bit_source_with_a_corrupt_scale_is_an_error(gpu, bin_path, model_dir, tiny, tmp_path):
    """A non-finite scale in any expert (here the nested absmax of layer 1,
    expert 3) fails the load naming file and tensor, as the mount's read of
    that tensor fails."""
    src = copy_source(tiny, tmp_path / "src")
    name = "model.layers.1.mlp.experts.gate_up_projs.3.weight.nested_absmax"
    poke(src, name, 0, lambda b: np.array([np.nan], np.float32).tobytes())
    r = drive(bin_path, model_dir, prompt(4, seed=1), tmp_path, "--expert-slots", 3,
              "--expert-source", src, expect_fail=True)
    assert "non-finite scale" in r.stderr and "gate_up_projs.3" in r.stderr
    assert "Traceback" not in r.stderr and r.returncode == 1


def test_4bit_store_needs_a_source(gpu, bin_path, model_dir, tmp_path):
    """Asking for a 4-bit store where no source is known is a clear error."""
    r = drive(bin_path, model_dir, prompt(4, seed=1), tmp_path, "--expert-slots", 3,
              "--expert-store", "q4-gpu", expect_fail=True)
    assert "names no usable source" in r.stderr


def test_long_prompt_over_a_prefill_chunk(gpu, bin_path, model_dir, ref, tmp_path):
    """2100 tokens: two prefill chunks (2048 + 52), YaRN positions > 2048,
    then decode steps."""
    ids = prompt(2100, seed=13)
    _, rows = drive(bin_path, model_dir, ids, tmp_path, "--greedy", 2)
    assert rel_err(rows[0], ref_prefill_last(ref, ids)) < TOL
    step = ref.step(int(np.argmax(rows[0])))
    assert rel_err(rows[1], step) < TOL


def test_context_limit_and_bad_ids_are_errors(gpu, bin_path, model_dir, tmp_path):
    r = drive(bin_path, model_dir, prompt(20, 1), tmp_path, "--max-context", 16,
              expect_fail=True)
    assert "context full" in r.stderr
    r = drive(bin_path, model_dir, [5, V], tmp_path, expect_fail=True)
    assert "outside the vocabulary" in r.stderr


def test_transformers_gives_the_same_logits(gpu, bin_path, model_dir, tmp_path):
    """transformers' GptOssForCausalLM (float32, eager attention, on the GPU)
    on the same checkpoint: prefill logits at every position."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no GptOssForCausalLM")
    ids = prompt(20, seed=17)
    _, rows = drive(bin_path, model_dir, ids, tmp_path, "--stepwise")
    try:
        m = transformers.GptOssForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="eager")
    except TypeError:       # transformers 4.x spells it torch_dtype
        m = transformers.GptOssForCausalLM.from_pretrained(
            str(model_dir), torch_dtype=torch.float32, attn_implementation="eager")
    m = m.to("cuda").eval()
    with torch.no_grad():
        out = m(torch.tensor([ids], device="cuda")).logits[0].float().cpu().numpy()
    assert rel_err(rows, out) < TOL


# gpt-oss-20b's attention geometry (64 query heads, 8 KV heads, head_dim 64,
# window 128) and top-4 routing, with small widths so the reference stays
# quick. The tiny fixture's head_dim is 16, and the attention kernels are
# compiled per head_dim.
GEO = dict(hidden=128, intermediate=128, layers=2, experts=8, topk=4, heads=64, kv_heads=8,
           head_dim=64, vocab=V, window=128)


@pytest.fixture(scope="module")
def geo_dir(gpu, tmp_path_factory):
    """An HF F16 checkpoint of GEO with seeded random weights, scaled so
    attention scores and activations stay O(1)."""
    c = GEO
    rng = np.random.default_rng(2026)
    H, I, E = c["hidden"], c["intermediate"], c["experts"]
    Q, KV = c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]

    def n(shape, std, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(np.float16)

    t = {"model.embed_tokens.weight": n((V, H), 1.0), "lm_head.weight": n((V, H), H ** -0.5),
         "model.norm.weight": n((H,), 0.1, 1.0)}
    for L in range(c["layers"]):
        p = f"model.layers.{L}."
        t.update({
            p + "input_layernorm.weight": n((H,), 0.1, 1.0),
            p + "post_attention_layernorm.weight": n((H,), 0.1, 1.0),
            p + "self_attn.q_proj.weight": n((Q, H), H ** -0.5),
            p + "self_attn.q_proj.bias": n((Q,), 0.1),
            p + "self_attn.k_proj.weight": n((KV, H), H ** -0.5),
            p + "self_attn.k_proj.bias": n((KV,), 0.1),
            p + "self_attn.v_proj.weight": n((KV, H), H ** -0.5),
            p + "self_attn.v_proj.bias": n((KV,), 0.1),
            p + "self_attn.o_proj.weight": n((H, Q), Q ** -0.5),
            p + "self_attn.o_proj.bias": n((H,), 0.02),
            p + "self_attn.sinks": n((c["heads"],), 1.0),
            p + "mlp.router.weight": n((E, H), H ** -0.5),
            p + "mlp.router.bias": n((E,), 0.1),
            p + "mlp.experts.gate_up_proj": n((E, H, 2 * I), H ** -0.5),
            p + "mlp.experts.gate_up_proj_bias": n((E, 2 * I), 0.05),
            p + "mlp.experts.down_proj": n((E, I, H), I ** -0.5),
            p + "mlp.experts.down_proj_bias": n((E, H), 0.02),
        })
    d = tmp_path_factory.mktemp("geo-hf")
    bnbref.write_safetensors(d / "model.safetensors", t)
    cfg = gen_fixture.hf_config(c)
    cfg["torch_dtype"] = "float16"
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


@pytest.mark.parametrize("n,feed", [(333, None), (700, 300)])
def test_real_head_geometry_matches_reference(gpu, bin_path, geo_dir, tmp_path, n, feed):
    """At head_dim 64 with 8 query heads a KV head: a prefill past the
    128-token window over several 64-key tiles (333 tokens: the last tile
    partly filled), or fed in pieces of 300 (later pieces start mid-tile,
    at positions > 0), then one decode step; both layer kinds (sliding,
    full) match the reference."""
    ref = gptoss_ref.Model(geo_dir)
    ids = prompt(n, seed=41)
    _, rows = drive(bin_path, geo_dir, ids, tmp_path, "--greedy", 2,
                    *(["--feed", feed] if feed else []))
    assert rows.shape == ((3 if feed else 1) + 1, V)    # a row a piece, then the step's
    assert rel_err(rows[-2], ref_prefill_last(ref, ids)) < TOL
    assert rel_err(rows[-1], ref.step(int(np.argmax(rows[-2])))) < TOL
