"""Fused RMSNorm + matmul beyond the generic registry parity: leading shapes, strides, residual, the
pre-folded inference variant, backward, RMSNormLinear vs transformers' norm + linears, autotune buckets,
opcheck, bad input."""
import pytest
import torch

import lowering_check
from conftest import DEVICE, DTYPES
from llama_triton import layers, reference, testing
from llama_triton.kernels import rms_norm_matmul as K
from llama_triton.ops import rms_norm_matmul as rmm_ops
from llama_triton.ops.rms_norm_matmul import fold_norm_weight, rms_norm_matmul


@pytest.fixture(autouse=True)
def _deterministic_inputs():
    """Every test draws its random inputs from the same seed, whatever ran before it."""
    torch.manual_seed(0)


def _inputs(m, k, n, dtype, lead=None):
    x = torch.randn(*(lead or (m,)), k, device=DEVICE).to(dtype)
    nw = (1 + 0.2 * torch.randn(k, device=DEVICE)).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) * k ** -0.5).to(dtype)
    return x, nw, w


def _check(x, nw, w, residual=None, backward=True, eps=1e-6):
    """Outputs and grads of ours vs the unfused low-precision reference vs the fp64 oracle (2x rule)."""
    args = (x, nw, w) if residual is None else (x, nw, w, residual)
    res = []
    for fn, a in ((rms_norm_matmul, args), (reference.rms_norm_matmul, args),
                  (reference.rms_norm_matmul, testing.to_oracle(args))):
        leaves = [t.detach().clone().requires_grad_(backward) for t in a]
        outs = testing.as_tuple(fn(leaves[0], leaves[1], leaves[2], eps, *leaves[3:]))
        grads = ()
        if backward:
            gen = torch.Generator().manual_seed(7)
            gs = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
            grads = torch.autograd.grad(outs, leaves, gs)
        res.append(tuple(o.detach() for o in outs) + tuple(grads))
    names = ["y", "res_out"][:len(res[0]) - (len(args) if backward else 0)] + ["dx", "dnorm_w", "dw", "dres"]
    for name, o, l, h in zip(names, *res):
        assert o.dtype == l.dtype and o.shape == l.shape, name
        testing.assert_close(name, o, l, h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (17, 129, 40), (129, 33, 17), (3, 4095, 20)])
