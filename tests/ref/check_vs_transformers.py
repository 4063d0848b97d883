#!/usr/bin/env python3
"""check_vs_transformers: compares gptoss_ref's logits with transformers'
GptOssForCausalLM on the same HF-canonical checkpoint (the tiny fixture's
expected/ by default, or any directory, e.g. a bnbfs mount of it).

Not part of CI (torch and transformers are not CI dependencies): it skips
with a message and exit 0 when they cannot be imported. Run it where they
are (a venv with CPU torch, or the GPU machine):

    python3 tests/ref/check_vs_transformers.py [MODEL_DIR] [--n 20] [--tol 1e-4]

MODEL_DIR defaults to the tiny fixture's expected/ (generated once into
.cache/fixtures like the tests do). transformers runs in float32 with eager
attention; the reference in float64. Prints the max relative error
(max |a - b| / max |b| over each position's logits) for a prefill of n
tokens (n > sliding_window so the window matters), for decode steps with
transformers' KV cache, and the greedy ids of both; exit 1 when above tol.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "ref"))
import gptoss_ref  # noqa: E402


def tiny_expected():
    out = ROOT / ".cache" / "fixtures" / "tiny"
    gen = ROOT / "tests" / "fixtures" / "gen_fixture.py"
    stamp = out / ".complete"
    if not (stamp.exists() and stamp.stat().st_mtime >= gen.stat().st_mtime):
        import shutil
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(gen), "--size", "tiny", str(out)], check=True)
    return out / "expected"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.abs(a - b).max(axis=-1) / np.abs(b).max(axis=-1)).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("--n", type=int, default=20, help="prompt length (default 20)")
    ap.add_argument("--steps", type=int, default=8, help="decode steps (default 8)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative error allowed")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    try:
        import torch
        import transformers
        from transformers import GptOssForCausalLM
    except Exception as e:                           # ImportError, or a broken install
        print(f"SKIP: torch/transformers not importable ({type(e).__name__}: {e})")
        return 0

    model_dir = pathlib.Path(a.model_dir) if a.model_dir else tiny_expected()
    ref = gptoss_ref.Model(model_dir)
    vocab = ref.w["model.embed_tokens.weight"].shape[0]
    ids = np.random.default_rng(a.seed).integers(0, vocab, size=a.n)

    # transformers wants a plain config: drop any quantization block.
    with tempfile.TemporaryDirectory() as td:
        cfg = json.loads((model_dir / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "float32"
        (pathlib.Path(td) / "config.json").write_text(json.dumps(cfg))
        for f in model_dir.iterdir():
            if f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json":
                (pathlib.Path(td) / f.name).symlink_to(f.resolve())
        tf = GptOssForCausalLM.from_pretrained(td, dtype=torch.float32,
                                               attn_implementation="eager")
        tf.eval()
        with torch.no_grad():
            t_ids = torch.tensor(ids[None, :], dtype=torch.long)
            out = tf(t_ids, use_cache=True)
            tf_logits = out.logits[0].float().numpy()
            past = out.past_key_values
            # decode: greedy tokens fed one at a time through transformers' cache
            tf_steps, tf_gen = [], []
            nxt = int(tf_logits[-1].argmax())
            for _ in range(a.steps):
                tf_gen.append(nxt)
                o = tf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = o.past_key_values
                tf_steps.append(o.logits[0, -1].float().numpy())
                nxt = int(tf_steps[-1].argmax())

    ref_logits = ref.forward(ids)
    ref.reset()
    ref.prefill(ids)
    ref_steps = [ref.step(t) for t in tf_gen]
    ref_gen, _ = ref.greedy(ids, a.steps)

    e_prefill = rel_err(tf_logits, ref_logits)
    e_decode = rel_err(np.stack(tf_steps), np.stack(ref_steps))
    per_pos = np.abs(tf_logits - ref_logits).max(axis=-1) / np.abs(ref_logits).max(axis=-1)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, model {model_dir}")
    print(f"prompt {a.n} tokens (sliding_window {ref.window}), layer_types {ref.layer_types}")
    print(f"prefill max relative error: {e_prefill:.3e}")
    print("  per position: " + " ".join(f"{x:.1e}" for x in per_pos))
    print(f"decode ({a.steps} steps, KV cache) max relative error: {e_decode:.3e}")
    print(f"greedy ids transformers: {tf_gen}")
    print(f"greedy ids reference:    {[int(t) for t in ref_gen]}")
    ok = e_prefill <= a.tol and e_decode <= a.tol and list(ref_gen) == tf_gen
    print("OK" if ok else f"FAIL (tol {a.tol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
