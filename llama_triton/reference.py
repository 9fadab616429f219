"""Plain-PyTorch versions of every op: the test oracle and the CPU fallback.

Each function computes its statistics in at least fp32 (fp64 in, fp64 math: the tests call these on
fp64 copies of the inputs to get the oracle) and follows Hugging Face ``transformers`` numerics, so that
running it in the input's low precision is "what plain PyTorch does" for the tolerance rule in DESIGN.md.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 for fp64: statistics never in less than fp32."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None):
    """HF LlamaRMSNorm: y = weight * (x * rsqrt(mean(x**2) + eps)).to(x.dtype), statistics in fp32.

    With `residual`, first s = residual + x (in x's dtype) and return (rms_norm(s), s).
    """
    if residual is not None:
        summed = residual + x
        return rms_norm(summed, weight, eps), summed
    h = x.to(_compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
