"""Low-rank factorization of linear layers: truncated SVD and activation-aware (whitened) SVD.

    report = factorize_model(model, method="svd", ratio=0.5)                    # plain truncated SVD
    report = factorize_model(model, method="asvd", ratio=0.5, calibration=batches)  # SVD-LLM whitening

A weight ``W (N, K)`` becomes ``B (N, r) @ A (r, K)`` (``layers.LowRankLinear``), ``r * (N + K)`` parameters.
  * "svd": ``W = U S V^T``; keep the r largest singular values, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``
    (the square root split keeps both factors at the same scale, for fp16). It minimises ``||W - BA||_F``,
    whose square is the sum of the discarded ``S_i**2`` (Eckart-Young).
  * "asvd" (SVD-LLM, Wang et al. 2024): what matters is the layer's output on real inputs X (T, K), i.e.
    ``||(W - BA) X^T||_F``. With the calibration covariance ``C = X^T X = L L^T`` (Cholesky, lower L) that
    is ``||(W - BA) L||_F``, minimised by truncating the SVD of ``W L = U S V^T`` and mapping back:
    ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T L^{-1}`` (a triangular solve). Its activation-weighted
    error is the sum of the discarded singular values of ``W L`` squared, never more than plain SVD's.
Rank per layer: a fixed ``rank``; ``ratio`` (the factors get at most ``ratio`` of the layer's dense
parameters, ``r = floor(ratio * N * K / (N + K))``); or ``energy`` (the smallest r keeping that fraction of
``sum S_i**2``, of W or of W L). A layer whose rank would not save parameters stays dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..low_rank_linear import LowRankLinear
from . import calibration as calib

METHODS = ("svd", "asvd")


@dataclass
class LayerRank:
    """What factorization did to one linear layer."""

    name: str
    shape: tuple                 # (out_features N, in_features K)
    rank: int | None             # None: kept dense (the rank would not save parameters)
    energy: float                # fraction of sum S**2 kept (of W, or of W L for asvd)
    params: int                  # parameters after (r (N + K), or N K when kept dense)

    @property
    def ratio(self) -> float:
        return self.params / (self.shape[0] * self.shape[1])


# -------------------------------------------------------------------------------------- argument checks
def check_rank(rank, N: int, K: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(N, K):
        raise ValueError(f"rank must be an int in [1, min(N, K) = {min(N, K)}] for a {N}x{K} weight, got {rank!r}")
    return rank


def _check_fraction(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {v!r}")
    return float(v)


def rank_for_ratio(N: int, K: int, ratio: float) -> int:
    """The largest rank whose factors hold at most ``ratio`` of the ``N x K`` dense parameters (>= 1)."""
    ratio = _check_fraction("ratio", ratio)
    return max(1, min(min(N, K), int(ratio * N * K / (N + K))))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r with ``sum(S[:r]**2) >= energy * sum(S**2)`` (singular values in descending order)."""
    energy = _check_fraction("energy", energy)
    e = singular_values.double() ** 2
    cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-300)
    return int(min(int((cum < energy - 1e-12).sum()) + 1, e.numel()))


# -------------------------------------------------------------------------------------------- factors
def _split(u, s, vh, rank, dtype):
    """Balanced factors of the rank-r truncation: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T."""
    root = s[:rank].sqrt()
    return (u[:, :rank] * root[None, :]).to(dtype), (root[:, None] * vh[:rank]).to(dtype)


