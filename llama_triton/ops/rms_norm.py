"""RMSNorm as torch.library custom ops over kernels/rms_norm.py: autograd, fake impls, dispatch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import rms_norm as K


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("llama_triton::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0,
                  casting_mode: str = "llama") -> tuple[Tensor, Tensor]:
    y, _, rstd = K.rms_norm_fwd(x, weight, eps, offset=offset, casting_mode=casting_mode)
    return y, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps, offset=0.0, casting_mode="llama"):
    M, N = x.shape
    return (x.new_empty((M, N), dtype=K.output_dtype(x.dtype, weight.dtype, casting_mode)),
            x.new_empty((M,), dtype=torch.float32))


@torch.library.custom_op("llama_triton::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd(x: Tensor, residual: Tensor, weight: Tensor, eps: float, offset: float = 0.0,
                      casting_mode: str = "llama") -> tuple[Tensor, Tensor, Tensor]:
    return K.rms_norm_fwd(x, weight, eps, residual=residual, offset=offset, casting_mode=casting_mode)


@_add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, offset=0.0, casting_mode="llama"):
    M, N = x.shape
    y = x.new_empty((M, N), dtype=K.output_dtype(x.dtype, weight.dtype, casting_mode))
    return y, x.new_empty((M, N)), x.new_empty((M,), dtype=torch.float32)


@torch.library.custom_op("llama_triton::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dres: Optional[Tensor], offset: float = 0.0,
                  casting_mode: str = "llama") -> tuple[Tensor, Tensor]:
    return K.rms_norm_bwd(dy, x, weight, rstd, dres, offset=offset, casting_mode=casting_mode)


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, dres, offset=0.0, casting_mode="llama"):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_fwd(ctx, inputs, output):
    x, weight, _, offset, casting_mode = inputs
    ctx.options = (offset, casting_mode)
    ctx.save_for_backward(x, weight, output[1])


def _backward_fwd(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, rstd, None, *ctx.options)
    return dx, dw, None, None, None


def _setup_add(ctx, inputs, output):
    _, _, weight, _, offset, casting_mode = inputs
    _, summed, rstd = output
    ctx.options = (offset, casting_mode)
    ctx.save_for_backward(summed, weight, rstd)


def _backward_add(ctx, dy, dres, _drstd):
    summed, weight, rstd = ctx.saved_tensors
    ds, dw = _rms_norm_bwd(dy, summed, weight, rstd, dres, *ctx.options)
    return ds, ds, dw, None, None, None  # d(residual + x)/dx = d/dresidual = 1


_rms_norm_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)
_add_rms_norm_fwd.register_autograd(_backward_add, setup_context=_setup_add)


# ------------------------------------------------------------------------------------------ public API
@backend.public_op(promote=("x", "residual"))
def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Optional[Tensor] = None, offset: float = 0.0,
             casting_mode: str = "llama"):
    """RMSNorm with the numerics of HF ``LlamaRMSNorm``, optionally fused with the residual add.

    Args:
        x: ``(..., hidden)`` fp32/fp16/bf16, any leading shape, any strides.
        weight: ``(hidden,)`` fp32/fp16/bf16 on x's device.
        eps: added to the mean square before the rsqrt.
        residual: optional ``(..., hidden)`` tensor, same shape and dtype as x.
        offset: the scale is ``offset + weight`` (Gemma stores ``w - 1`` and uses offset=1.0; Liger's name).
        casting_mode: as Liger-Kernel: "llama" (HF LlamaRMSNorm: ``x * rstd`` rounded to x's dtype, then
            times the weight; output ``promote(x.dtype, weight.dtype)``), "gemma" (HF GemmaRMSNorm: the
            product in fp32, one rounding to x's dtype) or "none" (Liger: no casts; here computed as "gemma",
            fp32 statistics and one rounding, which is at least as accurate). gemma / none return x's dtype.

    Returns:
        ``y`` of x's shape in ``promote(x.dtype, weight.dtype)``; with ``residual``, ``(y, s)`` where
        ``s = residual + x`` (x's dtype) is the new residual stream and ``y = rms_norm(s)``.

    Runs the Triton kernel or the PyTorch reference as llama_triton.backend decides. Differentiable in x,
    weight and residual.
    """
    K.check_inputs(x, weight, residual, eps, offset, casting_mode)
    if not backend.use_triton(x):
        return reference.rms_norm(x, weight, eps, residual, offset=offset, casting_mode=casting_mode)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                   # (rows, hidden)
    if residual is None:
        y, _ = _rms_norm_fwd(x2, weight, float(eps), float(offset), casting_mode)
        return y.view(shape)
    y, summed, _ = _add_rms_norm_fwd(x2, residual.reshape(-1, shape[-1]), weight, float(eps), float(offset),
                                     casting_mode)
    return y.view(shape), summed.view(shape)
