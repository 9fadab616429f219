"""Fused low-rank matmul ``(x @ a.T) @ b.T`` as a torch.library custom op over kernels/low_rank.py.

The forward is one Triton launch (the rank-r intermediate stays on chip). The backward is plain PyTorch
(three GEMMs, documented): with ``t = x @ a.T`` recomputed,
    dx = (dy @ b) @ a        da = (dy @ b).T @ x        db = dy.T @ t
so a low-rank model can be fine-tuned after factorization.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import low_rank as K

FUSED_MAX_M, FUSED_MAX_RK = K.FUSED_MAX_M, K.FUSED_MAX_RK


# ------------------------------------------------------------------------------------------ custom op
@torch.library.custom_op("llama_triton::low_rank_matmul", mutates_args=())
def _low_rank_matmul(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return K.low_rank_matmul(x, a, b)


@_low_rank_matmul.register_fake
def _(x, a, b):
    return x.new_empty((x.shape[0], b.shape[0]))


def _setup(ctx, inputs, output):
    x, a, b = inputs
    ctx.save_for_backward(x, a, b)


def _backward(ctx, dy):
    x, a, b = ctx.saved_tensors
    g = dy @ b                                                     # (M, N) @ (N, r) -> (M, r)
    dx = g @ a if ctx.needs_input_grad[0] else None                # (M, K)
    da = g.t() @ x if ctx.needs_input_grad[1] else None            # (r, K)
    db = dy.t() @ (x @ a.t()) if ctx.needs_input_grad[2] else None  # (N, r), t recomputed
    return dx, da, db


_low_rank_matmul.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------ public API
@backend.public_op("lower")
def low_rank_matmul(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``y = (x @ a.T) @ b.T``: a linear layer whose weight is factored as ``W (N, K) = b (N, r) @ a (r, K)``.

    Args:
        x: ``(..., K)`` fp16/bf16/fp32, any leading shape and strides.
        a: ``(r, K)`` the input-side factor, x's dtype.
        b: ``(N, r)`` the output-side factor, x's dtype.

    Returns:
        ``(..., N)`` in x's dtype. fp32 accumulation in both products; the intermediate ``(M, r)`` is
        rounded to x's dtype between them (as the two-matmul path rounds it) but never written to memory.
        One launch at any M; it is the decode kernel for small factors (``LowRankLinear`` switches to two
        GEMMs above ``FUSED_MAX_M`` rows or ``FUSED_MAX_RK`` elements of a: kernels/low_rank.py's cost model). Differentiable in x, a and b (plain-PyTorch backward).

    Runs the Triton kernel or ``reference.low_rank_matmul`` as llama_triton.backend decides.
    """
    K.check_inputs(x, a, b)
    if not backend.use_triton(x):
        return reference.low_rank_matmul(x, a, b)
    lead = x.shape[:-1]
    y = _low_rank_matmul(x.reshape(-1, x.shape[-1]), a, b)
    return y.view(*lead, b.shape[0])