def svd_factors(weight: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """Truncated SVD of ``weight (N, K)`` -> ``(B (N, r), A (r, K), S)`` in weight's dtype (S: all singular
    values, float64). Computed in float64. Give `rank` or `energy`."""
    N, K = weight.shape
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    rank = check_rank(rank, N, K) if rank is not None else rank_for_energy(s, energy)
    b, a = _split(u, s, vh, rank, weight.dtype)
    return b, a, s


def whitening(cov: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Lower-triangular L with ``L L^T = cov + lambda I`` (float64), lambda = damp * mean(diag(cov)), raised
    tenfold until the Cholesky factorization succeeds (a rank-deficient covariance: few tokens, dead inputs)."""
    cov = cov.to(torch.float64)
    K = cov.shape[0]
    eye = torch.eye(K, dtype=cov.dtype, device=cov.device)
    base = float(cov.diagonal().mean()) or 1.0
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(cov + damp * base * eye)
        if int(info) == 0:
            return L
        damp *= 10
    raise ValueError("the calibration covariance is not positive definite even with damping")


def whitened_svd_factors(weight: torch.Tensor, cov: torch.Tensor, rank: int | None = None,
                         energy: float | None = None, damp: float = 1e-6):
    """SVD-LLM factors of ``weight (N, K)`` for inputs with covariance ``cov = X^T X (K, K)`` ->
    ``(B (N, r), A (r, K), S)``, S the singular values of ``W L``. Give `rank` or `energy`."""
    N, K = weight.shape
    if tuple(cov.shape) != (K, K):
        raise ValueError(f"cov has shape {tuple(cov.shape)}; expected ({K}, {K}) for a {N}x{K} weight")
    L = whitening(cov, damp)                                                     # (K, K) lower
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64) @ L, full_matrices=False)
    rank = check_rank(rank, N, K) if rank is not None else rank_for_energy(s, energy)
    # V_r^T L^{-1}: solve L^T Y = V_r for Y = (V_r^T L^{-1})^T
    vh_unwhite = torch.linalg.solve_triangular(L.t(), vh[:rank].t(), upper=True).t()   # (r, K)
    b, a = _split(u, s, vh_unwhite, rank, weight.dtype)
    return b, a, s


def activation_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    """``||(W - W') X^T||_F^2 = tr((W - W') C (W - W')^T)`` with ``C = X^T X``: the layer's output error
    summed over the calibration tokens."""
    e = weight.detach().double() - approx.detach().double()
    return float(((e @ cov.double()) * e).sum())


# -------------------------------------------------------------------------------------- whole models
@torch.no_grad()
def factorize_linear(name: str, linear: nn.Linear, method: str = "svd", rank: int | None = None,
                     ratio: float | None = None, energy: float | None = None, cov: torch.Tensor | None = None):
    """``(LowRankLinear or None, LayerRank)`` for one linear; None when the rank would not save parameters."""
    N, K = linear.weight.shape
    if rank is None and energy is None:
        rank = rank_for_ratio(N, K, ratio)
    if method == "svd":
        b, a, s = svd_factors(linear.weight, rank, energy)
    elif method == "asvd":
        if cov is None:
            raise ValueError("method='asvd' needs the calibration covariance")
        b, a, s = whitened_svd_factors(linear.weight, cov, rank, energy)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    r = a.shape[0]
    kept = float((s[:r].double() ** 2).sum() / (s.double() ** 2).sum().clamp_min(1e-300))
    if r * (N + K) >= N * K:
        return None, LayerRank(name, (N, K), None, 1.0, N * K)
    new = LowRankLinear.from_factors(b, a, linear.bias).to(linear.weight.device)
    return new, LayerRank(name, (N, K), r, kept, r * (N + K))


def factorize_model(model: nn.Module, method: str = "svd", rank: int | None = None, ratio: float | None = None,
                    energy: float | None = None, calibration=None, skip=("lm_head",)) -> list[LayerRank]:
    """Replace every ``nn.Linear`` of `model` (except `skip`) by a ``LowRankLinear``, in place; returns one
    ``LayerRank`` per layer. Exactly one of `rank`, `ratio`, `energy`. method "asvd" needs `calibration`
    (model inputs) and runs block by block, each block calibrated on the already-factorized earlier ones."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if sum(v is not None for v in (rank, ratio, energy)) != 1:
        raise ValueError("give exactly one of rank, ratio or energy")
    if ratio is not None:
        _check_fraction("ratio", ratio)
    if energy is not None:
        _check_fraction("energy", energy)
    if method == "asvd" and not calibration:
        raise ValueError("method='asvd' needs calibration inputs (a non-empty list of batches)")
    report: list[LayerRank] = []

    def compress_block(linears, stats):
        for name, lin in linears.items():
            cov = stats[name].cov if stats is not None else None
            new, rep = factorize_linear(name, lin, method, rank, ratio, energy, cov)
            report.append(rep)
            if new is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)

    calib.sequential(model, calibration or [], compress_block, skip, covariance=method == "asvd",
                     needs_stats=method == "asvd")
    return report


def format_report(report: list[LayerRank]) -> str:
    lines = [f"{'layer':40s} {'shape':>12s} {'rank':>6s} {'energy':>8s} {'params':>8s}"]
    for r in report:
        lines.append(f"{r.name:40s} {'x'.join(map(str, r.shape)):>12s} {str(r.rank or 'dense'):>6s} "
                     f"{r.energy:8.2%} {r.ratio:8.1%}")
    return "\n".join(lines)
