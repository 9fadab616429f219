"""Parity checking shared by the tests and `llama-triton verify`.

The tolerance rule (FlashAttention/Liger practice, DESIGN.md): compare ours and the plain-PyTorch path in
the input's precision against an fp64 oracle; ours passes when
    max|ours - oracle| <= 2 * max|torch_lowp - oracle| + atol(dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}


@dataclass
class Comparison:
    name: str
    max_abs: float
    max_rel: float
    torch_abs: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.max_abs <= self.bound


def compare(name: str, ours: torch.Tensor, torch_lowp: torch.Tensor, oracle: torch.Tensor, atol: float | None = None) -> Comparison:
    """Compare `ours` and `torch_lowp` (same dtype) with the fp64 `oracle` under the 2x rule."""
    if ours.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)} != reference {tuple(oracle.shape)}")
    if atol is None:
        atol = ATOL.get(ours.dtype, 1e-5)
    oracle = oracle.double()
    err = (ours.double() - oracle).abs()
    if not torch.isfinite(ours).all():
        max_abs = float("inf")
    else:
        max_abs = err.max().item() if err.numel() else 0.0
    torch_abs = (torch_lowp.double() - oracle).abs().max().item() if err.numel() else 0.0
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    return Comparison(name, max_abs, max_abs / max(scale, 1e-30), torch_abs, 2 * torch_abs + atol)


def assert_close(name, ours, torch_lowp, oracle, atol=None) -> Comparison:
    """`compare` and raise AssertionError with the numbers when the rule fails."""
    c = compare(name, ours, torch_lowp, oracle, atol)
    assert c.ok, f"{name}: max abs err {c.max_abs:.3e} > bound {c.bound:.3e} (torch low-precision err {c.torch_abs:.3e})"
    return c


def to_oracle(args):
    """fp64 copies of the floating-point tensors in `args` (other values untouched)."""
    return tuple(a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _run(fn, args, grad_idx, seed):
    """Run fn on detached copies of args; return outputs and, when grad_idx, grads of sum(out * g)."""
    args = tuple(a.detach().clone().requires_grad_(i in grad_idx) if isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))
    outs = as_tuple(fn(*args))
    grads = ()
    if grad_idx:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        loss = 0
        for o in outs:
            if o.is_floating_point() and o.requires_grad:
                g = torch.randn(o.shape, generator=gen, dtype=torch.float32).to(device=o.device, dtype=o.dtype)
                loss = loss + (o * g).sum()
        grads = torch.autograd.grad(loss, [args[i] for i in grad_idx])
    return tuple(o.detach() for o in outs), tuple(g.detach() for g in grads)


def parity(spec, shape: dict, dtype: torch.dtype, device, backward: bool = True, seed: int = 0) -> list[Comparison]:
    """Run an OpSpec (llama_triton.registry) on one shape and dtype: outputs and input grads of ours and
    of the low-precision reference against the fp64 oracle. Returns one Comparison per tensor."""
    torch.manual_seed(seed)
    args = spec.make_inputs(shape, dtype, device)
    grad_idx = spec.grad_inputs if backward else ()
    ours, ours_g = _run(spec.fn, args, grad_idx, seed)
    low, low_g = _run(spec.reference, args, grad_idx, seed)
    hi, hi_g = _run(spec.reference, to_oracle(args), grad_idx, seed)
    results = [compare(f"out{i}", o, l, h) for i, (o, l, h) in enumerate(zip(ours, low, hi))]
    results += [compare(f"grad[{j}]", o, l, h) for j, o, l, h in zip(grad_idx, ours_g, low_g, hi_g)]
    return results
