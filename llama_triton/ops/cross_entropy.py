"""Cross-entropy and fused linear cross-entropy as torch.library custom ops over kernels/cross_entropy.py.

Both compute the gradient in the forward (Liger-Kernel's design: the softmax is already in registers), save
it, and the backward only scales it by the incoming gradient; so the forward of a module that does not need
gradients (``torch.no_grad()`` or inputs without ``requires_grad``) skips that work.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import cross_entropy as K


def _empty(t: Tensor) -> Tensor:
    return t.new_empty((0,))


def _loss_fake(n: int, reduction: str, like: Tensor) -> Tensor:
    return like.new_empty((n,) if reduction == "none" else (), dtype=torch.float32)


def _rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _mul_fp32(grad: Tensor, go: Tensor, out: Tensor) -> Tensor:
    """out = grad (R, X) * go (0-d, or (R, 1) per row), the product in fp32 and rounded once: the upstream
    gradient need not fit in grad's dtype (fp16 training scales the loss by GradScaler's 2**16 > fp16's max
    65504). Row chunks of <= 2**24 elements bound the fp32 temporary; ``out`` may be ``grad`` (in place)."""
    go = go.to(torch.float32)
    if grad.dtype == torch.float32:
        return torch.mul(grad, go, out=out)
    step = max(1, (1 << 24) // max(1, grad.shape[1]))
    for r in range(0, grad.shape[0], step):
        out[r:r + step].copy_(grad[r:r + step].float() * (go if go.dim() == 0 else go[r:r + step]))
    return out


def _host_checks_enabled() -> bool:
    return not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------- cross-entropy
@torch.library.custom_op("llama_triton::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: Tensor, labels: Tensor, ignore_index: int, reduction: str,
                       compute_grad: bool) -> tuple[Tensor, Tensor]:
    scale = K.mean_scale(labels, ignore_index) if (compute_grad and reduction == "mean") else None
    losses, dlogits = K.cross_entropy_rows(_rows(logits), labels, ignore_index, compute_grad, scale)
    return K.reduce_losses(losses, labels, ignore_index, reduction), dlogits if compute_grad else _empty(logits)


@_cross_entropy_fwd.register_fake
def _(logits, labels, ignore_index, reduction, compute_grad):
    grad = logits.new_empty(logits.shape) if compute_grad else _empty(logits)
    return _loss_fake(logits.shape[0], reduction, logits), grad


def _ce_setup(ctx, inputs, output):
    ctx.reduction, ctx.compute_grad = inputs[3], inputs[4]
    ctx.save_for_backward(output[1])


def _ce_backward(ctx, dloss, _dgrad):
    if not ctx.compute_grad:
        raise RuntimeError("cross_entropy was called with compute_grad=False; call the public "
                           "llama_triton.cross_entropy, which sets it from logits.requires_grad")
    (dlogits,) = ctx.saved_tensors
    go = dloss.reshape(-1, 1) if ctx.reduction == "none" else dloss
    if torch.compiler.is_compiling():      # traced: one fused elementwise kernel, no fp32 temporary
        return (dlogits.float() * go.float()).to(dlogits.dtype), None, None, None, None
    return _mul_fp32(dlogits, go, torch.empty_like(dlogits)), None, None, None, None


_cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Token-level cross-entropy over a (large) vocabulary, fp32 math, gradient computed in the forward.

    Args:
        logits: ``(..., V)`` fp32/fp16/bf16 (any strides; the vocab dim is made contiguous if it is not).
        labels: ``(...)`` int64/int32, each in ``[0, V)`` or equal to ``ignore_index``. Checked on the host
            (one small reduction and a sync; ValueError naming a bad value). Under torch.compile the check is
            skipped and a bad label gives a NaN loss instead (never a silently wrong loss).
        ignore_index: label value that contributes no loss and no gradient.
        reduction: "mean" (over non-ignored labels; all ignored -> 0, not NaN), "sum" or "none" (labels'
            shape).

    Returns:
        the fp32 loss. Differentiable in logits (gradient in logits' dtype).
    """
    K.check_ce_inputs(logits, labels, ignore_index, reduction)
    if _host_checks_enabled():
        K.check_labels(labels, logits.shape[-1], ignore_index)
    if not backend.use_triton(logits):
        return reference.cross_entropy(logits, labels, ignore_index, reduction)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _cross_entropy_fwd(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index, reduction,
                                 compute_grad)
    return loss.view(labels.shape) if reduction == "none" else loss


# --------------------------------------------------------------------------------- fused linear + CE
@torch.library.custom_op("llama_triton::fused_linear_cross_entropy_fwd", mutates_args=())
def _flce_fwd(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, reduction: str,
              grad_hidden: bool, grad_weight: bool, accum_dtype: Optional[torch.dtype] = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    in_fwd = reduction != "none"   # "none" needs the per-token upstream gradient: the backward recomputes
    loss, dh, dw = K.fused_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction,
                                                grad_hidden and in_fwd, grad_weight and in_fwd,
                                                accum_dtype=accum_dtype)
    return loss, dh if dh is not None else _empty(hidden), dw if dw is not None else _empty(weight)


@_flce_fwd.register_fake
def _(hidden, weight, labels, ignore_index, reduction, grad_hidden, grad_weight, accum_dtype=None):
    in_fwd = reduction != "none"
    dh = hidden.new_empty(hidden.shape) if grad_hidden and in_fwd else _empty(hidden)
    dw = weight.new_empty(weight.shape) if grad_weight and in_fwd else _empty(weight)
    return _loss_fake(hidden.shape[0], reduction, hidden), dh, dw


