"""Flash attention: forward, lse and backward against the fp64 reference under the 2x rule (odd lengths,
q_len != k_len, GQA 1/4/8, windows, varlen, empty rows, strided HF-layout inputs), SDPA agreement, the
custom ops (opcheck, torch.compile), dispatch, determinism and bad input. bf16 and big shapes: GPU only."""
import pytest
import torch

import lowering_check
from conftest import DEVICE, DTYPES
from llama_triton import reference, testing
from llama_triton.ops import flash_attention as fa_ops
from llama_triton.ops.flash_attention import flash_attention

LOWP = [d for d in DTYPES if d != torch.float32]


def _close_lse(name, ours, low, hi):
    """lse may hold -inf (empty rows): those must match exactly, the finite entries follow the 2x rule."""
    empty = torch.isneginf(hi)
    assert torch.equal(torch.isneginf(ours), empty), f"{name}: -inf (empty row) positions differ"
    keep = ~empty
    testing.assert_close(name, ours[keep], low[keep], hi[keep])


def _run(fn, q, k, v, kw, douts, with_lse_grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kw)
    loss = (out * douts[0].to(out.dtype)).sum()
    if with_lse_grad:
        loss = loss + (lse * douts[1].to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return (out.detach(), lse.detach()) + tuple(g.detach() for g in grads)


def check(q, k, v, backward=True, with_lse_grad=False, **kw):
    """Ours vs reference in the input dtype vs the fp64 oracle: out, lse and (with backward) dq, dk, dv."""
    gen = torch.Generator().manual_seed(1)
    out_shape = q.shape
    lse_shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1])
    douts = (torch.randn(out_shape, generator=gen).to(q.device), torch.randn(lse_shape, generator=gen).to(q.device))
    if not backward:
        ours = flash_attention(q, k, v, return_lse=True, **kw)
        low = reference.attention(q, k, v, return_lse=True, **kw)
        hi = reference.attention(*testing.to_oracle((q, k, v)), return_lse=True, **kw)
    else:
        ours = _run(flash_attention, q, k, v, kw, douts, with_lse_grad)
        low = _run(reference.attention, q, k, v, kw, douts, with_lse_grad)
        hi = _run(reference.attention, *testing.to_oracle((q, k, v)), kw, douts, with_lse_grad)
    assert ours[0].shape == q.shape and ours[0].dtype == q.dtype and ours[1].dtype == torch.float32
    assert ours[1].shape == lse_shape
    testing.assert_close("out", ours[0], low[0], hi[0])
    _close_lse("lse", ours[1], low[1], hi[1])
    for name, o, l, h, t in zip(("dq", "dk", "dv"), ours[2:], low[2:], hi[2:], (q, k, v)):
        assert o.shape == t.shape and o.dtype == t.dtype
        testing.assert_close(name, o, l, h)
    return ours


def _qkv(b, sq, sk, h, hk, d, dtype, device=DEVICE):
    return (torch.randn(b, sq, h, d, dtype=dtype, device=device), torch.randn(b, sk, hk, d, dtype=dtype, device=device),
            torch.randn(b, sk, hk, d, dtype=dtype, device=device))


