"""The numpy gpt-oss reference (tests/ref/gptoss_ref.py) on the tiny
fixture: decode with the KV cache equals a full prefill, the sliding window
cuts exactly at its edge on sliding layers only, sinks take attention mass,
the router takes the top k, YaRN has the documented constants. The
comparison with transformers itself is tests/ref/check_vs_transformers.py
(not in CI: it needs torch)."""
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import bnbref

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "ref"))
import gptoss_ref  # noqa: E402

REF = pathlib.Path(__file__).resolve().parent / "ref" / "gptoss_ref.py"


@pytest.fixture(scope="module")
def model(tiny):
    return gptoss_ref.Model(tiny / "expected")


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(11).integers(0, 201088, size=24)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_decode_with_kv_cache_equals_full_prefill(model, ids):
    full = model.forward(ids)
    model.reset()
    steps = np.stack([model.step(t) for t in ids])
    assert rel(steps, full) < 1e-12
    model.reset()
    chunked = np.concatenate([model.prefill(ids[:7]), model.prefill(ids[7:15]),
                              np.stack([model.step(t) for t in ids[15:]])])
    assert rel(chunked, full) < 1e-12
    # and the logits are not degenerate: positions differ, the vocab spreads
    assert np.abs(full[3] - full[4]).max() > 0.1 and full.std() > 0.05


def test_sliding_layer_sees_exactly_the_last_window_keys(model):
    g = np.random.default_rng(5)
    n, w = 14, model.window
    assert model.sliding(0) and not model.sliding(1) and w == 8
    q = g.normal(size=(n, model.nh, model.hd))
    k = g.normal(size=(n, model.nkv, model.hd))
    v = g.normal(size=(n, model.nkv, model.hd))
    pos = np.arange(n)
    for L in (0, 1):
        base, _ = model.attend(L, q, pos, k, v, pos)
        for j in range(n):
            k2, v2 = k.copy(), v.copy()
            k2[j] += 1.0
            v2[j] += 1.0
            out, _ = model.attend(L, q, pos, k2, v2, pos)
            changed = np.abs(out - base).max(axis=1) > 1e-12
            if model.sliding(L):
                want = (pos >= j) & (pos - j < w)     # keys q-w+1 .. q
            else:
                want = pos >= j
            assert changed.tolist() == want.tolist(), (L, j)


def test_token_past_the_window_stops_mattering_only_when_all_layers_slide(tiny, ids):
    w = 8
    base_ids = ids.copy()
    other = ids.copy()
    other[0] = (ids[0] + 1) % 201088
    # real layer types: a full layer carries token 0 to every position
    m = gptoss_ref.Model(tiny / "expected")
    d = np.abs(m.forward(base_ids) - m.forward(other)).max(axis=1)
    assert np.all(d > 0)
    # all three layers sliding: token 0 reaches at most 3 * (w - 1) positions ahead
    ms = gptoss_ref.Model(tiny / "expected", overrides={"layer_types": ["sliding_attention"] * 3})
    d = np.abs(ms.forward(base_ids) - ms.forward(other)).max(axis=1)
    reach = 3 * (w - 1)
    assert np.all(d[:reach + 1] > 0)
    assert np.all(d[reach + 1:] == 0) and len(d) > reach + 1


