"""Perplexity of a text with a sliding window (HF's strided evaluation), and tokens/s.

    res = perplexity(model, token_ids, max_length=512, stride=256)
    res.ppl, res.tokens, res.tokens_per_s
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass
class EvalResult:
    ppl: float            # exp(mean negative log-likelihood per predicted token)
    nll: float            # mean negative log-likelihood (nats/token)
    tokens: int           # tokens predicted (len(ids) - 1)
    windows: int          # forward passes
    seconds: float
    tokens_per_s: float   # tokens processed by forward passes per second (overlap counted)


@torch.no_grad()
def perplexity(model, ids, max_length: int = 512, stride: int | None = None, progress=None) -> EvalResult:
    """Sliding-window perplexity of the 1-D token sequence `ids` (int64).

    Each window covers up to `max_length` tokens and starts `stride` (default max_length // 2) after the
    previous one; only tokens not scored by an earlier window are scored, each with up to
    max_length - stride tokens of context. `progress(done, total)` is called after each window.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(model.device)
    n = ids.numel()
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    stride = stride or max(1, max_length // 2)
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    starts = list(range(0, max(n - max_length, 0) + stride, stride))
    starts = [s for s in starts if s < n - 1] or [0]
    nll_sum, scored, processed, prev_end = 0.0, 0, 0, 1     # token 0 is never predicted
    t0 = time.perf_counter()
    for i, begin in enumerate(starts):
        end = min(begin + max_length, n)
        window = ids[begin:end][None]                                              # (1, w)
        logits = model(window).logits[0, :-1].float()                              # predicts window[1:]
        targets = window[0, 1:]
        first = max(prev_end, begin + 1) - (begin + 1)                             # skip already-scored tokens
        logp = torch.log_softmax(logits[first:], -1).gather(-1, targets[first:, None])
        nll_sum -= logp.sum().item()
        scored += targets.numel() - first
        processed += window.shape[1]
        prev_end = end
        if progress is not None:
            progress(i + 1, len(starts))
        if end == n:
            break
    seconds = time.perf_counter() - t0
    nll = nll_sum / scored
    return EvalResult(math.exp(nll), nll, scored, i + 1, seconds, processed / max(seconds, 1e-9))
