"""bnbfs with -o dtype=bf16 and -o dtype=f32: every tensor of every shard
and every tensors/ file equals bnbref's expectation bit for bit, the header
names the dtype, and config.json says so."""
import json
import os

import numpy as np
import pytest

import fs_helpers as fh

HF = {"bf16": ("BF16", "bfloat16"), "f32": ("F32", "float32")}


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_mount_in_other_dtypes_is_bit_exact(bin_path, tiny, tmp_path, dtype):
    exp = fh.expected(tiny, dtype)
    st_name, hf_name = HF[dtype]
    with fh.mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt",
                    opts=[f"dtype={dtype}"]) as m:
        cfg = json.loads(m.path("config.json").read_text())
        assert cfg["torch_dtype"] == hf_name and "quantization_config" not in cfg
        from safetensors import safe_open
        seen = set()
        shards = sorted(p for p in os.listdir(m.mnt) if p.endswith(".safetensors"))
        for s in shards:
            with safe_open(str(m.path(s)), framework="numpy") as f:   # header validation
                keys = set(f.keys())
                assert f.metadata() == {"format": "pt"}
            got = fh.read_tensors_raw(m.path(s))
            assert set(got) == keys
            hdr, _ = fh.read_header(m.path(s))
            for name, a in got.items():
                e = exp[name]
                assert hdr[name]["dtype"] == st_name
                assert a.shape == e.shape and a.tobytes() == np.ascontiguousarray(e).tobytes(), name
                seen.add(name)
        assert seen == set(exp)
        for name, e in exp.items():
            p = m.path("tensors", name)
            assert os.getxattr(p, "user.bnbfs.dtype").decode() == st_name
            assert p.read_bytes() == np.ascontiguousarray(e).tobytes(), name
