#!/usr/bin/env python3
"""gptoss_ref: a numpy reference forward pass of gpt-oss (docs/formats.md
section 3), for checking bnbfs-run and the mounted checkpoints.

What this is: a plain, readable implementation of GptOssForCausalLM's
inference math (transformers models/gpt_oss, openai/gpt-oss torch/model.py),
reading an HF-canonical checkpoint directory (config.json + safetensors,
sharded or not, F16/BF16/F32) with numpy and the safetensors library only.
It computes in float64 by default (float32 on request); every weight is
used exactly as stored.
What this is not: fast, or for the full-size model (it holds all weights as
float64 arrays). It shares no code with bnbfs, nor with tests/fixtures.

    model = Model(dir)
    model.forward(ids)   -> logits [n, vocab] of a full prefill (no cache)
    model.reset(); model.step(id) -> logits [vocab] of one decode step (KV cache)
    model.greedy(ids, n) -> (n generated ids, logits [n, vocab] that chose them)

CLI:
    gptoss_ref.py MODEL_DIR --ids "1 2 3" [--greedy N] [--logits-out FILE]
prints the last position's top-5 and, with --greedy N, the N generated ids.
--logits-out writes raw little-endian float32 rows of vocab values: the last
prompt position's logits, then the logits after each generated token but the
last, so row k is the distribution greedy token k+1 was taken from
(max(N, 1) rows).
"""
import argparse
import json
import math
import pathlib
import sys

import numpy as np

# ------------------------------------------------------------- loading

_NP = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}


def load_tensors(model_dir):
    """name -> float32 array of every tensor of an HF checkpoint directory."""
    import safetensors
    d = pathlib.Path(model_dir)
    idx = d / "model.safetensors.index.json"
    files = (sorted(set(json.loads(idx.read_text())["weight_map"].values()))
             if idx.exists() else ["model.safetensors"])
    out = {}
    for f in files:
        for name, t in safetensors.deserialize((d / f).read_bytes()):
            dt = t["dtype"]
            if dt not in _NP:
                raise ValueError(f"{d / f}: {name}: dtype {dt} is not a float the reference reads")
            a = np.frombuffer(bytes(t["data"]), dtype=_NP[dt]).reshape(t["shape"])
            if dt == "BF16":                         # bit patterns -> float32, exact
                a = (a.astype(np.uint32) << 16).view(np.float32)
            out[name] = a.astype(np.float32)
    return out


# ---------------------------------------------------------------- rope

