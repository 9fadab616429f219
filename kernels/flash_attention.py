"""Flash attention (FlashAttention-2 algorithm) forward and backward, flash-attn layout and conventions.

Layout: q ``(batch, seqlen_q, heads, head_dim)``, k/v ``(batch, seqlen_k, heads_kv, head_dim)``, any
strides (all four are passed to the kernels, so an HF ``(b, h, s, d)`` tensor transposed is read in place);
varlen: ``(total_tokens, heads, head_dim)`` packed sequences with int32 ``cu_seqlens`` ``(n_seqs + 1,)``.
GQA/MQA: query head ``i`` reads kv head ``i // (heads // heads_kv)``; k/v are never repeated.

Masking (flash-attn >= 2.1): query ``i`` sits at key position ``i + seqlen_k - seqlen_q`` (bottom right);
key ``j`` is visible when ``pos - left <= j <= pos + right`` (``-1``: unbounded; causal means right = 0).
Rows with nothing visible give out = 0 and lse = -inf. K/V blocks that are fully masked are never visited,
and blocks that are fully visible skip the mask arithmetic (three loop phases: masked, full, masked).

Forward: one program per (query block, head, batch): online softmax in fp32 (exp2; in the fully visible
blocks qk_scale is folded into the exp2 argument as one FMA with the running max, tutorial 06 style), writes
out (q's dtype) and lse (fp32, natural log). On sm_90+ with a Triton that has `tl.make_tensor_descriptor`,
fp16/bf16 inputs go to the TMA forward in kernels/flash_attention_tma.py (same results; this portable
kernel serves other GPUs, older Tritons, fp32 and unaligned inputs; LLAMA_TRITON_FLASH_FWD=portable forces it).
Backward (deterministic, no atomics): ``delta = rowsum(dO * O) - dlse`` (preprocess kernel); a dk/dv
kernel with one program per (key block, kv head, batch) whose single loop walks the (query head of its GQA
group, query block) pairs (so dk/dv are summed over the group in registers); a dq kernel with one program
per (query block, head, batch) that loops over key blocks.
Autotune keys bucket the sequence length coarsely (SEQ_BUCKETS): a growing context re-tunes at most twice.
Every autotune config compiles spill-free for sm_90 (static, ptxas; tests/test_static_gates.py).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, interpreting

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------- autotune configs
def _smem_ok(block_d: int, resident: int, pipelined: int, stages: int, elt: int = 2, budget: int = 200 * 1024) -> bool:
    """Rough shared-memory estimate: resident rows once, pipelined (loop-loaded) rows stages - 1 times."""
    return elt * block_d * (resident + pipelined * max(stages - 1, 1)) <= budget


def _fwd_configs():
    """Forward: BLOCK_M queries x BLOCK_N keys. One small config under the interpreter. Every config here
    compiles without spills for sm_90 (bf16/fp16, head_dim 64/128, static, ptxas); dropped because they spill:
    128x64 w4 s3 (584/1108 bytes), 128x128 w8 s2/s3 (20-28), 128x32 w4 s4 (68-128)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in ((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 128, 8, 3),
                                    (64, 64, 4, 3), (64, 32, 4, 2))]
    configs.append(triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1))  # always fits
    return configs


def _elt(named_args) -> int:
    """Element size of the inputs (fp32 tiles take twice the shared memory of fp16/bf16 ones)."""
    q = named_args.get("Q")
    return q.element_size() if hasattr(q, "element_size") else 2


def _fwd_prune(configs, named_args, **kwargs):
    d, elt = {**named_args, **kwargs}["BLOCK_D"], _elt(named_args)
    keep = [c for c in configs if _smem_ok(d, c.kwargs["BLOCK_M"], 2 * c.kwargs["BLOCK_N"], c.num_stages, elt)
            and (d < 256 or c.kwargs["BLOCK_M"] <= 64)]       # the (BLOCK_M, 256) fp32 accumulator
    return keep or configs[-1:]


