"""SwiGLU activation ``silu(gate) * up``, forward and backward, on separate or concatenated gate/up.

Numerics follow PyTorch / Hugging Face ``LlamaMLP`` (``act_fn(gate_proj(x)) * up_proj(x)`` in the input
dtype) exactly: ``silu(gate)`` is computed in fp32 and rounded to the input dtype, then multiplied by ``up``
(in fp32, rounded once). The backward mirrors autograd's: ``dup = dy * silu(gate)`` (the rounded value),
``dsilu = (dy * up)`` rounded to the dtype, ``dgate = dsilu * sig * (1 + gate * (1 - sig))`` in fp32.

Layout: 2-D ``(rows, cols)`` tensors whose last dim is contiguous, rows strided (so ``gate_up[:, :I]``
and ``gate_up[:, I:]`` views of a concatenated ``(rows, 2I)`` tensor are passed as-is, and the backward of
the concatenated variant writes both halves of one ``(rows, 2I)`` gradient). Grid: (rows, column blocks).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, interpreting


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y,                                      # pointers
    n_cols,                                       # intermediate size
    stride_g, stride_u, stride_y,                 # row strides (the last dim is contiguous)
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(G.dtype.element_ty).to(tl.float32)     # silu rounded like PyTorch's
    tl.store(Y + row * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU,                             # pointers
    n_cols,
    stride_dy, stride_g, stride_u, stride_dg, stride_du,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = (g * sig).to(G.dtype.element_ty).to(tl.float32)
    dact = (dy * u).to(G.dtype.element_ty).to(tl.float32)               # autograd rounds d(silu) to the dtype
    dg = dact * sig * (1.0 + g * (1.0 - sig))
    tl.store(DU + row * stride_du + cols, (dy * act).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + row * stride_dg + cols, dg.to(DG.dtype.element_ty), mask=mask)


def _block(n_cols: int) -> int:
    cap = 128 if interpreting() else 1024             # small blocks keep the CPU interpreter fast
    return min(cap, triton.next_power_of_2(max(n_cols, 1)))


def check_inputs(gate, up=None):
    """Validate swiglu's arguments: gate/up (..., I) of one dtype and shape, or gate_up (..., 2I) alone."""
    check_tensor("gate_up" if up is None else "gate", gate, FLOAT_DTYPES, min_ndim=1)
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"gate_up's last dim must be even (gate and up concatenated), got {gate.shape[-1]}")
        return
    check_tensor("up", up, FLOAT_DTYPES, min_ndim=1)
    check_same_device(gate=gate, up=up)
    if up.shape != gate.shape:
        raise ValueError(f"up has shape {tuple(up.shape)} but gate has {tuple(gate.shape)}; they must match")
    if up.dtype != gate.dtype:
        raise TypeError(f"up has dtype {up.dtype} but gate has {gate.dtype}; they must match")


def _check_2d(**tensors):
    for name, t in tensors.items():
        if t.dim() != 2 or (t.stride(-1) != 1 and t.shape[-1] > 1):
            raise ValueError(f"{name} must be 2-D (rows, cols) with a contiguous last dim, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate, up (M, I) -> silu(gate) * up (M, I) in their dtype (rows may be strided views)."""
    check_inputs(gate, up)
    _check_2d(gate=gate, up=up)
    M, n = gate.shape
    y = torch.empty((M, n), dtype=gate.dtype, device=gate.device) if out is None else out
    if M == 0 or n == 0:
        return y
    BLOCK = _block(n)
    _swiglu_fwd_kernel[(M, triton.cdiv(n, BLOCK))](
        gate, up, y, n, gate.stride(0), up.stride(0), y.stride(0), BLOCK=BLOCK, num_warps=4,
    )
    return y


def swiglu_bwd(dy, gate, up, dgate=None, dup=None):
    """dy, gate, up (M, I) -> (dgate, dup) (M, I) in gate's dtype; dgate/dup may be given (e.g. the two
    halves of a (M, 2I) buffer for the concatenated variant)."""
    _check_2d(dy=dy, gate=gate, up=up)
    M, n = gate.shape
    dgate = torch.empty((M, n), dtype=gate.dtype, device=gate.device) if dgate is None else dgate
    dup = torch.empty((M, n), dtype=gate.dtype, device=gate.device) if dup is None else dup
    if M == 0 or n == 0:
        return dgate, dup
    BLOCK = _block(n)
    _swiglu_bwd_kernel[(M, triton.cdiv(n, BLOCK))](
        dy, gate, up, dgate, dup, n,
        dy.stride(0), gate.stride(0), up.stride(0), dgate.stride(0), dup.stride(0),
        BLOCK=BLOCK, num_warps=4,
    )
    return dgate, dup
