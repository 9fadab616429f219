"""Rotary position embeddings (Hugging Face ``apply_rotary_pos_emb`` convention), forward and backward.

HF convention (``rotate_half``), for a head vector ``x`` of ``head_dim = 2 * H`` with halves ``x1, x2``:
    out1 = x1 * cos1 - x2 * sin1
    out2 = x2 * cos2 + x1 * sin2
where ``cos = (cos1, cos2)`` and ``sin = (sin1, sin2)`` are the (b, s, head_dim) tables of
``LlamaRotaryEmbedding`` (their halves are equal for every LLaMA rope type, but the kernel does not assume
it). The backward is the transpose of that linear map (rope with ``-sin`` when the halves are equal):
    dx1 = dy1 * cos1 + dy2 * sin2
    dx2 = dy2 * cos2 - dy1 * sin1
Math in fp32, one rounding to the output dtype (HF rounds after each multiply and the add: ours is closer to
the fp64 oracle).

Layout: q ``(b, h, s, d)``, k ``(b, h_kv, s, d)`` with any strides whose last dim is contiguous (the
launcher copies otherwise); cos/sin ``(b, s, d)`` with any strides (batch stride 0 for a shared table).
One program per (batch, position) loads that position's cos/sin once and rotates all q heads and all k
heads (one launch for both), in blocks of ``BLOCK_H`` heads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor

MAX_HEAD_DIM = 1024


@triton.jit
def _rotate_heads(
    X, Y, n_heads, stride_xh, stride_yh,      # X/Y point at (batch, head 0, position, dim 0)
    c1, c2, s1, s2, dim_offs, dim_mask, half,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr,
):
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < n_heads) & dim_mask[None, :]
        x_offs = heads[:, None].to(tl.int64) * stride_xh + dim_offs[None, :]
        y_offs = heads[:, None].to(tl.int64) * stride_yh + dim_offs[None, :]
        x1 = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)         # (BLOCK_H, BLOCK_HALF)
        x2 = tl.load(X + x_offs + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(Y + y_offs, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + y_offs + half, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, QO, KO,                                   # pointers
    seqlen, n_q_heads, n_k_heads, half,                       # sizes (half = head_dim // 2)
    stride_qb, stride_qh, stride_qs,                          # q strides (last dim contiguous)
    stride_kb, stride_kh, stride_ks,
    stride_qob, stride_qoh, stride_qos,
    stride_kob, stride_koh, stride_kos,
    stride_cb, stride_cs, stride_cd,                          # cos/sin strides (same for both)
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)                       # one program per (batch, position)
    b = pid // seqlen
    s = pid % seqlen
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < half
    c_base = b * stride_cb + s * stride_cs
    c1 = tl.load(COS + c_base + d * stride_cd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + c_base + (d + half) * stride_cd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + c_base + d * stride_cd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + c_base + (d + half) * stride_cd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q + b * stride_qb + s * stride_qs, QO + b * stride_qob + s * stride_qos, n_q_heads,
                  stride_qh, stride_qoh, c1, c2, s1, s2, d, dmask, half, BACKWARD, BLOCK_H)
    _rotate_heads(K + b * stride_kb + s * stride_ks, KO + b * stride_kob + s * stride_kos, n_k_heads,
                  stride_kh, stride_koh, c1, c2, s1, s2, d, dmask, half, BACKWARD, BLOCK_H)


def check_inputs(q, k, cos, sin):
    """Validate apply_rotary_pos_emb's arguments (q/k already in (b, h, s, d) order)."""
    check_tensor("q", q, FLOAT_DTYPES, ndim=4)
    check_tensor("k", k, FLOAT_DTYPES, ndim=4)
    check_tensor("cos", cos, FLOAT_DTYPES)
    check_tensor("sin", sin, FLOAT_DTYPES)
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; they must match")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin has dtype {sin.dtype} but cos has {cos.dtype}; they must match")
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}: batch, seq and head_dim must match")
    if d % 2 or d < 2 or d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be even and in [2, {MAX_HEAD_DIM}], got {d}")
    if cos.shape != sin.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)} but cos has {tuple(cos.shape)}; they must match")
    ok = (cos.dim() == 2 and tuple(cos.shape) == (s, d)) or (
        cos.dim() == 3 and cos.shape[0] in (1, b) and tuple(cos.shape[1:]) == (s, d))
    if not ok:
        raise ValueError(f"cos/sin must have shape (seq, head_dim) = {(s, d)} or (batch or 1, seq, head_dim) = "
                         f"{(b, s, d)}, got {tuple(cos.shape)}")


def _table(t: torch.Tensor, b: int) -> torch.Tensor:
    """cos/sin (s, d) or (1|b, s, d) -> a (b, s, d) view (batch stride 0 when shared)."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    return t.expand(b, -1, -1)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope(q, k, cos, sin, backward: bool = False, q_out=None, k_out=None):
    """q (b, h, s, d), k (b, h_kv, s, d), cos/sin (s, d) or (1|b, s, d) -> (q_out, k_out) rotated.

    Outputs are in promote(q.dtype, cos.dtype) (as HF's ``q * cos`` is) with q's/k's strides, unless
    ``q_out``/``k_out`` are given (e.g. q and k themselves for the in-place variant). ``backward=True``
    applies the transpose (the gradient of rope w.r.t. its input).
    """
    check_inputs(q, k, cos, sin)
    b, hq, s, d = q.shape
    hk = k.shape[1]
    q, k = _last_contiguous(q), _last_contiguous(k)
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    if q_out is None:
        q_out = torch.empty_like(q, dtype=out_dtype)
    if k_out is None:
        k_out = torch.empty_like(k, dtype=out_dtype)
    for name, o, src in (("q_out", q_out, q), ("k_out", k_out, k)):
        if o.shape != src.shape or o.stride(-1) != 1:
            raise ValueError(f"{name} must have shape {tuple(src.shape)} and a contiguous last dim")
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    cos, sin = _table(cos, b), _table(sin, b)
    if cos.stride() != sin.stride():  # the kernel takes one set of strides for both tables
        cos, sin = cos.contiguous(), sin.contiguous()
    half = d // 2
    BLOCK_HALF = triton.next_power_of_2(half)
    BLOCK_H = max(1, min(triton.next_power_of_2(max(hq, hk)), 4096 // BLOCK_HALF, 16))
    _rope_kernel[(b * s,)](
        q, k, cos, sin, q_out, k_out,
        s, hq, hk, half,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), cos.stride(2),
        BACKWARD=backward, BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF,
        num_warps=4 if BLOCK_H * BLOCK_HALF <= 1024 else 8,
    )
    return q_out, k_out
