"""Fused low-rank matmul: y = (x @ A.T) @ B.T in one launch, the rank-r intermediate never leaving the chip.

A low-rank linear layer stores its weight ``W (N, K) ~= B (N, r) @ A (r, K)`` (truncated SVD, SVD-LLM; see
``llama_triton.compress.low_rank``). Two GEMMs would write ``t = x @ A.T (M, r)`` to memory and read it
back, and pay two launches: at decode (M of 1..16 rows) that is launch overhead on a path that should only
stream the two factors. This kernel gives each program one ``(BLOCK_M, BLOCK_N)`` output tile and loops
over the rank in ``BLOCK_R`` chunks:

    for each rank chunk r0:                       # t never goes to memory
        t  = x[m_tile, :] @ A[r0:r0+BLOCK_R, :].T   (BLOCK_M, BLOCK_R)   fp32 accumulation over K tiles
        acc += t.to(x.dtype) @ B[n_tile, r0:r0+BLOCK_R].T                  fp32 accumulator (BLOCK_M, BLOCK_N)

Numerics: t is rounded to x's dtype before the second product, exactly as the two-matmul PyTorch path
rounds its intermediate, so both sit at the same distance from the fp64 oracle (the 2x rule).

Cost model (why this is a decode kernel, for small r * K): every N tile recomputes its rows' t, so A is
read ``cdiv(N, BLOCK_N)`` times (from L2 after the first) and the x @ A.T FLOPs are repeated as often. More
fundamentally, with no communication between programs every program must read all of A (r x K), so one
launch cannot beat one SM streaming A: it wins at decode only while A is small (``r * K`` up to about
``FUSED_MAX_RK`` elements, a prediction from this model), where the two-GEMM path's second launch and the
intermediate's round trip dominate. Larger factors and prefill (large M: two cuBLAS GEMMs are compute-
efficient) go to two GEMMs in ``llama_triton.LowRankLinear``; benchmarks/bench_compress.py measures the
crossover on a GPU. A split-rank variant with a cross-program reduction would lift the bound (not built).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, interpreting
from ._tiles import grouped_tile
from .rms_norm_matmul import m_bucket

FUSED_MAX_M = 16         # LowRankLinear runs this kernel up to this many rows, two GEMMs above
FUSED_MAX_RK = 1 << 19   # ... and while the input-side factor A (r, K) has at most this many elements


@triton.jit(do_not_specialize=["M"])  # M: the runtime row count (batch x new tokens) must not recompile
def _low_rank_kernel(
    X, A, B, Y,                                        # pointers
    M, N, K, R, M_BUCKET,                              # sizes (M_BUCKET: autotune key only)
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # ---- tile coordinates: grouped order, GROUP_M row tiles share each column tile in L2
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)         # int64: M * K may pass 2**31
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        # -- t = x @ A[chunk].T over K: the rank-r intermediate, in registers
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)               # (BLOCK_M, BLOCK_K)
            a = tl.load(A + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)               # (BLOCK_K, BLOCK_R) = A.T
            if X.dtype.element_ty == tl.float32:
                t += tl.dot(x, a, input_precision="ieee")   # no tf32: fp32 inputs get fp32 math
            else:
                t += tl.dot(x, a)
        # -- acc += t @ B[n_tile, chunk].T (t rounded to x's dtype, as the two-matmul path rounds it)
        b = tl.load(B + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)                   # (BLOCK_R, BLOCK_N) = B.T
        t = t.to(X.dtype.element_ty)
        if X.dtype.element_ty == tl.float32:
            acc += tl.dot(t, b, input_precision="ieee")
        else:
            acc += tl.dot(t, b)

    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------- autotune configs
def _configs() -> list:
    """Decode tiles (BLOCK_M 16: wide N tiles so that A is re-read by few programs) and prefill tiles; the
    M bucket (an autotune key) selects one family (``_prune``). On Triton's interpreter: one small config."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16, "GROUP_M": 4})]

    def cfg(bm, bn, bk, br, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br, "GROUP_M": 8},
                             num_warps=warps, num_stages=stages)

    decode = [cfg(16, 64, 128, 32, 4, 3), cfg(16, 128, 128, 32, 4, 3), cfg(16, 32, 64, 32, 4, 4),
              cfg(16, 256, 128, 32, 8, 3), cfg(16, 64, 256, 64, 4, 2), cfg(16, 32, 128, 64, 4, 3)]
    prefill = [cfg(64, 128, 64, 64, 4, 3), cfg(128, 128, 64, 64, 8, 3), cfg(128, 64, 64, 32, 4, 3),
               cfg(64, 64, 64, 32, 4, 4)]
    return decode + prefill


def _prune(configs, named_args, **kwargs):
    """Decode-shaped tiles for M <= 16 and the others for larger M."""
    small = named_args["M_BUCKET"] <= 16
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] <= 16) == small]
    return kept or configs


@functools.lru_cache(maxsize=None)
def _kernel():
    """The autotuned kernel (built once, on first use, so that importing this module compiles nothing)."""
    return triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "R"],
                           prune_configs_by={"early_config_prune": _prune})(_low_rank_kernel)


# ---------------------------------------------------------------------------------------------- launcher
def check_inputs(x, a, b):
    """Validate low_rank_matmul's arguments: x ``(..., K)``, a ``(r, K)``, b ``(N, r)``, one float dtype,
    one device. Raises TypeError/ValueError naming the argument."""
    check_tensor("x", x, FLOAT_DTYPES, min_ndim=1)
    check_tensor("a", a, FLOAT_DTYPES, ndim=2)
    check_tensor("b", b, FLOAT_DTYPES, ndim=2)
    check_same_device(x=x, a=a, b=b)
    if a.dtype != x.dtype or b.dtype != x.dtype:
        raise TypeError(f"a ({a.dtype}) and b ({b.dtype}) must have x's dtype ({x.dtype})")
    if a.shape[1] != x.shape[-1]:
        raise ValueError(f"a has shape {tuple(a.shape)}; its second dim must be x's last dim K={x.shape[-1]}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"b has shape {tuple(b.shape)}; its second dim must be the rank r={a.shape[0]} of a")
    if a.shape[0] < 1:
        raise ValueError("a has rank 0; a low-rank factor needs rank >= 1")


def low_rank_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x ``(M, K)``, a ``(r, K)``, b ``(N, r)`` (fp16/bf16/fp32, one dtype, any strides) -> y ``(M, N)`` in
    x's dtype, ``y = (x @ a.T) @ b.T``, in one launch."""
    check_inputs(x, a, b)
    x = x.reshape(-1, x.shape[-1])
    M, K = x.shape
    R, N = a.shape[0], b.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _kernel()[grid](
        x, a, b, y, M, N, K, R, m_bucket(M),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1), y.stride(0), y.stride(1),
    )
    return y


def chosen_config() -> str:
    """The config the autotuner picked last (for benchmark output)."""
    cfg = getattr(_kernel(), "best_config", None)
    if cfg is None:
        return ""
    kw = cfg.kwargs
    return f"BM{kw['BLOCK_M']} BN{kw['BLOCK_N']} BK{kw['BLOCK_K']} BR{kw['BLOCK_R']} w{cfg.num_warps} s{cfg.num_stages}"