def test_matches_unfused_reference(m, k, n, dtype):
    x, nw, w = _inputs(m, k, n, dtype)
    _check(x, nw, w)
    _check(x, nw, w, residual=torch.randn_like(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leading_shapes_and_strides(dtype):
    x, nw, w = _inputs(0, 48, 24, dtype, lead=(2, 9))
    _check(x, nw, w, residual=torch.randn_like(x))
    rows = torch.randn(10, 48, device=DEVICE).to(dtype)[::2]                    # strided rows
    wt = torch.randn(48, 24, device=DEVICE).to(dtype).t()                       # transposed weight (N, K)
    xt = torch.randn(48, 5, device=DEVICE).to(dtype).t()                        # last dim not contiguous
    assert not wt.is_contiguous() and xt.stride(-1) != 1
    _check(rows, nw, wt)
    _check(xt, nw[::1], w, residual=torch.randn(48, 5, device=DEVICE).to(dtype).t())


def test_fp32_norm_weight_with_half_input():
    x, _, w = _inputs(6, 40, 16, torch.float16)
    nw = 1 + 0.2 * torch.randn(40, device=DEVICE)
    y = rms_norm_matmul(x, nw, w)
    assert y.dtype == torch.float16
    # HF would promote the norm output to fp32 before the (fp16) linear; the oracle is the same math in fp64
    oracle = reference.rms_norm_matmul(x.double(), nw.double(), w.double())
    low = reference.rms_norm_matmul(x, nw.half(), w)
    testing.assert_close("y", y, low, oracle)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefolded_weight(dtype):
    x, nw, w = _inputs(9, 96, 32, dtype)
    folded = fold_norm_weight(nw, w)
    ours = rms_norm_matmul(x, None, folded)
    testing.assert_close("y", ours, reference.rms_norm_matmul(x, nw, w),
                         reference.rms_norm_matmul(*testing.to_oracle((x, nw, w))))
    # the backward of the pre-folded variant (a norm without weight)
    xs = x.detach().requires_grad_()
    ws = folded.detach().requires_grad_()
    gx, gw = torch.autograd.grad(rms_norm_matmul(xs, None, ws).sum(), (xs, ws))
    x64, w64 = xs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(reference.rms_norm_matmul(x64, None, w64).sum(), (x64, w64))
    rx_low, rw_low = torch.autograd.grad(reference.rms_norm_matmul(xs, None, ws).sum(), (xs, ws))
    testing.assert_close("dx", gx, rx_low, rx)
    testing.assert_close("dw", gw, rw_low, rw)


def test_empty_rows():
    x, nw, w = _inputs(0, 16, 8, torch.float32)
    assert rms_norm_matmul(x, nw, w).shape == (0, 8)
    y, s = rms_norm_matmul(x, nw, w, residual=torch.randn_like(x))
    assert y.shape == (0, 8) and s.shape == (0, 16)


def test_autotune_buckets_and_pruning():
    assert [K.m_bucket(m) for m in (1, 16, 17, 256, 257, 5000)] == [16, 16, 64, 256, 1024, 4096]
    configs = [type("C", (), {"kwargs": {"BLOCK_M": bm}})() for bm in (16, 64, 128)]
    assert [c.kwargs["BLOCK_M"] for c in K._prune(configs, {"M_BUCKET": 16})] == [16]
    assert [c.kwargs["BLOCK_M"] for c in K._prune(configs, {"M_BUCKET": 1024})] == [64, 128]


def test_opcheck():
    x, nw, w = _inputs(5, 40, 24, torch.float32)
    r = torch.randn_like(x)
    torch.library.opcheck(rmm_ops._fwd, (x.requires_grad_(), nw.requires_grad_(), w.requires_grad_(), 1e-6, None))
    torch.library.opcheck(rmm_ops._fwd, (x, nw, w, 1e-5, r.requires_grad_()))
    torch.library.opcheck(rmm_ops._fwd, (x, None, w, 1e-6, None))


def test_rms_norm_linear_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    hidden, q, kv = 64, 64, 16
    norm = LlamaRMSNorm(hidden, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    projs = [torch.nn.Linear(hidden, o, bias=False).to(DEVICE) for o in (q, kv, kv)]
    fused = layers.RMSNormLinear.from_modules(norm, projs)
    assert fused.norm_weight is norm.weight and fused.weight.shape == (q + 2 * kv, hidden)
    x = torch.randn(2, 7, hidden, device=DEVICE)
    r = torch.randn(2, 7, hidden, device=DEVICE)
    h = norm(x)
    for a, p in zip(fused(x), projs):
        torch.testing.assert_close(a, p(h), rtol=1e-5, atol=1e-5)
    outs, s = fused(x, r)
    torch.testing.assert_close(s, r + x)
    for a, p in zip(outs, projs):
        torch.testing.assert_close(a, p(norm(r + x)), rtol=1e-5, atol=1e-5)
    # gradients reach the shared norm weight and the concatenated weight
    sum(o.square().sum() for o in fused(x)).backward()
    assert norm.weight.grad is not None and fused.weight.grad is not None
    # inference: pre-folded weight
    fused.fold_()
    assert fused.norm_weight is None
    for a, p in zip(fused(x), projs):
        torch.testing.assert_close(a, p(h), rtol=1e-4, atol=1e-5)


def test_rms_norm_linear_bias_and_errors():
    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.nn.Parameter(torch.ones(8)), 1e-6
    lins = [torch.nn.Linear(8, 4), torch.nn.Linear(8, 2)]
    fused = layers.RMSNormLinear.from_modules(norm, lins)
    x = torch.randn(3, 8)
    ref = reference.rms_norm(x, norm.weight, 1e-6)
    for a, lin in zip(fused(x), lins):
        torch.testing.assert_close(a, lin(ref), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="all linears have a bias"):
        layers.RMSNormLinear.from_modules(norm, [torch.nn.Linear(8, 4), torch.nn.Linear(8, 2, bias=False)])
    with pytest.raises(TypeError, match="nn.Linear"):
        layers.RMSNormLinear.from_modules(norm, [])
    assert layers.RMSNormLinear(8, 5)(x)[0].shape == (3, 5)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(x=torch.randn(2, 8).long()), TypeError, "x has dtype int64"),
        (dict(w=torch.randn(4, 8).half()), TypeError, "weight has dtype"),
        (dict(w=torch.randn(4, 7)), ValueError, "weight has shape"),
        (dict(w=torch.randn(8)), ValueError, "weight must have 2 dimensions"),
        (dict(nw=torch.randn(7)), ValueError, "norm_weight has shape"),
        (dict(nw=torch.randn(8).double()), TypeError, "norm_weight has dtype"),
        (dict(r=torch.randn(2, 7)), ValueError, "residual has shape"),
        (dict(r=torch.randn(2, 8).half()), TypeError, "residual has dtype"),
        (dict(nw=torch.randn(8, device="meta")), ValueError, "norm_weight is on meta"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(x=torch.randn(2, 0), nw=torch.randn(0), w=torch.randn(4, 0)), ValueError, "hidden size"),
    ],
)
def test_bad_input(kw, exc, match):
    a = dict(x=torch.randn(2, 8), nw=torch.randn(8), w=torch.randn(4, 8), r=None, eps=1e-6)
    a.update(kw)
    with pytest.raises(exc, match=match):
        rms_norm_matmul(a["x"], a["nw"], a["w"], a["eps"], a["r"])


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n", [(1, 6144), (16, 6144), (300, 28672), (2048, 6144)])
def test_gpu_llama3_shapes(m, n, dtype):
    x, nw, w = _inputs(m, 4096, n, dtype)
    _check(x, nw, w, backward=m <= 300)
    _check(x, nw, w, residual=torch.randn_like(x), backward=False)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    x, nw, w = _inputs(64, 4096, 6144, torch.bfloat16)
    y = torch.compile(rms_norm_matmul, fullgraph=True)(x, nw, w)
    testing.assert_close("y", y, reference.rms_norm_matmul(x, nw, w),
                         reference.rms_norm_matmul(*testing.to_oracle((x, nw, w))))


