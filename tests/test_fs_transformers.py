"""On the GPU machine: transformers loads the mount like any Hugging Face
checkpoint (GptOssForCausalLM.from_pretrained(MNT)), every parameter equals
the fixture's expectation bit for bit, and a forward pass runs on the GPU.
Skips without a GPU or without transformers/torch."""
import gc

import numpy as np
import pytest

import fs_helpers as fh


def test_transformers_loads_the_mount_bit_exact(gpu, bin_path, tiny, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    exp = fh.expected(tiny, "f16")
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": torch.float16} if major >= 5 else {"torch_dtype": torch.float16}
    with fh.mounted(bin_path("bnbfs"), tiny / "src", tmp_path / "mnt") as m:
        model = transformers.GptOssForCausalLM.from_pretrained(str(m.mnt), **kw)
        sd = model.state_dict()
        assert not set(exp) - set(sd), f"not loaded: {sorted(set(exp) - set(sd))}"
        upcast = []
        for name, e in exp.items():
            t = sd[name].detach().cpu().contiguous()
            assert tuple(t.shape) == e.shape, name
            if t.dtype == torch.float32:
                # transformers keeps some modules in fp32 (_keep_in_fp32_modules):
                # the upcast of an fp16 value is exact, so compare the bits of both.
                upcast.append(name)
                assert np.array_equal(t.numpy().view(np.uint32),
                                      e.astype(np.float32).view(np.uint32)), name
                t = t.to(torch.float16)
            assert t.dtype == torch.float16, f"{name}: {t.dtype}"
            assert np.array_equal(t.view(torch.int16).numpy().view(np.uint16),
                                  e.view(np.uint16)), name
        print(f"kept in fp32 by transformers: {upcast}")
        assert len(upcast) < len(exp) // 2
        model = model.to("cuda").eval()
        with torch.no_grad():
            logits = model(torch.tensor([[200006, 17360, 200008, 1, 2, 3]], device="cuda")).logits
        assert logits.shape == (1, 6, 201088)
        assert torch.isfinite(logits).all()
        del model, sd, logits
        gc.collect()
        torch.cuda.empty_cache()
