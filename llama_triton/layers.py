"""Drop-in nn.Modules over llama_triton.ops.

Each layer takes the constructor arguments of the Hugging Face class it replaces, has the same parameter
names (so state_dicts load unchanged), returns the same things from ``forward``, and has
``from_module(hf_module)`` that builds it around the existing module's parameters (shared, not copied).
"""
from __future__ import annotations

import torch
from torch import nn

from .ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """Drop-in for ``LlamaRMSNorm(hidden_size, eps)``: ``weight (hidden,)``, ``variance_epsilon``.

    ``forward(x)`` -> ``y``; ``forward(x, residual)`` -> ``(y, residual + x)`` (fused add + norm).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, residual)

    @classmethod
    def from_module(cls, module: nn.Module) -> "RMSNorm":
        """Build from an HF ``LlamaRMSNorm`` (or any module with ``weight`` and ``variance_epsilon``/``eps``)."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise TypeError(f"from_module needs a module with `weight` and `variance_epsilon`, got {type(module).__name__}")
        new = cls(module.weight.shape[0], eps, device="meta")
        new.weight = module.weight
        return new

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