def _bwd_configs(kernel: str):
    """dk/dv (BLOCK_N keys resident, loop over BLOCK_M queries) and dq (BLOCK_N queries resident, loop over
    BLOCK_M keys). Spill-free for sm_90 (bf16/fp16, head_dim 64/128, GQA 4, static, ptxas); dropped because
    they spill: 32x128 w4 (both), and for dk/dv 64x64 w4/w8 and 64x128 w8 (its 2 (N, D) fp32 accumulators
    plus k and v stay resident)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    tiles = ((32, 64, 4, 2), (32, 128, 8, 3), (32, 64, 8, 2))
    if kernel == "dq":
        tiles += ((64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2))
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]
    configs.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1))  # always fits
    return configs


def _bwd_prune(configs, named_args, **kwargs):
    d, elt = {**named_args, **kwargs}["BLOCK_D"], _elt(named_args)
    keep = [c for c in configs if _smem_ok(d, 2 * c.kwargs["BLOCK_N"], 2 * c.kwargs["BLOCK_M"], c.num_stages, elt)
            and (d < 256 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 64)]
    return keep or configs[-1:]


def _dkdv_prune(configs, named_args, **kwargs):
    """_bwd_prune, and with softcap no 4-warp config with 64+ keys resident: the tanh derivative keeps one
    more (N, M) fp32 tile live and 32x64 w4 spills (32/32 bytes, static, sm_90, head_dim 128)."""
    if {**named_args, **kwargs}.get("HAS_SOFTCAP"):
        configs = [c for c in configs if c.num_warps == 8 or c.kwargs["BLOCK_N"] < 64]
    return _bwd_prune(configs, named_args, **kwargs)


# Runtime sizes and windows are not specialised by the JIT (Triton would otherwise compile a variant per
# "== 1" / "% 16 == 0" value of each length: a recompile of every autotune config for a new prompt length).
_RUNTIME_INTS = ("seqlen_q", "seqlen_k", "window_left", "window_right")


SEQ_BUCKETS = (2048, 16384)  # autotune buckets of max(seqlen_q, seqlen_k): < 2k, < 16k, longer


def _seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: one of three coarse buckets (short prompts, long, very long), so
    a growing context re-tunes at most twice, not at every power of two."""
    return sum(int(n) >= b for b in SEQ_BUCKETS)


# ------------------------------------------------------------------------------------- shared jit helpers
@triton.jit
def _seq_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence off_b in q and in k (dense: (0, seqlen))."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + off_b)
        q_len = tl.load(CU_Q + off_b + 1) - q_start
        k_start = tl.load(CU_K + off_b)
        k_len = tl.load(CU_K + off_b + 1) - k_start
    else:                          # tensors, never constexprs (a length of 1 is specialised to a constant)
        zero = off_b * 0
        q_start = zero
        q_len = seqlen_q + zero
        k_start = zero
        k_len = seqlen_k + zero
    return q_start, q_len, k_start, k_len


