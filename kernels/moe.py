"""Mixture of experts: token -> expert alignment and grouped expert GEMMs (the fused_moe pattern), forward
and backward, deterministic (no atomics anywhere: every output element is written by exactly one program,
and every sum runs in a fixed order).

Notation: ``T`` tokens, hidden size ``H``, ``E`` experts with intermediate size ``I``, ``TOPK`` experts per
token; the ``S = T * TOPK`` (token, slot) pairs are numbered by their *flat index* ``s = t * TOPK + k``.
Expert weights as transformers 5 stores them: ``gate_up_proj (E, 2I, H)`` (gate rows first, then up rows)
and ``down_proj (E, H, I)``.

    gu[s]  = x[t] @ gate_up_proj[e].T                        (2I,)   e = topk_ids[t, k]
    h1[s]  = silu(gu[s, :I]) * gu[s, I:]                     (I,)    SwiGLU in the GEMM1 epilogue
    y[s]   = w[s] * (h1[s] @ down_proj[e].T)                 (H,)    routing weight in the GEMM2 epilogue
    out[t] = sum_k y[t * TOPK + k]                           (H,)    fixed-order fp32 sum (combine kernel)

Routing (``moe_route``, one launch): softmax over the experts in fp32, top-k, optionally renormalised.

Alignment (``moe_align``, two launches, on the device, no host sync): the flat indices are sorted by expert
(stable: increasing s within an expert) and each expert's run is padded to a multiple of ``BLOCK_M`` with the
sentinel ``S``. ``sorted_ids (max_blocks * BLOCK_M,)``, ``block_expert (max_blocks,)`` (the expert of each
M block), ``seg (E + 1,)`` (start of each expert's run in padded positions, ``seg[E]`` = total), and
``npost (1,)`` = total; slots and blocks past the total hold ``S`` and ``-1``. ``max_blocks = cdiv(S, BLOCK_M) + E`` bounds sum_e cdiv(count_e, BLOCK_M), so the
GEMM grids are sized on the host from shapes only; programs past ``npost`` return at once. An M block holds
rows of one expert only, so each expert's weight tile is read once per M block: at decode sizes (<= BLOCK_M
pairs per expert) every selected expert's weights are read exactly once and unselected experts not at all.

Backward (``dout (T, H)``):
    g[s]     = dout[t] @ down_proj[e]                        (I,)    grouped GEMM, swiglu-backward epilogue:
    dw[s]    = sum_i g[s, i] * h1[s, i]                              (per N tile, then a fixed-order sum)
    dh1[s]   = w[s] * g[s]
    dgu[s]   = [dh1 * u * sig * (1 + gate * (1 - sig)),  dh1 * silu(gate)]     (2I,)
    dx[t]    = sum_k dgu[s] @ gate_up_proj[e]                        grouped GEMM + combine
    d gate_up_proj[e] = sum_{s in e} dgu[s]^T x[t]                   (2I, H) weight-grad kernel
    d down_proj[e]    = sum_{s in e} (w[s] dout[t])^T h1[s]          (H, I)  weight-grad kernel
The weight-grad kernel gives each (expert, N tile, K tile) to one program that loops over that expert's
rows in order, so there is no split reduction; an expert with no tokens gets an exact zero gradient.

Numerics follow transformers' experts loop: the matmuls accumulate in fp32; gate/up are rounded to the input
dtype, silu(gate) is rounded, then the product (as ``act_fn(gate) * up`` in the dtype); the routing weight
multiplies the fp32 GEMM2 accumulator; the top-k sum is in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, cpu_value_check, interpreting

INDEX_DTYPES = (torch.int32, torch.int64)
DECODE_MAX_ROWS = 16   # pairs per expert (on average) up to which the BLOCK_M = 16 decode tiles are used


# ------------------------------------------------------------------------------------------- alignment
# S (the number of pairs) changes with every batch: never JIT-specialised (no recompile per token count).
@triton.jit(do_not_specialize=["S"])
def _moe_count_kernel(
    IDS, COUNTS,                                  # pointers: flat expert ids (S,), per-expert counts (E,)
    S,
    BLOCK: tl.constexpr,
):
    """counts[e] = #{s : ids[s] == e}; one program per expert."""
    e = tl.program_id(0)
    n = tl.zeros((BLOCK,), dtype=tl.int32)
    for s0 in range(0, S, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        ids = tl.load(IDS + offs, mask=offs < S, other=-1)
        n += (ids == e).to(tl.int32)
    tl.store(COUNTS + e, tl.sum(n, axis=0))


@triton.jit(do_not_specialize=["S", "max_blocks"])
def _moe_align_kernel(
    IDS, COUNTS, SORTED, BLOCK_EXPERT, SEG, NPOST,   # pointers
    S, E, max_blocks,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One program per expert: its padded run starts after the padded runs of the experts before it (an
    exclusive prefix sum over the counts); its flat indices go there in increasing order (a stable sort),
    the padding slots get the sentinel S, and its M blocks get its id. Program 0 writes the total."""
    e = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(COUNTS + offs_e, mask=offs_e < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M                           # (BLOCK_E,)
    start = tl.sum(tl.where(offs_e < e, padded, 0), axis=0)
    mine = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)
    my_padded = tl.sum(tl.where(offs_e == e, padded, 0), axis=0)
    # -- scatter this expert's flat indices, in order
    base = start
    for s0 in range(0, S, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        hit = (tl.load(IDS + offs, mask=offs < S, other=-1) == e).to(tl.int32)
        pos = base + tl.cumsum(hit, axis=0) - 1
        tl.store(SORTED + pos, offs, mask=hit != 0)
        base += tl.sum(hit, axis=0)
    # -- padding slots (fewer than BLOCK_M) and this expert's block ids
    pad = tl.arange(0, BLOCK_M)
    tl.store(SORTED + start + mine + pad, S, mask=pad < my_padded - mine)
    n_blocks = my_padded // BLOCK_M
    for b0 in range(0, n_blocks, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        tl.store(BLOCK_EXPERT + start // BLOCK_M + b, e, mask=b < n_blocks)
    tl.store(SEG + e, start)
    if e == 0:
        total = tl.sum(padded, axis=0)
        tl.store(SEG + E, total)
        tl.store(NPOST, total)
        for b0 in range(total // BLOCK_M, max_blocks, BLOCK):                      # unused blocks: no expert
            b = b0 + tl.arange(0, BLOCK)
            tl.store(BLOCK_EXPERT + b, -1, mask=b < max_blocks)
        for p0 in range(total, max_blocks * BLOCK_M, BLOCK):                       # and sentinel rows (every
            p = p0 + tl.arange(0, BLOCK)                                           # output is defined)
            tl.store(SORTED + p, S, mask=p < max_blocks * BLOCK_M)


# ------------------------------------------------------------------------------------------- routing
@triton.jit(do_not_specialize=["T"])
def _moe_route_kernel(
    L, W, IDS,                                    # pointers: logits (T, E), weights (T, TOP_K), ids (T, TOP_K)
    T, E,
    stride_l,
    TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token per program: p = softmax(logits) in fp32, the TOP_K largest (ties: the lower expert id first),
    w = p_selected (/ their sum when RENORM), stored in W's dtype; ids int64, in decreasing p (torch.topk's order)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    logits = tl.load(L + row * stride_l + offs, mask=mask, other=-float("inf")).to(tl.float32)
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    avail = tl.where(mask, p, -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    top_v = tl.zeros((BLOCK_K,), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        # -- the largest remaining probability, then take it out
        best = tl.max(avail, axis=0)
        idx = tl.minimum(tl.min(tl.where(avail == best, offs, BLOCK_E), axis=0), E - 1)   # NaN rows stay in range
        top_v = tl.where(offs_k == j, best, top_v)
        top_i = tl.where(offs_k == j, idx, top_i)
        avail = tl.where(offs == idx, -1.0, avail)
    if RENORM:
        top_v = top_v / tl.sum(tl.where(offs_k < TOP_K, top_v, 0.0), axis=0)
    kmask = offs_k < TOP_K
    tl.store(W + row * TOP_K + offs_k, top_v.to(W.dtype.element_ty), mask=kmask)
    tl.store(IDS + row * TOP_K + offs_k, top_i.to(tl.int64), mask=kmask)


# ------------------------------------------------------------------------------------ grouped GEMMs
@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return acc + tl.dot(a, b, input_precision="ieee")      # fp32 inputs get fp32 math, not tf32
    return acc + tl.dot(a, b)


@triton.jit(do_not_specialize=["S"])
def _moe_gate_up_kernel(
    X, W, SORTED, BLOCK_EXPERT, NPOST, GU, H1,       # pointers
    S, N, K, TOPK, S_BUCKET,                          # N = I, K = H (S_BUCKET: autotune key only)
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_gm, stride_hm,
    SAVE_GU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMM1 + SwiGLU: h1[s, n] = silu(x[t] . W[e, n]) * (x[t] . W[e, N + n]) for the BLOCK_M rows of one
    expert's M block and a BLOCK_N column tile (the matching gate and up rows, two accumulators)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NPOST):
        return
    e = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    flat = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)   # (BLOCK_M,) sentinel S
    valid = flat < S
    tok = flat // TOPK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk                 # (BLOCK_M, BLOCK_K)
    wg_ptrs = W + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk   # (BLOCK_K, BLOCK_N)
    wu_ptrs = wg_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    IEEE: tl.constexpr = X.dtype.element_ty == tl.float32
    for k0 in range(0, K, BLOCK_K):
        # -- load the gathered token rows and the expert's gate / up tiles
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        bu = tl.load(wu_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        # -- accumulate both halves
        acc_g = _dot(a, bg, acc_g, IEEE)
        acc_u = _dot(a, bu, acc_u, IEEE)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    # -- epilogue: SwiGLU with the experts loop's roundings; rows by flat index
    g = acc_g.to(H1.dtype.element_ty)
    u = acc_u.to(H1.dtype.element_ty)
    mask = valid[:, None] & mask_n[None, :]
    if SAVE_GU:  # pre-activations for the backward
        gu_ptrs = GU + flat[:, None] * stride_gm + offs_n[None, :]
        tl.store(gu_ptrs, g, mask=mask)
        tl.store(gu_ptrs + N, u, mask=mask)
    gf = g.to(tl.float32)
    act = (gf * tl.sigmoid(gf)).to(H1.dtype.element_ty).to(tl.float32)
    tl.store(H1 + flat[:, None] * stride_hm + offs_n[None, :], (act * u.to(tl.float32)).to(H1.dtype.element_ty),
             mask=mask)


@triton.jit(do_not_specialize=["S"])
def _moe_gemm_kernel(
    A, B, SORTED, BLOCK_EXPERT, NPOST, TW, C, GU, DW_WS,   # pointers
    S, N, K, TOPK, S_BUCKET,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_gm,
    A_BY_TOKEN: tl.constexpr, HAS_WEIGHT: tl.constexpr, SWIGLU_BWD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc[s, n] = A[row(s)] . B[e][:, n] over K, row(s) = s // TOPK (A_BY_TOKEN) or s; B[e] is (K, N) by strides.

    Epilogue (rows stored by flat index s):
      plain:      C[s, n] = acc * (TW[s] if HAS_WEIGHT)         (forward down_proj; backward dx)
      SWIGLU_BWD: acc = g = dout[t] @ down_proj[e]; GU holds the saved gate/up; writes
                  dgu = C[s, :N] / C[s, N:] (d gate, d up of dh1 = TW[s] * g) and this tile's part of
                  dw[s] = sum_n g * h1 to DW_WS[s, pid_n]:
                  dgate = dh1 * u * sig * (1 + gate * (1 - sig)),  dup = dh1 * silu(gate)
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(NPOST):
        return
    e = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    flat = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = flat < S
    if A_BY_TOKEN:
        row = flat // TOPK
    else:
        row = flat
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + e * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    IEEE: tl.constexpr = A.dtype.element_ty == tl.float32
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = valid[:, None] & mask_n[None, :]
    if HAS_WEIGHT:
        w = tl.load(TW + flat, mask=valid, other=0.0).to(tl.float32)                 # (BLOCK_M,)
    if SWIGLU_BWD:
        # -- recompute h1 from the saved pre-activations (the forward's roundings)
        gu_ptrs = GU + flat[:, None] * stride_gm + offs_n[None, :]
        g = tl.load(gu_ptrs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        act = (g * sig).to(C.dtype.element_ty).to(tl.float32)
        h1 = (act * u).to(C.dtype.element_ty).to(tl.float32)
        # -- routing-weight gradient, this tile's part (summed over the N tiles in order afterwards)
        tl.store(DW_WS + flat * tl.num_programs(1) + pid_n, tl.sum(acc * h1, axis=1), mask=valid)
        # -- d gate, d up
        dh1 = acc * w[:, None]
        dgate = dh1 * u * sig * (1.0 + g * (1.0 - sig))
        c_ptrs = C + flat[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, dgate.to(C.dtype.element_ty), mask=mask)
        tl.store(c_ptrs + N, (dh1 * act).to(C.dtype.element_ty), mask=mask)
    else:
        if HAS_WEIGHT:
            acc = acc * w[:, None]
        tl.store(C + flat[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["S"])
def _moe_weight_grad_kernel(
    A, B, SORTED, SEG, TW, DW,                        # pointers
    S, N, K, TOPK, S_BUCKET,
    stride_am, stride_an, stride_bm, stride_bk, stride_de, stride_dn, stride_dk,
    A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dW[e, n, k] = sum over expert e's rows s (in sorted order) of (TW[s] *) A[rowA(s), n] * B[rowB(s), k].
    One program per (expert, N tile, K tile); rows are token rows (s // TOPK) or flat rows (s)."""
    e = tl.program_id(0)
    pid = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_k
    pid_k = pid % num_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    lo = tl.load(SEG + e)
    hi = tl.load(SEG + e + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    IEEE: tl.constexpr = A.dtype.element_ty == tl.float32
    for r0 in range(lo, hi, BLOCK_S):
        # -- this chunk of the expert's rows (padding slots hold the sentinel S)
        r = r0 + tl.arange(0, BLOCK_S)
        flat = tl.load(SORTED + r, mask=r < hi, other=S).to(tl.int64)
        valid = flat < S
        if A_BY_TOKEN:
            row_a = flat // TOPK
        else:
            row_a = flat
        if B_BY_TOKEN:
            row_b = flat // TOPK
        else:
            row_b = flat
        a_t = tl.load(A + row_a[None, :] * stride_am + offs_n[:, None] * stride_an,
                      mask=valid[None, :] & mask_n[:, None], other=0.0)                  # (BLOCK_N, BLOCK_S)
        if HAS_WEIGHT:
            w = tl.load(TW + flat, mask=valid, other=0.0).to(tl.float32)
            a_t = (a_t.to(tl.float32) * w[None, :]).to(A.dtype.element_ty)
        b = tl.load(B + row_b[:, None] * stride_bm + offs_k[None, :] * stride_bk,
                    mask=valid[:, None] & mask_k[None, :], other=0.0)                    # (BLOCK_S, BLOCK_K)
        acc = _dot(a_t, b, acc, IEEE)
    tl.store(DW + e.to(tl.int64) * stride_de + offs_n[:, None] * stride_dn + offs_k[None, :] * stride_dk,
             acc.to(DW.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["R"])
def _moe_combine_kernel(
    Y, OUT,                                           # pointers: (R * G, C) rows, (R, C) output
    R, C, G,
    stride_y, stride_o,
    BLOCK: tl.constexpr,
):
    """OUT[r] = sum_{g < G} Y[r * G + g] in fp32, g in increasing order (deterministic), cast to OUT's dtype."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for g in range(0, G):
        acc += tl.load(Y + (r * G + g) * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + r * stride_o + cols, acc.to(OUT.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------- autotune configs
def _gemm_configs() -> list:
    """GEMM tiles (BLOCK_N, BLOCK_K); BLOCK_M is fixed by the alignment (block_m()). One under the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((64, 64, 4, 4), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3))]


def _wgrad_configs() -> list:
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_S": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_S": bs}, num_warps=w, num_stages=s)
            for bn, bk, bs, w, s in ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (128, 128, 32, 8, 3))]


