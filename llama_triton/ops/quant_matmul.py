"""Weight-only quantized matmul (W4A16 / W8A16) as a torch.library custom op over kernels/quant_gemm.py.

Inference op: the weight gets no gradient. A gradient for x (``dy @ W``, W dequantised by plain PyTorch) is
provided so that adapters trained on top of a frozen quantized model (QLoRA-style) still backpropagate.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import quant_gemm as K
from ..quant import QuantizedWeight, dequantize


# ------------------------------------------------------------------------------------------ custom op
@torch.library.custom_op("llama_triton::quant_matmul", mutates_args=())
def _quant_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], perm: Optional[Tensor],
                  bits: int, group_size: int) -> Tensor:
    return K.quant_matmul(x, qweight, scales, zeros, perm, bits, group_size)


@_quant_matmul.register_fake
def _(x, qweight, scales, zeros, perm, bits, group_size):
    return x.new_empty((x.shape[0], qweight.shape[0]))                  # qweight: repacked (N, KP // PACK)


def _setup(ctx, inputs, output):
    _, qweight, scales, zeros, perm, bits, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros, perm)
    ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, inputs[0].shape[-1]


def _backward(ctx, dy):
    qweight, scales, zeros, perm = ctx.saved_tensors
    qw = QuantizedWeight(qweight, scales, zeros, ctx.bits, ctx.group_size, perm, layout="repacked",
                         in_features=ctx.in_features)
    dx = dy @ dequantize(qw, dy.dtype)                       # (M, N) @ (N, K)
    return dx, None, None, None, None, None, None


_quant_matmul.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------ public API
def _check(x, qweight):
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a llama_triton.quant.QuantizedWeight, got {type(qweight).__name__} "
                        "(build one with quantize_weight, import_gptq or import_awq)")
    K.check_inputs(x, qweight.qweight, qweight.scales, qweight.zeros, qweight.perm, qweight.bits, qweight.group_size)


@backend.public_op(like={"x": "qweight.scales"})
def quant_matmul(x: Tensor, qweight: QuantizedWeight) -> Tensor:
    """``y = x @ W.T`` for a quantized weight ``W (N, K)`` (the ``nn.Linear`` convention, no bias).

    Args:
        x: ``(..., K)`` fp16/bf16 (fp32 also accepted), any leading shape and strides.
        qweight: a ``llama_triton.quant.QuantizedWeight`` (4-bit grouped or per-channel, 8-bit, symmetric or
            with zero points, act-order) on x's device.

    Returns:
        ``(..., N)`` in x's dtype. fp32 accumulation; the weight is dequantised inside the kernel's K loop.
        One launch: M = prod(leading dims) <= 4 runs the GEMV, <= 16 the decode dot kernel (split-K reduced
        in the same launch), larger M the tiled GEMM.

    Runs the Triton kernel or the PyTorch reference (``x @ dequantize(W).T``) as llama_triton.backend
    decides. Differentiable in x only.
    """
    _check(x, qweight)
    if not backend.use_triton(x):
        return reference.quant_matmul(x, qweight)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                                             # (M, K)
    y = _quant_matmul(x2, qweight.qweight, qweight.scales, qweight.zeros, qweight.perm, qweight.bits,
                      qweight.group_size)
    return y.view(*shape[:-1], qweight.out_features)