def rope_parameters(cfg):
    """(inv_freq [head_dim/2] float64, attention_factor) from config values,
    following transformers' _compute_yarn_parameters (yarn) or the default."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    base = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype == "default":
        return 1.0 / pos_freqs, 1.0
    if rtype != "yarn":
        raise ValueError(f"rope_type {rtype!r}: only yarn and default are implemented")
    factor = float(rp["factor"])
    orig = rp.get("original_max_position_embeddings") or cfg["max_position_embeddings"]

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rp.get("attention_factor")
    if attention_factor is None:
        ms, msa = rp.get("mscale"), rp.get("mscale_all_dim")
        attention_factor = (get_mscale(factor, ms) / get_mscale(factor, msa)
                            if ms and msa else get_mscale(factor))
    beta_fast = rp.get("beta_fast") or 32
    beta_slow = rp.get("beta_slow") or 1

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):                  # transformers' default when absent
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    # ramp 0 (fast-rotating dims): the original frequency; ramp 1: interpolated by factor.
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * (1 - ramp)
    return inv_freq, float(attention_factor)


def apply_rope(x, pos, inv_freq, attn_factor):
    """x [n, heads, head_dim] at positions pos [n]; NeoX halves: dim i pairs
    with i + head_dim/2. cos and sin both carry the attention factor."""
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :]
    cos = (np.cos(ang) * attn_factor)[:, None, :].astype(x.dtype)
    sin = (np.sin(ang) * attn_factor)[:, None, :].astype(x.dtype)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ---------------------------------------------------------------- model

class Model:
    def __init__(self, model_dir, dtype=np.float64, overrides=None):
        """overrides: config keys to replace (tests use layer_types,
        sliding_window)."""
        self.dir = pathlib.Path(model_dir)
        cfg = json.loads((self.dir / "config.json").read_text())
        cfg.update(overrides or {})
        self.cfg = cfg
        self.dt = dtype
        self.H = cfg["hidden_size"]
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim") or self.H // self.nh
        self.nlayers = cfg["num_hidden_layers"]
        self.topk = cfg.get("num_experts_per_tok", cfg.get("experts_per_token"))
        self.eps = cfg.get("rms_norm_eps", 1e-5)
        self.limit = float(cfg.get("swiglu_limit", 7.0))
        self.alpha = float(cfg.get("swiglu_alpha", 1.702))
        self.window = cfg.get("sliding_window")
        self.layer_types = cfg.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.nlayers)]
        self.scale = self.hd ** -0.5
        self.inv_freq, self.attn_factor = rope_parameters(cfg)
        w = load_tensors(self.dir)
        self.w = {k: v.astype(dtype) for k, v in w.items()}
        self.reset()

    def reset(self):
        """Forget the KV cache (the next step() is position 0)."""
        self.cache = [([], []) for _ in range(self.nlayers)]   # per layer: k, v [pos, nkv, hd]
        self.pos = 0

    # -- blocks, usable one at a time by tests --

    def rmsnorm(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def sliding(self, L):
        return self.layer_types[L] == "sliding_attention"

    def qkv(self, L, h, pos):
        """Projected, rotated q [n, nh, hd] and k, v [n, nkv, hd] of normed h [n, H]."""
        p = f"model.layers.{L}.self_attn."
        w = self.w
        q = (h @ w[p + "q_proj.weight"].T + w[p + "q_proj.bias"]).reshape(-1, self.nh, self.hd)
        k = (h @ w[p + "k_proj.weight"].T + w[p + "k_proj.bias"]).reshape(-1, self.nkv, self.hd)
        v = (h @ w[p + "v_proj.weight"].T + w[p + "v_proj.bias"]).reshape(-1, self.nkv, self.hd)
        return (apply_rope(q, pos, self.inv_freq, self.attn_factor),
                apply_rope(k, pos, self.inv_freq, self.attn_factor), v)

    def attend(self, L, q, qpos, k, v, kpos, sinks=None):
        """Attention of queries q [n, nh, hd] at positions qpos over keys and
        values [m, nkv, hd] at kpos. Returns (out [n, nh*hd], probs [nh, n, m]);
        each head's sink logit joins the softmax denominator only, so a row
        of probs sums to less than 1."""
        sinks = self.w[f"model.layers.{L}.self_attn.sinks"] if sinks is None else sinks
        grp = self.nh // self.nkv
        kh = np.repeat(k, grp, axis=1)               # query head h reads kv head h // grp
        vh = np.repeat(v, grp, axis=1)
        s = np.einsum("qhd,khd->hqk", q, kh) * self.scale
        visible = kpos[None, :] <= qpos[:, None]
        if self.sliding(L):
            visible &= kpos[None, :] > qpos[:, None] - self.window
        s = np.where(visible[None], s, -np.inf)
        sink = sinks.reshape(-1, 1, 1)
        m = np.maximum(s.max(axis=-1, keepdims=True), sink)
        e = np.exp(s - m)
        probs = e / (e.sum(axis=-1, keepdims=True) + np.exp(sink - m))
        out = np.einsum("hqk,khd->qhd", probs, vh).reshape(q.shape[0], -1)
        return out, probs

    def route(self, L, h):
        """(indices [n, k], weights [n, k], logits [n, E]): the top-k experts by
        router logit, highest first, weights a softmax over those k only."""
        p = f"model.layers.{L}.mlp.router."
        logits = h @ self.w[p + "weight"].T + self.w[p + "bias"]
        idx = np.argsort(-logits, axis=-1, kind="stable")[:, :self.topk]
        top = np.take_along_axis(logits, idx, axis=-1)
        e = np.exp(top - top.max(axis=-1, keepdims=True))
        return idx, e / e.sum(axis=-1, keepdims=True), logits

    def expert(self, L, e, h):
        """Output [n, H] of expert e on normed h [n, H]."""
        p = f"model.layers.{L}.mlp.experts."
        gu = h @ self.w[p + "gate_up_proj"][e] + self.w[p + "gate_up_proj_bias"][e]
        gate = np.minimum(gu[..., 0::2], self.limit)            # columns interleave gate/up
        up = np.clip(gu[..., 1::2], -self.limit, self.limit)
        glu = gate / (1.0 + np.exp(-self.alpha * gate))          # gate * sigmoid(alpha * gate)
        return ((up + 1.0) * glu) @ self.w[p + "down_proj"][e] + self.w[p + "down_proj_bias"][e]

    def moe(self, L, h):
        idx, wts, _ = self.route(L, h)
        out = np.zeros_like(h)
        for e in np.unique(idx):
            tok, slot = np.nonzero(idx == e)
            out[tok] += wts[tok, slot][:, None] * self.expert(L, int(e), h[tok])
        return out

    def layer(self, L, x, pos, cache=None):
        """One decoder layer on x [n, H] at positions pos; cache (k list, v
        list) holds earlier positions and receives these."""
        p = f"model.layers.{L}."
        h = self.rmsnorm(x, self.w[p + "input_layernorm.weight"])
        q, k, v = self.qkv(L, h, pos)
        if cache is not None:
            ck, cv = cache
            ck.append(k)
            cv.append(v)
            k, v = np.concatenate(ck), np.concatenate(cv)
        kpos = np.arange(pos[-1] + 1 - k.shape[0], pos[-1] + 1)
        a, _ = self.attend(L, q, pos, k, v, kpos)
        x = x + a @ self.w[p + "self_attn.o_proj.weight"].T + self.w[p + "self_attn.o_proj.bias"]
        h = self.rmsnorm(x, self.w[p + "post_attention_layernorm.weight"])
        return x + self.moe(L, h)

    def hidden_to_logits(self, x):
        x = self.rmsnorm(x, self.w["model.norm.weight"])
        return x @ self.w["lm_head.weight"].T

    # -- whole model --

    def _ids(self, ids):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        V = self.w["model.embed_tokens.weight"].shape[0]
        if ids.size == 0 or ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"token ids must be non-empty and in [0, {V})")
        return ids

    def forward(self, ids):
        """Logits [n, vocab] of a full prefill of ids (the cache is untouched)."""
        ids = self._ids(ids)
        pos = np.arange(ids.size)
        x = self.w["model.embed_tokens.weight"][ids]
        for L in range(self.nlayers):
            x = self.layer(L, x, pos)
        return self.hidden_to_logits(x)

    def prefill(self, ids):
        """Feed ids after the cached positions; logits [n, vocab]."""
        ids = self._ids(ids)
        pos = np.arange(self.pos, self.pos + ids.size)
        x = self.w["model.embed_tokens.weight"][ids]
        for L in range(self.nlayers):
            x = self.layer(L, x, pos, self.cache[L])
        self.pos += ids.size
        return self.hidden_to_logits(x)

    def step(self, token):
        """One decode step with the KV cache: logits [vocab] at the next position."""
        return self.prefill([int(token)])[0]

    def greedy(self, ids, n):
        """Greedy generation of n tokens after ids (resets the cache).
        Returns (ids [n], logits [max(n, 1), vocab]): row k chose token k."""
        self.reset()
        rows = [self.prefill(ids)[-1]]
        out = []
        for i in range(n):
            out.append(int(np.argmax(rows[-1])))
            if i + 1 < n:
                rows.append(self.step(out[-1]))
        return np.array(out, dtype=np.int64), np.stack(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description="numpy reference forward pass of gpt-oss")
    ap.add_argument("model_dir")
    ap.add_argument("--ids", required=True, help='prompt token ids, e.g. "1 2 3"')
    ap.add_argument("--greedy", type=int, default=0, metavar="N", help="generate N tokens")
    ap.add_argument("--logits-out", metavar="FILE", help="write float32 logits rows (see module doc)")
    ap.add_argument("--f32", action="store_true", help="compute in float32 instead of float64")
    a = ap.parse_args(argv)
    try:
        ids = [int(t) for t in a.ids.replace(",", " ").split()]
    except ValueError:
        ap.error(f"--ids: not a list of integers: {a.ids!r}")
    m = Model(a.model_dir, dtype=np.float32 if a.f32 else np.float64)
    gen, rows = m.greedy(ids, a.greedy)
    last = rows[0]
    top = np.argsort(-last, kind="stable")[:5]
    print("top5 " + " ".join(f"{int(t)}:{last[t]:.6f}" for t in top))
    if a.greedy:
        print("greedy " + " ".join(str(int(t)) for t in gen))
    if a.logits_out:
        rows.astype("<f4").tofile(a.logits_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
