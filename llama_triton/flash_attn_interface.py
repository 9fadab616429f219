"""flash-attn's function names and defaults over our kernels, so code written for ``flash_attn`` moves over
by changing one import::

    from llama_triton.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Thin wrappers: ``flash_attn_func`` / ``flash_attn_varlen_func`` call ``llama_triton.flash_attention`` (note
flash-attn's ``causal=False`` default: our own ``flash_attention`` defaults to ``causal=True``);
``flash_attn_with_kvcache`` writes the new k/v into the caches in place at ``cache_seqlens`` (after the
optional rotary embedding, through ``llama_triton.apply_rotary_pos_emb``) and then calls
``decode_attention`` (one query, or a causal chunk of up to 16) or ``flash_attention`` per sequence.

``softcap > 0`` (Gemma-2's attention logit soft-capping) is supported, forward and backward.
Not supported (ValueError naming the argument): ``dropout_p > 0``, ``alibi_slopes``, and for the cache
``block_table`` (paged KV) and ``cache_leftpad``. ``deterministic`` is accepted and ignored
(our backward is always deterministic). ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``:
flash-attn's third value (the attention probabilities, "for testing only") is not computed.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .kernels._checks import check_same_device, check_tensor
from .kernels.flash_attention import check_softcap
from .ops.decode_attention import decode_attention
from .ops.flash_attention import flash_attention
from .ops.rope import apply_rotary_pos_emb

_DECODE_MAX_Q = 16          # decode_attention's q_len limit (kernels/decode_attention.MAX_Q_LEN)


def _reject(dropout_p=0.0, alibi_slopes=None, **extra):
    """ValueError for the flash-attn options our kernels do not implement (never a silent wrong result)."""
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p!r} is not supported by llama_triton's attention (no dropout); "
                         "pass dropout_p=0.0")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported by llama_triton's attention; pass alibi_slopes=None")
    for name, value in extra.items():
        if value is not None:
            raise ValueError(f"{name} is not supported by llama_triton's flash_attn_with_kvcache; pass {name}=None")


def _with_probs(res, return_attn_probs):
    return (res[0], res[1], None) if return_attn_probs else res


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_func``: q ``(batch, seqlen_q, heads, head_dim)``, k/v ``(batch, seqlen_k,
    heads_kv, head_dim)`` -> out like q; with ``return_attn_probs``, ``(out, softmax_lse (batch, heads,
    seqlen_q) fp32, None)``. Bottom-right causal alignment and windows as flash-attn; differentiable.
    ``llama_triton.flash_attention(q, k, v, causal=causal, ...)``."""
    _reject(dropout_p, alibi_slopes)
    res = flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=tuple(window_size),
                          return_lse=return_attn_probs, softcap=softcap)
    return _with_probs(res, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func``: packed q ``(total_q, heads, head_dim)``, k/v ``(total_k,
    heads_kv, head_dim)``, int32 ``cu_seqlens_q/k (n_seqs + 1,)`` -> out like q; with
    ``return_attn_probs``, ``(out, softmax_lse (heads, total_q) fp32, None)``. Differentiable."""
    _reject(dropout_p, alibi_slopes, block_table=block_table)
    res = flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=tuple(window_size),
                          cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                          max_seqlen_k=max_seqlen_k, return_lse=return_attn_probs, softcap=softcap)
    return _with_probs(res, return_attn_probs)


# ------------------------------------------------------------------------------- flash_attn_with_kvcache
def _rotary_tables(cos_half: Tensor, sin_half: Tensor, positions: Tensor):
    """flash-attn tables ``(seqlen_ro, rotary_dim / 2)`` at ``positions (b, s)`` -> our rope op's
    ``(b, s, rotary_dim)`` tables (HF rotate_half convention: both halves equal)."""
    c, s = cos_half[positions], sin_half[positions]                       # (b, s, rd / 2)
    return torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """flash-attn's rotary on x ``(b, s, h, d)`` over its first ``rotary_dim = cos.shape[-1]`` dims, through
    our rope op. Interleaved (pairs 0&1, 2&3, ...) is the GPT-NeoX rotation of x with its dims permuted
    (evens, then odds), so it is done by permuting, rotating and permuting back."""
    rd = cos.shape[-1]
    xr = x[..., :rd]
    if interleaved:
        perm = torch.cat((torch.arange(0, rd, 2), torch.arange(1, rd, 2))).to(x.device)
        xr = xr[..., perm]
    yr, _ = apply_rotary_pos_emb(xr, xr[:, :, :1], cos, sin, unsqueeze_dim=2)
    yr = yr.to(x.dtype)
    if interleaved:
        yr = yr[..., torch.argsort(perm)]
    return yr if rd == x.shape[-1] else torch.cat((yr, x[..., rd:]), dim=-1)


def _check_cache_args(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx):
    check_tensor("q", q, ndim=4)
    check_tensor("k_cache", k_cache, ndim=4)
    check_tensor("v_cache", v_cache, ndim=4)
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new entries to append) or neither")
    if k is not None:
        for name, t, cache in (("k", k, k_cache), ("v", v, v_cache)):
            check_tensor(name, t, ndim=4)
            if t.dtype != cache.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but {name}_cache has {cache.dtype}; they must match")
            if t.shape[0] != q.shape[0] or tuple(t.shape[2:]) != tuple(cache.shape[2:]):
                raise ValueError(f"{name} has shape {tuple(t.shape)}: it must be (batch={q.shape[0]}, seqlen_new, "
                                 f"{cache.shape[2]}, {cache.shape[3]})")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when k/v are given (where to append them)")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin or neither")
    if rotary_cos is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check_tensor(name, t, ndim=2)
        if rotary_sin.shape != rotary_cos.shape or 2 * rotary_cos.shape[1] > q.shape[-1]:
            raise ValueError(f"rotary_cos/rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                             f"head_dim={q.shape[-1]}; got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
    if cache_batch_idx is not None:
        check_tensor("cache_batch_idx", cache_batch_idx, (torch.int32, torch.int64), ndim=1)
        if cache_batch_idx.shape[0] != q.shape[0]:
            raise ValueError(f"cache_batch_idx has shape {tuple(cache_batch_idx.shape)}; it must be (batch,)")
    elif k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has {q.shape[0]}: pass cache_batch_idx")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=rotary_cos,
                      cache_batch_idx=cache_batch_idx)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, Tensor]] = None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache`` (inference; no backward).

    Args:
        q: ``(batch, seqlen_q, heads, head_dim)``.
        k_cache, v_cache: ``(batch_cache, seqlen_cache, heads_kv, head_dim)``; updated IN PLACE when k/v are
            given: ``k_cache[cache_batch_idx[i], cache_seqlens[i] + j] = k[i, j]`` (k rotated first when
            rotary tables are given).
        k, v: optional ``(batch, seqlen_new, heads_kv, head_dim)`` new entries, the caches' dtype.
        rotary_cos, rotary_sin: optional ``(seqlen_ro, rotary_dim / 2)`` tables (applied only with k/v): k is
            rotated at positions ``cache_seqlens + j``; q at ``cache_seqlens + t`` when causal or windowed,
            else every query at ``cache_seqlens`` (flash-attn's rule).
        cache_seqlens: int or int32 ``(batch,)``: entries already in the cache (before appending k/v);
            None: the whole cache (only without k/v).
        cache_batch_idx: optional int ``(batch,)``: the cache row of each sequence (default ``0..batch-1``).
        softmax_scale, causal, window_size: as ``flash_attn_func`` (bottom-right alignment, causal=False).
        rotary_interleaved: True (flash-attn's default): rotate pairs (0,1), (2,3), ...; False: GPT-NeoX /
            HF halves (0, rd/2), (1, rd/2 + 1), ...
        num_splits: accepted for compatibility (0 = heuristic); our decode kernel picks its own split.
        return_softmax_lse: also return the fp32 lse ``(batch, heads, seqlen_q)``.

    Returns:
        out ``(batch, seqlen_q, heads, head_dim)`` in q's dtype (and the lse).

    Attention runs in ``decode_attention`` when seqlen_q is 1 (or causal and <= 16), no lse is asked for
    and softcap is 0: no host sync. Otherwise ``flash_attention`` per sequence, which reads
    ``cache_seqlens`` on the host.
    With cache_batch_idx, the selected cache rows are gathered (a copy) for the attention.
    """
    _reject(0.0, alibi_slopes, block_table=block_table, cache_leftpad=cache_leftpad)
    softcap = check_softcap(softcap)
    _check_cache_args(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx)
    b, sq = q.shape[:2]
    if cache_seqlens is None:
        cache_seqlens = torch.full((b,), k_cache.shape[1], dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        check_tensor("cache_seqlens", cache_seqlens, (torch.int32,), ndim=1)
        if cache_seqlens.shape[0] != b:
            raise ValueError(f"cache_seqlens has shape {tuple(cache_seqlens.shape)}; it must be (batch={b},)")
    rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(b, device=q.device)
    seqlens = cache_seqlens
    if k is not None:
        new = k.shape[1]
        if cache_seqlens.device.type == "cpu" and int(cache_seqlens.max()) + new > k_cache.shape[1]:
            raise ValueError(f"cache_seqlens + seqlen_new ({int(cache_seqlens.max())} + {new}) exceeds the cache "
                             f"length {k_cache.shape[1]} (k_cache dim 1)")
        positions = cache_seqlens.long()[:, None] + torch.arange(new, device=q.device)        # (b, new)
        if rotary_cos is not None:
            cos, sin = _rotary_tables(rotary_cos, rotary_sin, positions)
            k = _rotate(k, cos, sin, rotary_interleaved)
            if causal or tuple(window_size) != (-1, -1):
                q_pos = cache_seqlens.long()[:, None] + torch.arange(sq, device=q.device)
            else:
                q_pos = cache_seqlens.long()[:, None].expand(b, sq)
            cos_q, sin_q = _rotary_tables(rotary_cos, rotary_sin, q_pos)
            q = _rotate(q, cos_q, sin_q, rotary_interleaved)
        k_cache[rows[:, None], positions] = k                                               # in place
        v_cache[rows[:, None], positions] = v
        seqlens = cache_seqlens + new
    kc, vc = (k_cache, v_cache) if cache_batch_idx is None else (k_cache[rows], v_cache[rows])
    left, right = window_size
    if not return_softmax_lse and not softcap and (sq == 1 or (causal and sq <= _DECODE_MAX_Q)):
        # one query sits at the last key: causal or not, it sees keys [n - 1 - left, n - 1]
        return decode_attention(q, kc, vc, seqlens, softmax_scale, (left, -1))
    outs, lses = [], []
    for i, n in enumerate(seqlens.tolist()):
        o, lse = flash_attention(q[i:i + 1], kc[i:i + 1, :n], vc[i:i + 1, :n], causal=causal,
                                 softmax_scale=softmax_scale, window_size=(left, right), return_lse=True,
                                 softcap=softcap)
        outs.append(o)
        lses.append(lse)
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_softmax_lse else out
