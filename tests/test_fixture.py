"""The tiny fixture (tests/fixtures/gen_fixture.py) and the numpy reference
for bitsandbytes 4-bit (tests/fixtures/bnbref.py): the generated checkpoint
has the real on-disk format and every special case of docs/DESIGN.md, and the
reference's tables, rounding and mapping are right. Everything else in bnbfs
is judged against these two, so they are checked here against known values
and against slow, separate re-derivations."""
import json
import pathlib
import struct

import numpy as np
import pytest
import safetensors
from safetensors import safe_open

import bnbref
import gen_fixture

TINY_CFG = gen_fixture.SIZES["tiny"]

# bitsandbytes 0.48.1 functional.create_dynamic_map(signed=True) (float32 bit
# patterns, as torch computes it on x86), the nested_quant_map of every
# double-quantized weight.
BNB_DYNAMIC_MAP_HEX = """
    bf7e3333 bf7a999a bf770000 bf736666 bf6fcccd bf6c3333 bf68999a bf650000 bf616666 bf5dcccd
    bf5a3333 bf56999a bf530000 bf4f6666 bf4bcccd bf483333 bf44999a bf410000 bf3d6666 bf39cccd
    bf363334 bf32999a bf2f0000 bf2b6666 bf27cccd bf243334 bf20999a bf1d0000 bf196666 bf15cccd
    bf123334 bf0e999a bf0b0000 bf076666 bf03cccc bf003333 bef93332 bef20000 beeacccc bee3999a
    bedc6666 bed53333 bece0000 bec6cccc bebf999a beb86666 beb13333 beaa0000 bea2cccc be9b999a
    be946666 be8d3334 be860000 be7d9999 be6f3333 be60cccd be526666 be440000 be35999a be273333
    be18cccd be0a6666 bdf80000 bddb3334 bdc9eb85 bdc428f7 bdbe6667 bdb8a3d7 bdb2e148 bdad1eb8
    bda75c2a bda1999a bd9bd70a bd96147b bd9051eb bd8a8f5d bd84cccd bd7e147b bd728f5d bd670a3d
    bd5b851f bd500000 bd447ae1 bd38f5c3 bd2d70a3 bd21eb85 bd166667 bd0ae148 bcfeb852 bce7ae15
    bcd0a3d7 bcb9999a bca28f5d bc8b851f bc68f5c3 bc3ae148 bc1f3b64 bc160418 bc0ccccd bc039581
    bbf4bc6a bbe24dd3 bbcfdf3b bbbd70a4 bbab020d bb989374 bb8624dd bb676c8a bb428f5c bb1db22d
    baf1a9fc baa7ef9d ba7765ff ba59e83e ba3c6a80 ba1eecc1 ba016f01 b9c7e283 b98ce705 b923d70b
    b8ba1f4b b88aefb3 b8378034 b7b24206 b70205ff b65a1a94 b513a3b7 00000000 3513a3b7 365a1a94
    370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1
    3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d 3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374
    3bab020d 3bbd70a4 3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148
    3c68f5c3 3c8b851f 3ca28f5d 3cb9999a 3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 3d166667 3d21eb85
    3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d 3d728f5d 3d7e147b 3d84cccd 3d8a8f5d
    3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 3dbe6667 3dc428f7
    3dc9eb85 3ddb3334 3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd
    3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000 3eb13333 3eb86666
    3ebf999a 3ec6cccc 3ece0000 3ed53333 3edc6666 3ee3999a 3eeacccc 3ef20000 3ef93332 3f003333
    3f03cccc 3f076666 3f0b0000 3f0e999a 3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334
    3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd 3f3d6666 3f410000 3f44999a 3f483333
    3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 3f68999a 3f6c3333
    3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333 3f800000
"""


@pytest.fixture(scope="module")
def src(tiny):
    return tiny / "src"


@pytest.fixture(scope="module")
def shards(src):
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    files = sorted(set(idx["weight_map"].values()))
    return {f: bnbref.read_safetensors(src / f) for f in files}


@pytest.fixture(scope="module")
def tensors(shards):
    out = {}
    for t in shards.values():
        out.update(t)
    return out


def shard_of(shards, name):
    return next(f for f, t in shards.items() if name in t)


def qweights(tensors):
    return sorted(k.split(".quant_state.")[0] for k in tensors if ".quant_state.bitsandbytes__" in k)


# ----------------------------------------------------------- on-disk format

