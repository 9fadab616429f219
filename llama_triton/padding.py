"""Padding bookkeeping for transformers' 2-D padding masks, computed once per forward, not once per layer.

transformers hands the same mask tensor to every decoder layer of a forward (``hf_attention_forward`` gets
it as ``attention_mask``). What the attention derives from it (per-row lengths, left padding, the unpad
indices and cu_seqlens of the varlen path, their maxima) needs host syncs (``nonzero``, ``int(max)``), so
it is cached here on the mask object: the first layer pays, the others reuse it. One entry (the last mask
seen), checked by identity and version, so a new forward (or an in-place edit of the mask) recomputes.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_LAST: dict = {}


def _key(mask: torch.Tensor, *extra):
    return (id(mask), mask.data_ptr(), mask._version, tuple(mask.shape), mask.device, *extra)


def cached(mask: torch.Tensor, what: str, build, *extra):
    """``build()`` once per (mask object, what, extra), reused while the mask is alive and unchanged."""
    key = _key(mask, what, *extra)
    hit = _LAST.get(what)
    if hit is not None and hit[0] == key and hit[1]() is mask:
        return hit[2]
    value = build()
    _LAST[what] = (key, weakref.ref(mask), value)
    return value


def left_padding(attention_mask: torch.Tensor, n: int, device):
    """For a (b, >= n) padding mask whose last n columns are the keys: ``(leftpad int32 (b,), full int32
    (b,) == n)`` when every row is left padding only (zeros, then ones: what HF generate builds), else None.
    One host sync per forward (the check), none per layer."""
    def build():
        mask = attention_mask[:, -n:].to(device=device, dtype=torch.bool)
        lens = mask.sum(1, dtype=torch.int32)                                            # (b,)
        leftpad = n - lens
        cols = torch.arange(n, device=device)
        if not bool((mask == (cols[None] >= leftpad[:, None])).all()):                    # holes: not left padding
            return None
        return leftpad, torch.full_like(lens, n)
    return cached(attention_mask, "left_padding", build, n, str(device))


def unpad(attention_mask: torch.Tensor, n: int, sq: int, device):
    """Unpad indices of the varlen path for the last n key columns and the last sq query columns:
    ``(idx_k, idx_q, cu_k, cu_q, max_k, max_q)`` (the int maxima are host ints), once per forward."""
    def build():
        mask = attention_mask[:, -n:].to(device=device, dtype=torch.bool)
        q_mask = mask[:, -sq:]
        idx_k = mask.reshape(-1).nonzero().squeeze(1)
        idx_q = q_mask.reshape(-1).nonzero().squeeze(1)
        lens_k, lens_q = mask.sum(1, dtype=torch.int32), q_mask.sum(1, dtype=torch.int32)
        cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = F.pad(lens_q.cumsum(0, dtype=torch.int32), (1, 0))
        return idx_k, idx_q, cu_k, cu_q, int(lens_k.max()), int(lens_q.max())
    return cached(attention_mask, "unpad", build, n, sq, str(device))


def full_lengths(batch: int, n: int, device) -> torch.Tensor:
    """An int32 (batch,) tensor of n (the key count of an unpadded cache), one launch per (batch, n)."""
    key = (batch, n, str(device))
    hit = _LAST.get("full")
    if hit is None or hit[0] != key:
        _LAST["full"] = hit = (key, None, torch.full((batch,), n, dtype=torch.int32, device=device))
    return hit[2]
