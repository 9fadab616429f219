"""RMSNorm and fused residual-add + RMSNorm, forward and backward.

Numerics follow Hugging Face ``LlamaRMSNorm`` exactly (casting_mode="llama", the default):
    s    = residual + x                      (in the input dtype, when a residual is given)
    rstd = 1 / sqrt(mean(s.float()**2) + eps)  (fp32)
    y    = (offset + weight) * (s.float() * rstd).to(x.dtype)   (product in promote(x.dtype, weight.dtype))
With casting_mode="gemma" (HF ``GemmaRMSNorm``; offset=1 there: the weight is stored as ``w - 1``) the
product is taken in fp32 and rounded once: ``y = ((s.float() * rstd) * (offset + weight.float())).to(x.dtype)``.
Liger's "none" (no casts: the math in the input dtype) is computed here like "gemma" (fp32 statistics, one
rounding to x's dtype): the same formula, more accurate than doing it in half precision.

Layout: the launchers take 2-D ``(rows, hidden)`` tensors whose last dim is contiguous (rows may be
strided); one program normalises one row in a single pass (hidden <= MAX_HIDDEN). The backward runs a
persistent grid: each program walks a block of rows, keeps its partial ``dw`` in registers and writes it to
a ``(programs, hidden)`` fp32 buffer that is summed afterwards: deterministic, no atomics.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import (FLOAT_DTYPES, check_eps, check_residual, check_same_device, check_tensor, num_programs_hint,
                      num_warps_for, rows_view)

MAX_HIDDEN = 65536  # one row lives in registers; beyond this the single-pass kernel would spill


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, RES_OUT, RSTD,                   # pointers
    N,                                           # hidden size
    stride_x, stride_r, stride_y, stride_res,    # row strides (the last dim is contiguous)
    eps, offset,
    HAS_RESIDUAL: tl.constexpr,
    LLAMA_CASTS: tl.constexpr,                   # "llama": x * rstd and offset + w rounded to x's / w's dtype
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)  # rounded like `residual + x`
        tl.store(RES_OUT + row * stride_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row, rstd)
    normed = xf * rstd
    if LLAMA_CASTS:
        normed = normed.to(X.dtype.element_ty).to(tl.float32)  # HF Llama casts back before the weight multiply
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    if LLAMA_CASTS:
        w = w.to(W.dtype.element_ty).to(tl.float32)                # `offset + weight` in the weight's dtype
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DRES, DX, DW_PARTIAL,        # pointers
    M, N, rows_per_program,                      # sizes
    stride_dy, stride_x, stride_dres, stride_dx,  # row strides
    offset,
    HAS_DRES: tl.constexpr,
    LLAMA_CASTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """x_hat = x * rstd, w' = offset + w (both rounded to x's / w's dtype when LLAMA_CASTS, as in the forward):
        dw = sum_rows(dy * x_hat);   dx = rstd * (dy*w' - x_hat * mean(dy*w'*x_hat))  (+ dres)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    if LLAMA_CASTS:
        w = w.to(W.dtype.element_ty).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    first = row_start.to(tl.int64)
    DY += first * stride_dy
    X += first * stride_x
    DX += first * stride_dx
    if HAS_DRES:
        DRES += first * stride_dres
    for row in range(row_start, row_end):
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + cols, mask=mask, other=0.0)
        rstd = tl.load(RSTD + row)
        normed = x.to(tl.float32) * rstd
        if LLAMA_CASTS:
            dw_acc += dy * normed.to(X.dtype.element_ty).to(tl.float32)
        else:
            dw_acc += dy * normed
        dnormed = dy * w
        dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, axis=0) / N))
        if HAS_DRES:  # gradient arriving through the returned residual stream
            dx += tl.load(DRES + cols, mask=mask, other=0.0).to(tl.float32)
            DRES += stride_dres
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        DY += stride_dy
        X += stride_x
        DX += stride_dx
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)


