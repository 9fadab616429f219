"""Loss modules with Liger-Kernel's constructor options and call signatures, so training code written for
``LigerCrossEntropyLoss`` / ``LigerFusedLinearCrossEntropyLoss`` moves over unchanged (re-exported by
``llama_triton.layers``)::

    loss_fn = FusedLinearCrossEntropyLoss(ignore_index=-100, label_smoothing=0.1, lse_square_scale=1e-4)
    loss = loss_fn(model.lm_head.weight, hidden.view(-1, H), labels.view(-1))      # Liger's argument order

Options (as ``llama_triton.cross_entropy``): class weights, ``label_smoothing``, z-loss
(``lse_square_scale``, and ``return_z_loss=True`` -> ``(loss, z_loss)``), logit ``softcap``, reduction.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops.cross_entropy import cross_entropy, fused_linear_cross_entropy


class _LossOptions(nn.Module):
    def __init__(self, weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)   # class weights follow .to(device)
        self.ignore_index = ignore_index
        self.lse_square_scale = lse_square_scale
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.softcap = softcap
        self.return_z_loss = return_z_loss

    def _options(self) -> dict:
        return dict(ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing,
                    lse_square_scale=self.lse_square_scale, softcap=self.softcap, return_z_loss=self.return_z_loss)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, label_smoothing="
                f"{self.label_smoothing}, lse_square_scale={self.lse_square_scale}, softcap={self.softcap}")


class CrossEntropyLoss(_LossOptions):
    """``LigerCrossEntropyLoss``: ``forward(_input (..., V), target (...))`` -> loss, or ``(loss, z_loss)``
    with ``return_z_loss``. ``weight``: optional ``(V,)`` class weights (``nn.CrossEntropyLoss``'s)."""

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = -100, lse_square_scale: float = 0.0,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None,
                 return_z_loss: bool = False):
        super().__init__(weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss)

    def forward(self, _input: torch.Tensor, target: torch.Tensor):
        return cross_entropy(_input, target, weight=self.weight, **self._options())


class FusedLinearCrossEntropyLoss(_LossOptions):
    """``LigerFusedLinearCrossEntropyLoss``: ``forward(lin_weight (V, H), _input (..., H), target (...),
    bias=None)`` -> the cross-entropy of ``_input @ lin_weight.T + bias`` without materialising the logits
    (or ``(loss, z_loss)`` with ``return_z_loss``). ``ce_weight``: optional ``(V,)`` class weights;
    ``accum_dtype``: see ``llama_triton.fused_linear_cross_entropy``."""

    def __init__(self, ce_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 lse_square_scale: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean",
                 softcap: Optional[float] = None, return_z_loss: bool = False,
                 accum_dtype: Optional[torch.dtype] = None):
        super().__init__(ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap, return_z_loss)
        self.accum_dtype = accum_dtype

    @property
    def ce_weight(self) -> Optional[torch.Tensor]:
        return self.weight

    def forward(self, lin_weight: torch.Tensor, _input: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        return fused_linear_cross_entropy(_input, lin_weight, target, bias=bias, ce_weight=self.weight,
                                          accum_dtype=self.accum_dtype, **self._options())
