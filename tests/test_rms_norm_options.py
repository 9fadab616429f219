"""RMSNorm ``offset`` (Gemma's ``(offset + w)``) and ``casting_mode`` ("llama" / "gemma" / "none", as
Liger-Kernel defines them): forward and backward against the reference under the 2x rule, output dtypes,
transformers' GemmaRMSNorm through ``RMSNorm.from_module``, and bad values."""
import pytest
import torch

from conftest import DEVICE
from llama_triton import reference, testing
from llama_triton.layers import RMSNorm
from llama_triton.ops.rms_norm import rms_norm


def _run(fn, x, w, r, kw, seed=3):
    leaves = [t.detach().clone().requires_grad_() for t in ((x, w) if r is None else (x, w, r))]
    out = fn(leaves[0], leaves[1], 1e-6, leaves[2] if r is not None else None, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in outs)
    return tuple(o.detach() for o in outs) + torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("casting_mode", ["llama", "gemma", "none"])
@pytest.mark.parametrize("offset,residual", [(0.0, False), (1.0, False), (1.0, True)])
def test_offset_and_casting_mode_vs_reference(offset, residual, casting_mode, dtype):
    torch.manual_seed(0)
    x = torch.randn(5, 33, device=DEVICE).to(dtype)
    w = (0.1 * torch.randn(33, device=DEVICE)).to(dtype)        # Gemma-style weights near 0 (scale = 1 + w)
    r = torch.randn(5, 33, device=DEVICE).to(dtype) if residual else None
    kw = dict(offset=offset, casting_mode=casting_mode)
    ours, low = _run(rms_norm, x, w, r, kw), _run(reference.rms_norm, x, w, r, kw)
    hi = _run(reference.rms_norm, *testing.to_oracle((x, w, r)), kw)
    for i, (o, l, h) in enumerate(zip(ours, low, hi)):
        assert o.shape == l.shape and o.dtype == l.dtype, (i, o.dtype, l.dtype)
        testing.assert_close(f"{casting_mode} offset={offset} [{i}]", o, l, h)


def test_offset_changes_the_scale():
    x, w = torch.randn(3, 16, device=DEVICE), torch.randn(16, device=DEVICE)
    torch.testing.assert_close(rms_norm(x, w, offset=1.0), rms_norm(x, w + 1.0))


def test_output_dtypes():
    """llama: promote(x, weight) (HF LlamaRMSNorm); gemma / none: x's dtype (HF GemmaRMSNorm's type_as)."""
    x, w = torch.randn(2, 8, device=DEVICE).half(), torch.zeros(8, device=DEVICE)
    assert rms_norm(x, w, casting_mode="llama").dtype == torch.float32
    assert rms_norm(x, w, offset=1.0, casting_mode="gemma").dtype == torch.float16
    assert reference.rms_norm(x, w, offset=1.0, casting_mode="gemma").dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gemma_rms_norm_from_module(dtype):
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    torch.manual_seed(0)
    hf = gemma.GemmaRMSNorm(24, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        hf.weight.normal_(0, 0.1)
    ours = RMSNorm.from_module(hf)
    assert ours.offset == 1.0 and ours.casting_mode == "gemma" and ours.weight is hf.weight
    x = torch.randn(2, 3, 24, device=DEVICE).to(dtype)
    res = []
    for mod, inp in ((ours, x), (hf, x), (gemma.GemmaRMSNorm(24, eps=1e-6).double(), x.double())):
        if mod is not ours and mod is not hf:
            mod.weight.data.copy_(hf.weight.data.double())
        xi = inp.detach().clone().requires_grad_()
        y = mod(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
        res.append((y.detach(),) + torch.autograd.grad(y, (xi, mod.weight), g))
    for i, (o, l, h) in enumerate(zip(*res)):
        assert o.dtype == l.dtype
        testing.assert_close(f"gemma[{i}]", o, l, h)
    assert "offset=1.0" in repr(ours) and RMSNorm(8, offset=1.0, init_fn="zeros").weight.abs().sum() == 0


def test_bad_options():
    x, w = torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="casting_mode"):
        rms_norm(x, w, casting_mode="fp32")
    with pytest.raises(TypeError, match="offset"):
        rms_norm(x, w, offset=torch.tensor(1.0))
    with pytest.raises(ValueError, match="init_fn"):
        RMSNorm(8, init_fn="random")


@pytest.mark.parametrize("casting_mode", ["llama", "gemma"])
def test_casting_mode_roundings_match_hf(casting_mode):
    """Where the product is rounded decides the half-precision bits: ours must give the reference's (HF's)
    fp16 values bit for bit almost everywhere (fp32 summation order may flip a rare rounding). The 2x rule
    alone cannot tell one rounding from two."""
    torch.manual_seed(0)
    x = torch.randn(32, 256, device=DEVICE).half()
    w = (1 + torch.randn(256, device=DEVICE)).half()
    ours = rms_norm(x, w, offset=1.0, casting_mode=casting_mode)
    ref = reference.rms_norm(x, w, offset=1.0, casting_mode=casting_mode)
    assert (ours == ref).float().mean().item() > 0.99
