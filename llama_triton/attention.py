"""Attention dispatch for the model and for transformers' AttentionInterface.

``causal_attention`` (prefill / training: flash_attention), ``cached_attention`` (decode over a static
KVCache: decode_attention) and ``hf_attention_forward``, the function registered with transformers as
``attn_implementation="llama_triton"``: it takes HF-shaped (b, h, s, d) tensors and HF's padding mask, and
runs flash_attention on transposed views (varlen, unpadded, when there is padding).
The ops dispatch as llama_triton.backend decides (Triton kernels, or the PyTorch reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import padding
from .kernels.decode_attention import MAX_Q_LEN as DECODE_MAX_Q_LEN
from .ops.decode_attention import decode_attention
from .ops.flash_attention import flash_attention


def window_size(sliding_window: int | None, causal: bool = True) -> tuple[int, int]:
    """HF sliding_window W (a query sees itself and the W - 1 keys before it) -> flash-attn (left, right);
    non-causal: W - 1 on both sides, as transformers' flash-attention path."""
    if not sliding_window:
        return (-1, -1)
    return (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)


def causal_attention(q, k, v, softmax_scale=None, sliding_window=None, cu_seqlens=None, max_seqlen=None):
    """q (b, s, h, d), k/v (b, s, h_kv, d) -> (b, s, h, d): causal (bottom-right) attention, GQA, window.

    ``cu_seqlens`` int32 (n + 1,): the b*s tokens are n packed documents (offsets into the flattened
    tokens), each attending only to itself (varlen flash attention); ``max_seqlen`` its longest."""
    if cu_seqlens is None:
        return flash_attention(q, k, v, causal=True, softmax_scale=softmax_scale,
                               window_size=window_size(sliding_window))
    b, s, h, d = q.shape
    out = flash_attention(q.reshape(b * s, h, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d), causal=True,
                          softmax_scale=softmax_scale, window_size=window_size(sliding_window),
                          cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                          max_seqlen_k=max_seqlen)
    return out.view(b, s, h, d)


def cached_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, sliding_window=None):
    """q (b, q_len, h, d) over k/v_cache (b, max_seqlen, h_kv, d) holding cache_seqlens int32 (b,) valid
    entries (the new tokens' keys included, the last q_len of each row) -> (b, q_len, h, d).

    q_len <= 16 (decoding): decode_attention, no host sync. A longer chunk appended to a non-empty cache
    (chunked prefill, a prompt continued): flash_attention over each row's cache prefix, bottom-right causal
    (one small host sync for the lengths; never inside a captured decode step)."""
    if q.shape[1] <= DECODE_MAX_Q_LEN:
        return decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale,
                                window_size=window_size(sliding_window))
    return _prefix_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, sliding_window)


def _prefix_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, sliding_window):
    """cached_attention for q_len > 16: flash_attention of q (b, s, h, d) over k/v_cache[i, :cache_seqlens[i]]
    (a slice when every row holds the same length, else varlen over the gathered valid entries)."""
    b, s, h, d = q.shape
    m, h_kv = k_cache.shape[1], k_cache.shape[2]
    lo, hi = (int(t) for t in cache_seqlens.aminmax())
    if lo < 0 or hi > m:
        raise ValueError(f"cache_seqlens must be in [0, max_seqlen={m}], got values in [{lo}, {hi}]")
    win = window_size(sliding_window)
    if lo == hi:                                        # every row the same length: strided views, no copy
        return flash_attention(q, k_cache[:, :hi], v_cache[:, :hi], causal=True, softmax_scale=softmax_scale,
                               window_size=win)
    lens = cache_seqlens.to(device=q.device, dtype=torch.int32)
    valid = torch.arange(m, device=q.device)[None] < lens[:, None]                      # (b, m)
    idx = valid.reshape(-1).nonzero().squeeze(1)                                        # (total_k,)
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
    out = flash_attention(q.reshape(b * s, h, d), k_cache.reshape(b * m, h_kv, d)[idx],
                          v_cache.reshape(b * m, h_kv, d)[idx], causal=True, softmax_scale=softmax_scale,
                          window_size=win, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=s, max_seqlen_k=hi)
    return out.view(b, s, h, d)


def _masked_dense(q, k, v, mask, scale):
    """Plain-torch attention under an arbitrary 4D mask (bool: True attends; float: additive), (b, s, h, d)."""
    rep = q.shape[2] // k.shape[2]
    qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))                # (b, h, s, d)
    kf, vf = kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1)
    scores = qf @ kf.transpose(-1, -2) * scale                                  # (b, h, sq, sk)
    mask = mask[..., : k.shape[1]]
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
    return (probs @ vf).transpose(1, 2).to(q.dtype)


