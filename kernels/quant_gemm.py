"""Weight-only quantized GEMM: y = x @ W.T with W stored as 4- or 8-bit integers (W4A16 / W8A16).

Weight layout (``llama_triton.quant`` documents it in full and converts GPTQ/AWQ checkpoints to it):
    qweight  int32 ``(K // PACK, N)``, PACK = 32 // bits, packed along K: bits ``[i*bits, (i+1)*bits)`` of
             ``qweight[j, n]`` hold the unsigned code of ``W[n, j*PACK + i]`` (GPTQ's qweight layout)
    scales   ``(G, N)`` fp16/bf16/fp32, G = K // group_size (G = 1: per output channel)
    zeros    ``(G, N)`` uint8/int16/int32 zero points, or None: symmetric, zero point 2**(bits-1)
    perm     int32/int64 ``(K,)`` or None: act-order. Column j of the stored weight is column perm[j] of W,
             so the kernel reads x[:, perm[j]] for it (a gather of the small activation, not of scales).
    W[n, perm[k]] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]

Numerics: the integer tile ``q - z`` (exact in fp16/bf16: |q - z| <= 256) is fed to ``tl.dot`` in x's
dtype with an fp32 accumulator, and the scale multiplies the fp32 partial product of each K tile (a K
tile never straddles a group: BLOCK_K divides group_size) or, per channel, the final accumulator. The
weights are never dequantised to memory and this is at least as accurate as ``x @ dequantize(W).T``.

Two paths, chosen by M (rows of x):
  * decode  (M <= 16): BLOCK_M = 16, split-K: SPLIT_K programs share each N tile so that enough programs
    stream the weight to fill every SM; each writes an fp32 partial to a workspace ``(SPLIT_K, M, N)``
    that a small reduce kernel sums afterwards in a fixed order (deterministic, no atomics).
  * prefill (M > 16):  tiled GEMM with grouped tile ordering for L2 reuse, direct store.
Both are autotuned on (M bucket, N, K, bits, group size), never on M itself. Decode loads each code on its
own (PACK rows of a tile read the same int32 word, served by L1: the GPTQ-Triton split-K pattern, small
register tiles); prefill loads each word once, ``(BLOCK_K / PACK, BLOCK_N)``, and unpacks it in registers
(``COMPACT``), so the pipelined shared-memory tile is 8x smaller than the unpacked int32 tile.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, interpreting

SUPPORTED_BITS = (4, 8)
DECODE_MAX_M = 16
INT_DTYPES = (torch.uint8, torch.int16, torch.int32)


@triton.jit(do_not_specialize=["M"])
def _quant_matmul_kernel(
    X, QW, S, Z, PERM, Y, WS,                          # pointers
    M, N, K, M_BUCKET,                                 # sizes (M_BUCKET: autotune key only)
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,     # GROUP_SIZE 0: one scale per output channel
    HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, COMPACT: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    MID: tl.constexpr = 1 << (BITS - 1)
    # ---- tile coordinates: grouped ordering so that GROUP_M row tiles reuse one weight column tile
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)        # int64: M * K may pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # ---- this program's K range: whole BLOCK_K tiles, so a tile never straddles a group
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)

    if GROUP_SIZE == 0:  # per output channel: one zero row and one scale row for the whole K loop
        if HAS_ZEROS:
            z_row = tl.load(Z + offs_n * stride_zn, mask=mask_n, other=0).to(tl.int32)
        s_row = tl.load(S + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:
            src_k = tl.load(PERM + offs_k, mask=mask_k, other=0).to(tl.int64)
        else:
            src_k = offs_k
        x = tl.load(X + offs_m[:, None] * stride_xm + src_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)                  # (BLOCK_M, BLOCK_K)
        if COMPACT:  # load each int32 word once, (BLOCK_K / PACK, BLOCK_N), and unpack in registers
            offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
            packed = tl.load(QW + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                             mask=(offs_w[:, None] < K // PACK) & mask_n[None, :], other=0)
            shifts = tl.arange(0, PACK) * BITS
            q = (packed[:, None, :] >> shifts[None, :, None]) & MAXQ                  # (BLOCK_K/PACK, PACK, BLOCK_N)
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))                                     # row j*PACK + i
        else:        # one load per code: PACK rows read the same word (served by L1); GPTQ-triton style
            packed = tl.load(QW + (offs_k[:, None] // PACK) * stride_qk + offs_n[None, :] * stride_qn,
                             mask=mask_k[:, None] & mask_n[None, :], other=0)          # (BLOCK_K, BLOCK_N)
            q = (packed >> ((offs_k[:, None] % PACK) * BITS)) & MAXQ
        if GROUP_SIZE > 0:
            g = k0 // GROUP_SIZE
            if HAS_ZEROS:
                z = tl.load(Z + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0).to(tl.int32)
            s = tl.load(S + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        else:
            if HAS_ZEROS:
                z = z_row
        if HAS_ZEROS:
            w = (q - z[None, :]).to(X.dtype.element_ty)       # integers |q - z| <= 256: exact in fp16/bf16
        else:
            w = (q - MID).to(X.dtype.element_ty)
        if X.dtype.element_ty == tl.float32:
            part = tl.dot(x, w, input_precision="ieee")     # no tf32: fp32 inputs get fp32 math
        else:
            part = tl.dot(x, w)
        if GROUP_SIZE > 0:
            acc += part * s[None, :]
        else:
            acc += part
    if GROUP_SIZE == 0:
        acc = acc * s_row[None, :]

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty), mask=mask)
    else:  # fp32 partial into the (SPLIT_K, M, N) workspace, reduced by _split_k_reduce_kernel
        ws = WS + pid_k.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws, acc, mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    WS, Y,                                             # pointers: (split, M, N) fp32 partials, (M, N) output
    M, N, split,
    stride_ym, stride_yn,
    BLOCK: tl.constexpr,
):
    """Y = sum over the first `split` partials, in a fixed order (deterministic), cast to Y's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # flat index into (M, N)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, split):
        acc += tl.load(WS + s * M * N + offs, mask=mask, other=0.0)
    m, n = offs // N, offs % N
    tl.store(Y + m * stride_ym + n * stride_yn, acc.to(Y.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------- autotune configs
def _configs(decode: bool, max_block_k: int) -> list:
    """Autotune configs for one path; BLOCK_K <= max_block_k (it must divide the group size).

    decode: memory-bound, narrow N tiles and split K so that every SM streams weights; each code loaded
    on its own (PACK rows share a word through L1: small register tiles). prefill: the classic Triton
    matmul tiles, each packed word loaded once (COMPACT) so the pipelined shared-memory tile stays small.
    On Triton's interpreter: one small config per path (the decode one still splits K, so tests cover it)."""
    if interpreting():
        bk = min(32, max_block_k)
        if decode:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": bk, "GROUP_M": 1, "SPLIT_K": 2,
                                   "COMPACT": False})]
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": bk, "GROUP_M": 4, "SPLIT_K": 1,
                               "COMPACT": True})]
    out = []
    if decode:
        for bn, bk, split, warps, stages in [(32, 128, 4, 4, 3), (64, 128, 2, 4, 3), (64, 128, 4, 4, 3),
                                             (64, 64, 8, 4, 4), (128, 64, 2, 4, 3), (32, 128, 8, 4, 3),
                                             (128, 128, 1, 8, 3), (64, 256, 4, 8, 2), (32, 128, 1, 4, 4)]:
            out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": min(bk, max_block_k), "GROUP_M": 1,
                                      "SPLIT_K": split, "COMPACT": False}, num_warps=warps, num_stages=stages))
    else:
        for bm, bn, bk, warps, stages in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                          (128, 64, 64, 4, 4), (64, 64, 128, 4, 3), (128, 128, 128, 8, 2)]:
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": min(bk, max_block_k), "GROUP_M": 8,
                                      "SPLIT_K": 1, "COMPACT": True}, num_warps=warps, num_stages=stages))
    unique = {}
    for c in out:  # clamping BLOCK_K can make two configs equal
        unique.setdefault((tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages), c)
    return list(unique.values())


