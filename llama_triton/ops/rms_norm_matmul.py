"""Fused RMSNorm + matmul as torch.library custom ops over kernels/rms_norm_matmul.py.

The forward is the fused kernel. The backward is unfused (documented): it recomputes the normalised input
with the RMSNorm kernel (kernels/rms_norm.py), does the two GEMMs with torch (cuBLAS), and runs the
RMSNorm backward kernel for dx and the norm weight's gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import rms_norm as RN
from ..kernels import rms_norm_matmul as K

fold_norm_weight = K.fold_norm_weight


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("llama_triton::rms_norm_matmul_fwd", mutates_args=())
def _fwd(x: Tensor, norm_weight: Optional[Tensor], weight: Tensor, eps: float,
         residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    y, res_out = K.rms_norm_matmul_fwd(x, norm_weight, weight, eps, residual)
    return y, res_out if res_out is not None else x.new_empty((0,))


@_fwd.register_fake
def _(x, norm_weight, weight, eps, residual):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    return y, x.new_empty(x.shape) if residual is not None else x.new_empty((0,))


@torch.library.custom_op("llama_triton::rms_norm_matmul_bwd", mutates_args=())
def _bwd(dy: Tensor, s: Tensor, norm_weight: Optional[Tensor], weight: Tensor, eps: float,
         dres: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """dy (M, N), s (M, K) the normalised input (residual + x when fused) -> ds (M, K) (includes dres),
    dnorm_weight (K,) (empty when pre-folded), dweight (N, K)."""
    nw = norm_weight if norm_weight is not None else torch.ones(s.shape[1], dtype=s.dtype, device=s.device)
    h, _, rstd = RN.rms_norm_fwd(s, nw, eps)                                  # (M, K) recomputed, rstd (M,)
    dy = dy.contiguous()
    dweight = torch.mm(dy.t(), h.to(weight.dtype))                            # (N, K)
    dh = torch.mm(dy, weight).to(h.dtype)                                     # (M, K)
    ds, dnw = RN.rms_norm_bwd(dh, s, nw, rstd, dres)
    return ds, dnw if norm_weight is not None else s.new_empty((0,)), dweight


@_bwd.register_fake
def _(dy, s, norm_weight, weight, eps, dres):
    dnw = torch.empty_like(norm_weight) if norm_weight is not None else s.new_empty((0,))
    return s.new_empty(s.shape), dnw, weight.new_empty(weight.shape)


def _setup(ctx, inputs, output):
    x, norm_weight, weight, eps, residual = inputs
    ctx.eps, ctx.has_residual, ctx.has_nw = eps, residual is not None, norm_weight is not None
    s = output[1] if residual is not None else x
    ctx.save_for_backward(s, norm_weight, weight)


def _backward(ctx, dy, dres):
    s, norm_weight, weight = ctx.saved_tensors
    ds, dnw, dweight = _bwd(dy, s, norm_weight, weight, ctx.eps, dres if ctx.has_residual else None)
    return ds, (dnw if ctx.has_nw else None), dweight, None, (ds if ctx.has_residual else None)


_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------ public API
@backend.public_op("lower")
def rms_norm_matmul(x: Tensor, norm_weight: Optional[Tensor], weight: Tensor, eps: float = 1e-6,
                    residual: Optional[Tensor] = None):
    """``rms_norm(x [+ residual], norm_weight, eps) @ weight.T`` in one fused GEMM (the norm before the
    q/k/v and gate/up projections).

    Args:
        x: ``(..., K)`` fp32/fp16/bf16, any leading shape.
        norm_weight: ``(K,)`` the RMSNorm weight (any float dtype), folded into the product inside the K
            loop (applied to the x tiles, which pass through registers for the sum of squares anyway); or
            None when it was pre-folded into ``weight`` once (``weight = fold_norm_weight(norm_weight,
            weight)``, the inference variant).
        weight: ``(N, K)`` the linear weight(s), x's dtype (concatenate q/k/v or gate/up for one GEMM).
        eps: RMSNorm epsilon.
        residual: optional ``(..., K)`` added to x first (in x's dtype, as HF's residual stream).

    Returns:
        ``y (..., N)`` in x's dtype; with residual, ``(y, residual + x)``. Numerics: fp32 sum of squares
        and accumulation; rounding points differ from HF's unfused norm-then-linear (held to the 2x rule
        against the fp64 oracle). Differentiable in x, norm_weight, weight, residual; the backward is
        unfused (RMSNorm kernels + two cuBLAS GEMMs).
    """
    K.check_inputs(x, norm_weight, weight, eps, residual)
    if not backend.use_triton(x):
        return reference.rms_norm_matmul(x, norm_weight, weight, eps, residual)
    lead, k = x.shape[:-1], x.shape[-1]
    y, res_out = _fwd(x.reshape(-1, k), norm_weight, weight, float(eps),
                      residual.reshape(-1, k) if residual is not None else None)
    y = y.view(*lead, weight.shape[0])
    return (y, res_out.view(x.shape)) if residual is not None else y