# ------------------------------------------------------------------- GPU compile check without a GPU
# tests/test_lowering.py compiles every kernel the registry's ops launch (GPU block sizes and every autotune
# config). This adds the issue-6 kernel variants the registry entries do not reach, with the same interceptor.
_VARIANTS = r"""
import torch
from llama_triton import cross_entropy, rms_norm_matmul
with torch.no_grad():                                              # loss only: COMPUTE_GRAD=False
    cross_entropy(torch.randn(4, 32000).bfloat16(), torch.zeros(4, dtype=torch.long))
L.all_configs = False          # the generic check compiles every autotune config; the first suffices here
for dt in (torch.bfloat16, torch.float32):                         # pre-folded weight; fp32 ("ieee" dots)
    x, w = torch.randn(5, 256, dtype=dt), torch.randn(48, 256, dtype=dt)
    rms_norm_matmul(x, None, w)
    rms_norm_matmul(x, torch.ones(256, dtype=dt), w, residual=x)
print("LOWERING OK", len(L.compiled))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_issue6_kernel_variants_lower_to_sm90():
    """cross_entropy without gradient and rms_norm_matmul pre-folded / in fp32 compile for sm_90."""
    stdout = lowering_check.run_snippet(_VARIANTS)
    assert "COMPUTE_GRAD=False" in stdout and "HAS_NORM_WEIGHT=False" in stdout and "ieee" in stdout