@functools.lru_cache(maxsize=None)
def _kernel(decode: bool, max_block_k: int):
    """The autotuned kernel for one path and one BLOCK_K bound (built once, cached)."""
    return triton.autotune(
        configs=_configs(decode, max_block_k),
        key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_ZEROS", "HAS_PERM"],
    )(_quant_matmul_kernel)


def m_bucket(M: int) -> int:
    """Autotune bucket of the row count: powers of two, capped (M itself is never a key)."""
    return min(triton.next_power_of_2(max(M, 1)), 4096)


# ---------------------------------------------------------------------------------------------- launcher
def check_inputs(x, qweight, scales, zeros=None, perm=None, bits=4, group_size=128):
    """Validate quant_matmul's arguments (x is ``(..., K)``); raises TypeError/ValueError naming them."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    check_tensor("x", x, FLOAT_DTYPES, min_ndim=1)
    check_tensor("qweight", qweight, (torch.int32,), ndim=2)
    check_tensor("scales", scales, FLOAT_DTYPES, ndim=2)
    if zeros is not None:
        check_tensor("zeros", zeros, INT_DTYPES, ndim=2)
    if perm is not None:
        check_tensor("perm", perm, (torch.int32, torch.int64), ndim=1)
    check_same_device(x=x, qweight=qweight, scales=scales, zeros=zeros, perm=perm)
    pack = 32 // bits
    K = x.shape[-1]
    N = qweight.shape[1]
    if K < 1 or K % pack:
        raise ValueError(f"x's last dim K={K} must be a positive multiple of {pack} for {bits}-bit weights")
    if qweight.shape[0] * pack != K:
        raise ValueError(f"qweight has shape {tuple(qweight.shape)}; for x with K={K} and {bits}-bit weights it "
                         f"must be ({K // pack}, N) (int32, {pack} values packed along K)")
    if not isinstance(group_size, int) or group_size < 1 or K % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive divisor of K={K}")
    if group_size != K and (group_size < 16 or group_size & (group_size - 1)):
        raise ValueError(f"group_size={group_size} must be a power of two >= 16, or K={K} (per output channel)")
    G = K // group_size
    if tuple(scales.shape) != (G, N):
        raise ValueError(f"scales has shape {tuple(scales.shape)}; expected (K // group_size, N) = ({G}, {N})")
    if zeros is not None and tuple(zeros.shape) != (G, N):
        raise ValueError(f"zeros has shape {tuple(zeros.shape)}; expected (K // group_size, N) = ({G}, {N})")
    if perm is not None and perm.shape[0] != K:
        raise ValueError(f"perm has shape {tuple(perm.shape)}; expected ({K},)")


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 perm: torch.Tensor | None = None, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    """x ``(M, K)`` fp16/bf16/fp32 (any strides) and a packed weight (module docstring) -> y ``(M, N)`` in
    x's dtype, ``y = x @ W.T``. M <= 16 takes the split-K decode path, larger M the tiled GEMM."""
    check_inputs(x, qweight, scales, zeros, perm, bits, group_size)
    x = x.reshape(-1, x.shape[-1])
    M, K = x.shape
    N = qweight.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    grouped = group_size != K
    max_block_k = group_size if grouped else 256
    decode = M <= DECODE_MAX_M
    kernel = _kernel(decode, max_block_k)
    # workspace for split-K partials: sized for the largest split any config may pick (allocation only)
    max_split = max(c.kwargs["SPLIT_K"] for c in kernel.configs)
    ws = torch.empty((max_split, M, N), dtype=torch.float32, device=x.device) if max_split > 1 else y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, perm if perm is not None else qweight, y, ws,
        M, N, K, m_bucket(M),
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0) if zeros is not None else 0, zeros.stride(1) if zeros is not None else 0,
        y.stride(0), y.stride(1),
        BITS=bits, GROUP_SIZE=group_size if grouped else 0,
        HAS_ZEROS=zeros is not None, HAS_PERM=perm is not None,
    )
    split = kernel.best_config.kwargs["SPLIT_K"]
    if split > 1:  # one more small launch: M <= 16 rows of N outputs
        BLOCK = 1024
        _split_k_reduce_kernel[(triton.cdiv(M * N, BLOCK),)](ws, y, M, N, split, y.stride(0), y.stride(1), BLOCK=BLOCK)
    return y


def chosen_config(M: int, K: int, group_size: int) -> str:
    """The config the autotuner picked last for this path (for benchmark output)."""
    kernel = _kernel(M <= DECODE_MAX_M, group_size if group_size != K else 256)
    cfg = getattr(kernel, "best_config", None)
    if cfg is None:
        return ""
    kw = cfg.kwargs
    return (f"BM{kw['BLOCK_M']} BN{kw['BLOCK_N']} BK{kw['BLOCK_K']} split{kw['SPLIT_K']} "
            f"w{cfg.num_warps} s{cfg.num_stages}")