# (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal, window)
CASES = [
    (1, 1, 1, 2, 2, 16, True, (-1, -1)),          # a single token
    (2, 17, 17, 4, 1, 32, True, (-1, -1)),        # batch > 1, GQA 4
    (1, 17, 17, 2, 2, 64, False, (-1, -1)),
    (1, 127, 127, 1, 1, 16, True, (-1, -1)),
    (1, 129, 129, 2, 1, 16, False, (-1, -1)),
    (1, 300, 300, 1, 1, 16, True, (-1, -1)),
    (1, 17, 45, 8, 1, 16, True, (-1, -1)),        # q_len < k_len (chunked prefill), GQA 8
    (1, 45, 17, 2, 1, 32, True, (-1, -1)),        # q_len > k_len: the first 28 rows see nothing
    (2, 33, 20, 2, 2, 16, False, (-1, -1)),
    (1, 70, 70, 2, 1, 32, True, (16, -1)),        # sliding window + causal (Mistral)
    (1, 50, 61, 2, 2, 16, False, (7, 3)),         # two-sided window, q_len != k_len
    (1, 61, 50, 2, 2, 16, False, (0, 0)),         # a diagonal band, with empty rows
    (1, 40, 40, 2, 1, 80, True, (-1, -1)),        # non-power-of-2 head_dim (padded)
    (1, 20, 24, 1, 1, 8, False, (-1, 5)),
    (1, 33, 33, 1, 1, 128, True, (-1, -1)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_sq{}_sk{}_h{}_hk{}_d{}_{}_w{}_{}".format(
    *c[:6], "causal" if c[6] else "full", *c[7]))
def test_forward_backward_fp32(case):
    b, sq, sk, h, hk, d, causal, window = case
    torch.manual_seed(0)
    check(*_qkv(b, sq, sk, h, hk, d, torch.float32), causal=causal, window_size=window)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[7], CASES[9], CASES[12]], ids=lambda c: str(c[:7]))
def test_forward_backward_low_precision(case, dtype):
    b, sq, sk, h, hk, d, causal, window = case
    torch.manual_seed(0)
    check(*_qkv(b, sq, sk, h, hk, d, dtype), causal=causal, window_size=window)


def test_softmax_scale_and_lse_gradient():
    torch.manual_seed(0)
    check(*_qkv(1, 20, 31, 4, 2, 32, torch.float32), causal=True, softmax_scale=0.3, with_lse_grad=True)
    check(*_qkv(1, 31, 31, 2, 2, 16, torch.float32), causal=False, window_size=(5, 5), with_lse_grad=True)


def test_empty_rows_are_zero_not_nan():
    """q_len > k_len causal: queries before the first key see nothing -> out 0, lse -inf, zero grads."""
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 10, 4, 2, 1, 16, torch.float32))
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[:, :6] == 0).all() and torch.isneginf(lse[..., :6]).all() and torch.isfinite(lse[..., 6:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :6] == 0).all()
    # no keys at all
    q0, k0, v0 = _qkv(1, 3, 0, 2, 2, 16, torch.float32)
    out, lse = flash_attention(q0, k0, v0, causal=False, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_varlen_matches_reference():
    """Packed sequences (a length-1 one, q_len != k_len per sequence, an empty q and an empty k sequence),
    GQA, causal."""
    torch.manual_seed(0)
    lens_q, lens_k = [5, 1, 17, 0, 3, 2], [5, 9, 17, 4, 1, 0]
    cu_q = torch.tensor([0] + lens_q, device=DEVICE).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEVICE).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens_q), 4, 32, device=DEVICE)
    k = torch.randn(sum(lens_k), 2, 32, device=DEVICE)
    v = torch.randn(sum(lens_k), 2, 32, device=DEVICE)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17, max_seqlen_k=17)
    check(q, k, v, causal=True, **kw)
    check(q, k, v, causal=False, window_size=(2, 1), with_lse_grad=True, **kw)
    del kw["max_seqlen_q"], kw["max_seqlen_k"]                     # read from cu_seqlens
    check(q.half(), k.half(), v.half(), causal=True, **kw)


def test_varlen_equals_dense_per_sequence():
    """Packed equal-length sequences against the reference's dense (batched) path, not its varlen loop."""
    torch.manual_seed(0)
    q, k, v = _qkv(3, 19, 19, 2, 1, 16, torch.float32)
    cu = torch.arange(0, 4 * 19, 19, dtype=torch.int32, device=DEVICE)
    packed = flash_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens_q=cu, cu_seqlens_k=cu)
    testing.assert_close("packed", packed.view_as(q), reference.attention(q, k, v),
                         reference.attention(*testing.to_oracle((q, k, v))))