@torch.library.custom_op("llama_triton::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd(hidden: Tensor, weight: Tensor, labels: Tensor, row_scale: Tensor, ignore_index: int,
              grad_hidden: bool, grad_weight: bool, accum_dtype: Optional[torch.dtype] = None
              ) -> tuple[Tensor, Tensor]:
    """Recompute-based backward for reduction="none": per-token incoming gradients scale each row."""
    _, dh, dw = K.fused_linear_cross_entropy(hidden, weight, labels, ignore_index, "sum", grad_hidden, grad_weight,
                                             row_scale=row_scale, accum_dtype=accum_dtype)
    return dh if dh is not None else _empty(hidden), dw if dw is not None else _empty(weight)


@_flce_bwd.register_fake
def _(hidden, weight, labels, row_scale, ignore_index, grad_hidden, grad_weight, accum_dtype=None):
    dh = hidden.new_empty(hidden.shape) if grad_hidden else _empty(hidden)
    dw = weight.new_empty(weight.shape) if grad_weight else _empty(weight)
    return dh, dw


@torch.library.custom_op("llama_triton::scale_", mutates_args=("grad",))
def _scale_(grad: Tensor, dloss: Tensor) -> None:
    _mul_fp32(grad, dloss, grad)


@_scale_.register_fake
def _(grad, dloss):
    return None


def _scale(grad: Tensor, dloss: Tensor) -> Tensor:
    """grad * dloss in place on the saved gradient, so no second (V, H) buffer is allocated (a second
    backward through the same graph raises autograd's "modified by an inplace operation"). A mutating custom
    op, so that AOT autograd / torch.compile functionalize it correctly."""
    _scale_(grad, dloss)
    return grad


def _flce_setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index, reduction, gh, gw, accum_dtype = inputs
    ctx.reduction, ctx.ignore_index, ctx.flags, ctx.accum_dtype = reduction, ignore_index, (gh, gw), accum_dtype
    if reduction == "none":            # gradients need the per-token upstream gradient: recompute then
        ctx.save_for_backward(hidden, weight, labels)
    else:
        ctx.save_for_backward(output[1], output[2])


def _flce_backward(ctx, dloss, _ddh, _ddw):
    gh, gw = ctx.flags
    if ctx.reduction == "none":
        hidden, weight, labels = ctx.saved_tensors
        dh, dw = _flce_bwd(hidden, weight, labels, dloss, ctx.ignore_index, gh, gw, ctx.accum_dtype)
    else:
        dh, dw = ctx.saved_tensors
        dh = _scale(dh, dloss) if gh else None
        dw = _scale(dw, dloss) if gw else None
    return (dh if gh else None), (dw if gw else None), None, None, None, None, None, None


_flce_fwd.register_autograd(_flce_backward, setup_context=_flce_setup)


def fused_linear_cross_entropy(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, ignore_index: int = -100,
                               reduction: str = "mean", accum_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``cross_entropy(hidden @ lm_head_weight.T, labels)`` without materialising the ``(tokens, vocab)``
    logits: tokens are processed in chunks (one ``(chunk, vocab)`` buffer at a time) and the gradients of
    hidden and of the weight are computed in the forward (Liger-Kernel's FLCE).

    Args:
        hidden: ``(..., H)`` fp32/fp16/bf16 final hidden states (already shifted to align with labels).
        lm_head_weight: ``(V, H)``, same dtype (e.g. ``model.lm_head.weight``, or the tied embedding).
        labels: ``(...)`` int64/int32 in ``[0, V)`` or ``ignore_index`` (host check as in cross_entropy).
        ignore_index, reduction: as in ``cross_entropy`` (all ignored -> 0 for "mean").
        accum_dtype: dtype in which the weight gradient is summed over token chunks. None (default): fp32
            (a (V, H) fp32 buffer, cast to the weight's dtype at the end; as accurate as the unfused
            reference). ``lm_head_weight.dtype``: Liger's low-memory mode (no fp32 buffer; each chunk's
            partial sum is rounded to bf16/fp16, so the weight gradient carries ~one rounding per chunk).

    Returns:
        the fp32 loss. Differentiable in hidden and lm_head_weight. Memory: the gradients are computed
        (and held) by the forward. With reduction="none" the forward computes only the loss and the
        backward recomputes the chunks.
    """
    K.check_flce_inputs(hidden, lm_head_weight, labels, ignore_index, reduction)
    if accum_dtype is not None and accum_dtype not in (torch.float32, lm_head_weight.dtype):
        raise ValueError(f"accum_dtype must be None, torch.float32 or lm_head_weight's dtype "
                         f"({lm_head_weight.dtype}), got {accum_dtype}")
    if _host_checks_enabled():
        K.check_labels(labels, lm_head_weight.shape[0], ignore_index)
    if not backend.use_triton(hidden):
        return reference.fused_linear_cross_entropy(hidden, lm_head_weight, labels, ignore_index, reduction)
    grad = torch.is_grad_enabled()
    gh, gw = grad and hidden.requires_grad, grad and lm_head_weight.requires_grad
    loss, _, _ = _flce_fwd(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, labels.reshape(-1), ignore_index,
                           reduction, gh, gw, accum_dtype)
    return loss.view(labels.shape) if reduction == "none" else loss
