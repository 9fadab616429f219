"""Decode attention over a KV cache as a torch.library custom op over kernels/decode_attention.py.

Forward only (inference): no autograd formula is registered, so calling it on tensors that require grad
and backpropagating raises. The fake impl lets torch.compile trace a decode step (fullgraph) and the launch
does no host sync, so the step can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import decode_attention as K


# ------------------------------------------------------------------------------------------ custom op
@torch.library.custom_op("llama_triton::decode_attention", mutates_args=())
def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, softmax_scale: float,
                      window_left: int, num_splits: Optional[int], cache_leftpad: Optional[Tensor] = None) -> Tensor:
    out, _ = K.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale, (window_left, -1),
                                    num_splits=num_splits, cache_leftpad=cache_leftpad)
    return out


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_left, num_splits, cache_leftpad=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous (b, q_len, h, d)


@torch.library.custom_op("llama_triton::decode_attention_append", mutates_args=("k_cache", "v_cache"))
def _decode_attention_append(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                             rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], softmax_scale: float,
                             window_left: int, num_splits: Optional[int]) -> Tensor:
    out, _ = K.decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale, (window_left, -1),
                                    num_splits=num_splits, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    return out


@_decode_attention_append.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale, window_left, num_splits):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ------------------------------------------------------------------------------------------ public API
@backend.public_op(like={"q": "k_cache"})
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                     softmax_scale: Optional[float] = None, window_size=(-1, -1),
                     num_splits: Optional[int] = None, cache_leftpad: Optional[Tensor] = None) -> Tensor:
    """Attention of a few new queries over a KV cache (flash-attn ``flash_attn_with_kvcache`` semantics,
    exactly ``llama_triton.reference.decode_attention``).

    Args:
        q: ``(batch, q_len, heads, head_dim)`` fp32/fp16/bf16, q_len in [1, 16] (1 for decoding, a few for
            speculative decoding), any strides.
        k_cache, v_cache: ``(batch, max_seqlen, heads_kv, head_dim)`` in q's dtype, any strides;
            ``heads % heads_kv == 0`` (GQA: query head i reads kv head ``i // (heads // heads_kv)``).
        cache_seqlens: int32 ``(batch,)`` on q's device: sequence i holds ``cache_seqlens[i]`` valid entries,
            the last q_len of which are the new tokens' own keys (already written, e.g. by
            ``layers.KVCache.update``). Query t attends causally to keys ``[0, cache_seqlens[i] - q_len + t]``.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        window_size: ``(left, right)``, -1 unbounded; only ``left`` matters (attention is causal).
        num_splits: force the number of split-K chunks (testing); default from shapes and the device.
        cache_leftpad: optional int32 ``(batch,)``: sequence i's keys start at that slot (flash-attn's
            ``cache_leftpad``: a left-padded batch in a dense cache, e.g. transformers' DynamicCache).

    Returns:
        ``(batch, q_len, heads, head_dim)`` in q's dtype. A query with no key to attend to gets 0.

    Values of cache_seqlens are checked (ValueError outside ``[0, max_seqlen]``) when they live on the CPU
    or with ``LLAMA_TRITON_CHECK_SEQLENS=1``; on a GPU they are otherwise clamped to ``[0, max_seqlen]``
    without a host sync (CUDA-graph safe; no recompilation as lengths grow). Forward only.
    """
    K.check_inputs(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_size)
    if not torch.compiler.is_compiling():
        K.check_seqlens_values(cache_seqlens, k_cache.shape[1])
    if not backend.use_triton(q):
        return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale, tuple(window_size),
                                          cache_leftpad=cache_leftpad)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    return _decode_attention(q, k_cache, v_cache, cache_seqlens, scale, int(window_size[0]), num_splits,
                             cache_leftpad)


@backend.public_op(like={"q": "k_cache", "k": "k_cache", "v": "v_cache"})
def decode_attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor,
                                  cache_seqlens: Tensor, rotary_cos: Optional[Tensor] = None,
                                  rotary_sin: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                                  window_size=(-1, -1), num_splits: Optional[int] = None) -> Tensor:
    """RoPE + KV-cache append + decode attention in one launch (plus the split merge when the cache is split):
    the decode step of ``llama_triton.model`` (flash-attn ``flash_attn_with_kvcache`` with ``k``/``v``).

    Args:
        q: ``(batch, q_len, heads, head_dim)``, q_len in [1, 16], not yet rotated.
        k_cache, v_cache: ``(batch, max_seqlen, heads_kv, head_dim)`` in q's dtype; **written in place**:
            row ``cache_seqlens[i] + t`` of sequence i gets the new token t's (rotated) key and its value.
        k, v: ``(batch, q_len, heads_kv, head_dim)`` the new tokens' keys (not yet rotated) and values.
        cache_seqlens: int32 ``(batch,)`` entries each sequence holds *before* this call (flash-attn
            semantics: not updated here; the new tokens sit at positions ``cache_seqlens[i] + t``).
        rotary_cos, rotary_sin: optional ``(n, head_dim)`` tables with ``n >= max_seqlen``
            (``layers.RotaryEmbedding.table``, HF's numerics): q and k are rotated at their positions
            (HF ``rotate_half``, fp32 math, one rounding: the same values as ``apply_rotary_pos_emb``).
        softmax_scale, window_size, num_splits: as ``decode_attention``.

    Returns:
        ``(batch, q_len, heads, head_dim)`` in q's dtype: attention over ``cache_seqlens[i] + q_len`` entries,
        bottom-right causal. No host sync on a GPU (CUDA-graph safe). Forward only.
    """
    K.check_inputs(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_size)
    K.check_append_inputs(q, k_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)
    if not backend.use_triton(q):
        return reference.decode_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos,
                                                       rotary_sin, softmax_scale, tuple(window_size))
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    return _decode_attention_append(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, scale,
                                    int(window_size[0]), num_splits)