# The CPU tests run one small config per kernel; the GPU configs also have square blocks and BLOCK_M <
# BLOCK_N (forward) / BLOCK_M > BLOCK_N (backward), which move the block edges of the three loop phases.
@pytest.mark.parametrize("fwd_block,bwd_block", [((16, 16), (16, 16)), ((16, 32), (32, 16))], ids=str)
def test_other_block_shapes(monkeypatch, fwd_block, bwd_block):
    import triton

    K = fa_ops.K
    for kernel, (bm, bn) in ((K._attn_fwd_kernel, fwd_block), (K._attn_bwd_dkdv_kernel, bwd_block),
                             (K._attn_bwd_dq_kernel, bwd_block)):
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4,
                                                              num_stages=1)])
        monkeypatch.setattr(kernel, "cache", {})
    torch.manual_seed(0)
    check(*_qkv(1, 37, 50, 2, 1, 24, torch.float32), causal=True, window_size=(20, -1), with_lse_grad=True)
    check(*_qkv(1, 50, 37, 2, 2, 24, torch.float32), causal=False, window_size=(5, 7))


def test_hf_layout_strided_inputs_without_copy(monkeypatch):
    """HF (b, h, s, d) tensors transposed to (b, s, h, d), and k/v sliced out of one fused projection: the
    kernel must read them in place (the launcher sees the caller's storage), and grads must match."""
    torch.manual_seed(0)
    b, s, h, hk, d = 2, 23, 4, 2, 32
    q_hf = torch.randn(b, h, s, d, device=DEVICE, requires_grad=True)
    kv = torch.randn(b, s, 2 * hk, d, device=DEVICE, requires_grad=True)
    dout = torch.randn(b, h, s, d, device=DEVICE).transpose(1, 2)         # a strided output gradient too
    grads = []
    for fn in (flash_attention, reference.attention):
        q, k, v = q_hf.transpose(1, 2), kv[:, :, :hk], kv[:, :, hk:]
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        if fn is flash_attention:
            seen = []
            real = fa_ops.K.attention_fwd
            monkeypatch.setattr(fa_ops.K, "attention_fwd",
                                lambda *a: seen.append([t.data_ptr() for t in a[:3]]) or real(*a))
        out = fn(q, k, v, causal=True)
        if fn is flash_attention:
            assert seen == [[q_hf.data_ptr(), kv.data_ptr(), v.data_ptr()]]
        grads.append((out,) + torch.autograd.grad(out, (q_hf, kv), dout))
    for name, ours, ref in zip(("out", "dq", "dkv"), *grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5, msg=name)
    check(q_hf.detach().transpose(1, 2), kv.detach()[:, :, :hk], kv.detach()[:, :, hk:], causal=False)


def test_agrees_with_sdpa_and_an_explicit_mask_on_hf_shaped_tensors():
    """What HF's sdpa attention computes on (b, h, s, d) with mask = reference.attention_mask, vs ours on the
    transposed views (q_len < k_len, GQA, causal + window)."""
    torch.manual_seed(0)
    b, h, hk, sq, sk, d = 2, 4, 2, 19, 27, 32
    q, k, v = torch.randn(b, h, sq, d), torch.randn(b, hk, sk, d), torch.randn(b, hk, sk, d)
    for causal, window in ((True, (-1, -1)), (True, (6, -1)), (False, (-1, -1))):
        mask = reference.attention_mask(sq, sk, causal, window)
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1), attn_mask=mask)
        got = flash_attention(*(t.to(DEVICE).transpose(1, 2) for t in (q, k, v)), causal=causal, window_size=window)
        torch.testing.assert_close(got.transpose(1, 2).cpu(), want, rtol=1e-5, atol=1e-5)


