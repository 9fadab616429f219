"""Calibration: input statistics of linear layers, recorded with forward hooks that are always removed.

    stats = record(model, batches, {"model.layers.0.mlp.up_proj": linear}, covariance=True)
    stats["model.layers.0.mlp.up_proj"].sq      # (K,) float64: sum over calibration tokens of x_k ** 2
    stats[...].cov                               # (K, K) float64: X^T X (whitening for activation-aware SVD)

``sequential(model, batches, compress_block)`` runs the layer-by-layer loop of Wanda / SparseGPT / SVD-LLM:
for each decoder block in order, record its linears' inputs on the calibration batches (with the earlier
blocks already compressed, so each block sees the activations it will get), call ``compress_block``, remove
the hooks, go on. The forward stops at the end of the block being calibrated (no wasted compute after it).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class InputStats:
    """Statistics of one linear layer's inputs x (rows of ``(..., K)``) over the calibration data."""

    tokens: int                       # rows seen
    sq: torch.Tensor                  # (K,) float64, sum of x**2 per input feature
    cov: torch.Tensor | None = None   # (K, K) float64, X^T X (None unless requested)

    @property
    def norm(self) -> torch.Tensor:
        """(K,) the L2 norm of each input feature over all calibration tokens (Wanda's ||X_j||_2)."""
        return self.sq.sqrt()


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)


def linear_layers(module: nn.Module, skip=("lm_head",), prefix: str = "") -> dict[str, nn.Linear]:
    """name -> ``nn.Linear`` for every (exactly) nn.Linear in `module`, except names (full dotted, or last
    component) in `skip`. Names are prefixed with `prefix` (the module's name in the model)."""
    if isinstance(skip, str):
        skip = (skip,)
    out = {}
    for name, m in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if type(m) is nn.Linear and full and not _skipped(full, skip):
            out[full] = m
    return out


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's decoder blocks in order (``model.model.layers`` for our and HF Llama models), or the
    whole model as one block for any other module."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return [(f"model.layers.{i}", layer) for i, layer in enumerate(layers)]
    return [("", model)]


@contextmanager
def hooks(linears: dict[str, nn.Module], covariance: bool = False):
    """Record the inputs of `linears` while the context is open; yields ``{name: InputStats}``. The
    forward pre-hooks are removed on exit, also when the body raises."""
    stats: dict[str, InputStats] = {}

    def make(name, k):
        def hook(module, args):
            x = args[0].detach().reshape(-1, k).to(torch.float64)                 # (tokens, K)
            s = stats.get(name)
            if s is None:
                s = stats[name] = InputStats(0, torch.zeros(k, dtype=torch.float64, device=x.device),
                                             torch.zeros(k, k, dtype=torch.float64, device=x.device)
                                             if covariance else None)
            s.tokens += x.shape[0]
            s.sq += (x * x).sum(0)
            if covariance:
                s.cov += x.t() @ x
        return hook

    handles = [m.register_forward_pre_hook(make(name, m.in_features)) for name, m in linears.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    """Raised by a hook at the end of the block being calibrated: the rest of the forward is not needed."""


@torch.no_grad()
def record(model: nn.Module, batches, linears: dict[str, nn.Module], covariance: bool = False,
           stop_after: nn.Module | None = None) -> dict[str, InputStats]:
    """Run `model` on each calibration batch and return the input statistics of `linears`. With
    `stop_after`, each forward is cut short once that submodule has run."""
    with hooks(linears, covariance) as stats:
        handle = None
        if stop_after is not None and stop_after is not model:
            def stop(module, args, output):
                raise _StopForward
            handle = stop_after.register_forward_hook(stop)
        try:
            for batch in batches:
                try:
                    model(batch)
                except _StopForward:
                    pass
        finally:
            if handle is not None:
                handle.remove()
    missing = sorted(set(linears) - set(stats))
    if missing:
        raise ValueError(f"the calibration batches never reached {', '.join(missing)}")
    return stats


def sequential(model: nn.Module, batches, compress_block, skip=("lm_head",), covariance: bool = False,
               needs_stats: bool = True) -> None:
    """Layer by layer: for each block of ``blocks(model)``, record its linears' inputs (unless
    `needs_stats` is False) and call ``compress_block(linears: {name: nn.Linear}, stats: {name: InputStats}
    | None)``, which modifies the block in place. Hooks are removed after each block."""
    order = blocks(model)
    seen: set = set()
    for prefix, block in order:
        linears = linear_layers(block, skip, prefix)
        seen |= set(linears)
        if linears:
            compress_block(linears, record(model, batches, linears, covariance, stop_after=block)
                           if needs_stats else None)
    # linears outside every block (in a Llama model only lm_head, which is skipped by default)
    rest = {n: m for n, m in linear_layers(model, skip).items() if n not in seen}
    if rest:
        compress_block(rest, record(model, batches, rest, covariance) if needs_stats else None)


def token_batches(ids, n_samples: int = 32, seq_len: int = 128, batch_size: int = 8, seed: int = 0,
                  device=None) -> list[torch.Tensor]:
    """Calibration batches: `n_samples` random windows of `seq_len` tokens from the 1-D sequence `ids`,
    grouped into (batch_size, seq_len) int64 tensors."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if n_samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(f"n_samples, seq_len and batch_size must be >= 1, got {n_samples}, {seq_len}, {batch_size}")
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len + 1) for _ in range(n_samples)]
    windows = torch.stack([ids[s:s + seq_len] for s in starts])                    # (n_samples, seq_len)
    return [w.to(device) if device is not None else w for w in windows.split(batch_size)]
