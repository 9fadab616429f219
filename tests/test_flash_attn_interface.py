"""flash-attn-named wrappers (llama_triton.flash_attn_interface): flash-attn's documented defaults
(causal=False, ...), results equal to our own functions, return_attn_probs -> lse, flash_attn_with_kvcache's
in-place append at cache_seqlens, rotary (interleaved and GPT-NeoX), cache_batch_idx, and clear errors for
what is not supported (dropout, alibi, softcap, paged KV)."""
import inspect

import pytest
import torch

from conftest import DEVICE
from llama_triton import reference, testing
from llama_triton.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from llama_triton.ops.decode_attention import decode_attention
from llama_triton.ops.flash_attention import flash_attention


def _defaults(fn):
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_flash_attn_defaults_are_flash_attns():
    common = {"dropout_p": 0.0, "softmax_scale": None, "causal": False, "window_size": (-1, -1), "softcap": 0.0,
              "alibi_slopes": None, "deterministic": False, "return_attn_probs": False}
    assert _defaults(flash_attn_func) == common
    assert {k: _defaults(flash_attn_varlen_func)[k] for k in common} == common
    kv = _defaults(flash_attn_with_kvcache)
    assert kv["causal"] is False and kv["rotary_interleaved"] is True and kv["softcap"] == 0.0
    assert kv["window_size"] == (-1, -1) and kv["return_softmax_lse"] is False
    assert list(inspect.signature(flash_attn_with_kvcache).parameters)[:9] == [
        "q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx"]
    assert _defaults(flash_attention)["causal"] is True        # ours keeps its own default


def _qkv(b, sq, sk, h, hk, d=16, dtype=torch.float32):
    return (torch.randn(b, sq, h, d, dtype=dtype, device=DEVICE), torch.randn(b, sk, hk, d, dtype=dtype, device=DEVICE),
            torch.randn(b, sk, hk, d, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (3, 2), "softmax_scale": 0.3}])
def test_flash_attn_func_is_flash_attention(kw):
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in _qkv(2, 5, 7, 4, 2))
    out = flash_attn_func(q, k, v, **kw)
    expected = flash_attention(q, k, v, causal=kw.get("causal", False), softmax_scale=kw.get("softmax_scale"),
                               window_size=kw.get("window_size", (-1, -1)))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(expected, (q, k, v), g),
                               rtol=0, atol=0)
    # and flash-attn's non-causal default really is non-causal: the oracle agrees under the 2x rule
    low = reference.attention(q.detach(), k.detach(), v.detach(), causal=kw.get("causal", False),
                              softmax_scale=kw.get("softmax_scale"), window_size=kw.get("window_size", (-1, -1)))
    hi = reference.attention(*testing.to_oracle((q, k, v)), causal=kw.get("causal", False),
                             softmax_scale=kw.get("softmax_scale"), window_size=kw.get("window_size", (-1, -1)))
    testing.assert_close("out", out.detach(), low, hi)


def test_return_attn_probs_gives_lse():
    q, k, v = _qkv(1, 3, 4, 2, 2)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
    ref_out, ref_lse = flash_attention(q, k, v, causal=False, return_lse=True)
    assert probs is None and lse.shape == (1, 2, 3)
    torch.testing.assert_close((out, lse), (ref_out, ref_lse), rtol=0, atol=0)


def test_flash_attn_varlen_func_is_flash_attention():
    torch.manual_seed(0)
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 4, 6], dtype=torch.int32, device=DEVICE)
    q, k, v = torch.randn(8, 4, 16), torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 4, return_attn_probs=True)
    expected = flash_attention(q, k, v, causal=False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5,
                               max_seqlen_k=4, return_lse=True)
    torch.testing.assert_close((out, lse), expected, rtol=0, atol=0)
    out_c = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 4, causal=True)
    torch.testing.assert_close(out_c, flash_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), rtol=0, atol=0)


@pytest.mark.parametrize("fn", ["func", "varlen", "kvcache"])
@pytest.mark.parametrize("bad,match", [({"alibi_slopes": torch.ones(2)}, "alibi_slopes"), ({"dropout_p": 0.1}, "dropout_p"),
                                       ({"softcap": -1.0}, "softcap")])
