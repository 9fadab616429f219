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


def _public_result(loss: Tensor, z: Tensor, labels: Tensor, reduction: str, opts, return_z_loss: bool):
    """The custom op's flat (loss, z) -> labels' shape for "none"; with return_z_loss, ``(loss, z.detach())``
    (zeros when there is no z-loss: the op returned an empty tensor)."""
    if reduction == "none":
        loss = loss.view(labels.shape)
    if not return_z_loss:
        return loss
    z = z.view(loss.shape) if opts.lse_square_scale > 0 else torch.zeros_like(loss)
    return loss, z.detach()


def _host_checks_enabled() -> bool:
    return not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------- cross-entropy
def _opts(label_smoothing, lse_square_scale, softcap, weight) -> K.CEOptions:
    return K.CEOptions(label_smoothing, lse_square_scale, softcap, weight)


def _z_fake(n: int, reduction: str, lse_square_scale: float, like: Tensor) -> Tensor:
    return _loss_fake(n, reduction, like) if lse_square_scale > 0 else like.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("llama_triton::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd(logits: Tensor, labels: Tensor, ignore_index: int, reduction: str,
                       compute_grad: bool, label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                       softcap: Optional[float] = None, weight: Optional[Tensor] = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    opts = _opts(label_smoothing, lse_square_scale, softcap, weight)
    scale = z_scale = None
    if compute_grad and reduction == "mean":
        scale, z_scale = K.mean_scales(labels, ignore_index, opts)
    zlosses = logits.new_empty((logits.shape[0],), dtype=torch.float32) if lse_square_scale > 0 else None
    losses, dlogits = K.cross_entropy_rows(_rows(logits), labels, ignore_index, compute_grad, scale, opts=opts,
                                           z_scale=z_scale, zlosses=zlosses)
    loss, z = K.reduce_with_options(losses, zlosses, labels, ignore_index, reduction, opts)
    return loss, dlogits if compute_grad else _empty(logits), z if z is not None else _empty(losses)


@_cross_entropy_fwd.register_fake
def _(logits, labels, ignore_index, reduction, compute_grad, label_smoothing=0.0, lse_square_scale=0.0,
      softcap=None, weight=None):
    grad = logits.new_empty(logits.shape) if compute_grad else _empty(logits)
    n = logits.shape[0]
    return _loss_fake(n, reduction, logits), grad, _z_fake(n, reduction, lse_square_scale, logits)


def _ce_setup(ctx, inputs, output):
    ctx.reduction, ctx.compute_grad = inputs[3], inputs[4]
    ctx.save_for_backward(output[1])


def _ce_backward(ctx, dloss, _dgrad, _dz):
    if not ctx.compute_grad:
        raise RuntimeError("cross_entropy was called with compute_grad=False; call the public "
                           "llama_triton.cross_entropy, which sets it from logits.requires_grad")
    (dlogits,) = ctx.saved_tensors
    go = dloss.reshape(-1, 1) if ctx.reduction == "none" else dloss
    none = (None,) * 8
    if torch.compiler.is_compiling():      # traced: one fused elementwise kernel, no fp32 temporary
        return ((dlogits.float() * go.float()).to(dlogits.dtype),) + none
    return (_mul_fp32(dlogits, go, torch.empty_like(dlogits)),) + none


_cross_entropy_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


@backend.public_op("keep")
def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: Optional[float] = None,
                  weight: Optional[Tensor] = None, return_z_loss: bool = False):
    """Token-level cross-entropy over a (large) vocabulary, fp32 math, gradient computed in the forward.

    Args:
        logits: ``(..., V)`` fp32/fp16/bf16 (any strides; the vocab dim is made contiguous if it is not).
        labels: ``(...)`` int64/int32, each in ``[0, V)`` or equal to ``ignore_index``. Checked on the host
            (one small reduction and a sync; ValueError naming a bad value). Under torch.compile the check is
            skipped and a bad label gives a NaN loss instead (never a silently wrong loss).
        ignore_index: label value that contributes no loss and no gradient.
        reduction: "mean" (over non-ignored labels; all ignored -> 0, not NaN), "sum" or "none" (labels'
            shape).
        label_smoothing: in [0, 1], as ``F.cross_entropy``: ``(1 - eps) * ce + eps / V * sum_c w[c] * (lse -
            x[c])``.
        lse_square_scale: z-loss weight s >= 0 (PaLM; Liger's name): ``s * logsumexp(x)**2`` is added to each
            token's loss ("mean": averaged over the non-ignored tokens).
        softcap: None, or c > 0: the logits are capped first, ``x = c * tanh(x / c)`` (Gemma-2).
        weight: ``(V,)`` float class weights, as ``F.cross_entropy``'s (the "mean" divides by the sum of the
            weights of the non-ignored labels). Constants: no gradient flows to them.
        return_z_loss: also return the z-loss (reduced like the loss; already included in the loss and
            returned detached, for logging; zero when lse_square_scale is 0), as Liger's ``return_z_loss``.

    Returns:
        the fp32 loss (and the z-loss). Differentiable in logits (gradient in logits' dtype).
    """
    K.check_ce_inputs(logits, labels, ignore_index, reduction)
    opts = K.check_ce_options(logits.shape[-1], logits.device, label_smoothing, lse_square_scale, softcap, weight)
    if _host_checks_enabled():
        K.check_labels(labels, logits.shape[-1], ignore_index)
    if not backend.use_triton(logits):
        res = reference.cross_entropy(logits, labels, ignore_index, reduction, *opts[:3], weight=opts.weight,
                                      return_z_loss=return_z_loss)
        return res
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _, z = _cross_entropy_fwd(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index, reduction,
                                    compute_grad, *opts)
    return _public_result(loss, z, labels, reduction, opts, return_z_loss)


