"""The causal-LM loss with transformers' semantics, computed by the fused linear cross-entropy (no logits).

    loss = causal_lm_loss(hidden, model.lm_head.weight, labels)                     # labels (b, s), shifted here
    loss = causal_lm_loss(hidden, w, labels, num_items_in_batch=n)                  # sum / n (grad accumulation)
    loss = causal_lm_loss(hidden, w, shift_labels=already_shifted)                  # packed data: labels pre-shifted

transformers' ``ForCausalLMLoss``: position t predicts ``labels[t + 1]`` (the last position predicts nothing),
labels equal to ``ignore_index`` (-100) contribute nothing, fp32 math; the mean is over the non-ignored labels,
or, with ``num_items_in_batch`` (the Trainer passes the number of non-ignored labels over all the micro-batches
of one optimizer step), the sum divided by it, so that N accumulated micro-batches give the gradient of one
batch of N. ``logits_loss`` is the same on materialised logits (the path the fused one must equal).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss", "logits_loss", "shift"]


def shift(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels (..., s) -> next-token targets (..., s): ``out[..., t] = labels[..., t + 1]``, the last ignored."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _targets(labels, shift_labels, ignore_index, like: torch.Tensor) -> torch.Tensor:
    if (labels is None) == (shift_labels is None):
        raise ValueError("give exactly one of labels (shifted here) and shift_labels (already shifted)")
    t = shift(labels, ignore_index) if shift_labels is None else shift_labels
    if tuple(t.shape) != tuple(like.shape[:-1]):
        raise ValueError(f"labels have shape {tuple(t.shape)} but the hidden states / logits are "
                         f"{tuple(like.shape)}: labels must be {tuple(like.shape[:-1])}")
    return t.to(like.device)


def _reduce(loss_sum_or_mean: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    if num_items_in_batch is None:
        return loss_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum_or_mean.device)
    return loss_sum_or_mean / num_items_in_batch


def causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                   shift_labels: torch.Tensor | None = None, ignore_index: int = -100, num_items_in_batch=None,
                   **_ignored) -> torch.Tensor:
    """Next-token loss of ``hidden (..., s, H) @ lm_head_weight (V, H).T`` without building the logits.

    ``labels (..., s)`` int (shifted here) or ``shift_labels (..., s)`` (already aligned with hidden);
    ``num_items_in_batch`` (int or 0-d tensor): return sum / it instead of the mean. Returns the fp32 loss.
    Extra keyword arguments (what transformers passes along to a loss function) are ignored.
    """
    from .ops.cross_entropy import fused_linear_cross_entropy

    targets = _targets(labels, shift_labels, ignore_index, hidden)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = fused_linear_cross_entropy(hidden, lm_head_weight, targets, ignore_index=ignore_index, reduction=reduction)
    return _reduce(loss, num_items_in_batch)


def logits_loss(logits: torch.Tensor, labels: torch.Tensor | None = None, *, shift_labels=None,
                ignore_index: int = -100, num_items_in_batch=None, **_ignored) -> torch.Tensor:
    """``causal_lm_loss`` on materialised ``logits (..., s, V)`` (our cross_entropy kernel)."""
    from .ops.cross_entropy import cross_entropy

    targets = _targets(labels, shift_labels, ignore_index, logits)
    reduction = "mean" if num_items_in_batch is None else "sum"
    return _reduce(cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction), num_items_in_batch)
