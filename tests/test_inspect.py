"""bnbfs-inspect over the tiny fixture: the plan lists the HF-canonical
tensors, and every output tensor dumped through the C core equals the
independent numpy expectation bit for bit, in every output dtype and with
every SIMD level the CPU has (all must give the same bits)."""
import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

import bnbref


def inspect(bin_path, *args, env=None, check=True):
    return subprocess.run([str(bin_path("bnbfs-inspect")), *map(str, args)],
                          capture_output=True, check=check, env=env)


@pytest.fixture(scope="module")
def plan(bin_path, tiny):
    out = inspect(bin_path, "--json", tiny / "src").stdout.decode()
    return [json.loads(line) for line in out.splitlines()]


def test_plan_lists_exactly_the_hf_tensors(plan, tiny):
    expected = load_file(str(tiny / "expected" / "model.safetensors"))
    assert sorted(t["name"] for t in plan) == sorted(expected)
    for t in plan:
        assert t["shape"] == list(expected[t["name"]].shape), t["name"]
        assert t["bytes"] == expected[t["name"]].nbytes


def test_plan_fuses_experts_and_renames_router(plan):
    by = {t["name"]: t for t in plan}
    gu = by["model.layers.0.mlp.experts.gate_up_proj"]
    assert gu["op"] == "fuse_t" and gu["shape"] == [5, 64, 272]
    assert "gate_up_projs.{0..4}.weight (4-bit)" in gu["source"]
    assert by["model.layers.2.mlp.experts.down_proj_bias"]["op"] == "stack"
    assert by["model.layers.1.mlp.router.weight"]["source"].endswith("router.linear.weight")
    assert by["model.layers.2.self_attn.k_proj.weight"]["quant"].startswith("fp4")
    assert by["model.layers.1.self_attn.o_proj.weight"]["quant"].startswith("nf4 bs=128")
    assert by["model.layers.0.self_attn.v_proj.weight"]["quant"] == "nf4 bs=64"


def test_table_has_totals(bin_path, tiny):
    out = inspect(bin_path, tiny / "src").stdout.decode()
    assert "54 output tensors" in out and "3 layers, 5 experts" in out


NP = {"f16": np.float16, "bf16": np.uint16, "f32": np.float32}


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_every_tensor_dumps_bit_exact(bin_path, tiny, plan, dtype):
    if dtype == "f16":
        want = load_file(str(tiny / "expected" / "model.safetensors"))
    else:
        want = bnbref.expected_tensors(str(tiny / "src"), dtype)
    for t in plan:
        got = inspect(bin_path, "--dtype", dtype, "--dump", t["name"], tiny / "src").stdout
        exp = np.ascontiguousarray(want[t["name"]]).view(np.uint8).tobytes()
        assert len(got) == len(exp), t["name"]
        if got != exp:
            g = np.frombuffer(got, NP[dtype]).reshape(want[t["name"]].shape)
            bad = np.argwhere(g.view(np.uint8) != want[t["name"]].view(np.uint8))
            pytest.fail(f"{t['name']} ({dtype}) differs at {len(bad)} elements, first {bad[:3].tolist()}")


@pytest.mark.parametrize("simd", ["scalar", "avx2", "avx512"])
def test_simd_levels_dump_the_same_bits(bin_path, tiny, simd):
    env = dict(os.environ, BNBFS_SIMD=simd)
    want = load_file(str(tiny / "expected" / "model.safetensors"))
    for name in ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.2.self_attn.k_proj.weight", "model.embed_tokens.weight"]:
        got = inspect(bin_path, "--dump", name, "--threads", "2", tiny / "src", env=env).stdout
        assert got == want[name].tobytes(), (name, simd)


def test_dump_unknown_tensor_is_a_clear_error(bin_path, tiny):
    r = inspect(bin_path, "--dump", "no.such.tensor", tiny / "src", check=False)
    assert r.returncode == 1
    assert b"no output tensor named 'no.such.tensor'" in r.stderr


def test_bad_source_is_a_clear_error(bin_path, tmp_path):
    r = inspect(bin_path, tmp_path, check=False)
    assert r.returncode == 1
    assert str(tmp_path).encode() in r.stderr and b"not a safetensors checkpoint" in r.stderr