def test_unsupported_options_raise(fn, bad, match):
    q, k, v = _qkv(1, 2, 3, 2, 2)
    if fn == "kvcache" and "dropout_p" in bad:
        bad = {"block_table": torch.zeros(1, 1, dtype=torch.int32)}
        match = "block_table"
    with pytest.raises(ValueError, match=match):
        if fn == "func":
            flash_attn_func(q, k, v, **bad)
        elif fn == "varlen":
            cu = torch.tensor([0, 2], dtype=torch.int32)
            flash_attn_varlen_func(q[0], k[0, :2], v[0, :2], cu, cu, 2, 2, **bad)
        else:
            flash_attn_with_kvcache(q, k, v, cache_seqlens=1, **bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kw", [{"causal": True}, {"window_size": (4, 1)}])
def test_softcap_vs_reference(kw, dtype):
    """Gemma-2's attention logit soft-capping, ``softcap * tanh(scores / softcap)`` (flash-attn's ``softcap``):
    out, lse and dq/dk/dv against the reference under the 2x rule (odd lengths, GQA)."""
    torch.manual_seed(0)
    q, k, v = (1.5 * t for t in _qkv(1, 17, 19, 4, 2, dtype=torch.float32))   # scores of a few units: cap 3 bites
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(dtype)

    def run(fn, args):
        leaves = [t.detach().clone().requires_grad_() for t in args]
        out, lse = fn(*leaves)
        return (out.detach(), lse.detach()) + torch.autograd.grad(out, leaves, g.to(out.dtype))

    ours = run(lambda *a: flash_attn_func(*a, softcap=3.0, return_attn_probs=True, **kw)[:2], (q, k, v))
    ref = lambda *a: reference.attention(*a, softcap=3.0, return_lse=True, causal=kw.get("causal", False),  # noqa: E731
                                         window_size=kw.get("window_size", (-1, -1)))
    low, hi = run(ref, (q, k, v)), run(ref, testing.to_oracle((q, k, v)))
    for name, o, l, h in zip(("out", "lse", "dq", "dk", "dv"), ours, low, hi):
        testing.assert_close(name, o, l, h)
    plain = flash_attn_func(q, k, v, **kw)
    assert (plain - ours[0]).abs().max() > 1e-2                     # the cap changed the result


# ------------------------------------------------------------------------------- flash_attn_with_kvcache
def _rotary_ref(x, cos, sin, interleaved):
    """flash-attn's apply_rotary_emb, plain PyTorch: x (b, s, h, d), cos/sin (b, s, rd / 2)."""
    rd = cos.shape[-1] * 2
    xr, rest = x[..., :rd].double(), x[..., rd:]
    c, s = cos[:, :, None].double(), sin[:, :, None].double()
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        y = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    else:
        x0, x1 = xr[..., : rd // 2], xr[..., rd // 2:]
        y = torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1)
    return torch.cat((y.to(x.dtype), rest), dim=-1)


def _kvcache_ref(q, k_cache, v_cache, k, v, cos, sin, seqlens, batch_idx, causal, window, interleaved, softcap=0.0):
    """flash_attn_with_kvcache's documented semantics in plain PyTorch (fp64 math): -> (out, k_cache, v_cache)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    b, sq = q.shape[:2]
    idx = batch_idx.tolist() if batch_idx is not None else list(range(b))
    outs = []
    for i in range(b):
        n, j = int(seqlens[i]), idx[i]
        qi = q[i:i + 1]
        if k is not None:
            sn = k.shape[1]
            ki, vi = k[i:i + 1], v[i:i + 1]
            if cos is not None:
                pos = torch.arange(n, n + sn)
                ki = _rotary_ref(ki, cos[None, pos], sin[None, pos], interleaved)
                qpos = torch.arange(n, n + sq) if (causal or window != (-1, -1)) else torch.full((sq,), n)
                qi = _rotary_ref(qi, cos[None, qpos], sin[None, qpos], interleaved)
            k_cache[j, n:n + sn], v_cache[j, n:n + sn] = ki[0], vi[0]
            n += sn
        outs.append(reference.attention(qi.double(), k_cache[j:j + 1, :n].double(), v_cache[j:j + 1, :n].double(),
                                        causal=causal, window_size=window, softcap=softcap))
    return torch.cat(outs).to(q.dtype), k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [
    dict(sq=1),                                                     # decode, flash-attn's causal=False default
    dict(sq=3, causal=True),                                        # a few new tokens (decode_attention path)
    dict(sq=3),                                                     # non-causal chunk (flash_attention path)
    dict(sq=1, rotary=True, interleaved=True),                      # flash-attn's default rotary layout
    dict(sq=2, rotary=True, interleaved=False, causal=True, rd=8),  # GPT-NeoX layout, partial rotary dim
    dict(sq=2, rotary=True, interleaved=True, batch_idx=True),      # non-causal: q rotated at cache_seqlens
    dict(sq=1, window=(2, -1), int_seqlens=True),
    dict(sq=2, no_new=True, causal=True),                           # attention over the cache only
    dict(sq=1, softcap=2.0),                                        # softcap: the flash_attention path
])
def test_flash_attn_with_kvcache(case, dtype):
    torch.manual_seed(0)
    b, h, hk, d, cache_len, cache_b = 2, 4, 2, 16, 12, 3
    sq = case["sq"]
    q = torch.randn(b, sq, h, d, device=DEVICE).to(dtype)
    k_cache = torch.randn(cache_b, cache_len, hk, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(cache_b, cache_len, hk, d, device=DEVICE).to(dtype)
    k = v = None
    if not case.get("no_new"):
        k, v = (torch.randn(b, sq, hk, d, device=DEVICE).to(dtype) for _ in range(2))
    seqlens = torch.tensor([5, 7], dtype=torch.int32, device=DEVICE) if not case.get("int_seqlens") else 6
    seq_t = seqlens if isinstance(seqlens, torch.Tensor) else torch.full((b,), seqlens, dtype=torch.int32)
    batch_idx = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE) if case.get("batch_idx") else None
    if batch_idx is None:
        k_cache, v_cache = k_cache[:b].contiguous(), v_cache[:b].contiguous()
    cos = sin = None
    if case.get("rotary"):
        rd = case.get("rd", d)
        angle = torch.rand(cache_len, rd // 2, device=DEVICE) * 6
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    causal, window, interleaved = case.get("causal", False), case.get("window", (-1, -1)), case.get("interleaved", True)
    softcap = case.get("softcap", 0.0)
    exp_out, exp_k, exp_v = _kvcache_ref(q, k_cache, v_cache, k, v, cos, sin, seq_t, batch_idx, causal, window,
                                         interleaved, softcap)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                  cache_batch_idx=batch_idx, causal=causal, window_size=window,
                                  rotary_interleaved=interleaved, softcap=softcap)
    # the new k/v were written into the caches in place (rotated k; one rounding, so within 1 ulp)
    torch.testing.assert_close(kc, exp_k, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)
    torch.testing.assert_close(vc, exp_v, rtol=0, atol=0)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out, exp_out, rtol=tol, atol=tol)


def test_kvcache_matches_decode_attention_and_lse():
    """The decode path is decode_attention itself (cache_seqlens then counts the appended token)."""
    torch.manual_seed(0)
    q, k_cache, v_cache = _qkv(2, 1, 10, 4, 2)
    seqlens = torch.tensor([3, 9], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
    torch.testing.assert_close(out, decode_attention(q, k_cache, v_cache, seqlens), rtol=0, atol=0)
    out2, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, return_softmax_lse=True)
    ref_lse = torch.cat([reference.attention(q[i:i + 1], k_cache[i:i + 1, :n], v_cache[i:i + 1, :n], causal=False,
                                             return_lse=True)[1] for i, n in enumerate((3, 9))])
    assert lse.shape == (2, 4, 1)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_kvcache_bad_input():
    q, k_cache, v_cache = _qkv(1, 1, 4, 2, 2)
    k = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="v"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, cache_seqlens=1)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=k)
    with pytest.raises(ValueError, match="cache_seqlens"):        # no room for the new token
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=k, cache_seqlens=4)
    with pytest.raises(TypeError, match="k"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k.half(), v=k.half(), cache_seqlens=1)
    with pytest.raises(ValueError, match="rotary_sin"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=k, cache_seqlens=1, rotary_cos=torch.ones(4, 8))