def test_shards_are_valid_safetensors_with_pt_metadata_and_padded_header(src, shards):
    assert sorted(shards) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for f in shards:
        raw = (src / f).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0, f"{f}: header length {n} not padded to 8"
        header = json.loads(raw[8:8 + n])
        assert header["__metadata__"] == {"format": "pt"}
        # data tiles the buffer exactly (the reference reader's rule)
        spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
        assert spans[0][0] == 0 and 8 + n + spans[-1][1] == len(raw)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        with safe_open(str(src / f), framework="numpy") as h:
            assert h.metadata() == {"format": "pt"}
            assert sorted(h.keys()) == sorted(shards[f])


def test_index_weight_map_and_total_size_are_exact(src, shards):
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    expect = {name: f for f, t in shards.items() for name in t}
    assert idx["weight_map"] == expect
    assert idx["metadata"]["total_size"] == sum(a.nbytes for t in shards.values() for _, a in t.values())


def test_tensor_names_and_dtypes_are_the_unsloth_layout(tensors):
    c = TINY_CFG
    plain = {n: dt for n, (dt, _) in tensors.items() if not bnbref.is_companion(n)}
    assert plain["model.embed_tokens.weight"] == "BF16"
    assert tensors["model.embed_tokens.weight"][1].shape == (201088, 64)
    assert tensors["lm_head.weight"][1].shape == (201088, 64)
    for L in range(c["layers"]):
        p = f"model.layers.{L}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.sinks",
                  "mlp.router.linear.weight", "mlp.router.linear.bias",
                  "self_attn.q_proj.bias", "self_attn.o_proj.bias"):
            assert plain[p + n] == "BF16", p + n
        for proj in "qkvo":
            assert plain[p + f"self_attn.{proj}_proj.weight"] == "U8"
        for e in range(c["experts"]):
            assert plain[p + f"mlp.experts.gate_up_projs.{e}.weight"] == "U8"
            assert tensors[p + f"mlp.experts.gate_up_projs.{e}.bias"][1].shape == (272,)
            assert tensors[p + f"mlp.experts.down_projs.{e}.bias"][1].shape == (64,)
        assert not any(k.startswith(p + "mlp.router.weight") for k in tensors)
    n_plain = 3 + c["layers"] * (4 * 2 + 1 + 2 + 2 + 4 * c["experts"])
    assert len(plain) == n_plain


