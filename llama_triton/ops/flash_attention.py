"""Flash attention as torch.library custom ops over kernels/flash_attention.py: autograd, fake impls, dispatch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import flash_attention as K


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("llama_triton::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int,
                    window_right: int, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    return K.attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                           window_left, window_right, softcap)


@_flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
      softcap=0.0):
    if cu_seqlens_q is not None:                                   # (total_q, h, d) -> lse (h, total_q)
        lse_shape = (q.shape[1], q.shape[0])
    else:                                                          # (b, sq, h, d) -> lse (b, h, sq)
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("llama_triton::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
                    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                    max_seqlen_k: int, softmax_scale: float, window_left: int,
                    window_right: int, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    return K.attention_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, window_left, window_right, softcap)


@_flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
      window_left, window_right, softcap=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_fwd(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, left, right, softcap)


def _backward_fwd(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_flash_attn_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)


# ------------------------------------------------------------------------------------------ public API
@backend.public_op("lower")
def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, softmax_scale: Optional[float] = None,
                    window_size: tuple[int, int] = (-1, -1), cu_seqlens_q: Optional[Tensor] = None,
                    cu_seqlens_k: Optional[Tensor] = None, max_seqlen_q: Optional[int] = None,
                    max_seqlen_k: Optional[int] = None, return_lse: bool = False, softcap: float = 0.0):
    """Softmax attention, FlashAttention-2 style, with flash-attn's interface and conventions.

    Args:
        q: ``(batch, seqlen_q, heads, head_dim)``, or ``(total_q, heads, head_dim)`` in varlen mode.
        k, v: ``(batch, seqlen_k, heads_kv, head_dim)`` / ``(total_k, heads_kv, head_dim)``; ``heads_kv``
            divides ``heads`` (GQA/MQA: query head i uses kv head ``i // (heads // heads_kv)``, k/v are never
            repeated in memory). fp16/bf16/fp32, all three the same dtype and device. Any strides: an HF
            ``(b, h, s, d)`` tensor ``.transpose(1, 2)`` is read in place.
        causal: bottom-right aligned (flash-attn >= 2.1): query i sits at key position
            ``i + seqlen_k - seqlen_q``, so a chunk of new queries attends to all earlier keys.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        window_size: ``(left, right)`` sliding window, -1 = unbounded; with causal, right is 0.
        cu_seqlens_q, cu_seqlens_k: int32 ``(n_seqs + 1,)`` offsets of packed sequences (varlen mode).
        max_seqlen_q, max_seqlen_k: longest sequence (varlen); read from cu_seqlens when None.
        return_lse: also return the log-sum-exp of the scaled (and capped) scores.
        softcap: 0 (off) or > 0: scores ``softcap * tanh(scale * q.k / softcap)`` before the mask and the
            softmax (Gemma-2's attention logit soft-capping; flash-attn's ``softcap``), forward and backward.

    head_dim: a multiple of 8 up to 256 (non-powers of 2 are padded with masking in the kernel).

    Returns:
        ``out`` like q (q's dtype, contiguous) and, with ``return_lse``, ``lse`` fp32 ``(batch, heads,
        seqlen_q)`` / ``(heads, total_q)``. A query with no visible key gets out = 0 and lse = -inf.

    Differentiable in q, k, v (and through lse). The backward is deterministic (no atomics: one program
    per key block accumulates dk/dv over its GQA group, another per query block accumulates dq).
    Varlen mode validates cu_seqlens on the host (one small device -> host copy per call).
    """
    scale, left, right, max_q, max_k = K.check_inputs(q, k, v, causal, softmax_scale, window_size, cu_seqlens_q,
                                                      cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    softcap = K.check_softcap(softcap)
    if not backend.use_triton(q):
        return reference.attention(q, k, v, causal, scale, (left, right), cu_seqlens_q, cu_seqlens_k,
                                   max_q, max_k, return_lse, softcap)
    out, lse = _flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, left, right, softcap)
    return (out, lse) if return_lse else out