def test_check_detects_a_wrong_mask(monkeypatch):
    """The comparison itself must be able to fail: an off-by-one window, or an lse shifted by a little."""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 20, 20, 2, 1, 16, torch.float32)
    real = flash_attention
    monkeypatch.setitem(globals(), "flash_attention", lambda *a, window_size=(-1, -1), **kw: real(
        *a, window_size=(window_size[0] + 1, window_size[1]), **kw))
    with pytest.raises(AssertionError):
        check(q, k, v, backward=False, causal=True, window_size=(4, -1))

    def shifted_lse(*a, **kw):
        out, lse = real(*a, **kw)
        return out, lse + 1e-4
    monkeypatch.setitem(globals(), "flash_attention", shifted_lse)
    with pytest.raises(AssertionError, match="lse"):
        check(q, k, v, backward=False, causal=True)


def test_backward_is_deterministic():
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 37, 37, 4, 1, 16, torch.float32))
    dout = torch.randn(q.shape, device=DEVICE)
    g1 = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), dout)
    g2 = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_opcheck():
    torch.manual_seed(0)
    q, k, v = _qkv(1, 5, 7, 2, 1, 16, torch.float32)
    torch.library.opcheck(fa_ops._flash_attn_fwd, (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                                                   None, None, 5, 7, 0.25, -1, 0))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(fa_ops._flash_attn_fwd, (q[0].detach().requires_grad_(), k[0, :5].detach(),
                                                   v[0, :5].detach(), cu, cu, 3, 3, 0.25, 1, 0))