# --------------------------------------------------------------------------------- fused linear + CE
@torch.library.custom_op("llama_triton::fused_linear_cross_entropy_fwd", mutates_args=())
def _flce_fwd(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, reduction: str,
              grad_hidden: bool, grad_weight: bool, accum_dtype: Optional[torch.dtype] = None,
              bias: Optional[Tensor] = None, grad_bias: bool = False, label_smoothing: float = 0.0,
              lse_square_scale: float = 0.0, softcap: Optional[float] = None, ce_weight: Optional[Tensor] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    in_fwd = reduction != "none"   # "none" needs the per-token upstream gradient: the backward recomputes
    loss, dh, dw, db, z = K.fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index, reduction, grad_hidden and in_fwd, grad_weight and in_fwd,
        accum_dtype=accum_dtype, bias=bias, grad_bias=grad_bias and in_fwd,
        opts=_opts(label_smoothing, lse_square_scale, softcap, ce_weight))
    return (loss, dh if dh is not None else _empty(hidden), dw if dw is not None else _empty(weight),
            db if db is not None else _empty(weight), z if z is not None else _empty(loss))


@_flce_fwd.register_fake
def _(hidden, weight, labels, ignore_index, reduction, grad_hidden, grad_weight, accum_dtype=None, bias=None,
      grad_bias=False, label_smoothing=0.0, lse_square_scale=0.0, softcap=None, ce_weight=None):
    in_fwd = reduction != "none"
    dh = hidden.new_empty(hidden.shape) if grad_hidden and in_fwd else _empty(hidden)
    dw = weight.new_empty(weight.shape) if grad_weight and in_fwd else _empty(weight)
    db = bias.new_empty(bias.shape) if bias is not None and grad_bias and in_fwd else _empty(weight)
    n = hidden.shape[0]
    return _loss_fake(n, reduction, hidden), dh, dw, db, _z_fake(n, reduction, lse_square_scale, hidden)


