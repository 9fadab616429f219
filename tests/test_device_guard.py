"""The one CUDA device guard (llama_triton.backend.device_guard, entered by every public op): a launch runs
on its tensors' GPU, not the current device, so a model split over GPUs (device_map="auto") works."""
import contextlib

import pytest
import torch

import llama_triton
from llama_triton import backend, reference


class _FakeCudaTensor:
    device = torch.device("cuda", 1)


def test_guard_takes_the_tensors_device(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    with backend.device_guard(_FakeCudaTensor()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with backend.device_guard(torch.ones(1)):                  # CPU: no CUDA guard at all
        pass
    assert entered == [torch.device("cuda", 1)]


def test_public_ops_enter_the_guard_with_their_input(monkeypatch):
    seen = []
    monkeypatch.setattr(backend, "device_guard", lambda t: seen.append(t) or contextlib.nullcontext())
    x, w = torch.randn(2, 8), torch.ones(8)
    llama_triton.rms_norm(x, w)
    g = torch.randn(2, 8)
    llama_triton.swiglu(g)
    assert seen[0] is x and seen[1] is g



def test_every_dispatching_op_is_wrapped():
    """Each function of llama_triton.ops that dispatches (calls backend.use_triton) enters public_op."""
    import importlib
    import inspect
    import pkgutil

    import llama_triton.ops

    found = []
    for mod in pkgutil.iter_modules(llama_triton.ops.__path__):
        module = importlib.import_module(f"llama_triton.ops.{mod.name}")
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and fn.__module__ == module.__name__ and not name.startswith("_"):
                if "backend.use_triton(" in inspect.getsource(inspect.unwrap(fn)):
                    found.append(name)
                    assert hasattr(fn, "autocast_rule"), f"{module.__name__}.{name} is not wrapped by backend.public_op"
    assert {"rms_norm", "flash_attention", "decode_attention_with_kvcache", "low_rank_matmul"} <= set(found)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x, w = torch.randn(64, 256, device=dev, dtype=torch.float16), torch.randn(256, device=dev, dtype=torch.float16)
    torch.testing.assert_close(llama_triton.rms_norm(x, w), reference.rms_norm(x, w, 1e-6, None))
    q, k, v = (torch.randn(2, 65, 4, 64, device=dev, dtype=torch.float16) for _ in range(3))
    torch.testing.assert_close(llama_triton.flash_attention(q, k, v), reference.attention(q, k, v, True),
                               atol=2e-3, rtol=2e-3)
    assert torch.cuda.current_device() == 0