def test_torch_compile_fullgraph_traces_the_custom_op():
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 9, 9, 2, 1, 16, torch.float32))
    fn = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True), fullgraph=True)
    out = fn(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_dispatch(monkeypatch):
    q, k, v = _qkv(1, 4, 4, 2, 2, 16, torch.float32)
    calls = []
    real = fa_ops.K.attention_fwd
    monkeypatch.setattr(fa_ops.K, "attention_fwd", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("LLAMA_TRITON_BACKEND", raising=False)
    flash_attention(q, k, v)
    assert calls                                                   # auto: the kernel (interpreter / CUDA)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    out = flash_attention(q, k, v, window_size=(1, -1))
    assert len(calls) == 1
    torch.testing.assert_close(out, reference.attention(q, k, v, window_size=(1, -1)))
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="LLAMA_TRITON_BACKEND=triton"):
        flash_attention(q.cpu(), k.cpu(), v.cpu())


def _cu(*vals, dtype=torch.int32):
    return torch.tensor(vals, dtype=dtype)


@pytest.mark.parametrize(
    "args,kw,exc,match",
    [
        (((1, 4, 2, 48), (1, 4, 2, 48)), {}, None, None),                                    # 48 is fine
        (((1, 4, 2, 12), (1, 4, 2, 12)), {}, ValueError, "head_dim must be a multiple of 8"),
        (((1, 4, 2, 512), (1, 4, 2, 512)), {}, ValueError, "head_dim"),
        (((1, 4, 3, 16), (1, 4, 2, 16)), {}, ValueError, r"q's heads \(3\) must be a multiple"),
        (((1, 4, 2, 16), (1, 4, 2, 32)), {}, ValueError, "k has head_dim 32"),
        (((2, 4, 2, 16), (1, 4, 2, 16)), {}, ValueError, "k has batch 1"),
        (((4, 2, 16), (4, 2, 16)), {}, ValueError, "q must have 4 dimensions"),
        (((1, 4, 2, 16), (1, 4, 2, 16)), {"window_size": (-2, 0)}, ValueError, r"window_size\[0\]"),
        (((1, 4, 2, 16), (1, 4, 2, 16)), {"window_size": 3}, ValueError, "window_size must be a"),
        (((1, 4, 2, 16), (1, 4, 2, 16)), {"softmax_scale": "x"}, ValueError, "softmax_scale"),
        (((1, 4, 2, 16), (1, 4, 2, 16)), {"softmax_scale": float("inf")}, ValueError, "softmax_scale"),
        (((1, 4, 2, 16), (1, 4, 2, 16)), {"causal": 1}, TypeError, "causal must be a bool"),
        (((4, 2, 16), (4, 2, 16)), {"cu_seqlens_q": _cu(0, 4, dtype=torch.int64), "cu_seqlens_k": _cu(0, 4)},
         TypeError, "cu_seqlens_q has dtype int64"),
        (((4, 2, 16), (4, 2, 16)), {"cu_seqlens_q": _cu(0, 4)}, ValueError, "cu_seqlens_k is None"),
        (((4, 2, 16), (4, 2, 16)), {"cu_seqlens_q": _cu(0, 3, 1, 4), "cu_seqlens_k": _cu(0, 1, 2, 4)},
         ValueError, "cu_seqlens_q must start at 0, never decrease"),
        (((4, 2, 16), (4, 2, 16)), {"cu_seqlens_q": _cu(0, 2, 4), "cu_seqlens_k": _cu(0, 1, 3)},
         ValueError, "end at the token count 4"),
        (((4, 2, 16), (4, 2, 16)), {"cu_seqlens_q": _cu(0, 2, 4), "cu_seqlens_k": _cu(0, 4)},
         ValueError, "cu_seqlens_q has 3 entries but cu_seqlens_k has 2"),
        (((4, 2, 16), (4, 2, 16)), {"cu_seqlens_q": _cu(0, 1, 4), "cu_seqlens_k": _cu(0, 1, 4), "max_seqlen_q": 2},
         ValueError, r"max_seqlen_q=2 is less than the longest sequence \(3\)"),
    ],
)
def test_bad_input(args, kw, exc, match):
    q = torch.randn(args[0])
    k = v = torch.randn(args[1])
    if exc is None:
        flash_attention(q, k, v, **kw)
        return
    with pytest.raises(exc, match=match):
        flash_attention(q, k, v, **kw)


def test_bad_dtypes_and_devices():
    q, k, v = _qkv(1, 4, 4, 2, 2, 16, torch.float32, device="cpu")
    with pytest.raises(TypeError, match="k has dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q has dtype float64"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        flash_attention(q, k, v.tolist())
    with pytest.raises(ValueError, match="but v has"):
        flash_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="k is on meta"):
        flash_attention(q, k.to("meta"), v)
    cu = torch.tensor([0, 4], dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="cu_seqlens_q is on meta"):
        flash_attention(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu)


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("causal,window,sq,sk", [(True, (-1, -1), 1024, 1024), (False, (-1, -1), 777, 1500),
                                                 (True, (-1, -1), 1000, 3000), (True, (256, -1), 2048, 2048)])
def test_gpu_large(dtype, head_dim, causal, window, sq, sk):
    torch.manual_seed(0)
    check(*_qkv(2, sq, sk, 8, 2, head_dim, dtype, device="cuda"), causal=causal, window_size=window)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_varlen_and_fp32(dtype):
    torch.manual_seed(0)
    lens = [1, 700, 129, 2048, 17]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens), 16, 128, dtype=dtype, device="cuda")
    k = torch.randn(sum(lens), 4, 128, dtype=dtype, device="cuda")
    v = torch.randn(sum(lens), 4, 128, dtype=dtype, device="cuda")
    check(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)