SMEM_BUDGET = 200 * 1024     # bytes of pipelined tiles a config may need (an H100/H200 block has 227 KiB)


def _prune(b_tiles: int):
    """Early prune: drop configs whose pipelined tiles (stages x (A tile + b_tiles B tiles)) exceed
    SMEM_BUDGET for this BLOCK_M and dtype (the smallest config is kept if none fits)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        elt = args["X" if "X" in args else "A"].element_size()
        bm = args["BLOCK_M"]
        keep = [c for c in configs if c.num_stages * elt * c.kwargs["BLOCK_K"] * (bm + b_tiles * c.kwargs["BLOCK_N"])
                <= SMEM_BUDGET]
        return keep or configs[:1]
    return prune


_KEY = ["S_BUCKET", "N", "K", "BLOCK_M"]
_gate_up = triton.autotune(configs=_gemm_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune(2)})(
    _moe_gate_up_kernel)
_gemm = triton.autotune(configs=_gemm_configs(), key=_KEY + ["A_BY_TOKEN", "HAS_WEIGHT", "SWIGLU_BWD"],
                        prune_configs_by={"early_config_prune": _prune(1)})(_moe_gemm_kernel)
_wgrad = triton.autotune(configs=_wgrad_configs(), key=["S_BUCKET", "N", "K", "A_BY_TOKEN", "B_BY_TOKEN"])(
    _moe_weight_grad_kernel)


def s_bucket(S: int) -> int:
    """Autotune bucket of the pair count: powers of two, capped (S itself is never a key)."""
    return min(triton.next_power_of_2(max(S, 1)), 16384)


def block_m(S: int, E: int) -> int:
    """Rows per M block, from the average pairs per expert: 16 at decode sizes (each selected expert's
    weights read once), larger tiles when experts get many rows (less padding waste than a fixed 128)."""
    if interpreting():
        return 16
    per_expert = triton.cdiv(S, E)
    if per_expert <= DECODE_MAX_ROWS:
        return 16
    if per_expert <= 64:
        return 32
    if per_expert <= 256:
        return 64
    return 128


def _num_blocks(S: int, E: int, bm: int) -> int:
    return triton.cdiv(S, bm) + E


# ---------------------------------------------------------------------------------------------- launchers
def check_route(router_logits, top_k):
    check_tensor("router_logits", router_logits, FLOAT_DTYPES, ndim=2)
    E = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, {E}] (the number of experts), got {top_k!r}")


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype):
    """router_logits (T, E) -> (topk_weights (T, top_k) in out_dtype, topk_ids (T, top_k) int64): softmax in
    fp32, top-k, optionally renormalised, in one launch (Mixtral / Qwen-MoE routing)."""
    check_route(router_logits, top_k)
    T, E = router_logits.shape
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    w = torch.empty((T, top_k), dtype=out_dtype, device=logits.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    if T:
        _moe_route_kernel[(T,)](logits, w, ids, T, E, logits.stride(0), TOP_K=top_k, RENORM=renormalize,
                                BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k))
    return w, ids


def check_inputs(x, gate_up_proj, down_proj, topk_ids, topk_weights):
    """Validate moe_experts' arguments; raises TypeError/ValueError naming the argument. Returns
    (T, H, E, I, top_k)."""
    check_tensor("x", x, FLOAT_DTYPES, ndim=2)
    check_tensor("gate_up_proj", gate_up_proj, FLOAT_DTYPES, ndim=3)
    check_tensor("down_proj", down_proj, FLOAT_DTYPES, ndim=3)
    check_tensor("topk_ids", topk_ids, INDEX_DTYPES, ndim=2)
    check_tensor("topk_weights", topk_weights, FLOAT_DTYPES, ndim=2)
    check_same_device(x=x, gate_up_proj=gate_up_proj, down_proj=down_proj, topk_ids=topk_ids,
                      topk_weights=topk_weights)
    T, H = x.shape
    E, two_i, h_w = gate_up_proj.shape
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has {x.dtype}; they must match")
    if two_i % 2 or two_i == 0:
        raise ValueError(f"gate_up_proj must be (E, 2 * I, H) with gate and up rows concatenated; got shape "
                         f"{tuple(gate_up_proj.shape)} (odd or zero middle dim)")
    if h_w != H:
        raise ValueError(f"gate_up_proj has shape {tuple(gate_up_proj.shape)}; its last dim must be x's hidden "
                         f"size {H}")
    inter = two_i // 2
    if tuple(down_proj.shape) != (E, H, inter):
        raise ValueError(f"down_proj has shape {tuple(down_proj.shape)}; expected (E, H, I) = ({E}, {H}, {inter}) "
                         f"to match gate_up_proj {tuple(gate_up_proj.shape)} and x")
    top_k = topk_ids.shape[1]
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids has shape {tuple(topk_ids.shape)}; expected ({T}, top_k) (one row per token)")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights has shape {tuple(topk_weights.shape)} but topk_ids has "
                         f"{tuple(topk_ids.shape)}; they must match")
    if top_k < 1 or top_k > E:
        raise ValueError(f"top_k (topk_ids.shape[1]) = {top_k} must be between 1 and the number of experts {E}")
    # on a GPU this check would be a host sync, under torch.compile a graph break: CPU eager only
    if topk_ids.device.type == "cpu" and topk_ids.numel() and not torch.compiler.is_compiling():
        with cpu_value_check():
            lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"topk_ids must lie in [0, {E}) (the number of experts); got values in [{lo}, {hi}]")
    return T, H, E, inter, top_k


def moe_align(topk_ids: torch.Tensor, num_experts: int, bm: int):
    """topk_ids (T, top_k) int32/int64 -> (sorted_ids int32 (max_blocks * bm,), block_expert int32
    (max_blocks,), seg int32 (E + 1,), npost int32 (1,)) as in the module docstring. Two launches, no sync."""
    ids = topk_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()
    S, E = ids.numel(), num_experts
    max_blocks = _num_blocks(S, E, bm)
    dev = ids.device
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(max_blocks * bm, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    seg = torch.empty(E + 1, dtype=torch.int32, device=dev)
    npost = torch.empty(1, dtype=torch.int32, device=dev)
    BLOCK = 128 if interpreting() else 1024
    _moe_count_kernel[(E,)](ids, counts, S, BLOCK=BLOCK)
    _moe_align_kernel[(E,)](ids, counts, sorted_ids, block_expert, seg, npost, S, E, max_blocks,
                            BLOCK_M=bm, BLOCK=BLOCK, BLOCK_E=triton.next_power_of_2(E))
    return sorted_ids, block_expert, seg, npost


def combine(y: torch.Tensor, rows: int, group: int, out: torch.Tensor) -> torch.Tensor:
    """out (rows, C) = y (rows * group, C) summed over consecutive groups in fp32, in a fixed order."""
    C = y.shape[1]
    if rows and C:
        BLOCK = min(128 if interpreting() else 1024, triton.next_power_of_2(C))
        _moe_combine_kernel[(rows, triton.cdiv(C, BLOCK))](y, out, rows, C, group, y.stride(0), out.stride(0),
                                                         BLOCK=BLOCK)
    return out


def _gemm_and_combine(a, b, b_strides, sorted_ids, block_expert, npost, tw, out, top_k, bm, n_blocks, has_weight):
    """out (T, N) = sum_k (tw[s] *) a[s] @ B[e]: a (S, K) rows by flat index, B (E, K, N) given by
    ``b_strides`` (expert, k, n). The grouped GEMM writes one row per pair (straight into out for top-1),
    then the fixed-order top-k sum."""
    S, K = a.shape
    T, N = out.shape
    y = out if top_k == 1 else torch.empty((S, N), dtype=out.dtype, device=out.device)   # top-1: flat == token
    _gemm[lambda meta: (n_blocks, triton.cdiv(N, meta["BLOCK_N"]))](
        a, b, sorted_ids, block_expert, npost, tw, y, a, tw,          # GU / DW_WS unused without SWIGLU_BWD
        S, N, K, top_k, s_bucket(S),
        a.stride(0), a.stride(1), *b_strides, y.stride(0), 0,
        A_BY_TOKEN=False, HAS_WEIGHT=has_weight, SWIGLU_BWD=False, BLOCK_M=bm,
    )
    if top_k > 1:
        combine(y, T, top_k, out)
    return out


def moe_experts_fwd(x, gate_up_proj, down_proj, topk_ids, topk_weights, save_for_backward: bool = False):
    """x (T, H), gate_up_proj (E, 2I, H), down_proj (E, H, I) (x's dtype, any strides), topk_ids (T, top_k)
    int, topk_weights (T, top_k) float -> out (T, H) in x's dtype, plus what the backward needs:
    ``(out, sorted_ids, block_expert, seg, npost, gu (S, 2I), h1 (S, I))`` (gu empty unless
    save_for_backward). Launches: 2 (alignment) + GEMM1 + GEMM2 (+ combine when top_k > 1)."""
    T, H, E, inter, top_k = check_inputs(x, gate_up_proj, down_proj, topk_ids, topk_weights)
    S = T * top_k
    dev, dt = x.device, x.dtype
    bm = block_m(S, E)
    sorted_ids, block_expert, seg, npost = moe_align(topk_ids, E, bm)
    tw = topk_weights.reshape(-1)
    tw = tw if tw.is_contiguous() else tw.contiguous()
    gu = torch.empty((S, 2 * inter) if save_for_backward else (0, 2 * inter), dtype=dt, device=dev)
    h1 = torch.empty((S, inter), dtype=dt, device=dev)
    out = torch.empty((T, H), dtype=dt, device=dev)
    if S == 0:
        return out, sorted_ids, block_expert, seg, npost, gu, h1
    n_blocks = _num_blocks(S, E, bm)
    sb = s_bucket(S)

    def grid(n):
        return lambda meta: (n_blocks, triton.cdiv(n, meta["BLOCK_N"]))

    _gate_up[grid(inter)](
        x, gate_up_proj, sorted_ids, block_expert, npost, gu, h1,
        S, inter, H, top_k, sb,
        x.stride(0), x.stride(1), gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2),
        gu.stride(0), h1.stride(0),
        SAVE_GU=save_for_backward, BLOCK_M=bm,
    )
    # down_proj[e] (H, I) read as the (K = I, N = H) operand
    _gemm_and_combine(h1, down_proj, (down_proj.stride(0), down_proj.stride(2), down_proj.stride(1)), sorted_ids,
                      block_expert, npost, tw, out, top_k, bm, n_blocks, has_weight=True)
    return out, sorted_ids, block_expert, seg, npost, gu, h1


def moe_experts_bwd(dout, x, gate_up_proj, down_proj, topk_ids, topk_weights, sorted_ids, block_expert, seg, npost,
                    gu, h1):
    """Gradients of moe_experts_fwd: (dx (T, H), d_gate_up_proj (E, 2I, H), d_down_proj (E, H, I),
    d_topk_weights (T, top_k) in topk_weights' dtype). ``gu``/``h1`` and the alignment are the forward's."""
    T, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    S = T * top_k
    dev, dt = x.device, x.dtype
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dx = torch.empty((T, H), dtype=dt, device=dev)
    dwgu = torch.empty(gate_up_proj.shape, dtype=gate_up_proj.dtype, device=dev)
    dwd = torch.empty(down_proj.shape, dtype=down_proj.dtype, device=dev)
    dtw = torch.empty((T, top_k), dtype=topk_weights.dtype, device=dev)
    if S == 0:
        return dx, dwgu.zero_(), dwd.zero_(), dtw
    bm = block_m(S, E)
    n_blocks = _num_blocks(S, E, bm)
    sb = s_bucket(S)
    tw = topk_weights.reshape(-1)
    tw = tw if tw.is_contiguous() else tw.contiguous()
    dgu = torch.empty((S, two_i), dtype=dt, device=dev)
    max_tiles = triton.cdiv(inter, min(c.kwargs["BLOCK_N"] for c in _gemm.configs))
    dw_ws = torch.empty((S, max_tiles), dtype=torch.float32, device=dev)   # row s: one partial per N tile

    def grid(n):
        return lambda meta: (n_blocks, triton.cdiv(n, meta["BLOCK_N"]))

    # -- g = dout[t] @ down_proj[e] with the swiglu-backward epilogue: dgu, dw partials. The N-tile count that
    # lays out dw_ws comes from this launch's own grid call (the autotuner calls it last with the config it
    # runs), never from the shared `_gemm.best_config`: autograd runs each GPU's backward in its own thread
    tiles = []

    def bwd_grid(meta):
        tiles.append(triton.cdiv(inter, meta["BLOCK_N"]))
        return (n_blocks, tiles[-1])

    _gemm[bwd_grid](
        dout, down_proj, sorted_ids, block_expert, npost, tw, dgu, gu, dw_ws,
        S, inter, H, top_k, sb,
        dout.stride(0), dout.stride(1), down_proj.stride(0), down_proj.stride(1), down_proj.stride(2),
        dgu.stride(0), gu.stride(0),
        A_BY_TOKEN=True, HAS_WEIGHT=True, SWIGLU_BWD=True, BLOCK_M=bm,
    )
    n_tiles = tiles[-1]
    # the kernel wrote dw_ws as (S, n_tiles) row-major (row stride = the grid's N-tile count)
    combine(dw_ws.view(-1)[: S * n_tiles].view(S * n_tiles, 1), S, n_tiles, dtw.view(S, 1))
    # -- dx = sum_k dgu[s] @ gate_up_proj[e]: gate_up_proj[e] (2I, H) is already the (K, N) operand
    _gemm_and_combine(dgu, gate_up_proj, gate_up_proj.stride(), sorted_ids, block_expert, npost, tw, dx, top_k, bm,
                      n_blocks, has_weight=False)

    # -- weight gradients: one program per (expert, tile), the expert's rows in order
    def wgrid(n, k):
        return lambda meta: (E, triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]))

    x_c = x if x.stride(-1) == 1 else x.contiguous()
    _wgrad[wgrid(two_i, H)](
        dgu, x_c, sorted_ids, seg, tw, dwgu,
        S, two_i, H, top_k, sb,
        dgu.stride(0), dgu.stride(1), x_c.stride(0), x_c.stride(1), dwgu.stride(0), dwgu.stride(1), dwgu.stride(2),
        A_BY_TOKEN=False, B_BY_TOKEN=True, HAS_WEIGHT=False,
    )
    _wgrad[wgrid(H, inter)](
        dout, h1, sorted_ids, seg, tw, dwd,
        S, H, inter, top_k, sb,
        dout.stride(0), dout.stride(1), h1.stride(0), h1.stride(1), dwd.stride(0), dwd.stride(1), dwd.stride(2),
        A_BY_TOKEN=True, B_BY_TOKEN=False, HAS_WEIGHT=True,
    )
    return dx, dwgu, dwd, dtw


def chosen_configs() -> str:
    """The configs the autotuner picked last (for benchmark output)."""
    parts = []
    for name, k in (("gate_up", _gate_up), ("gemm", _gemm), ("wgrad", _wgrad)):
        cfg = getattr(k, "best_config", None)
        if cfg is not None:
            kw = " ".join(f"{a}{b}" for a, b in cfg.kwargs.items())
            parts.append(f"{name}: {kw} w{cfg.num_warps} s{cfg.num_stages}")
    return "; ".join(parts)
