"""Model loading of bnbfs-run (runner/model.c), on the CPU: every tensor the
forward pass needs is checked for presence, dtype and shape, and config.json
for the keys that change the math, before anything runs; each problem is one
clear error line naming the file or tensor, and a non-zero exit.

Checkpoints are assembled in tmp_path from the tiny fixture's HF-canonical
expected/ output (with one tensor removed, reshaped or retyped, or one config
key dropped) and opened with `bnbfs-run MODEL --check`, which needs no GPU.
The parallel prefetch is exercised through llm-model-check.
"""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def canon(tiny):
    """The tiny fixture's HF-canonical tensors and config."""
    tensors = load_file(str(tiny / "expected" / "model.safetensors"))
    cfg = json.loads((tiny / "expected" / "config.json").read_text())
    return tensors, cfg


def make_model(path, tiny, tensors, cfg, gen_cfg=True, shards=1):
    """Writes an HF-canonical checkpoint directory (one file, or `shards`
    files with an index) plus the tokenizer files --check loads."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if gen_cfg:
        shutil.copy(tiny / "src" / "generation_config.json", path)
    for f in TOKENIZER_FILES:
        os.symlink(tiny / "src" / f, path / f)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        wm = {}
        per = (len(names) + shards - 1) // shards
        for s in range(shards):
            fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
            save_file(part, str(path / fn), metadata={"format": "pt"})
            wm.update({n: fn for n in part})
        total = sum(t.nbytes for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return path


def check(bin_path, model):
    return subprocess.run([str(bin_path("bnbfs-run")), str(model), "--check"],
                          capture_output=True, text=True, timeout=120)


def errors(r):
    return [ln for ln in r.stderr.splitlines() if " error:" in ln or "error" in ln.lower()]


def test_valid_checkpoint_loads_with_config_values(bin_path, tiny, canon, tmp_path):
    tensors, cfg = canon
    m = make_model(tmp_path / "m", tiny, tensors, cfg, shards=3)
    r = check(bin_path, m)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "3 layers (2 sliding, window 8)" in out
    assert "hidden 64" in out and "5 experts (top 2)" in out and "intermediate 136" in out
    assert "4 heads / 2 kv heads x 16" in out and "vocab 201088" in out
    assert "(YaRN)" in out
    assert " error:" not in r.stderr


def test_missing_tensor_is_named(bin_path, tiny, canon, tmp_path):
    tensors, cfg = canon
    t = dict(tensors)
    del t["model.layers.1.mlp.router.bias"]
    r = check(bin_path, make_model(tmp_path / "m", tiny, t, cfg))
    assert r.returncode != 0
    line = [ln for ln in r.stderr.splitlines() if "model.layers.1.mlp.router.bias" in ln]
    assert line and "missing" in line[0], r.stderr


def test_misshaped_tensor_names_both_shapes(bin_path, tiny, canon, tmp_path):
    tensors, cfg = canon
    t = dict(tensors)
    name = "model.layers.2.self_attn.k_proj.weight"
    t[name] = np.ascontiguousarray(t[name].reshape(64, 32))
    r = check(bin_path, make_model(tmp_path / "m", tiny, t, cfg))
    assert r.returncode != 0
    line = [ln for ln in r.stderr.splitlines() if name in ln]
    assert line, r.stderr
    assert "shape [64, 32]" in line[0] and "expected [32, 64]" in line[0]
    assert "model.safetensors" in line[0]      # the file is named too


def test_misshaped_expert_tensor(bin_path, tiny, canon, tmp_path):
    """An expert weight in the per-expert Linear layout [E, 2I, H] instead of
    the HF-canonical x @ W layout [E, H, 2I] is refused, not silently used."""
    tensors, cfg = canon
    t = dict(tensors)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    t[name] = np.ascontiguousarray(t[name].transpose(0, 2, 1))
    r = check(bin_path, make_model(tmp_path / "m", tiny, t, cfg))
    assert r.returncode != 0
    assert any(name in ln and "expected [5, 64, 272]" in ln for ln in r.stderr.splitlines()), \
        r.stderr


def test_wrong_dtype_is_named(bin_path, tiny, canon, tmp_path):
    tensors, cfg = canon
    t = dict(tensors)
    name = "model.layers.0.self_attn.sinks"
    t[name] = t[name].astype(np.int32)
    r = check(bin_path, make_model(tmp_path / "m", tiny, t, cfg))
    assert r.returncode != 0
    line = [ln for ln in r.stderr.splitlines() if name in ln]
    assert line and "dtype I32" in line[0], r.stderr


def test_bf16_and_f32_tensors_are_accepted(bin_path, tiny, canon, tmp_path):
    tensors, cfg = canon
    t = dict(tensors)
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.float32)
    r = check(bin_path, make_model(tmp_path / "m", tiny, t, cfg))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("key", ["head_dim", "num_local_experts", "swiglu_limit",
                                 "rms_norm_eps", "num_key_value_heads", "vocab_size"])
def test_missing_config_key_is_named(bin_path, tiny, canon, tmp_path, key):
    tensors, cfg = canon
    c = dict(cfg)
    del c[key]
    r = check(bin_path, make_model(tmp_path / "m", tiny, tensors, c))
    assert r.returncode != 0
    assert any("config.json" in ln and f'"{key}"' in ln for ln in r.stderr.splitlines()), r.stderr


def test_config_dimension_must_match_tensors(bin_path, tiny, canon, tmp_path):
    """intermediate_size that disagrees with the files: the expert tensors are
    named with the shape the config implies."""
    tensors, cfg = canon
    c = dict(cfg, intermediate_size=128)
    r = check(bin_path, make_model(tmp_path / "m", tiny, tensors, c))
    assert r.returncode != 0
    assert "mlp.experts.gate_up_proj" in r.stderr and "expected [5, 64, 256]" in r.stderr


def test_layer_types_must_match_layer_count(bin_path, tiny, canon, tmp_path):
    tensors, cfg = canon
    c = dict(cfg, layer_types=["sliding_attention", "full_attention"])
    r = check(bin_path, make_model(tmp_path / "m", tiny, tensors, c))
    assert r.returncode != 0 and "layer_types" in r.stderr


def test_unknown_layer_type_is_refused(bin_path, tiny, canon, tmp_path):
    tensors, cfg = canon
    c = dict(cfg, layer_types=["sliding_attention", "chunked_attention", "full_attention"])
    r = check(bin_path, make_model(tmp_path / "m", tiny, tensors, c))
    assert r.returncode != 0 and "layer_types[1]" in r.stderr


def test_rope_parameters_spelling_of_transformers_5(bin_path, tiny, canon, tmp_path):
    """transformers 5 writes rope_parameters (with rope_theta inside) instead
    of rope_scaling + rope_theta: both load the same way."""
    tensors, cfg = canon
    c = dict(cfg)
    rp = dict(c.pop("rope_scaling"))
    rp["rope_theta"] = c.pop("rope_theta")
    c["rope_parameters"] = rp
    r = check(bin_path, make_model(tmp_path / "m", tiny, tensors, c))
    assert r.returncode == 0, r.stderr
    assert "(YaRN)" in r.stdout and "rope theta 150000" in r.stdout


def test_unsupported_rope_type_is_refused(bin_path, tiny, canon, tmp_path):
    tensors, cfg = canon
    c = dict(cfg, rope_scaling=dict(cfg["rope_scaling"], rope_type="longrope"))
    r = check(bin_path, make_model(tmp_path / "m", tiny, tensors, c))
    assert r.returncode != 0 and "longrope" in r.stderr


def test_quantized_source_dir_points_to_the_mount(bin_path, tiny):
    """The Unsloth 4-bit source directory itself is not runnable: the error
    says to mount it with bnbfs."""
    r = check(bin_path, tiny / "src")
    assert r.returncode != 0
    assert "quantization_config" in r.stderr and "bnbfs" in r.stderr


def test_generation_config_eos_is_used(bin_path, tiny, canon, tmp_path):
    """eos ids come from generation_config.json (a list there) over config.json."""
    tensors, cfg = canon
    m = make_model(tmp_path / "m", tiny, tensors, cfg, gen_cfg=False)
    (m / "generation_config.json").write_text(json.dumps({"eos_token_id": [200002, 199999, 200012]}))
    r = subprocess.run([str(bin_path("llm-model-check")), str(m)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["eos"] == [200002, 199999, 200012]
    (m / "generation_config.json").unlink()
    r = subprocess.run([str(bin_path("llm-model-check")), str(m)], capture_output=True, text=True,
                       timeout=60)
    assert json.loads(r.stdout)["eos"] == [cfg["eos_token_id"]]


def test_config_values_reach_the_model(bin_path, tiny, canon, tmp_path):
    tensors, cfg = canon
    m = make_model(tmp_path / "m", tiny, tensors, cfg)
    r = subprocess.run([str(bin_path("llm-model-check")), str(m)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    rs = cfg["rope_scaling"]
    assert info["sliding"] == [t == "sliding_attention" for t in cfg["layer_types"]]
    assert info["sliding_window"] == cfg["sliding_window"]
    assert info["yarn"] == {"factor": rs["factor"], "beta_fast": rs["beta_fast"],
                            "beta_slow": rs["beta_slow"],
                            "original_max_position_embeddings": rs["original_max_position_embeddings"],
                            "truncate": rs["truncate"]}
    assert info["swiglu_limit"] == cfg["swiglu_limit"]
    assert info["rope_theta"] == cfg["rope_theta"]
    assert info["rms_eps"] == pytest.approx(cfg["rms_norm_eps"])


def test_prefetch_reads_every_byte(bin_path, tiny, canon, tmp_path):
    """rn_model_prefetch reads every tensor byte (parallel preads) and prints
    progress with bytes and GB/s when asked."""
    tensors, cfg = canon
    m = make_model(tmp_path / "m", tiny, tensors, cfg, shards=3)
    r = subprocess.run([str(bin_path("llm-model-check")), str(m), "--prefetch", "--threads", "3",
                        "--progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    total = sum(t.nbytes for t in tensors.values())
    assert total <= info["prefetch_bytes"] < total + (1 << 20)
    assert "GB/s" in r.stderr and "prefetch" in r.stderr


def test_not_a_directory(bin_path, tmp_path):
    r = check(bin_path, tmp_path / "nope")
    assert r.returncode != 0
    assert str(tmp_path / "nope") in r.stderr
