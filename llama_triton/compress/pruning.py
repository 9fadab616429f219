"""Pruning: magnitude and Wanda scores, unstructured and N:M semi-structured masks, applied in place.

    report = prune_model(model, method="wanda", pattern="2:4", calibration=batches)
    report = prune_model(model, method="magnitude", sparsity=0.5)
    print(format_report(report))

Scores of a linear weight ``W (N, K)`` (out x in):
  * magnitude: ``|W|``;
  * Wanda (Sun et al. 2023): ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of input feature j over
    the calibration tokens (recorded with hooks, block by block, each block seeing the already-pruned
    earlier blocks' outputs).
Masks keep the highest scores:
  * unstructured at ``sparsity`` s in [0, 1): ``floor(s * K)`` weights pruned in each output row for
    Wanda (the paper's per-output comparison), ``floor(s * N * K)`` over the whole layer for magnitude;
  * N:M (``"2:4"``, ``"4:8"``): in every group of M consecutive weights along K (input features) exactly
    N are kept. 2:4 is what sparse tensor cores run (``to_semi_structured``); 4:8 keeps the same 50% but
    chooses within larger groups, so it loses less accuracy (it has no hardware kernel here).
Ties are broken by index (``topk``), so the sparsity reached is exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import calibration as calib

METHODS = ("magnitude", "wanda")


@dataclass
class LayerSparsity:
    """What pruning did to one linear layer."""

    name: str
    shape: tuple          # (out_features, in_features)
    zeros: int            # weights that are exactly 0 after pruning
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.total, 1)


# -------------------------------------------------------------------------------------- argument checks
def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def parse_pattern(pattern) -> tuple[int, int]:
    """``"2:4"`` or ``(2, 4)`` -> (n, m): keep n of every m consecutive weights along K; 1 <= n < m."""
    try:
        n, m = (int(v) for v in (pattern.split(":") if isinstance(pattern, str) else pattern))
    except (TypeError, ValueError):
        raise ValueError(f"pattern must be 'N:M' (e.g. '2:4') or a pair (N, M), got {pattern!r}") from None
    if not (1 <= n < m):
        raise ValueError(f"pattern {n}:{m}: N:M sparsity keeps N of every M weights and needs 1 <= N < M")
    return n, m


# ------------------------------------------------------------------------------------------ scores, masks
def scores(weight: torch.Tensor, method: str, act_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each weight ``(N, K)`` (float32): ``|W|`` (magnitude) or ``|W| * act_norm`` (Wanda,
    ``act_norm (K,)`` the input features' L2 norms)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    s = weight.detach().abs().to(torch.float32)
    if method == "wanda":
        if act_norm is None or act_norm.shape != (weight.shape[1],):
            raise ValueError(f"wanda needs act_norm of shape ({weight.shape[1]},), got "
                             f"{None if act_norm is None else tuple(act_norm.shape)}")
        s = s * act_norm.to(device=s.device, dtype=torch.float32)[None, :]
    return s


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Bool mask ``(N, K)``, True = keep: the ``floor(sparsity * K)`` lowest scores of each row pruned
    (per_row), or the ``floor(sparsity * N * K)`` lowest of the whole matrix."""
    sparsity = check_sparsity(sparsity)
    flat = score if per_row else score.reshape(1, -1)
    n_prune = int(sparsity * flat.shape[1])
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        mask.scatter_(1, flat.topk(n_prune, dim=1, largest=False).indices, False)
    return mask.reshape(score.shape)