def test_sinks_take_mass_from_the_keys(model):
    g = np.random.default_rng(9)
    n = 6
    q = g.normal(size=(n, model.nh, model.hd))
    k = g.normal(size=(n, model.nkv, model.hd))
    v = g.normal(size=(n, model.nkv, model.hd))
    pos = np.arange(n)
    sinks = model.w["model.layers.1.self_attn.sinks"]
    _, p = model.attend(1, q, pos, k, v, pos)
    mass = p.sum(axis=-1)                           # [heads, queries]
    assert np.all(mass < 1) and np.all(mass > 0)
    # the missing mass is the sink's share of the softmax
    kh = np.repeat(k, model.nh // model.nkv, axis=1)
    s = np.einsum("qhd,khd->hqk", q, kh) * model.scale
    s = np.where(pos[None, None, :] <= pos[None, :, None], s, -np.inf)
    share = np.exp(sinks)[:, None] / (np.exp(sinks)[:, None] + np.exp(s).sum(axis=-1))
    assert np.allclose(1 - mass, share, rtol=1e-12, atol=0)
    # no sink (-inf): a plain softmax; larger sinks: less mass
    _, p0 = model.attend(1, q, pos, k, v, pos, sinks=np.full(model.nh, -np.inf))
    assert np.allclose(p0.sum(axis=-1), 1, rtol=0, atol=1e-14)
    _, p2 = model.attend(1, q, pos, k, v, pos, sinks=sinks + 1)
    assert np.all(p2.sum(axis=-1) < mass)


def test_router_picks_top_k_and_softmaxes_over_them(model):
    g = np.random.default_rng(4)
    h = g.normal(size=(32, model.H))
    idx, wts, logits = model.route(0, h)
    assert idx.shape == (32, model.topk) == wts.shape
    for t in range(32):
        order = sorted(range(logits.shape[1]), key=lambda e: -logits[t, e])
        assert idx[t].tolist() == order[:model.topk]
        z = np.exp(logits[t, idx[t]] - logits[t, idx[t]].max())
        assert np.allclose(wts[t], z / z.sum(), rtol=1e-14)
    # the MoE output is the weighted sum of the chosen experts only
    out = model.moe(0, h)
    want = np.stack([sum(wts[t, j] * model.expert(0, int(idx[t, j]), h[t:t + 1])[0]
                         for j in range(model.topk)) for t in range(32)])
    assert np.allclose(out, want, rtol=1e-12, atol=1e-14)
    assert len(np.unique(idx)) == logits.shape[1]  # every expert is chosen by some token


def test_swiglu_clamp_bites_on_the_tiny_fixture(model):
    """The fixture has an expert large enough that gate/up leave [-7, 7]: the
    reference's clamp order matters for its logits (and for the runner's)."""
    g = np.random.default_rng(2)
    h = model.rmsnorm(g.normal(size=(64, model.H)), 1.0)
    p = "model.layers.0.mlp.experts."
    E = model.w[p + "gate_up_proj"].shape[0]
    gu = np.stack([h @ model.w[p + "gate_up_proj"][e] + model.w[p + "gate_up_proj_bias"][e]
                   for e in range(E)])
    assert (gu[..., 0::2] > 7).any() and (np.abs(gu[..., 1::2]) > 7).any()
    clamped = model.expert(0, E - 1, h)
    model.limit = 1e9
    try:
        free = model.expert(0, E - 1, h)
    finally:
        model.limit = 7.0
    assert np.abs(clamped - free).max() > 1e-3


def test_yarn_matches_the_documented_gpt_oss_constants():
    cfg = {"hidden_size": 2880, "num_attention_heads": 64, "head_dim": 64, "rope_theta": 150000,
           "max_position_embeddings": 131072,
           "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                            "original_max_position_embeddings": 4096, "truncate": False}}
    inv, af = gptoss_ref.rope_parameters(cfg)
    assert af == pytest.approx(1.3465735902799727, rel=1e-15)
    low, high = 8.092779115512402, 17.39802450158856
    j = np.arange(32)
    ramp = np.clip((j - low) / (high - low), 0, 1)
    f = 150000.0 ** (2 * j / 64)
    assert np.allclose(inv, (1 / (32 * f)) * ramp + (1 / f) * (1 - ramp), rtol=1e-14)
    assert inv[0] == 1.0 and inv[31] == pytest.approx(1 / (32 * f[31]), rel=1e-14)
    # truncate (transformers' default when the key is absent) floors/ceils the range
    cfg["rope_scaling"].pop("truncate")
    inv_t, _ = gptoss_ref.rope_parameters(cfg)
    ramp_t = np.clip((j - 8) / (18 - 8), 0, 1)
    assert np.allclose(inv_t, (1 / (32 * f)) * ramp_t + (1 / f) * (1 - ramp_t), rtol=1e-14)


def test_rope_rotates_neox_halves_and_keeps_relative_positions(model):
    g = np.random.default_rng(8)
    q = g.normal(size=(1, 1, model.hd))
    k = g.normal(size=(1, 1, model.hd))
    af = model.attn_factor

    def dot(pq, pk):
        a = gptoss_ref.apply_rope(q, np.array([pq]), model.inv_freq, af)
        b = gptoss_ref.apply_rope(k, np.array([pk]), model.inv_freq, af)
        return float((a * b).sum())
    assert dot(5, 2) == pytest.approx(dot(103, 100), rel=1e-10)
    # position 0 only scales by the attention factor; pairs are (i, i + hd/2)
    assert np.allclose(gptoss_ref.apply_rope(q, np.array([0]), model.inv_freq, af), q * af)
    r = gptoss_ref.apply_rope(q, np.array([1]), model.inv_freq, af)[0, 0]
    h = model.hd // 2
    c, s = math.cos(model.inv_freq[0]) * af, math.sin(model.inv_freq[0]) * af
    assert r[0] == pytest.approx(q[0, 0, 0] * c - q[0, 0, h] * s, rel=1e-12)
    assert r[h] == pytest.approx(q[0, 0, h] * c + q[0, 0, 0] * s, rel=1e-12)


def test_loads_bf16_and_f32_checkpoints_too(tiny, tmp_path, ids):
    ref16 = gptoss_ref.Model(tiny / "expected").forward(ids[:10])
    cfg = json.loads((tiny / "expected" / "config.json").read_text())
    for dt in ("bf16", "f32"):
        d = tmp_path / dt
        d.mkdir()
        t = bnbref.expected_tensors(tiny / "src", dt)
        bnbref.write_safetensors(d / "model.safetensors", t, bf16=set(t) if dt == "bf16" else ())
        (d / "config.json").write_text(json.dumps(cfg))
        logits = gptoss_ref.Model(d).forward(ids[:10])
        err = rel(logits, ref16)
        assert err < (5e-2 if dt == "bf16" else 1e-2), (dt, err)
        assert err > 0                               # the weights did differ


def test_cli_greedy_and_logits_file(tiny, tmp_path, model):
    out = tmp_path / "logits.f32"
    r = subprocess.run([sys.executable, str(REF), str(tiny / "expected"), "--ids", "200006 17360 200008 13",
                        "--greedy", "3", "--logits-out", str(out)],
                       capture_output=True, text=True, check=True)
    gen_line = next(line for line in r.stdout.splitlines() if line.startswith("greedy "))
    gen = [int(t) for t in gen_line.split()[1:]]
    rows = np.fromfile(out, dtype="<f4").reshape(-1, 201088)
    assert rows.shape[0] == 3
    assert [int(np.argmax(x)) for x in rows] == gen
    want_ids, want_rows = model.greedy([200006, 17360, 200008, 13], 3)
    assert gen == want_ids.tolist()
    assert rel(rows, want_rows) < 1e-6
    bad = subprocess.run([sys.executable, str(REF), str(tiny / "expected"), "--ids", "1 x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--ids" in bad.stderr