CASTING_MODES = ("llama", "gemma", "none")


def check_norm_options(offset=0.0, casting_mode="llama"):
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise TypeError(f"offset must be a finite float (Gemma: 1.0), got {type(offset).__name__} {offset!r}"
                        if not isinstance(offset, torch.Tensor) else "offset must be a Python float, got a tensor")
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")


def output_dtype(x_dtype, w_dtype, casting_mode="llama"):
    """llama: promote(x, weight) (HF LlamaRMSNorm); gemma / none: x's dtype (HF GemmaRMSNorm's type_as)."""
    return torch.promote_types(x_dtype, w_dtype) if casting_mode == "llama" else x_dtype


def check_inputs(x, weight, residual=None, eps=1e-6, offset=0.0, casting_mode="llama"):
    """Validate the arguments of rms_norm (any leading shape); raises TypeError/ValueError naming them."""
    check_tensor("x", x, FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, FLOAT_DTYPES, ndim=1)
    check_residual(residual, x)
    check_same_device(x=x, weight=weight, residual=residual)
    hidden = x.shape[-1]
    if weight.shape[0] != hidden:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but x's last dim is {hidden}; they must match")
    if hidden < 1 or hidden > MAX_HIDDEN:
        raise ValueError(f"x's last dim (hidden size) must be in [1, {MAX_HIDDEN}], got {hidden}")
    check_eps(eps)
    check_norm_options(offset, casting_mode)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 offset: float = 0.0, casting_mode: str = "llama"):
    """x, residual (M, N); weight (N,) -> y (M, N) in output_dtype (promote(x, weight) for "llama"), res_out
    (M, N) or None, rstd (M,) fp32. ``y = (offset + weight) * x_hat`` with casting_mode's roundings."""
    check_inputs(x, weight, residual, eps, offset, casting_mode)
    x = rows_view(x)
    residual = rows_view(residual) if residual is not None else None
    M, N = x.shape
    y = torch.empty((M, N), dtype=output_dtype(x.dtype, weight.dtype, casting_mode), device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    if M == 0:
        return y, res_out, rstd
    BLOCK_N = triton.next_power_of_2(N)
    _rms_norm_fwd_kernel[(M,)](
        x, residual if residual is not None else x, weight.contiguous(), y,
        res_out if res_out is not None else y, rstd,
        N,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        float(eps), float(offset),
        HAS_RESIDUAL=residual is not None, LLAMA_CASTS=casting_mode == "llama", BLOCK_N=BLOCK_N,
        num_warps=num_warps_for(BLOCK_N),
    )
    return y, res_out, rstd


def rms_norm_bwd(dy, x, weight, rstd, dres=None, offset: float = 0.0, casting_mode: str = "llama"):
    """dy (M, N), x (M, N) the normalised input (the summed residual stream when fused), weight (N,),
    rstd (M,) fp32, dres (M, N) or None: the gradient of the returned residual.
    -> dx (M, N) in x's dtype (also the residual's gradient when fused), dw (N,) in weight's dtype."""
    dy, x = rows_view(dy), rows_view(x)
    dres = rows_view(dres) if dres is not None else None
    M, N = x.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return dx, torch.zeros_like(weight)
    programs = min(M, num_programs_hint(x.device))
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    dw_partial = torch.empty((programs, N), dtype=torch.float32, device=x.device)
    BLOCK_N = triton.next_power_of_2(N)
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight.contiguous(), rstd, dres if dres is not None else dy, dx, dw_partial,
        M, N, rows_per_program,
        dy.stride(0), x.stride(0), dres.stride(0) if dres is not None else 0, dx.stride(0),
        float(offset),
        HAS_DRES=dres is not None, LLAMA_CASTS=casting_mode == "llama", BLOCK_N=BLOCK_N,
        num_warps=num_warps_for(BLOCK_N),
    )
    return dx, dw_partial.sum(0).to(weight.dtype)
