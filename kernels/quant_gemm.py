"""Weight-only quantized GEMM: y = x @ W.T with W stored as 4- or 8-bit integers (W4A16 / W8A16).

Weight layout: the K-interleaved repacking of ``kernels/quant_layout.py`` (made once at load time by
``llama_triton.quant``), every tensor indexed by output channel n:
    qweight  int32 ``(N, KP // PACK)``, PACK = 32 // bits: chunks of 16 words per row; value i of the 16
             words of chunk c holds the codes of ``W[n, c*16*PACK + 16*i : ... + 16]`` (16 consecutive k)
    scales   ``(G, N)`` fp16/bf16/fp32, G = K // group_size (G = 1: per output channel)
    zeros    ``(G, N)`` uint8/int16/int32 zero points, or None: symmetric, zero point 2**(bits-1)
    perm     int32/int64 ``(K,)`` or None: act-order. Column j of the stored weight is column perm[j] of W,
             so the kernel reads x[:, perm[j]] for it (a gather of the small activation, not of scales).
    W[n, perm[k]] = (q[k, n] - z[k // group_size, n]) * s[k // group_size, n]

Dequantisation without int->float converts (the mantissa trick): OR-ing a code ``q < 2**23`` into the
mantissa of the fp32 constant 2**23 (bit pattern 0x4B000000) gives the float ``2**23 + q`` exactly, so
``bitcast(q | 0x4B000000) - (2**23 + z)`` is ``q - z`` for one LOP3 and one FADD (no I2F). Value i of a word
is not even shifted down: ``word & (MAXQ << e)`` is ``q * 2**e``, still below 2**23 for the low values
(e <= 16 for 4-bit, <= 8 for 8-bit; the top values come from one shift of the word), and the 2**e is folded
into the scale: ``(bitcast(word & (MAXQ << e) | 0x4B000000) - (2**23 + z * 2**e)) * (s * 2**-e)``. Every step
is exact (integers below 2**24, power-of-two rescaling), so each weight equals fp32 ``(q - z) * s`` bit for
bit, the value ``llama_triton.quant.dequantize`` rounds to x's dtype.

Three paths, chosen by M (rows of x); all autotuned on (M bucket, N, K, bits, group size), never on M:
  * GEMV (M <= 4): no ``tl.dot``. Each program streams a (BLOCK_N, 16)-word tile per chunk (128-bit loads,
    each word loaded once per call), takes value i of every word as the weights of 16 consecutive k, and
    accumulates ``w * x[m, None, k]`` elementwise in one fp32 (BLOCK_N, 16) tile per row m of x, in the word
    tile's own layout (no layout conversion of the weights); one reduction over the 16 at the end.
  * decode dot (4 < M <= 16): the same tiles, each (BLOCK_N, 16) slice cast to x's dtype and fed to a
    K = 16 ``tl.dot`` with BLOCK_M = 16 (mma), fp32 accumulator.
  * prefill (M > 16): tiled GEMM with grouped tile ordering; each chunk unpacked in registers to a
    (BLOCK_N, PACK * 16) tile in natural k order (scales gathered per 16-k slice) and one ``tl.dot``.
Split-K (decode paths) is reduced inside the same launch, deterministically: every program of an N tile
writes its fp32 partial to a workspace, then takes a ticket from a per-tile counter (atomic add); the last
to arrive sums the SPLIT_K partials in split order (the same order whoever arrives last), writes y and
resets the counter. One launch per call, so the autotuner times what runs, reduce included. An early prune
drops configs whose global->SM bytes (``decode_load_bytes``) exceed 1.25x the bytes the call must move.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, interpreting
from ._tiles import grouped_tile
from .quant_layout import CHUNK_WORDS, chunk_k, repacked_shape

SUPPORTED_BITS = (4, 8)
DECODE_MAX_M = 16
GEMV_MAX_M = 4
INT_DTYPES = (torch.uint8, torch.int16, torch.int32)
BYTES_BUDGET = 1.25   # decode configs may move at most this times (weights + scales + zeros + x)


@triton.jit
def _slice_weights(words, words_hi, s, z, I: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                   HI: tl.constexpr):
    """Value I of every word of ``words`` (BLOCK_N, 16) int32 -> fp32 weights ``(q - z) * s`` (BLOCK_N, 16),
    by the mantissa trick (module docstring). s, z: (BLOCK_N,) fp32 for the slice's group; words_hi =
    words >> HI supplies the values whose bits reach past bit 22."""
    MAXQ: tl.constexpr = (1 << BITS) - 1
    B: tl.constexpr = BITS * I                       # bit offset of value I
    USE_HI: tl.constexpr = B + BITS > 23
    E: tl.constexpr = B - HI * USE_HI                # the code sits at bits [E, E + BITS) of src
    if USE_HI:
        src = words_hi
    else:
        src = words
    v = ((src & (MAXQ << E)) | 0x4B000000).to(tl.float32, bitcast=True)   # 2**23 + q * 2**E, exact
    if HAS_ZEROS:
        zc = 8388608.0 + z * (1 << E)                                       # 2**23 + z * 2**E
    else:
        zc = 8388608.0 + (1 << (BITS - 1)) * (1 << E) + z * 0.0
    return (v - zc[:, None]) * (s * (1.0 / (1 << E)))[:, None]


@triton.jit(do_not_specialize=["M"])
def _decode_kernel(
    X, QW, S, Z, PERM, Y, WS, LOCK,                    # pointers
    M, N, K, M_BUCKET,                                 # sizes (M_BUCKET: autotune key only)
    stride_xm, stride_xk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,     # GROUP_SIZE 0: one scale per output channel
    HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr,     # set by the launcher from M
    BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """y (M, N) = x (M, K) @ W.T for M <= 16: grid (cdiv(N, BLOCK_N), SPLIT_K); each program streams
    CHUNKS chunks of (BLOCK_N, 16) words per step over its share of the K steps."""
    PACK: tl.constexpr = 32 // BITS
    KW: tl.constexpr = 16                             # words per chunk row = k per value slice
    CK: tl.constexpr = PACK * KW                      # k per chunk
    BLOCK_K: tl.constexpr = CHUNKS * CK               # k per loop step
    HI: tl.constexpr = 12 + 4 * (BITS // 8)           # 4-bit: values 5..7 from words >> 12; 8-bit: 2, 3 from >> 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_w = tl.arange(0, KW)
    n_chunks = tl.cdiv(K, CK)
    # ---- this program's K steps (whole chunks; empty for the last splits when there are few steps)
    k_steps = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_steps, SPLIT_K)
    step_lo = pid_k * per_split
    step_hi = tl.minimum(step_lo + per_split, k_steps)
    qw_rows = QW + offs_n.to(tl.int64)[:, None] * stride_qn                 # (BLOCK_N, 1) row starts

    if GROUP_SIZE == 0:  # per output channel: one scale (and zero) row for the whole K loop
        s = tl.load(S + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        z = s
        if HAS_ZEROS:
            z = tl.load(Z + offs_n * stride_zn, mask=mask_n, other=0).to(tl.float32)
    # GEMV: one (BLOCK_N, 16) fp32 accumulator per row of x, in the layout of the word tile (no layout
    # conversion of the weights), summed over the 16 once at the end. Dot: one (BLOCK_M, BLOCK_N) tile.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
    for step in range(step_lo, step_hi):
        for c in tl.static_range(CHUNKS):
            chunk = step * CHUNKS + c
            # -- each packed word loaded once: (BLOCK_N, 16) int32, 128-bit loads along the row
            offs_q = chunk * KW + offs_w                                    # word index in the row
            words = tl.load(qw_rows + offs_q[None, :], mask=mask_n[:, None] & (offs_q < n_chunks * KW)[None, :],
                            other=0)
            words_hi = words >> HI
            for i in tl.static_range(PACK):
                k0 = chunk * CK + i * KW                                    # first k of value slice i
                if GROUP_SIZE > 0:
                    if (c * CK + i * KW) % GROUP_SIZE == 0:                 # a new group starts: its scale row
                        g = k0 // GROUP_SIZE
                        gmask = mask_n & (offs_n * 0 + k0 < K)
                        s = tl.load(S + g * stride_sg + offs_n * stride_sn, mask=gmask, other=0.0).to(tl.float32)
                        z = s
                        if HAS_ZEROS:
                            z = tl.load(Z + g * stride_zg + offs_n * stride_zn, mask=gmask, other=0).to(tl.float32)
                # -- dequantise value slice i: (BLOCK_N, 16) fp32 weights of k0 .. k0 + 15
                w = _slice_weights(words, words_hi, s, z, i, BITS, HAS_ZEROS, HI)
                offs_k = k0 + offs_w
                mask_k = offs_k < K
                if HAS_PERM:
                    src_k = tl.load(PERM + offs_k, mask=mask_k, other=0).to(tl.int64)
                else:
                    src_k = offs_k
                # -- accumulate
                if USE_DOT:
                    x = tl.load(X + offs_m[:, None] * stride_xm + src_k[None, :] * stride_xk,
                                mask=mask_m[:, None] & mask_k[None, :], other=0.0)   # (BLOCK_M, 16)
                    if X.dtype.element_ty == tl.float32:
                        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
                    else:
                        acc += tl.dot(x, tl.trans(w.to(X.dtype.element_ty)))
                else:
                    x_row = X + src_k * stride_xk                                    # (16,) row 0 of x
                    acc0 += w * tl.load(x_row, mask=mask_k, other=0.0).to(tl.float32)[None, :]
                    if BLOCK_M > 1:
                        x1 = tl.load(x_row + stride_xm, mask=mask_k & (offs_w * 0 + 1 < M), other=0.0)
                        acc1 += w * x1.to(tl.float32)[None, :]
                    if BLOCK_M > 2:
                        x2 = tl.load(x_row + 2 * stride_xm, mask=mask_k & (offs_w * 0 + 2 < M), other=0.0)
                        acc2 += w * x2.to(tl.float32)[None, :]
                        x3 = tl.load(x_row + 3 * stride_xm, mask=mask_k & (offs_w * 0 + 3 < M), other=0.0)
                        acc3 += w * x3.to(tl.float32)[None, :]
    if USE_DOT:
        out = acc
    else:  # (BLOCK_M, BLOCK_N) from the rows' sums over the 16 (once per program)
        r0 = tl.sum(acc0, axis=1)
        if BLOCK_M == 1:
            out = r0[None, :]
        elif BLOCK_M == 2:
            out = tl.permute(tl.join(r0, tl.sum(acc1, axis=1)), (1, 0))
        else:
            quad = tl.join(tl.join(r0, tl.sum(acc1, axis=1)), tl.join(tl.sum(acc2, axis=1), tl.sum(acc3, axis=1)))
            out = tl.reshape(tl.permute(quad, (2, 1, 0)), (BLOCK_M, BLOCK_N))  # quad[n, j, i] = row 2 i + j

    mask = mask_m[:, None] & mask_n[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT_K == 1:
        tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=mask)
    else:
        # ---- split-K reduced in this launch: partial -> workspace, ticket, the last program sums in split order
        ws_tile = WS + offs_m[:, None] * N + offs_n[None, :]                 # WS: (SPLIT_K, M, N) fp32
        tl.store(ws_tile + pid_k * M * N, out, mask=mask)
        tl.debug_barrier()                                                   # all of this CTA's stores issued
        ticket = tl.atomic_add(LOCK + pid_n, 1, sem="acq_rel")              # release ours, acquire the others'
        if ticket == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):                              # fixed order: deterministic
                total += tl.load(ws_tile + sk * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=mask)
            tl.atomic_xchg(LOCK + pid_n, 0)                                  # ready for the next launch


@triton.jit(do_not_specialize=["M"])
def _prefill_kernel(
    X, QW, S, Z, PERM, Y,                              # pointers
    M, N, K, M_BUCKET,                                 # sizes (M_BUCKET: autotune key only)
    stride_xm, stride_xk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y (M, N) = x (M, K) @ W.T for M > 16: one (BLOCK_M, BLOCK_N) tile per program, K in chunks; each
    chunk's (BLOCK_N, 16) words are loaded once and unpacked to (BLOCK_N, PACK * 16) in natural k order."""
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    MID: tl.constexpr = 1 << (BITS - 1)
    KW: tl.constexpr = 16
    CK: tl.constexpr = PACK * KW
    # ---- tile coordinates: grouped order, GROUP_M row tiles share each column tile in L2
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)        # int64: M * K may pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_w = tl.arange(0, KW)
    shifts = tl.arange(0, PACK) * BITS                                     # (PACK,) bit offset of value i
    slice_k = tl.arange(0, PACK) * KW                                      # (PACK,) first k of value slice i
    qw_rows = QW + offs_n.to(tl.int64)[:, None] * stride_qn

    if GROUP_SIZE == 0:
        s = tl.load(S + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[:, None]      # (BLOCK_N, 1)
        if HAS_ZEROS:
            z = tl.load(Z + offs_n * stride_zn, mask=mask_n, other=0).to(tl.float32)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for chunk in range(0, tl.cdiv(K, CK)):
        k0 = chunk * CK
        words = tl.load(qw_rows + chunk * KW + offs_w[None, :], mask=mask_n[:, None], other=0)   # (BLOCK_N, 16)
        q = (words[:, None, :] >> shifts[None, :, None]) & MAXQ              # (BLOCK_N, PACK, 16): k0 + 16 i + w
        if GROUP_SIZE > 0:  # one scale (and zero) per row and value slice
            g = (k0 + slice_k) // GROUP_SIZE
            gmask = mask_n[:, None] & (k0 + slice_k < K)[None, :]
            s = tl.load(S + g[None, :] * stride_sg + offs_n[:, None] * stride_sn, mask=gmask,
                        other=0.0).to(tl.float32)                           # (BLOCK_N, PACK)
            if HAS_ZEROS:
                z = tl.load(Z + g[None, :] * stride_zg + offs_n[:, None] * stride_zn, mask=gmask,
                            other=0).to(tl.float32)
        if HAS_ZEROS:
            zc = 8388608.0 + z
        else:
            zc = 8388608.0 + MID + s * 0.0
        v = (q | 0x4B000000).to(tl.float32, bitcast=True)                   # 2**23 + q (mantissa trick)
        w = (v - zc[:, :, None]) * s[:, :, None]                             # (q - z) * s, exact fp32
        w = tl.reshape(w, (BLOCK_N, CK)).to(X.dtype.element_ty)              # (BLOCK_N, CK), natural k order
        offs_k = k0 + tl.arange(0, CK)
        mask_k = offs_k < K
        if HAS_PERM:
            src_k = tl.load(PERM + offs_k, mask=mask_k, other=0).to(tl.int64)
        else:
            src_k = offs_k
        x = tl.load(X + offs_m[:, None] * stride_xm + src_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)      # (BLOCK_M, CK)
        if X.dtype.element_ty == tl.float32:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")          # no tf32: fp32 inputs get fp32 math
        else:
            acc += tl.dot(x, tl.trans(w))
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(Y.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------- autotune configs
def _decode_configs(use_dot: bool) -> list:
    """Decode configs (BLOCK_N, CHUNKS, SPLIT_K, warps, stages). Memory-bound: enough programs to stream
    the weight from every SM, but wide N tiles, because each N tile re-reads x and each split adds a
    partial (the byte prune keeps what fits the budget). On the interpreter: one small config per path that
    still splits K (tests cover the in-launch reduction)."""
    if interpreting():
        rows = [(32, 2, 2, 4, 1)] if use_dot else [(32, 1, 2, 4, 1)]
    elif use_dot:
        rows = [(256, 1, 1, 8, 3), (256, 1, 2, 8, 3), (256, 1, 4, 8, 3), (512, 1, 4, 16, 3),
                (512, 1, 8, 16, 3), (256, 2, 4, 8, 2), (128, 1, 4, 4, 4), (128, 1, 8, 4, 3)]
    else:
        rows = [(64, 1, 2, 4, 1), (64, 2, 4, 4, 1), (128, 1, 1, 4, 1), (128, 1, 2, 4, 1), (128, 1, 4, 4, 1),
                (256, 1, 1, 8, 1), (256, 1, 2, 8, 1), (256, 1, 4, 8, 1)]
    return [triton.Config({"BLOCK_N": bn, "CHUNKS": ch, "SPLIT_K": sk}, num_warps=w, num_stages=st)
            for bn, ch, sk, w, st in rows]


def _prefill_configs() -> list:
    """The classic Triton matmul tiles (K step: one chunk, 128 k for 4-bit, 64 for 8-bit)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4})]
    rows = [(128, 128, 8, 3), (64, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)]   # spill-free at sm_90
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=st)
            for bm, bn, w, st in rows]


def decode_load_bytes(cfg: dict, M: int, N: int, K: int, bits: int, group_size: int, has_zeros: bool,
                      has_perm: bool, x_bytes: int, s_bytes: int, z_bytes: int) -> int:
    """Global->SM bytes one decode launch loads with ``cfg`` (BLOCK_N, CHUNKS, SPLIT_K, BLOCK_M): every
    load of the kernel counted at its full tile size (masked lanes included: an upper bound), times how
    often it runs: the K loop's loads once per (N tile, K step), the per-channel rows once per program, the
    reduction's partials once per N tile. group_size == K means per channel. tests/test_quant_static.py
    checks this model against the loads in the compiled kernel (sm_90 TTIR)."""
    bn, chunks, split, bm = cfg["BLOCK_N"], cfg["CHUNKS"], cfg["SPLIT_K"], cfg["BLOCK_M"]
    block_k = chunks * chunk_k(bits)
    tiles, steps = -(-N // bn), -(-K // block_k)
    grouped = group_size != K
    per_step = bn * CHUNK_WORDS * chunks * 4 + bm * block_k * x_bytes + (block_k * 4 if has_perm else 0)
    if grouped:
        per_step += max(1, block_k // group_size) * bn * (s_bytes + (z_bytes if has_zeros else 0))
    total = tiles * steps * per_step
    if not grouped:
        total += tiles * split * bn * (s_bytes + (z_bytes if has_zeros else 0))
    if split > 1:
        total += tiles * split * bm * bn * 4
    return total


def ideal_bytes(M: int, N: int, K: int, bits: int, group_size: int, has_zeros: bool, x_bytes: int,
                s_bytes: int, z_bytes: int) -> int:
    """What a call must read at least: packed weights + scales + zero points + x."""
    G = K // group_size
    return K * N * bits // 8 + G * N * (s_bytes + (z_bytes if has_zeros else 0)) + M * K * x_bytes


def _prune_decode(configs, named_args, **kwargs):
    """Keep the configs that move at most BYTES_BUDGET x the ideal bytes (the fewest-bytes one if none
    does), and no more splits than K steps."""
    named_args = {**named_args, **kwargs}             # the constexprs arrive as keyword arguments
    M, N, K = named_args["M"], named_args["N"], named_args["K"]
    bits, gs = named_args["BITS"], named_args["GROUP_SIZE"] or K
    x, s, z = named_args["X"], named_args["S"], named_args["Z"]
    has_zeros, has_perm, bm = named_args["HAS_ZEROS"], named_args["HAS_PERM"], named_args["BLOCK_M"]
    xb, sb, zb = x.element_size(), s.element_size(), z.element_size()
    ideal = ideal_bytes(M, N, K, bits, gs, has_zeros, xb, sb, zb)
    scored = []
    for c in configs:
        steps = -(-K // (c.kwargs["CHUNKS"] * chunk_k(bits)))
        if c.kwargs["SPLIT_K"] > max(1, steps):
            continue
        scored.append((decode_load_bytes({**c.kwargs, "BLOCK_M": bm}, M, N, K, bits, gs, has_zeros, has_perm,
                                         xb, sb, zb), c))
    if not scored:
        scored = [(0, min(configs, key=lambda c: c.kwargs["SPLIT_K"]))]
    fits = [c for b, c in scored if b <= BYTES_BUDGET * ideal]
    return fits or [min(scored, key=lambda t: t[0])[1]]


_KEY = ["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_ZEROS", "HAS_PERM"]


@functools.lru_cache(maxsize=None)
def _kernel(path: str):
    """The autotuned kernel of one path ("gemv", "dot", "prefill"), built once."""
    if path == "prefill":
        return triton.autotune(configs=_prefill_configs(), key=_KEY)(_prefill_kernel)
    return triton.autotune(configs=_decode_configs(path == "dot"), key=_KEY,
                           prune_configs_by={"early_config_prune": _prune_decode})(_decode_kernel)


def path_for(M: int) -> str:
    """Which kernel path serves M rows: "gemv" (M <= 4), "dot" (M <= 16) or "prefill"."""
    return "gemv" if M <= GEMV_MAX_M else "dot" if M <= DECODE_MAX_M else "prefill"


def m_bucket(M: int) -> int:
    """Autotune bucket of the row count: powers of two, capped (M itself is never a key)."""
    return min(triton.next_power_of_2(max(M, 1)), 4096)


_LOCKS: dict = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Per-device int32 counters for the split-K tickets, all zero between launches (each launch resets the
    ones it used). Allocated once per device and grown when a wider N needs more; one stream at a time."""
    key = (device.type, device.index)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


# ---------------------------------------------------------------------------------------------- launcher
def check_inputs(x, qweight, scales, zeros=None, perm=None, bits=4, group_size=128):
    """Validate quant_matmul's arguments (x is ``(..., K)``, qweight the repacked ``(N, KP // PACK)``);
    raises TypeError/ValueError naming them."""
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
    N = qweight.shape[0]
    if K < 1 or K % pack:
        raise ValueError(f"x's last dim K={K} must be a positive multiple of {pack} for {bits}-bit weights")
    if tuple(qweight.shape) != repacked_shape(K, N, bits):
        raise ValueError(f"qweight has shape {tuple(qweight.shape)}; for x with K={K} and {bits}-bit weights the "
                         f"repacked layout (kernels/quant_layout.py) is (N, KP // {pack}) = "
                         f"{repacked_shape(K, N, bits)}")
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
    """x ``(M, K)`` fp16/bf16/fp32 (any strides) and a repacked weight (module docstring) -> y ``(M, N)`` in
    x's dtype, ``y = x @ W.T``, in one launch. M <= 4: GEMV, M <= 16: decode dot, larger: tiled GEMM."""
    check_inputs(x, qweight, scales, zeros, perm, bits, group_size)
    x = x.reshape(-1, x.shape[-1])
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    grouped = group_size != K
    path = path_for(M)
    kernel = _kernel(path)
    args = (x, qweight, scales, zeros if zeros is not None else scales, perm if perm is not None else qweight, y)
    strides = (x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), scales.stride(1),
               zeros.stride(0) if zeros is not None else 0, zeros.stride(1) if zeros is not None else 0,
               y.stride(0), y.stride(1))
    meta = dict(BITS=bits, GROUP_SIZE=group_size if grouped else 0, HAS_ZEROS=zeros is not None,
                HAS_PERM=perm is not None)
    if path == "prefill":
        def grid(m):
            return (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)

        kernel[grid](*args, M, N, K, m_bucket(M), *strides, **meta)
        return y
    # split-K workspace (allocation only) and tickets sized for any config the autotuner may pick
    max_split = max(c.kwargs["SPLIT_K"] for c in kernel.configs)
    ws = torch.empty((max_split, M, N), dtype=torch.float32, device=x.device) if max_split > 1 else y
    locks = _locks(x.device, triton.cdiv(N, min(c.kwargs["BLOCK_N"] for c in kernel.configs)))

    def grid(m):
        return (triton.cdiv(N, m["BLOCK_N"]), m["SPLIT_K"])

    kernel[grid](*args, ws, locks, M, N, K, m_bucket(M), *strides, **meta,
                 BLOCK_M=triton.next_power_of_2(M) if path == "gemv" else 16, USE_DOT=path == "dot")
    return y


def chosen_config(M: int, N: int, K: int, bits: int, group_size: int, has_zeros: bool, has_perm: bool = False) -> str:
    """The config the autotuner chose for this call's key (looked up by key in the autotuner's cache, so a
    launch on another thread with another shape cannot change the answer); "" before the first call."""
    kernel = _kernel(path_for(M))
    if len(kernel.configs) == 1:  # the autotuner does not tune (nor cache) a single config
        return _describe(path_for(M), kernel.configs[0])
    want = (m_bucket(M), N, K, bits, group_size if group_size != K else 0, has_zeros, has_perm)
    for key, cfg in list(getattr(kernel, "cache", {}).items()):
        if tuple(key[:len(want)]) == want:
            return _describe(path_for(M), cfg)
    return ""


def _describe(path: str, cfg) -> str:
    kw = cfg.kwargs
    tile = (f"BM{kw['BLOCK_M']} BN{kw['BLOCK_N']}" if "BLOCK_M" in kw else
            f"BN{kw['BLOCK_N']} chunks{kw['CHUNKS']} split{kw['SPLIT_K']}")
    return f"{path} {tile} w{cfg.num_warps} s{cfg.num_stages}"