@triton.jit
def _kv_range(m0, q_len, k_len, window_left, window_right,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of query block [m0, m0 + BLOCK_M) as block-aligned phases:
    [lo, full_lo) masked, [full_lo, full_hi) fully visible, [full_hi, hi) masked."""
    diff = k_len - q_len                                   # query i sits at key position i + diff
    lo = diff * 0
    hi = k_len
    full_lo = lo
    full_hi = k_len // BLOCK_N * BLOCK_N                   # the ragged last block needs the j < k_len mask
    if HAS_LEFT:
        lo = tl.maximum(m0 + diff - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + diff - window_left, 0), BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(hi, tl.maximum(m0 + BLOCK_M + diff + window_right, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(m0 + diff + window_right + 1, 0) // BLOCK_N * BLOCK_N)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _q_range(n0, q_len, k_len, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range that sees key block [n0, n0 + BLOCK_N), as phases like _kv_range (masked, full, masked).
    Keys past k_len only feed dk/dv rows that are never stored, so no k_len mask is needed here."""
    diff = k_len - q_len
    lo = diff * 0
    hi = q_len
    full_lo = lo
    full_hi = q_len
    if HAS_RIGHT:   # i + diff + right >= j
        lo = tl.maximum(n0 - window_right - diff, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - window_right - diff, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:    # i + diff - left <= j
        hi = tl.minimum(hi, tl.maximum(n0 + BLOCK_N + window_left - diff, 0))
        full_hi = tl.maximum(n0 + window_left - diff + 1, 0) // BLOCK_M * BLOCK_M
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _visible(rows_pos, cols, k_len, window_left, window_right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(len(rows_pos), len(cols)) boolean: key cols[j] is visible to the query at key position rows_pos[i]."""
    keep = cols[None, :] < k_len
    if HAS_RIGHT:
        keep = keep & (cols[None, :] <= rows_pos[:, None] + window_right)
    if HAS_LEFT:
        keep = keep & (cols[None, :] >= rows_pos[:, None] - window_left)
    return keep


@triton.jit
def _visible_t(rows_pos, cols, window_left, window_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """_visible transposed, (len(cols), len(rows_pos)), without the k_len test (see _q_range)."""
    keep = rows_pos[None, :] >= rows_pos[None, :]
    if HAS_RIGHT:
        keep = keep & (cols[:, None] <= rows_pos[None, :] + window_right)
    if HAS_LEFT:
        keep = keep & (cols[:, None] >= rows_pos[None, :] - window_left)
    return keep


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _softcap(s, cap):
    """cap * tanh(s / cap) (Gemma-2 soft-capping; scores and cap in the same units), tanh written with exp
    (no libdevice): +-inf -> +-cap."""
    return cap * (1.0 - 2.0 / (tl.math.exp2(s * (2.8853900817779268 / cap)) + 1.0))   # exp(2 s / cap)


@triton.jit
def _softmax_step(qk, m_i, l_i, rows_pos, cols, k_len, qk_scale, softcap, window_left, window_right,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One online-softmax step over raw scores qk (M, N) (q k^T, fp32): -> p (M, N), alpha (M,) (the factor
    that rescales the running acc and l), the new running max m (M,) and l (M,), all in log2 units."""
    if HAS_SOFTCAP:                                                                       # (softcap in log2 units)
        qk = _softcap(qk * qk_scale, softcap)
    if MASKED:
        if not HAS_SOFTCAP:
            qk = qk * qk_scale                                                            # log2 units
        qk = tl.where(_visible(rows_pos, cols, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT),
                      qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)                              # empty so far
        p = tl.math.exp2(qk - m_use[:, None])
    elif HAS_SOFTCAP:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
    else:                               # -- qk_scale folded into exp2 as one FMA with the running max --
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)                                 # qk_scale >= 0
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
               rows_pos, k_len, lo, hi, qk_scale, softcap, window_left, window_right,
               MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        base = tl.cast(start_n, tl.int64)
        kt_ptrs = K + base * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, N)
        v_ptrs = V + base * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd   # (N, D)
        # -- compute qk --
        if MASKED:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None] & (cols[None, :] < k_len), other=0.0)
        elif BLOCK_D == HEAD_DIM:                                                         # no mask at all
            kt = tl.load(kt_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION)                                    # (M, N), raw scores
        # -- online softmax (exp2; scale, softcap, mask) --
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, rows_pos, cols, k_len, qk_scale, softcap, window_left,
                                           window_right, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)
        # -- acc = acc * alpha + p v --
        if MASKED:
            v = tl.load(v_ptrs, mask=(cols[:, None] < k_len) & d_ok[None, :], other=0.0)
        elif BLOCK_D == HEAD_DIM:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_i


@triton.autotune(configs=_fwd_configs(), key=["BLOCK_D", "seq_bucket", "HAS_LEFT", "HAS_RIGHT", "IS_VARLEN", "HAS_SOFTCAP"],
                 prune_configs_by={"early_config_prune": _fwd_prune})
