"""Fused RMSNorm + matmul: ``y = rms_norm(x [+ residual], norm_weight) @ weight.T`` in one GEMM.

Since ``rms_norm(x)[m, k] = rstd[m] * x[m, k] * w[k]``, the product is
    y[m, n] = rstd[m] * sum_k x[m, k] * (w[k] * W[n, k])
so the GEMM's K loop reads x once, accumulates ``sum_k x**2`` (fp32) next to the dot product, and the
epilogue scales each output row by ``rstd = 1 / sqrt(mean(x**2) + eps)``. The diagonal ``diag(w)`` is
folded into the product as each tile is loaded: on the A side (``x[m, k] * w[k]`` in fp32, rounded to the
input dtype), because the x tile already passes through registers for the sum of squares while the W tile
can then go straight from shared memory to the tensor cores (Hopper's wgmma reads B from shared memory
only; scaling B in registers would cost a round trip per tile). Mathematically it is the same as folding
w into B. For inference it can instead be pre-folded into ``weight`` once (``norm_weight=None``: see
``fold_norm_weight``), which skips even that multiply.
With a residual, ``s = residual + x`` (rounded to x's dtype, as HF) is normalised and written out by the
programs of the first column block.

Numerics differ from HF's unfused ``(x * rstd).to(dtype) * w`` then matmul by where the roundings fall
(here: ``x * w`` rounded, the rstd applied in fp32 to the fp32 accumulator); the tests hold it to the 2x
rule against the fp64 oracle of the unfused reference.

Layout: x ``(M, K)`` and residual with a contiguous last dim (rows strided), weight ``(N, K)`` any
strides, y ``(M, N)`` contiguous. Grouped tile order for L2 reuse; autotuned per (bucketed M, N, K):
decode (M <= 16) configs use BLOCK_M=16, prefill ones large tiles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import (FLOAT_DTYPES, check_eps, check_residual, check_same_device, check_tensor, interpreting,
                      rows_view)
from ._tiles import grouped_tile


def _configs():
    """Autotune space: one small config on the interpreter; decode and prefill tiles on a GPU."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    cfg = lambda m, n, k, w, s: triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},  # noqa: E731
                                              num_warps=w, num_stages=s)
    decode = [cfg(16, 64, 128, 4, 4), cfg(16, 64, 256, 4, 3), cfg(16, 128, 128, 4, 4), cfg(16, 128, 64, 4, 5),
              cfg(16, 32, 256, 4, 3)]
    prefill = [cfg(128, 128, 64, 8, 3), cfg(128, 256, 64, 8, 3), cfg(256, 128, 64, 8, 3), cfg(64, 256, 32, 4, 4),
               cfg(128, 128, 32, 4, 4), cfg(128, 64, 32, 4, 4), cfg(64, 128, 32, 4, 4), cfg(64, 64, 64, 4, 4)]
    return decode + prefill


def _prune(configs, named_args, **kwargs):
    """Decode-shaped tiles for M <= 16 and the others for larger M (the M bucket is an autotune key)."""
    small = named_args["M_BUCKET"] <= 16
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] <= 16) == small]
    return kept or configs