def test_every_4bit_weight_has_its_companions_with_consistent_sizes(tensors):
    ws = qweights(tensors)
    assert len(ws) == 3 * (4 + 2 * 5)
    for w in ws:
        st = bnbref.qstate_of(tensors, w)
        n = int(np.prod(st["shape"]))
        nb = -(-n // st["blocksize"])
        assert tensors[w][0] == "U8" and tensors[w][1].shape == ((n + 1) // 2, 1), w
        assert tensors[w + ".quant_map"][0] == "F32"
        assert np.array_equal(tensors[w + ".quant_map"][1], bnbref.TABLES[st["quant_type"]])
        if "nested_blocksize" in st:
            assert tensors[w + ".absmax"][0] == "U8" and tensors[w + ".absmax"][1].shape == (nb,)
            assert tensors[w + ".nested_absmax"][1].shape == (-(-nb // 256),)
            assert tensors[w + ".nested_quant_map"][1].shape == (256,)
        else:
            assert tensors[w + ".absmax"][0] == "F32" and tensors[w + ".absmax"][1].shape == (nb,)
            assert w + ".nested_absmax" not in tensors and w + ".nested_quant_map" not in tensors


def test_quant_state_json_is_bitsandbytes_packed_format(tensors):
    w = "model.layers.0.self_attn.q_proj.weight"
    blob = bytes(tensors[w + ".quant_state.bitsandbytes__nf4"][1])
    st = json.loads(blob)
    # QuantState.as_dict(packed=True): json.dumps in this key order, default separators
    assert list(st) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                        "nested_dtype", "nested_offset"]
    assert blob.startswith(b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", '
                           b'"shape": [64, 64], "nested_blocksize": 256, "nested_dtype": "float32", '
                           b'"nested_offset": ')
    assert isinstance(st["nested_offset"], float)
    # the offset is the mean of the block absmax (within double-quant error)
    a = bnbref.block_scales(tensors, w, st)
    assert abs(st["nested_offset"] - a.mean()) < 0.01 * a.mean()


def test_special_cases_of_the_tiny_fixture(tensors, shards):
    v0 = bnbref.qstate_of(tensors, "model.layers.0.self_attn.v_proj.weight")
    assert "nested_blocksize" not in v0 and v0["blocksize"] == 64
    o1 = bnbref.qstate_of(tensors, "model.layers.1.self_attn.o_proj.weight")
    assert o1["blocksize"] == 128 and o1["quant_type"] == "nf4"
    k2 = "model.layers.2.self_attn.k_proj.weight"
    assert k2 + ".quant_state.bitsandbytes__fp4" in tensors
    assert bnbref.qstate_of(tensors, k2)["quant_type"] == "fp4"
    # down_projs Linear [64, 136]: 136 is not a multiple of 64, blocks cross rows
    dn = bnbref.qstate_of(tensors, "model.layers.0.mlp.experts.down_projs.0.weight")
    assert dn["shape"] == [64, 136] and 136 % dn["blocksize"] != 0
    # gate_up Linear [272, 64]: 272 blocks, two nested blocks
    gu = "model.layers.0.mlp.experts.gate_up_projs.0.weight"
    assert bnbref.qstate_of(tensors, gu)["shape"] == [272, 64]
    assert tensors[gu + ".absmax"][1].shape == (272,) and tensors[gu + ".nested_absmax"][1].shape == (2,)
    # every other weight: nf4, blocksize 64, nested 256
    for w in qweights(tensors):
        if w in gen_fixture.TINY_SPECIAL:
            continue
        st = bnbref.qstate_of(tensors, w)
        assert (st["quant_type"], st["blocksize"], st.get("nested_blocksize")) == ("nf4", 64, 256), w
    # companions stored in another shard than their codes
    assert len(gen_fixture.TINY_MOVED) >= 3
    for comp in gen_fixture.TINY_MOVED:
        w = bnbref.COMPANION_RE.match(comp)["w"]
        assert shard_of(shards, comp) != shard_of(shards, w), comp


def test_config_and_passthrough_files(src):
    cfg = json.loads((src / "config.json").read_text())
    c = TINY_CFG
    assert cfg["model_type"] == "gpt_oss" and cfg["architectures"] == ["GptOssForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
            cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"], cfg["sliding_window"]) == (
        c["hidden"], c["intermediate"], c["layers"], c["experts"], c["topk"], c["heads"],
        c["kv_heads"], c["head_dim"], c["vocab"], c["window"])
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert cfg["rope_scaling"] == {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                   "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                   "truncate": False}
    assert (cfg["rope_theta"], cfg["swiglu_limit"], cfg["torch_dtype"]) == (150000, 7.0, "bfloat16")
    q = cfg["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["load_in_4bit"] is True
    assert q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"] is True
    assert q["bnb_4bit_compute_dtype"] == "bfloat16" and q["bnb_4bit_quant_storage"] == "uint8"
    assert "lm_head" in q["llm_int8_skip_modules"]
    tok = json.loads((src / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and len(tok["added_tokens"]) == 21
    for f in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "README.md"):
        assert (src / f).stat().st_size > 0, f


def test_generation_is_deterministic_for_a_seed(tmp_path, src):
    gen_fixture.generate("tiny", tmp_path / "again", 0, log=lambda m: None)
    for f in sorted(src.iterdir()):
        assert (tmp_path / "again" / "src" / f.name).read_bytes() == f.read_bytes(), f.name
    assert (tmp_path / "again" / ".complete").exists()


def test_refuses_a_non_empty_output_dir(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(SystemExit):
        gen_fixture.generate("tiny", tmp_path, 0, log=lambda m: None)
    assert (tmp_path / "x").read_text() == "keep me"


# ------------------------------------------------------- tables and maps

def test_dynamic_map_equals_the_values_bitsandbytes_produces():
    known = np.array([int(h, 16) for h in BNB_DYNAMIC_MAP_HEX.split()], dtype=np.uint32)
    assert known.size == 256
    assert np.array_equal(bnbref.create_dynamic_map().view(np.uint32), known)
    m = known.view(np.float32)
    assert m[0] == np.float32(-0.99296875) and m[-1] == 1.0 and np.all(np.diff(m) > 0)


def test_fp4_table_is_float32_of_twelfths_and_equals_the_cuda_literals():
    for code in range(16):
        c = bnbref.FP4_TWELFTHS[code]
        assert bnbref.FP4[code] == np.float32(c / 12)
        assert np.signbit(bnbref.FP4[code]) == (code >= 8)
        lit = np.float32(bnbref.FP4_CUDA_LITERALS[code & 7])
        assert abs(bnbref.FP4[code]) == lit, (code, bnbref.FP4_CUDA_LITERALS[code & 7])


def test_nf4_table_is_sorted_and_spans_minus_one_to_one():
    assert np.all(np.diff(bnbref.NF4) > 0)
    assert bnbref.NF4[0] == -1 and bnbref.NF4[7] == 0 and bnbref.NF4[15] == 1
    assert bnbref.NF4.dtype == np.float32


def test_nibble_packing_is_high_nibble_first():
    packed = bnbref.pack_nibbles(np.array([1, 2, 3, 4, 15], np.uint8))
    assert packed.reshape(-1).tolist() == [0x12, 0x34, 0xF0]
    assert bnbref.unpack_nibbles(packed, 5).tolist() == [1, 2, 3, 4, 15]


def test_quantize_uses_the_midpoint_rule():
    t = bnbref.NF4
    mids = (t[:-1] + t[1:]) / np.float32(2)
    y = np.concatenate([t, mids, np.nextafter(mids, np.float32(2))]).astype(np.float32)
    y = np.append(y, np.float32(1.0))               # absmax element of the block
    q = bnbref.quantize_4bit(y.reshape(1, -1), blocksize=64, nested=False)
    codes = bnbref.unpack_nibbles(q[""], y.size)
    assert codes[:16].tolist() == list(range(16))   # table values map to themselves
    assert codes[16:31].tolist() == list(range(15))  # exactly on a midpoint: the lower code
    assert codes[31:46].tolist() == list(range(1, 16))  # just above: the upper code


# ---------------------------------------------------------- rounding rule

def _edge_values():
    g = np.random.default_rng(7)
    with np.errstate(invalid="ignore"):
        x = _edge_values_raw(g)
    return x[np.isfinite(x)]


def _edge_values_raw(g):
    return np.concatenate([
        g.normal(0, 1, 20000).astype(np.float32) * np.float32(10) ** g.integers(-9, 6, 20000),
        g.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        # exact ties between representable f16 / bf16 neighbours
        (np.arange(1, 2000, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0 ** -10),
        (np.arange(256, 512, dtype=np.float32) + np.float32(0.5)),
        np.float32([6.1e-5, 5.96e-8, 2.98e-8, 65504, 65519.99, 65520, 3.39e38, 3.3895e38]),
    ]).astype(np.float32)


@pytest.mark.parametrize("out", ["f16", "bf16"])
def test_rounding_is_one_round_to_nearest_even(out):
    x = _edge_values()
    got, _ = bnbref.to_out(x, out)
    want = bnbref.round_generic(x, out)
    fmax = 65504.0 if out == "f16" else float(bnbref.bf16_to_f32(np.uint16(0x7F7F)))
    fin = np.abs(want) <= fmax
    g = got.astype(np.float64) if out == "f16" else bnbref.bf16_to_f32(got).astype(np.float64)
    assert np.array_equal(g[fin], want[fin])
    assert np.array_equal(np.signbit(g[fin]), np.signbit(want[fin]))
    assert np.all(np.abs(g[~fin]) == fmax)


@pytest.mark.parametrize("out,big,maxbits", [("f16", 70000.0, 0x7BFF), ("bf16", 3.4e38, 0x7F7F)])
def test_saturation_clamps_counts_and_passes_inf_nan(out, big, maxbits):
    x = np.array([big, -big, np.inf, -np.inf, np.nan, 1.0], dtype=np.float32)
    r, n = bnbref.to_out(x, out)
    bits = r.view(np.uint16)
    assert n == 2
    assert bits[0] == maxbits and bits[1] == maxbits | 0x8000
    assert bits[2] == (0x7C00 if out == "f16" else 0x7F80)
    assert bits[3] == (0xFC00 if out == "f16" else 0xFF80)
    v = r.astype(np.float32) if out == "f16" else bnbref.bf16_to_f32(r)
    assert np.isnan(v[4]) and v[5] == 1.0


def test_plain_conversions_between_float_dtypes():
    b = bnbref.f32_to_bf16_rne(np.float32([1.5, -2.25, 3e38, 1e-40]))
    r, n = bnbref.convert("BF16", b, "f16")
    assert r.tolist() == [1.5, -2.25, 65504.0, 0.0] and n == 1
    r, n = bnbref.convert("F16", np.float16([1.0009765625, -65504]), "bf16")
    # 1 + 2^-10 is a tie between bf16 neighbours 1 and 1 + 2^-7: even is 1
    assert bnbref.bf16_to_f32(r).tolist() == [1.0, -65536.0] and n == 0
    r, n = bnbref.convert("F64", np.float64([1e300, 1 + 2.0 ** -30]), "f32")
    assert r[0] == np.finfo(np.float32).max and r[1] == 1.0 and n == 1
    # F64 -> BF16 rounds once: just above a tie goes up, not to even
    r, _ = bnbref.convert("F64", np.float64([1 + 2.0 ** -8 + 2.0 ** -40]), "bf16")
    assert bnbref.bf16_to_f32(r)[0] == np.float32(1 + 2.0 ** -7)


# ------------------------------------------------- dequantization, mapping

def _scalar_dequant(tensors, w, k):
    """Element k of 4-bit weight w, one element at a time from the raw bytes."""
    st = bnbref.qstate_of(tensors, w)
    byte = int(tensors[w][1].reshape(-1)[k // 2])
    nib = byte >> 4 if k % 2 == 0 else byte & 15
    b = k // st["blocksize"]
    if "nested_blocksize" in st:
        code = int(tensors[w + ".absmax"][1][b])
        a = np.float32(tensors[w + ".nested_quant_map"][1][code]
                       * tensors[w + ".nested_absmax"][1][b // st["nested_blocksize"]])
        a = np.float32(a + np.float32(st["nested_offset"]))
    else:
        a = np.float32(tensors[w + ".absmax"][1][b])
    return np.float32(tensors[w + ".quant_map"][1][nib] * a)


def test_expected_file_matches_element_by_element_dequantization(tiny, tensors):
    exp = bnbref.read_safetensors(tiny / "expected" / "model.safetensors")
    c = TINY_CFG
    E, H, I = c["experts"], c["hidden"], c["intermediate"]
    assert exp["model.layers.1.mlp.experts.gate_up_proj"][1].shape == (E, H, 2 * I)
    assert exp["model.layers.1.mlp.experts.down_proj"][1].shape == (E, I, H)
    assert exp["model.layers.1.mlp.experts.gate_up_proj_bias"][1].shape == (E, 2 * I)
    assert exp["model.layers.1.mlp.experts.down_proj_bias"][1].shape == (E, H)
    assert exp["model.layers.1.mlp.router.weight"][1].shape == (E, H)
    assert all(dt == "F16" for dt, _ in exp.values())
    assert not any(bnbref.is_companion(n) or ".linear." in n or "projs" in n for n in exp)
    g = np.random.default_rng(3)
    cases = []
    for L in range(3):
        for e in range(E):
            for r, col in zip(g.integers(0, H, 4), g.integers(0, 2 * I, 4)):
                cases.append((f"model.layers.{L}.mlp.experts.gate_up_proj", (e, r, col),
                              f"model.layers.{L}.mlp.experts.gate_up_projs.{e}.weight", col * H + r))
            for r, col in zip(g.integers(0, I, 4), g.integers(0, H, 4)):
                cases.append((f"model.layers.{L}.mlp.experts.down_proj", (e, r, col),
                              f"model.layers.{L}.mlp.experts.down_projs.{e}.weight", col * I + r))
        for proj, (o, i) in {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64)}.items():
            for k in list(g.integers(0, o * i, 6)) + [0, o * i - 1]:
                name = f"model.layers.{L}.self_attn.{proj}_proj.weight"
                cases.append((name, (k // i, k % i), name, k))
    for out_name, at, w, k in cases:
        want = np.float16(_scalar_dequant(tensors, w, int(k)))
        got = exp[out_name][1][at]
        assert got.view(np.uint16) == want.view(np.uint16), (out_name, at)
    # stacked biases and renamed router: bit-exact BF16 -> F16
    b = tensors["model.layers.2.mlp.experts.down_projs.3.bias"][1]
    assert np.array_equal(exp["model.layers.2.mlp.experts.down_proj_bias"][1][3],
                          bnbref.bf16_to_f32(b).astype(np.float16))
    rw = tensors["model.layers.0.mlp.router.linear.weight"][1]
    assert np.array_equal(exp["model.layers.0.mlp.router.weight"][1],
                          bnbref.bf16_to_f32(rw).astype(np.float16))


def test_expected_tensors_in_every_output_dtype_agree(tiny):
    f16 = bnbref.read_safetensors(tiny / "expected" / "model.safetensors")
    f32 = bnbref.expected_tensors(tiny / "src", "f32")
    bf16 = bnbref.expected_tensors(tiny / "src", "bf16")
    assert set(f32) == set(bf16) == set(f16)
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.2.self_attn.k_proj.weight",
                 "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                 "lm_head.weight"):
        a32 = f32[name]
        assert a32.dtype == np.float32 and bf16[name].dtype == np.uint16
        assert np.array_equal(f16[name][1], a32.astype(np.float16)), name
        assert np.array_equal(bf16[name], bnbref.f32_to_bf16_rne(a32).reshape(a32.shape)), name


def test_quantization_error_is_within_the_nf4_bound(tensors):
    """The stored weights are the drawn originals quantized: every element's
    error is within half the widest NF4 gap of its block's absmax, plus the
    double-quant error of that absmax."""
    half_gap = {"nf4": float(np.max(np.diff(np.sort(bnbref.NF4))) / 2),
                "fp4": float(np.max(np.diff(np.sort(bnbref.FP4))) / 2)}
    specs = {s.name: s for s in gen_fixture.model_specs(TINY_CFG, "tiny")}
    rel = []
    for w in qweights(tensors):
        st = bnbref.qstate_of(tensors, w)
        orig = gen_fixture.draw(specs[w], 0).reshape(-1).astype(np.float64)
        deq = bnbref.dequantize_values(tensors, w, st).reshape(-1).astype(np.float64)
        bs = st["blocksize"]
        nb = -(-orig.size // bs)
        pad = np.zeros(nb * bs)
        pad[:orig.size] = np.abs(orig)
        a_true = pad.reshape(nb, bs).max(axis=1)
        a_deq = bnbref.block_scales(tensors, w, st).astype(np.float64)
        bound = (a_true * half_gap[st["quant_type"]] + np.abs(a_true - a_deq))[np.arange(orig.size) // bs]
        err = np.abs(orig - deq)
        assert np.all(err <= bound * (1 + 1e-6) + 1e-12), w
        rel.append(np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(orig ** 2)))
    # NF4 on normal data loses about a tenth of the signal: the check has teeth
    assert 0.03 < float(np.median(rel)) < 0.2


def test_full_size_plan_has_real_shapes_and_4gb_shards():
    c = gen_fixture.SIZES["full"]
    specs = gen_fixture.model_specs(c, "full")
    shards, moved = gen_fixture.plan_shards(specs, c, "full")
    sizes = [sum(gen_fixture._stored_bytes(s) for s in sh) for sh in shards]
    total = sum(sizes)
    assert 12e9 < total < 14e9 and not moved
    assert all(s <= gen_fixture.FULL_SHARD_BYTES for s in sizes) and len(shards) == 3
    assert [len(sh) for sh in shards if not sh] == []
    byname = {s.name: s for s in specs}
    assert byname["model.layers.23.mlp.experts.gate_up_projs.31.weight"].shape == (5760, 2880)
    assert byname["model.layers.0.mlp.experts.down_projs.0.weight"].shape == (2880, 2880)
    assert byname["model.layers.5.self_attn.q_proj.weight"].shape == (4096, 2880)
    assert byname["model.layers.5.self_attn.k_proj.weight"].shape == (512, 2880)


def test_full_size_random_weights_dequantize_to_realistic_values():
    c = gen_fixture.SIZES["full"]
    specs = {s.name: s for s in gen_fixture.model_specs(c, "full")}
    t, _ = gen_fixture.full_tensors(specs["model.layers.3.self_attn.k_proj.weight"], 0)
    stored = {k: ("U8" if v.dtype == np.uint8 else "F32", v) for k, v in t.items()}
    v = bnbref.dequantize_values(stored, "model.layers.3.self_attn.k_proj.weight",
                                 bnbref.qstate_of(stored, "model.layers.3.self_attn.k_proj.weight"))
    assert v.shape == (512, 2880) and np.all(np.isfinite(v))
    m = np.abs(v)
    assert 0.01 < float(np.mean(m)) < 0.05 and float(m.max()) < 0.1
    # nearly zero-mean (uniform NF4 codes would give +0.0234 x absmax ~ +1.2e-3,
    # a shared direction that makes every token route alike)
    assert abs(float(np.mean(v))) < 2e-4, float(np.mean(v))
    # big plain tensors (embed_tokens, lm_head) take the random-bits path
    emb = specs["lm_head.weight"]
    part = gen_fixture.Spec(emb.name, (1024, emb.shape[1]), emb.init)
    big, _ = gen_fixture.full_tensors(part, 0)
    x = bnbref.bf16_to_f32(big["lm_head.weight"])
    assert np.all(np.isfinite(x)) and 0.005 < float(np.mean(np.abs(x))) < 0.05
