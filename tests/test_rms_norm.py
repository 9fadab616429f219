"""RMSNorm specifics beyond the generic registry parity: layouts, the fused residual, the drop-in module
against transformers, opcheck, dispatch, bad input, and GPU-only bf16 / torch.compile checks."""
import pytest
import torch

from conftest import DEVICE, DTYPES
from llama_triton import backend, layers, reference, testing
from llama_triton.ops import rms_norm as rms_ops
from llama_triton.ops.rms_norm import rms_norm


def _check(x, w, residual=None, eps=1e-6):
    ours = rms_norm(x, w, eps, residual)
    low = reference.rms_norm(x, w, eps, residual)
    hi = reference.rms_norm(*testing.to_oracle((x, w)), eps, residual.double() if residual is not None else None)
    for name, o, l, h in zip(("y", "residual"), testing.as_tuple(ours), testing.as_tuple(low), testing.as_tuple(hi)):
        assert o.dtype == l.dtype and o.shape == l.shape
        testing.assert_close(name, o, l, h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7,), (2, 3, 33), (1, 1, 1, 64)])
def test_leading_shapes(shape, dtype):
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    w = torch.randn(shape[-1], dtype=dtype, device=DEVICE)
    _check(x, w)
    _check(x, w, residual=torch.randn_like(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    base = torch.randn(6, 40, 3, dtype=dtype, device=DEVICE)
    x = base[..., 1]                        # last dim strided (stride 3)
    r = torch.randn(40, 6, dtype=dtype, device=DEVICE).t()  # transposed
    w = torch.randn(80, dtype=dtype, device=DEVICE)[::2]
    assert not x.is_contiguous() and not r.is_contiguous() and not w.is_contiguous()
    _check(x, w)
    _check(x, w, residual=r)
    rows = torch.randn(10, 48, dtype=dtype, device=DEVICE)[::2]  # strided rows, contiguous last dim
    _check(rows, torch.randn(48, dtype=dtype, device=DEVICE))


def test_mixed_weight_dtype_promotes_like_hf():
    x = torch.randn(3, 32, dtype=torch.float16, device=DEVICE)
    w = torch.randn(32, dtype=torch.float32, device=DEVICE)
    y = rms_norm(x, w)
    assert y.dtype == torch.float32
    _check(x, w)


def test_backward_non_contiguous_grad():
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    dy = torch.randn(24, 5, device=DEVICE).t()
    gx, gw = torch.autograd.grad(rms_norm(x, w), (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(reference.rms_norm(x64, w64), (x64, w64), dy.double())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)


def test_backward_many_rows_reduces_dw_across_programs():
    """More rows than persistent programs: every program's partial dw must be summed exactly once."""
    x = torch.randn(37, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(16, device=DEVICE, requires_grad=True)
    r = torch.randn(37, 16, device=DEVICE, requires_grad=True)
    y, s = rms_norm(x, w, residual=r)
    (y.square().sum() + (s * 3).sum()).backward()
    x2, w2, r2 = (t.detach().double().requires_grad_() for t in (x, w, r))
    y2, s2 = reference.rms_norm(x2, w2, residual=r2)
    (y2.square().sum() + (s2 * 3).sum()).backward()
    for a, b in ((x, x2), (w, w2), (r, r2)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4)


def test_empty_rows_give_empty_output():
    x = torch.randn(0, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    assert rms_norm(x, w).shape == (0, 8)
    y, s = rms_norm(x, w, residual=torch.randn(0, 8, device=DEVICE))
    assert y.shape == s.shape == (0, 8)


def test_opcheck():
    x = torch.randn(5, 33, device=DEVICE)
    w = torch.randn(33, device=DEVICE)
    r = torch.randn(5, 33, device=DEVICE)
    torch.library.opcheck(rms_ops._rms_norm_fwd, (x.requires_grad_(), w.requires_grad_(), 1e-6))
    torch.library.opcheck(rms_ops._add_rms_norm_fwd, (x, r.requires_grad_(), w, 1e-6))


def test_module_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        hf.weight.normal_()
    ours = layers.RMSNorm.from_module(hf)
    assert ours.weight is hf.weight and ours.variance_epsilon == 1e-5
    x = torch.randn(2, 9, 96, device=DEVICE)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
    fresh = layers.RMSNorm(96, eps=1e-5)
    fresh.load_state_dict(hf.state_dict())  # same parameter name
    torch.testing.assert_close(fresh.to(DEVICE)(x), hf(x), rtol=1e-5, atol=1e-5)


def test_dispatch_forced_torch_and_triton(monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    assert backend.use_triton(x) is False
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="LLAMA_TRITON_BACKEND=triton"):
        rms_norm(x, torch.ones(8))
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "gpu")
    with pytest.raises(ValueError, match="LLAMA_TRITON_BACKEND"):
        backend.use_triton(x)


def test_dispatch_auto_runs_the_kernel_on_this_device(monkeypatch):
    """Under the test set-up (interpreter or CUDA) the auto backend must pick Triton, not the reference."""
    monkeypatch.delenv("LLAMA_TRITON_BACKEND", raising=False)
    calls = []
    real = rms_ops.K.rms_norm_fwd
    monkeypatch.setattr(rms_ops.K, "rms_norm_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE))
    assert calls


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 8).long(), torch.ones(8), None), TypeError, "x has dtype int64"),
        (lambda: (torch.randn(2, 8), torch.ones(8, dtype=torch.float64), None), TypeError, "weight has dtype"),
        (lambda: (torch.randn(2, 8), torch.ones(7), None), ValueError, "weight has shape"),
        (lambda: (torch.randn(2, 8), torch.ones(2, 8), None), ValueError, "weight must have 1 dimension,"),
        (lambda: (torch.randn(2, 8), torch.ones(8), torch.randn(2, 7)), ValueError, "residual has shape"),
        (lambda: (torch.randn(2, 8), torch.ones(8), torch.randn(2, 8).half()), TypeError, "residual has dtype"),
        (lambda: (torch.randn(2, 0), torch.ones(0), None), ValueError, "hidden size"),
        (lambda: ([1.0, 2.0], torch.ones(2), None), TypeError, "x must be a torch.Tensor"),
        (lambda: (torch.randn(2, 8), torch.ones(8, device="meta"), None), ValueError, "weight is on meta"),
    ],
)
def test_bad_input(make, exc, match):
    x, w, r = make()
    with pytest.raises(exc, match=match):
        rms_norm(x, w, residual=r)


def test_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        rms_norm(torch.randn(2, 8), torch.ones(8), eps=-1.0)


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (2048, 8192), (3, 16384), (1000, 5120)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_large_shapes(shape, dtype):
    x = torch.randn(shape, dtype=dtype, device="cuda")
    w = torch.randn(shape[-1], dtype=dtype, device="cuda")
    _check(x, w)
    _check(x, w, residual=torch.randn_like(x))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    norm = layers.RMSNorm(4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 128, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(norm, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, reference.rms_norm(x, norm.weight, norm.variance_epsilon), rtol=2e-2, atol=2e-2)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_torch_compile_fullgraph_traces_the_custom_op():
    norm = layers.RMSNorm(64).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 64, device=DEVICE)
    y, s = torch.compile(norm, fullgraph=True)(x, r)
    ry, rs = reference.rms_norm(x, norm.weight, norm.variance_epsilon, r)
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, rs)
    y.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