@torch.library.custom_op("llama_triton::fused_linear_cross_entropy_bwd", mutates_args=())
def _flce_bwd(hidden: Tensor, weight: Tensor, labels: Tensor, row_scale: Tensor, ignore_index: int,
              grad_hidden: bool, grad_weight: bool, accum_dtype: Optional[torch.dtype] = None,
              bias: Optional[Tensor] = None, grad_bias: bool = False, label_smoothing: float = 0.0,
              lse_square_scale: float = 0.0, softcap: Optional[float] = None, ce_weight: Optional[Tensor] = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Recompute-based backward for reduction="none": per-token incoming gradients scale each row."""
    _, dh, dw, db, _ = K.fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index, "sum", grad_hidden, grad_weight, row_scale=row_scale,
        accum_dtype=accum_dtype, bias=bias, grad_bias=grad_bias,
        opts=_opts(label_smoothing, lse_square_scale, softcap, ce_weight))
    return (dh if dh is not None else _empty(hidden), dw if dw is not None else _empty(weight),
            db if db is not None else _empty(weight))


@_flce_bwd.register_fake
def _(hidden, weight, labels, row_scale, ignore_index, grad_hidden, grad_weight, accum_dtype=None, bias=None,
      grad_bias=False, label_smoothing=0.0, lse_square_scale=0.0, softcap=None, ce_weight=None):
    dh = hidden.new_empty(hidden.shape) if grad_hidden else _empty(hidden)
    dw = weight.new_empty(weight.shape) if grad_weight else _empty(weight)
    db = bias.new_empty(bias.shape) if bias is not None and grad_bias else _empty(weight)
    return dh, dw, db


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
    _scale_(grad if grad.dim() == 2 else grad.view(1, -1), dloss)
    return grad


def _flce_setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index, reduction, gh, gw, accum_dtype, bias, gb = inputs[:10]
    ctx.reduction, ctx.ignore_index, ctx.flags, ctx.accum_dtype = reduction, ignore_index, (gh, gw, gb), accum_dtype
    ctx.options = inputs[10:13]           # label_smoothing, lse_square_scale, softcap
    if reduction == "none":            # gradients need the per-token upstream gradient: recompute then
        ctx.save_for_backward(hidden, weight, labels, bias, inputs[13])
    else:
        ctx.save_for_backward(output[1], output[2], output[3])


def _flce_backward(ctx, dloss, _ddh, _ddw, _ddb, _dz):
    gh, gw, gb = ctx.flags
    if ctx.reduction == "none":
        hidden, weight, labels, bias, ce_weight = ctx.saved_tensors
        dh, dw, db = _flce_bwd(hidden, weight, labels, dloss, ctx.ignore_index, gh, gw, ctx.accum_dtype, bias, gb,
                               *ctx.options, ce_weight)
    else:
        dh, dw, db = ctx.saved_tensors
        dh = _scale(dh, dloss) if gh else None
        dw = _scale(dw, dloss) if gw else None
        db = _scale(db, dloss) if gb else None
    return ((dh if gh else None), (dw if gw else None), None, None, None, None, None, None, (db if gb else None),
            None, None, None, None, None)


_flce_fwd.register_autograd(_flce_backward, setup_context=_flce_setup)


@backend.public_op("lower", keep=("ce_weight",))
def fused_linear_cross_entropy(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, ignore_index: int = -100,
                               reduction: str = "mean", accum_dtype: Optional[torch.dtype] = None,
                               bias: Optional[Tensor] = None, ce_weight: Optional[Tensor] = None,
                               label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                               softcap: Optional[float] = None, return_z_loss: bool = False):
    """``cross_entropy(hidden @ lm_head_weight.T + bias, labels)`` without materialising the ``(tokens,
    vocab)`` logits: tokens are processed in chunks (one ``(chunk, vocab)`` buffer at a time) and the
    gradients of hidden, the weight and the bias are computed in the forward (Liger-Kernel's FLCE).

    Args:
        hidden: ``(..., H)`` fp32/fp16/bf16 final hidden states (already shifted to align with labels).
        lm_head_weight: ``(V, H)``, same dtype (e.g. ``model.lm_head.weight``, or the tied embedding).
        labels: ``(...)`` int64/int32 in ``[0, V)`` or ``ignore_index`` (host check as in cross_entropy).
        ignore_index, reduction: as in ``cross_entropy`` (all ignored -> 0 for "mean").
        accum_dtype: dtype in which the weight gradient is summed over token chunks. None (default): fp32
            (a (V, H) fp32 buffer, cast to the weight's dtype at the end; as accurate as the unfused
            reference). ``lm_head_weight.dtype``: Liger's low-memory mode (no fp32 buffer; each chunk's
            partial sum is rounded to bf16/fp16, so the weight gradient carries ~one rounding per chunk).
        bias: optional ``(V,)`` lm_head bias, hidden's dtype (differentiable).
        ce_weight: optional ``(V,)`` class weights (``cross_entropy``'s ``weight``; Liger's name).
        label_smoothing, lse_square_scale, softcap, return_z_loss: as in ``cross_entropy``.

    Returns:
        the fp32 loss (and, with return_z_loss, the detached z-loss). Differentiable in hidden,
        lm_head_weight and bias. Memory: the gradients are computed (and held) by the forward. With
        reduction="none" the forward computes only the loss and the backward recomputes the chunks.
    """
    K.check_flce_inputs(hidden, lm_head_weight, labels, ignore_index, reduction)
    vocab = lm_head_weight.shape[0]
    opts = K.check_ce_options(vocab, hidden.device, label_smoothing, lse_square_scale, softcap, ce_weight,
                              weight_name="ce_weight")
    if bias is not None:
        K.check_tensor("bias", bias, K.FLOAT_DTYPES, ndim=1)
        if bias.shape[0] != vocab or bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be ({vocab},) in hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
                             f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if accum_dtype is not None and accum_dtype not in (torch.float32, lm_head_weight.dtype):
        raise ValueError(f"accum_dtype must be None, torch.float32 or lm_head_weight's dtype "
                         f"({lm_head_weight.dtype}), got {accum_dtype}")
    if _host_checks_enabled():
        K.check_labels(labels, vocab, ignore_index)
    if not backend.use_triton(hidden):
        return reference.fused_linear_cross_entropy(hidden, lm_head_weight, labels, ignore_index, reduction, bias=bias,
                                                    ce_weight=opts.weight, label_smoothing=opts.label_smoothing,
                                                    lse_square_scale=opts.lse_square_scale, softcap=opts.softcap,
                                                    return_z_loss=return_z_loss)
    grad = torch.is_grad_enabled()
    gh, gw = grad and hidden.requires_grad, grad and lm_head_weight.requires_grad
    gb = grad and bias is not None and bias.requires_grad
    loss, _, _, _, z = _flce_fwd(hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, labels.reshape(-1),
                                 ignore_index, reduction, gh, gw, accum_dtype, bias, gb, *opts)
    return _public_result(loss, z, labels, reduction, opts, return_z_loss)