def nm_mask(score: torch.Tensor, pattern) -> torch.Tensor:
    """Bool mask ``(N, K)``: in each group of m consecutive columns the n highest scores are kept."""
    n, m = parse_pattern(pattern)
    N, K = score.shape
    if K % m:
        raise ValueError(f"in_features K={K} is not a multiple of M={m}: cannot apply {n}:{m} sparsity")
    groups = score.reshape(N, K // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2).indices, True)
    return mask.reshape(N, K)


@torch.no_grad()
def prune_linear(name: str, linear: nn.Linear, method: str, sparsity: float | None = None, pattern=None,
                 act_norm: torch.Tensor | None = None) -> LayerSparsity:
    """Prune one linear in place (``weight *= mask``) and report the sparsity reached."""
    s = scores(linear.weight, method, act_norm)
    if pattern is not None:
        mask = nm_mask(s, pattern)
    else:
        mask = unstructured_mask(s, sparsity, per_row=method == "wanda")
    linear.weight.mul_(mask.to(linear.weight.dtype))
    zeros = int((linear.weight == 0).sum())
    return LayerSparsity(name, tuple(linear.weight.shape), zeros, linear.weight.numel())


def prune_model(model: nn.Module, method: str = "wanda", sparsity: float | None = 0.5, pattern=None,
                calibration=None, skip=("lm_head",)) -> list[LayerSparsity]:
    """Prune every ``nn.Linear`` of `model` in place (except `skip`, full dotted names or last components)
    and return one ``LayerSparsity`` per layer.

    method: "magnitude" or "wanda" (needs `calibration`: a list of model inputs, e.g. the token batches of
    ``calibration.token_batches``). sparsity in [0, 1) for unstructured pruning, or pattern "N:M" (e.g.
    "2:4", "4:8"; sparsity is then ignored). Wanda runs block by block (``calibration.sequential``): the
    hooks recording a block's inputs are removed before the next block.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if pattern is not None:
        parse_pattern(pattern)
    else:
        check_sparsity(sparsity)
    if method == "wanda" and not calibration:
        raise ValueError("method='wanda' needs calibration inputs (a non-empty list of batches)")
    report: list[LayerSparsity] = []

    def compress_block(linears, stats):
        for name, lin in linears.items():
            norm = stats[name].norm if stats is not None else None
            report.append(prune_linear(name, lin, method, sparsity, pattern, norm))

    calib.sequential(model, calibration or [], compress_block, skip, needs_stats=method == "wanda")
    return report


def sparsity_report(model: nn.Module, skip=()) -> list[LayerSparsity]:
    """The measured sparsity (exact zeros) of every ``nn.Linear`` weight of `model`."""
    return [LayerSparsity(n, tuple(m.weight.shape), int((m.weight == 0).sum()), m.weight.numel())
            for n, m in calib.linear_layers(model, skip).items()]


def format_report(report: list[LayerSparsity]) -> str:
    """A per-layer table (name, shape, zeros, sparsity) with a total line."""
    lines = [f"{'layer':40s} {'shape':>12s} {'zeros':>9s} {'sparsity':>9s}"]
    for r in report:
        lines.append(f"{r.name:40s} {'x'.join(map(str, r.shape)):>12s} {r.zeros:9d} {r.sparsity:9.2%}")
    zeros, total = sum(r.zeros for r in report), sum(r.total for r in report)
    lines.append(f"{'total':40s} {'':>12s} {zeros:9d} {zeros / max(total, 1):9.2%}")
    return "\n".join(lines)


# --------------------------------------------------------------------- 2:4 sparse tensor cores (GPU)
def is_2_4_sparse(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive weights along K has at most 2 non-zeros."""
    N, K = weight.shape
    return K % 4 == 0 and bool(((weight.reshape(N, K // 4, 4) != 0).sum(-1) <= 2).all())


def semi_structured_support(device) -> tuple[bool, str]:
    """(supported, reason): PyTorch's semi-structured sparse tensors (cuSPARSELt / CUTLASS 2:4 kernels)
    need ``torch.sparse.to_sparse_semi_structured`` and a CUDA device of compute capability >= 8.0."""
    device = torch.device(device)
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if device.type != "cuda":
        return False, f"semi-structured sparse kernels need a CUDA device, got {device}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"2:4 sparse tensor cores need compute capability >= 8.0, got {major}.x"
    return True, ""


@torch.no_grad()
def to_semi_structured(model: nn.Module, skip=("lm_head",)) -> dict[str, str]:
    """Convert every 2:4-sparse fp16/bf16 ``nn.Linear`` weight of `model` (on a supported GPU) to a
    ``torch.sparse.SparseSemiStructuredTensor`` in place, so its matmul runs on sparse tensor cores.
    Returns ``{layer: "converted" or why not}``. Inference only (the weight no longer trains)."""
    out = {}
    for name, lin in calib.linear_layers(model, skip).items():
        w = lin.weight
        ok, why = semi_structured_support(w.device)
        if ok and w.dtype not in (torch.float16, torch.bfloat16):
            ok, why = False, f"dtype {w.dtype} (fp16/bf16 only)"
        if ok and not is_2_4_sparse(w):
            ok, why = False, "weight is not 2:4 sparse"
        if ok:
            try:
                lin.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(w.detach()), requires_grad=False)
                why = "converted"
            except (RuntimeError, ValueError) as e:   # shape constraints of the backend (min rows/cols)
                why = f"not converted: {str(e).splitlines()[0]}"
        out[name] = why
    return out
