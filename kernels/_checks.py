"""Input checks shared by the launchers: every failure names the argument and what is allowed."""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, dtypes=FLOAT_DTYPES, ndim: int | None = None, min_ndim: int | None = None):
    """Raise TypeError/ValueError unless `t` is a tensor with one of `dtypes` and the required rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; allowed: {allowed}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'' if ndim == 1 else 's'}, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors):
    """Raise ValueError unless all given (non-None) tensors live on the same device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; put them on one device")


def num_programs_hint(device: torch.device) -> int:
    """How many persistent programs to launch: the SM count on CUDA, a small number on the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def num_warps_for(block: int) -> int:
    """Warps for a one-row-per-program kernel over `block` elements (as in the Triton tutorials / Liger)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def interpreting() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1): launchers pick small blocks / one
    autotune config there. Key GPU-vs-interpreter choices on this, not on the tensor's device, so that
    tests/lowering_check.py (CPU tensors, no interpreter) compiles the GPU choices."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_residual(residual, x):
    """A residual stream added to x must be a float tensor of x's shape and dtype (None passes)."""
    if residual is None:
        return
    check_tensor("residual", residual, FLOAT_DTYPES)
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}; they must match")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}; they must match")


def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):   # nan too
        got = (f"a Tensor of shape {tuple(eps.shape)}" if isinstance(eps, torch.Tensor)
               else repr(eps) if isinstance(eps, (int, float)) else f"a {type(eps).__name__}")
        raise ValueError(f"eps must be a non-negative float, got {got}")


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N) with a contiguous last dim (copies only when it has to)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


_CPU_VALUE_CHECKS = [0]     # nesting depth of cpu_value_check() regions (profiling.count_kernels reads it)


class cpu_value_check:
    """``with cpu_value_check(): ...`` marks a check of tensor *values* that only runs on the CPU (where it is
    free), e.g. ``int(positions.max())``: ``llama_triton.profiling.count_kernels`` reports its ops and syncs
    as ``checks``, apart from the launches and syncs a GPU run also does."""

    def __enter__(self):
        _CPU_VALUE_CHECKS[0] += 1

    def __exit__(self, *exc):
        _CPU_VALUE_CHECKS[0] -= 1
        return False


def in_cpu_value_check() -> bool:
    return _CPU_VALUE_CHECKS[0] > 0