@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,                                # pointers
    seqlen_q, seqlen_k, group, seq_bucket,                      # sizes (dense lengths; heads per kv head)
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh,                                       # lse: (b, h, sq) or (h, total_q)
    qk_scale, softcap, window_left, window_right,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)         # longest (causal) blocks first
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    off_hk = off_h // group
    b64 = off_b.to(tl.int64)
    q_row0 = q_start.to(tl.int64) + m0
    Q += b64 * stride_qb + q_row0 * stride_qm + off_h.to(tl.int64) * stride_qh
    O += b64 * stride_ob + q_row0 * stride_om + off_h.to(tl.int64) * stride_oh
    K += b64 * stride_kb + k_start.to(tl.int64) * stride_kn + off_hk.to(tl.int64) * stride_kh
    V += b64 * stride_vb + k_start.to(tl.int64) * stride_vn + off_hk.to(tl.int64) * stride_vh
    LSE += b64 * stride_lb + off_h.to(tl.int64) * stride_lh + q_row0

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (m0 + offs_m) < q_len
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)  # (M, D)
    rows_pos = m0 + offs_m + (k_len - q_len)                   # key position of each query (bottom right)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _kv_range(m0, q_len, k_len, window_left, window_right,
                                         HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, rows_pos, k_len,
                               lo, full_lo, qk_scale, softcap, window_left, window_right, True, HAS_LEFT,
                               HAS_RIGHT, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, rows_pos, k_len,
                               full_lo, full_hi, qk_scale, softcap, window_left, window_right, False, HAS_LEFT,
                               HAS_RIGHT, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_kd, stride_vn, stride_vd, rows_pos, k_len,
                               full_hi, hi, qk_scale, softcap, window_left, window_right, True, HAS_LEFT,
                               HAS_RIGHT, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_N, PRECISION)

    empty = l_i == 0.0                                          # nothing visible: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty), mask=tile_ok)
    tl.store(LSE + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=("seqlen_q",))
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_Q,
    seqlen_q,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lh,                                       # shared by dlse and delta (lse layout)
    IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse (fp32), lse layout."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2)
    q_start, q_len, _, _ = _seq_bounds(CU_Q, CU_Q, off_b, seqlen_q, seqlen_q, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    b64 = off_b.to(tl.int64)
    row0 = q_start.to(tl.int64) + m0
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (m0 + offs_m) < q_len
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b64 * stride_ob + row0 * stride_om + off_h * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=tile_ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + row0 * stride_dom + off_h * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=tile_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_off = b64 * stride_lb + off_h * stride_lh + row0 + offs_m
    if HAS_DLSE:   # d lse_i / d s_ij = p_ij, so an lse gradient just shifts delta
        delta -= tl.load(DLSE + lse_off, mask=row_ok, other=0.0)
    tl.store(DELTA + lse_off, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_block(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qm, stride_qd, stride_dom, stride_dod,
                    cols, k_len, q_len, start_m, qk_scale, softcap, window_left, window_right,
                    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """dk/dv += the contribution of query block [start_m, start_m + BLOCK_M) of one query head:
    P^T = exp2(K Q^T c - lse), dV += P^T dO, dS^T = P^T * (V dO^T - delta), dK += dS^T Q (c = qk_scale)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    row_ok = rows < q_len
    base = tl.cast(start_m, tl.int64)
    tile_ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + base * stride_qm + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=tile_ok, other=0.0)                                                   # (M, D)
    do = tl.load(DO + base * stride_dom + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=tile_ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634            # empty row: p = 0
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION)                                 # (N, M), raw
    if HAS_SOFTCAP:
        st = _softcap(st * qk_scale, softcap)                                              # log2 units
        pt = tl.math.exp2(st - lse[None, :])
    else:
        pt = tl.math.exp2(st * qk_scale - lse[None, :])                                    # one FMA
    if MASKED:
        pt = tl.where(_visible_t(rows + (k_len - q_len), cols, window_left, window_right, HAS_LEFT, HAS_RIGHT),
                      pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)                       # (N, D)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)                               # (N, M)
    dst = pt * (dpt - delta[None, :])
    if HAS_SOFTCAP:                                   # d(cap * tanh(s / cap)) / ds = 1 - tanh**2
        tt = st / softcap
        dst = dst * (1.0 - tt * tt)
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)                         # (N, D)
    return dk, dv


@triton.autotune(configs=_bwd_configs("dkdv"), key=["BLOCK_D", "seq_bucket", "HAS_LEFT", "HAS_RIGHT", "IS_VARLEN", "HAS_SOFTCAP"],
                 prune_configs_by={"early_config_prune": _dkdv_prune})
@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    seqlen_q, seqlen_k, group, seq_bucket,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_lb, stride_lh,
    qk_scale, sm_scale, softcap, window_left, window_right,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    b64 = off_b.to(tl.int64)
    k_row0 = k_start.to(tl.int64) + n0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = ((n0 + offs_n) < k_len)[:, None] & (offs_d[None, :] < HEAD_DIM)
    hk64 = off_hk.to(tl.int64)
    k = tl.load(K + b64 * stride_kb + k_row0 * stride_kn + hk64 * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=tile_ok, other=0.0)  # (N, D)
    v = tl.load(V + b64 * stride_vb + k_row0 * stride_vn + hk64 * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=tile_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    cols = n0 + offs_n
    lo, _, _, hi = _q_range(n0, q_len, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    q_row0 = q_start.to(tl.int64)
    # One pipelined loop over the (query head of the GQA group, query block) pairs: a loop over the group
    # around three phase loops kept dk/dv, k, v and three loops' pipeline state live at once and spilled
    # (static, sm_90: 3072 bytes at 32x128 w4). Every block applies the window mask (none without one).
    n_blk = tl.cdiv(hi - lo, BLOCK_M)
    for it in range(0, group * n_blk):
        g = it // n_blk
        start_m = lo + (it - g * n_blk) * BLOCK_M
        h64 = (off_hk * group + g).to(tl.int64)
        Qh = Q + b64 * stride_qb + q_row0 * stride_qm + h64 * stride_qh
        DOh = DO + b64 * stride_dob + q_row0 * stride_dom + h64 * stride_doh
        LSEh = LSE + b64 * stride_lb + h64 * stride_lh + q_row0
        DELTAh = DELTA + b64 * stride_lb + h64 * stride_lh + q_row0
        dk, dv = _bwd_dkdv_block(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qm, stride_qd, stride_dom, stride_dod,
                                 cols, k_len, q_len, start_m, qk_scale, softcap, window_left, window_right,
                                 HAS_LEFT or HAS_RIGHT, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M,
                                 PRECISION)
    dk *= sm_scale
    tl.store(DK + b64 * stride_dkb + k_row0 * stride_dkn + hk64 * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + b64 * stride_dvb + k_row0 * stride_dvn + hk64 * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
                  rows_pos, k_len, lo, hi, qk_scale, softcap, window_left, window_right,
                  MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        base = tl.cast(start_n, tl.int64)
        k_ptrs = K + base * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd   # (N, D)
        v_ptrs = V + base * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            tile_ok = (cols[:, None] < k_len) & d_ok[None, :]
            k = tl.load(k_ptrs, mask=tile_ok, other=0.0)
            v = tl.load(v_ptrs, mask=tile_ok, other=0.0)
        elif BLOCK_D == HEAD_DIM:                                                         # no mask at all
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale                  # (M, N)
        if HAS_SOFTCAP:
            s = _softcap(s, softcap)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_visible(rows_pos, cols, k_len, window_left, window_right, HAS_LEFT, HAS_RIGHT), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)                            # (M, N)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            t = s / softcap
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)                      # (M, D)
    return dq


@triton.autotune(configs=_bwd_configs("dq"), key=["BLOCK_D", "seq_bucket", "HAS_LEFT", "HAS_RIGHT", "IS_VARLEN", "HAS_SOFTCAP"],
                 prune_configs_by={"early_config_prune": _bwd_prune})
@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    seqlen_q, seqlen_k, group, seq_bucket,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_lb, stride_lh,
    qk_scale, sm_scale, softcap, window_left, window_right,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # the dk/dv configs are tuned with BLOCK_N keys >= BLOCK_M queries; the dq kernel swaps the roles
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(CU_Q, CU_K, off_b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_N
    if m0 >= q_len:
        return
    off_hk = off_h // group
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    q_row0 = q_start.to(tl.int64) + m0
    offs_m = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (m0 + offs_m) < q_len
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + q_row0 * stride_qm + h64 * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + q_row0 * stride_dom + h64 * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=tile_ok, other=0.0)
    lse_off = b64 * stride_lb + h64 * stride_lh + q_row0 + offs_m
    lse = tl.load(LSE + lse_off, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634          # empty row: p = 0
    delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
    K += b64 * stride_kb + k_start.to(tl.int64) * stride_kn + off_hk.to(tl.int64) * stride_kh
    V += b64 * stride_vb + k_start.to(tl.int64) * stride_vn + off_hk.to(tl.int64) * stride_vh
    rows_pos = m0 + offs_m + (k_len - q_len)
    dq = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _kv_range(m0, q_len, k_len, window_left, window_right,
                                         HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_M)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, rows_pos, k_len,
                       lo, full_lo, qk_scale, softcap, window_left, window_right, True, HAS_LEFT, HAS_RIGHT,
                       HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, rows_pos, k_len,
                       full_lo, full_hi, qk_scale, softcap, window_left, window_right, False, HAS_LEFT, HAS_RIGHT,
                       HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_kd, stride_vn, stride_vd, rows_pos, k_len,
                       full_hi, hi, qk_scale, softcap, window_left, window_right, True, HAS_LEFT, HAS_RIGHT,
                       HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_M, PRECISION)
    dq *= sm_scale
    tl.store(DQ + b64 * stride_dqb + q_row0 * stride_dqm + h64 * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------------- launchers
def _int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_inputs(q, k, v, causal=True, softmax_scale=None, window_size=(-1, -1), cu_seqlens_q=None,
                 cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, check_values=True):
    """Validate flash_attention's arguments; raises TypeError/ValueError naming the argument.

    Returns ``(softmax_scale, window_left, window_right, max_seqlen_q, max_seqlen_k)`` with the defaults
    filled in: scale ``head_dim ** -0.5``; causal folded into ``window_right = 0``; dense max seqlens are
    the seqlens; varlen ones are read from cu_seqlens when not given (a device -> host copy). With
    ``check_values`` (the public function) the cu_seqlens values are checked: they start at 0, never
    decrease, end at the token count, and the given max_seqlen_* cover every sequence.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, FLOAT_DTYPES, ndim=3 if varlen else 4)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    heads, head_dim = q.shape[-2], q.shape[-1]
    heads_kv = k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k has head_dim {k.shape[-1]} but q has {head_dim}; they must match")
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {head_dim}")
    if heads_kv == 0 or heads % heads_kv:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k/v's heads ({heads_kv}) (GQA)")
    if heads > 65535:
        raise ValueError(f"q has {heads} heads; at most 65535 are supported")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        softmax_scale = head_dim ** -0.5
    elif (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
          or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a (left, right) pair, got {window_size!r}")
    left, right = (_int(f"window_size[{i}]", w, -1) for i, w in enumerate(window_size))
    if causal:
        right = 0

    if not varlen:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k has batch {k.shape[0]} but q has {q.shape[0]}; they must match")
        if q.shape[0] > 65535:
            raise ValueError(f"q has batch {q.shape[0]}; at most 65535 are supported")
        return float(softmax_scale), left, right, q.shape[1], k.shape[1]

    if cu_seqlens_q is None or cu_seqlens_k is None:
        missing = "cu_seqlens_k" if cu_seqlens_k is None else "cu_seqlens_q"
        raise ValueError(f"varlen mode needs both cu_seqlens_q and cu_seqlens_k; {missing} is None")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, (torch.int32,), ndim=1)
        if not 2 <= cu.numel() <= 65536:
            raise ValueError(f"{name} must hold n_seqs + 1 offsets with 1 <= n_seqs <= 65535, got {cu.numel()}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel()}; they must match")
    maxima = []
    for name, cu, total, given in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                   ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        mname = name.replace("cu_seqlens", "max_seqlen")
        if given is not None:
            _int(mname, given, 0)
        if check_values or given is None:
            offs = cu.tolist()
            lens = [b - a for a, b in zip(offs[:-1], offs[1:])]
            if offs[0] != 0 or min(lens) < 0 or offs[-1] != total:
                raise ValueError(f"{name} must start at 0, never decrease and end at the token count {total}, "
                                 f"got {offs if len(offs) <= 16 else str(offs[:16])[:-1] + ', ...]'}")
            if given is not None and given < max(lens):
                raise ValueError(f"{mname}={given} is less than the longest sequence ({max(lens)}) in {name}")
            given = max(lens) if given is None else given
        maxima.append(given)
    return float(softmax_scale), left, right, maxima[0], maxima[1]


def check_softcap(softcap) -> float:
    """softcap: a finite float >= 0 (0 = off, flash-attn's convention); ValueError otherwise."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0.0 = no soft-capping), got {softcap!r}")
    return float(softcap)


def _strides4(t: torch.Tensor, varlen: bool):
    """(batch, seq, head, dim) strides; packed varlen tensors have no batch stride."""
    return (0, *t.stride()) if varlen else tuple(t.stride())


def _precision(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 input: exact fp32 dots (no TF32 rounding)


def _lse_strides(q: torch.Tensor, varlen: bool):
    """Strides (batch, head) of the fp32 lse: (b, h, sq) dense, (h, total_q) varlen."""
    return (0, q.shape[0]) if varlen else (q.shape[2] * q.shape[1], q.shape[1])


def attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                  softmax_scale: float, window_left: int, window_right: int, softcap: float = 0.0):
    """q (b, sq, h, d) / (total_q, h, d), k/v (b, sk, h_kv, d) / (total_k, h_kv, d), any strides; windows
    with -1 = unbounded (causal: window_right = 0); softcap > 0: scores ``softcap * tanh(s / softcap)``.
    -> out like q (contiguous, q's dtype), lse fp32 (b, h, sq) / (h, total_q)."""
    varlen = cu_seqlens_q is not None
    check_inputs(q, k, v, False, softmax_scale, (window_left, window_right), cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k, check_values=False)
    heads, head_dim, heads_kv = q.shape[-2], q.shape[-1], k.shape[-2]
    n_seqs = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (heads, q.shape[0]) if varlen else (q.shape[0], heads, q.shape[1])
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or max_seqlen_q == 0:
        return out, lse.fill_(float("-inf"))
    if softmax_scale < 0:      # the kernels fold a positive scale into exp2 (max(s * c) = max(s) * c for c >= 0)
        q, softmax_scale = -q, -softmax_scale
    from . import flash_attention_tma      # (imported here: it imports this module)
    if flash_attention_tma.use_for(q, k, v):                  # Hopper: TMA descriptors (same results)
        flash_attention_tma.launch_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       softmax_scale, window_left, window_right, softcap)
        return out, lse
    seqlen_q, seqlen_k = (0, 0) if varlen else (q.shape[1], k.shape[1])
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, n_seqs)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q if varlen else q, cu_seqlens_k if varlen else q,
        seqlen_q, seqlen_k, heads // heads_kv, _seq_bucket(max(max_seqlen_q, max_seqlen_k)),
        *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(out, varlen),
        *_lse_strides(q, varlen),
        float(softmax_scale) * LOG2E, float(softcap) * LOG2E, window_left, window_right,
        IS_VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0,
        HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), 16), PRECISION=_precision(q.dtype),
    )
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                  max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int, softcap: float = 0.0):
    """Gradients of attention_fwd. dout like q (any strides), out/lse as returned by attention_fwd, dlse
    (lse's shape) or None. -> dq, dk, dv (contiguous, input dtypes); dk/dv summed over each GQA group.
    Deterministic: every gradient element is written by exactly one program, no atomics."""
    varlen = cu_seqlens_q is not None
    heads, head_dim, heads_kv = q.shape[-2], q.shape[-1], k.shape[-2]
    n_seqs = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dk.numel() == 0 or max_seqlen_k == 0:           # nothing visible anywhere
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dq.numel() == 0 or max_seqlen_q == 0:           # no queries: zero key gradients
        return dq, dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    delta = torch.empty_like(lse)
    seqlen_q, seqlen_k = (0, 0) if varlen else (q.shape[1], k.shape[1])
    cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if varlen else (q, q)
    block_d = max(triton.next_power_of_2(head_dim), 16)
    lse_strides = _lse_strides(q, varlen)
    pre_block = 16 if interpreting() else 64
    _bwd_preprocess_kernel[(triton.cdiv(max_seqlen_q, pre_block), heads, n_seqs)](
        out, dout, dlse if dlse is not None else lse, delta, cu_q,
        seqlen_q, *_strides4(out, varlen), *_strides4(dout, varlen), *lse_strides,
        IS_VARLEN=varlen, HAS_DLSE=dlse is not None, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_block,
    )
    common = dict(IS_VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0,
                  HEAD_DIM=head_dim, BLOCK_D=block_d, PRECISION=_precision(q.dtype))
    scales = (float(softmax_scale) * LOG2E, float(softmax_scale), float(softcap) * LOG2E, window_left, window_right)
    sizes = (seqlen_q, seqlen_k, heads // heads_kv, _seq_bucket(max(max_seqlen_q, max_seqlen_k)))
    _attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]), heads_kv, n_seqs)](
        q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, *sizes,
        *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(dout, varlen),
        *_strides4(dk, varlen), *_strides4(dv, varlen), *lse_strides, *scales, **common,
    )
    _attn_bwd_dq_kernel[lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_N"]), heads, n_seqs)](
        q, k, v, dout, lse, delta, dq, cu_q, cu_k, *sizes,
        *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(dout, varlen),
        *_strides4(dq, varlen), *lse_strides, *scales, **common,
    )
    return dq, dk, dv


def chosen_configs() -> str:
    """The autotuned configs of the last launches (for benchmark output); 'not tuned yet' before any."""
    from .flash_attention_tma import _attn_fwd_tma_kernel

    parts = []
    for name, kernel in (("fwd", _attn_fwd_kernel), ("fwd_tma", _attn_fwd_tma_kernel), ("dkdv", _attn_bwd_dkdv_kernel),
                         ("dq", _attn_bwd_dq_kernel)):
        c = getattr(kernel, "best_config", None)
        if c is not None:
            parts.append(f"{name} M{c.kwargs['BLOCK_M']}/N{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}")
    return "; ".join(parts) or "not tuned yet"