def m_bucket(M: int) -> int:
    """Runtime M rounded up to a few buckets, so a new batch/sequence size does not re-tune."""
    for b in (16, 64, 256, 1024):
        if M <= b:
            return b
    return 4096


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _rms_norm_matmul_kernel(
    X, R, NW, W, Y, RES_OUT,                                 # pointers
    M, N, K,                                                 # sizes
    stride_xm, stride_rm, stride_wn, stride_wk, stride_ym, stride_resm,
    eps,
    M_BUCKET,                                                # autotune key only
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM_WEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)   # GROUP_M row blocks share W tiles

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        xm = m_mask[:, None] & k_mask[None, :]
        x = tl.load(X + rm64[:, None] * stride_xm + k[None, :], mask=xm, other=0.0)           # (BM, BK)
        if HAS_RESIDUAL:
            r = tl.load(R + rm64[:, None] * stride_rm + k[None, :], mask=xm, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)                 # as `residual + x`
            if pid_n == 0:                                                                   # written once
                tl.store(RES_OUT + rm64[:, None] * stride_resm + k[None, :], x, mask=xm)
        xf = x.to(tl.float32)
        sumsq += tl.sum(xf * xf, axis=1)
        if HAS_NORM_WEIGHT:  # diag(w) applied on the A side: x is in registers already (for sumsq)
            nw = tl.load(NW + k, mask=k_mask, other=0.0).to(tl.float32)
            x = (xf * nw[None, :]).to(X.dtype.element_ty)
        b = tl.load(W + rn64[None, :] * stride_wn + k[:, None].to(tl.int64) * stride_wk,
                    mask=n_mask[None, :] & k_mask[:, None], other=0.0)                        # (BK, BN)
        acc = tl.dot(x, b, acc, input_precision=DOT_PRECISION)
    rstd = 1.0 / tl.sqrt(sumsq / K + eps)
    y = acc * rstd[:, None]
    tl.store(Y + rm64[:, None] * stride_ym + rn64[None, :], y.to(Y.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def check_inputs(x, norm_weight, weight, eps=1e-6, residual=None):
    """Validate rms_norm_matmul's arguments (x any leading shape); TypeError/ValueError naming them."""
    check_tensor("x", x, FLOAT_DTYPES, min_ndim=1)
    check_tensor("weight", weight, FLOAT_DTYPES, ndim=2)
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, FLOAT_DTYPES, ndim=1)
    check_residual(residual, x)
    check_same_device(x=x, weight=weight, norm_weight=norm_weight, residual=residual)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    K = x.shape[-1]
    if K < 1:
        raise ValueError("x's last dim (hidden size) must be >= 1")
    if weight.shape[1] != K:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but x's last dim is {K}: it must be (N, {K})")
    if norm_weight is not None and norm_weight.shape[0] != K:
        raise ValueError(f"norm_weight has shape {tuple(norm_weight.shape)} but x's last dim is {K}; they must match")
    check_eps(eps)


def fold_norm_weight(norm_weight: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight (N, K) * norm_weight (K,)`` (fp32 product, rounded to weight's dtype) for the pre-folded
    inference variant: ``rms_norm_matmul(x, None, folded)`` == ``rms_norm_matmul(x, norm_weight, weight)``
    up to that rounding."""
    return (weight.float() * norm_weight.float()[None, :]).to(weight.dtype)


def rms_norm_matmul_fwd(x, norm_weight, weight, eps, residual=None):
    """x (M, K), norm_weight (K,) or None, weight (N, K), residual (M, K) or None -> y (M, N) in x's dtype,
    res_out (M, K) (= residual + x) or None."""
    check_inputs(x, norm_weight, weight, eps, residual)
    x = rows_view(x)
    residual = rows_view(residual) if residual is not None else None
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    if M == 0 or N == 0:
        if res_out is not None:
            torch.add(residual, x, out=res_out)
        return y, res_out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _rms_norm_matmul_kernel[grid](
        x, residual if residual is not None else x,
        norm_weight.contiguous() if norm_weight is not None else x, weight, y,
        res_out if res_out is not None else y,
        M, N, K,
        x.stride(0), residual.stride(0) if residual is not None else 0, weight.stride(0), weight.stride(1),
        y.stride(0), res_out.stride(0) if res_out is not None else 0,
        float(eps), m_bucket(M),
        HAS_RESIDUAL=residual is not None, HAS_NORM_WEIGHT=norm_weight is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    return y, res_out


def describe_config(M: int, N: int, K: int) -> str:
    """The autotuned config chosen for this (M bucket, N, K), after a run ('' before any)."""
    for key, cfg in _rms_norm_matmul_kernel.cache.items():
        if tuple(key[:3]) == (m_bucket(M), N, K):
            return str(cfg)
    return ""
