"""SwiGLU as torch.library custom ops over kernels/swiglu.py: autograd, fake impls, dispatch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import swiglu as K


def _rows(t: Tensor) -> Tensor:
    """(..., n) -> (rows, n) with a contiguous last dim (copies only when it has to)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("llama_triton::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    return K.swiglu_fwd(_rows(gate), _rows(up))


@_swiglu_fwd.register_fake
def _(gate, up):
    return gate.new_empty((gate.shape[0], gate.shape[1]))


@torch.library.custom_op("llama_triton::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return K.swiglu_bwd(_rows(dy), _rows(gate), _rows(up))


@_swiglu_bwd.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.custom_op("llama_triton::swiglu_packed_fwd", mutates_args=())
def _swiglu_packed_fwd(gate_up: Tensor) -> Tensor:
    gu = _rows(gate_up)
    n = gu.shape[1] // 2
    return K.swiglu_fwd(gu[:, :n], gu[:, n:])


@_swiglu_packed_fwd.register_fake
def _(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("llama_triton::swiglu_packed_bwd", mutates_args=())
def _swiglu_packed_bwd(dy: Tensor, gate_up: Tensor) -> Tensor:
    gu = _rows(gate_up)
    n = gu.shape[1] // 2
    dgu = torch.empty(gu.shape, dtype=gu.dtype, device=gu.device)     # both halves written by one launch
    K.swiglu_bwd(_rows(dy), gu[:, :n], gu[:, n:], dgu[:, :n], dgu[:, n:])
    return dgu


@_swiglu_packed_bwd.register_fake
def _(dy, gate_up):
    return gate_up.new_empty(gate_up.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    return _swiglu_bwd(dy, *ctx.saved_tensors)


def _backward_packed(ctx, dy):
    return _swiglu_packed_bwd(dy, *ctx.saved_tensors)


_swiglu_fwd.register_autograd(_backward, setup_context=_setup)
_swiglu_packed_fwd.register_autograd(_backward_packed, setup_context=_setup)


# ------------------------------------------------------------------------------------------ public API
@backend.public_op(promote=("gate", "up"))
def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """SwiGLU activation ``silu(gate) * up`` with PyTorch's numerics (HF ``LlamaMLP``'s
    ``act_fn(gate_proj(x)) * up_proj(x)``: silu rounded to the input dtype, then the product).

    Args:
        gate: ``(..., I)`` fp32/fp16/bf16, any leading shape and strides; or, when ``up`` is None, the
            concatenated ``gate_up (..., 2I)`` (first half gate, second half up, as one fused gate/up
            projection produces it): no split copies, and its gradient is one ``(..., 2I)`` tensor.
        up: ``(..., I)``, same shape and dtype as gate.

    Returns:
        ``(..., I)`` in the input dtype. Differentiable in gate and up (or gate_up).
    """
    K.check_inputs(gate, up)
    if not backend.use_triton(gate):
        return reference.swiglu(gate, up)
    lead = gate.shape[:-1]
    if up is None:
        if gate.numel() == 0:
            return gate.new_empty((*lead, gate.shape[-1] // 2))
        return _swiglu_packed_fwd(gate.reshape(-1, gate.shape[-1])).view(*lead, gate.shape[-1] // 2)
    if gate.numel() == 0:
        return gate.new_empty(gate.shape)
    return _swiglu_fwd(gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])).view(gate.shape)