@pytest.mark.gpu
def test_gpu_matches_sdpa_and_compiles():
    """Compiled, on HF-layout views: as close to the fp64 oracle as bf16 SDPA (the 2x rule), grads too."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    want_g = torch.autograd.grad(want, (q, k, v), dout)
    fn = torch.compile(lambda q, k, v: flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
                       fullgraph=True)
    got = fn(q, k, v).transpose(1, 2)
    got_g = torch.autograd.grad(got, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    oracle = reference.attention(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2)).transpose(1, 2)
    oracle_g = torch.autograd.grad(oracle, (q64, k64, v64), dout.double())
    testing.assert_close("out", got, want, oracle)
    for name, g, w, o in zip(("dq", "dk", "dv"), got_g, want_g, oracle_g):
        testing.assert_close(name, g, w, o)


@pytest.mark.gpu
def test_gpu_offsets_past_2_to_the_31():
    """Varlen, 1.08M packed tokens x 16 heads x 128 > 2**31 elements: the last sequences start past int32
    range (offsets must be int64). Sequences are independent, so the last one is checked on its own."""
    torch.manual_seed(0)
    n, s, h, hk, d = 4200, 256, 16, 2, 128
    assert (n - 1) * s * h * d >= 2**31
    cu = torch.arange(0, (n + 1) * s, s, dtype=torch.int32, device="cuda")
    q = torch.randn(n * s, h, d, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    k, v = (torch.randn(n * s, hk, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(2))
    out, lse = flash_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s,
                               return_lse=True)
    dout = torch.zeros_like(out)
    dout[-s:] = torch.randn(s, h, d, dtype=torch.bfloat16, device="cuda")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    last = [t.detach()[-s:][None] for t in (q, k, v)]
    ours = (out.detach()[-s:][None], lse.detach()[:, -s:][None]) + tuple(g[-s:][None] for g in grads)
    low = _run(reference.attention, *last, {}, (dout[-s:][None], None), False)
    hi = _run(reference.attention, *testing.to_oracle(last), {}, (dout[-s:][None], None), False)
    testing.assert_close("out", ours[0], low[0], hi[0])
    testing.assert_close("lse", ours[1], low[1], hi[1])
    for name, o, lo_, hi_ in zip(("dq", "dk", "dv"), ours[2:], low[2:], hi[2:]):
        testing.assert_close(name, o, lo_, hi_)
    assert (grads[0][:-s] == 0).all() and (grads[1][:-s] == 0).all()        # the other sequences got dout = 0


# ------------------------------------------------------------------- GPU compile check without a GPU
# tests/test_lowering.py compiles the registry's flash shapes (head_dim 16). This compiles the head dims
# a model uses with the same interceptor (tests/lowering_check.py): every autotune config that survives
# the prune for head_dim 128 and 256 (forward and both backward kernels; 256 is the shared-memory edge),
# the first config for 64/80/96, and window + varlen at 128.
_LOWERING = r"""
import torch
from llama_triton import flash_attention

def run(q, k, v, **kw):
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    flash_attention(q, k, v, **kw).sum().backward()

for d, every in ((128, True), (256, True), (64, False), (80, False), (96, False)):
    L.all_configs = every
    run(torch.randn(2, 200, 4, d, dtype=torch.bfloat16), torch.randn(2, 200, 2, d, dtype=torch.bfloat16),
        torch.randn(2, 200, 2, d, dtype=torch.bfloat16), causal=True)
L.all_configs = False
cu = torch.tensor([0, 100, 300], dtype=torch.int32)
run(torch.randn(300, 4, 128, dtype=torch.bfloat16), torch.randn(300, 2, 128, dtype=torch.bfloat16),
    torch.randn(300, 2, 128, dtype=torch.bfloat16), causal=True, window_size=(64, 0), cu_seqlens_q=cu,
    cu_seqlens_k=cu, max_seqlen_q=200, max_seqlen_k=200)
print("LOWERING OK", len(L.compiled))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_model_head_dims_lower_to_sm90_without_a_gpu():
    stdout = lowering_check.run_snippet(_LOWERING)
    for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
        assert f"compiled {name}" in stdout and "HEAD_DIM=256" in stdout, stdout
    assert "IS_VARLEN=True" in stdout and "HAS_LEFT=True" in stdout, stdout


def test_autotune_length_buckets_are_coarse():
    """A growing context re-tunes at most twice (< 2k, < 16k, longer), not at every power of two."""
    from llama_triton.kernels import flash_attention as K

    buckets = [K._seq_bucket(n) for n in range(1, 70000, 97)]
    assert sorted(set(buckets)) == [0, 1, 2] and buckets == sorted(buckets)
    assert K._seq_bucket(2047) == 0 and K._seq_bucket(2048) == K._seq_bucket(16383) == 1 and K._seq_bucket(16384) == 2
