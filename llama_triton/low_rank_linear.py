"""``LowRankLinear``: an ``nn.Linear`` whose weight is stored as two factors, ``W (N, K) = B (N, r) @ A (r, K)``
(re-exported by llama_triton.layers; built by ``llama_triton.compress.low_rank``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops.low_rank import FUSED_MAX_M, FUSED_MAX_RK, low_rank_matmul


class LowRankLinear(nn.Module):
    """``y = (x @ A.T) @ B.T + bias`` with parameters ``weight_a`` ``(rank, in_features)``, ``weight_b``
    ``(out_features, rank)`` and ``bias`` ``(out_features,)`` or None.

    ``forward(x (..., in)) -> (..., out)`` in x's dtype. Up to ``FUSED_MAX_M`` rows (decode), when
    ``rank * in_features <= FUSED_MAX_RK``, it is one fused launch (``llama_triton.ops.low_rank.
    low_rank_matmul``: the rank-r intermediate stays on chip); otherwise two ``F.linear`` GEMMs (cuBLAS:
    prefill is compute-bound, and every program of the fused kernel re-reads all of A, which only pays for
    small factors; kernels/low_rank.py has the cost model). The attribute ``fused`` (True / False / None:
    that rule) overrides the choice. Parameters cost ``rank * (in + out)`` against ``in * out`` dense, so a
    factorization saves memory only when ``rank < in * out / (in + out)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("rank", rank)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LowRankLinear: {name} must be a positive int, got {v!r}")
        if rank > min(in_features, out_features):
            raise ValueError(f"LowRankLinear: rank={rank} exceeds min(out_features, in_features)="
                             f"{min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.fused: bool | None = None
        kw = {"device": device, "dtype": dtype}
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        if device is None or torch.device(device).type != "meta":
            nn.init.normal_(self.weight_a, std=in_features ** -0.5)
            nn.init.normal_(self.weight_b, std=rank ** -0.5)

    @classmethod
    def from_factors(cls, b: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        """Wrap factors ``b (N, r)`` and ``a (r, K)`` (copied into parameters) and an optional bias ``(N,)``."""
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() != 2 or b.dim() != 2:
            raise TypeError("from_factors needs 2-D tensors b (N, r) and a (r, K)")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"b has shape {tuple(b.shape)} and a {tuple(a.shape)}: b's second dim must be a's rank")
        new = cls(a.shape[1], b.shape[0], a.shape[0], bias=bias is not None, device="meta")
        new.weight_a = nn.Parameter(a.detach().clone())
        new.weight_b = nn.Parameter(b.detach().clone().to(a.dtype))
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone().to(a.dtype))
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``B @ A (out, in)`` it stands for (computed: for inspection and tests)."""
        return self.weight_b @ self.weight_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        fused = self.fused if self.fused is not None else (
            rows <= FUSED_MAX_M and self.rank * self.in_features <= FUSED_MAX_RK)
        if fused:
            y = low_rank_matmul(x, self.weight_a, self.weight_b)
        else:
            y = F.linear(F.linear(x, self.weight_a), self.weight_b)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