def _packed_cu_seqlens(module, q, k, kwargs):
    """int32 (n + 1,) offsets of packed documents in a no-cache forward, or None: transformers' flash kwargs
    ``cu_seq_lens_q`` when given, else (training only: it costs a host sync) derived from ``position_ids``
    that restart at 0 inside the row, as transformers' flash-attention path does."""
    if q.shape[1] != k.shape[1]:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(device=q.device, dtype=torch.int32)
    pos = kwargs.get("position_ids")
    if pos is None or q.shape[0] != 1 or not getattr(module, "training", False):
        return None
    starts = (pos.reshape(-1) == 0).nonzero().squeeze(1)
    if starts.numel() <= 1 or int(starts[0]) != 0:
        return None
    return F.pad(starts, (0, 1), value=q.shape[1]).to(torch.int32)


def hf_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         sliding_window=None, **kwargs):
    """transformers AttentionInterface function: query (b, h, sq, d), key/value (b, h_kv, sk, d) ->
    (out (b, sq, h, d), None).

    attention_mask is what the registered mask function (``hf.attention_mask``) gives: None (no padding:
    plain causal), a 2D bool (b, n) padding mask over the n seen + new tokens, n <= sk (n < sk with a
    StaticCache), or an int32 (b,) count of filled slots (a StaticCache without padding: only the first
    count[i] keys of the buffer are tokens, the queries are the last sq of them: ``cached_attention``). With
    padding, q/k/v are unpadded and run as varlen flash attention, causal bottom-right per sequence. A 4D
    mask (someone else's, e.g. a custom one) runs a plain-torch masked attention.
    ``is_causal`` (kwarg, else ``module.is_causal``, else True) and ``sliding_window`` (kwarg, else
    ``module.sliding_window``) as transformers' flash-attention function reads them.
    """
    if dropout and getattr(module, "training", False):
        raise NotImplementedError("llama_triton attention does not implement attention dropout; set "
                                  "config.attention_dropout = 0")
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    win = window_size(sliding_window, causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (b, s, h, d) views
    b, sq, h, d = q.shape
    # decode steps (<= 16 new tokens, causal, no gradient) read HF's cache in place with decode_attention:
    # split-K over the keys, K/V read once per kv head, no host sync (lengths from padding.py, per forward)
    decode = causal and sq <= DECODE_MAX_Q_LEN and not (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    if attention_mask is None:
        cu = _packed_cu_seqlens(module, q, k, kwargs)
        if cu is not None:          # packed documents (transformers' DataCollatorWithFlattening): varlen
            out = flash_attention(q.reshape(b * sq, h, d), k.reshape(b * sq, -1, d), v.reshape(b * sq, -1, d),
                                  causal=causal, softmax_scale=scaling, window_size=win, cu_seqlens_q=cu,
                                  cu_seqlens_k=cu, max_seqlen_q=kwargs.get("max_length_q"),
                                  max_seqlen_k=kwargs.get("max_length_q"))
            return out.view(b, sq, h, d), None
        if decode:
            return decode_attention(q, k, v, padding.full_lengths(b, k.shape[1], q.device), softmax_scale=scaling,
                                    window_size=win), None
        return flash_attention(q, k, v, causal=causal, softmax_scale=scaling, window_size=win), None
    if attention_mask.dim() == 1:   # a StaticCache without padding: (b,) filled slots, the tail never read
        filled = attention_mask.to(device=q.device, dtype=torch.int32)
        if causal:
            return cached_attention(q, k, v, filled, scaling, sliding_window), None
        if sliding_window:
            raise NotImplementedError("llama_triton attention: a non-causal sliding window over a StaticCache")
        keys = torch.arange(k.shape[1], device=q.device)[None] < filled[:, None]              # (b, sk)
        return _masked_dense(q, k, v, keys[:, None, None, :], scaling if scaling is not None else d ** -0.5), None
    if attention_mask.dim() == 4:
        return _masked_dense(q, k, v, attention_mask, scaling if scaling is not None else d ** -0.5), None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be None, 1D (batch,) int, 2D (batch, seq) or 4D, got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=q.device, dtype=torch.bool)
    sk = k.shape[1]
    if mask.shape[1] > sk:          # sliding-window caches keep only the last sk keys
        mask = mask[:, -sk:]
    n = mask.shape[1]
    k, v = k[:, :n], v[:, :n]       # a StaticCache: only the first n slots are filled
    if decode:                      # left padding (what HF generate builds): keys [leftpad, n) of each row
        left = padding.left_padding(attention_mask, n, q.device)
        if left is not None:
            return decode_attention(q, k, v, left[1], softmax_scale=scaling, window_size=win,
                                    cache_leftpad=left[0]), None
    # the queries are the last sq positions; unpad indices once per forward (padding.unpad), not per layer
    idx_k, idx_q, cu_k, cu_q, max_k, max_q = padding.unpad(attention_mask, n, sq, q.device)
    out = flash_attention(
        q.reshape(b * sq, h, d)[idx_q], k.reshape(b * n, -1, d)[idx_k], v.reshape(b * n, -1, d)[idx_k],
        causal=causal, softmax_scale=scaling, window_size=win, cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    full = q.new_zeros(b * sq, h, d)
    full[idx_q] = out
    return full.view(b, sq, h, d), None
