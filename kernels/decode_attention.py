"""Decode attention over a KV cache: split-K flash-decoding with GQA packing (forward only).

Semantics are those of ``llama_triton.reference.decode_attention`` (flash-attn's ``flash_attn_with_kvcache``
without the cache append): q ``(b, q_len, h, d)`` attends over the first ``cache_seqlens[i]`` entries of
k/v caches ``(b, max_seqlen, h_kv, d)``; the last ``q_len`` valid entries are the new tokens' own keys, so
query t sits at position ``cache_seqlens[i] - q_len + t`` (bottom-right causal), optionally within a
left window.

Two stages:
  1. grid ``(b, h_kv * m_tiles, num_splits)``. One program owns one kv head of one sequence and ALL the
     query rows that read it: the ``group = h // h_kv`` query heads times the ``q_len`` new tokens, packed
     into one ``BLOCK_M >= 16`` tile so that ``q @ k^T`` and ``p @ v`` are ``tl.dot``s and K/V are read
     once per kv head. It streams its split of the cache with an online softmax (fp32, exp2) and writes a
     normalised partial output and its log-sum-exp.
  2. grid ``(b * q_len, h)``: merge the splits' partial outputs with their log-sum-exps.
  With one split, stage 1 writes the final output directly and stage 2 is skipped.

No host sync, no recompiles as the cache grows: ``cache_seqlens`` is read by the kernel, and the split
boundaries are computed *in the kernel* from the runtime length (``num_splits`` is chosen on the host from
``b * h_kv`` versus the SM count and the buffer size ``max_seqlen`` only). Splits past a sequence's end
produce lse = -inf and are ignored by the merge; a row with nothing to attend to gets 0 output.

The kernel clamps each length to ``[0, max_seqlen]`` so a bad length can never read out of bounds (this is
also what the reference does: it slices ``[:n]``). Lengths are *checked* (ValueError) only where that is
free: when ``cache_seqlens`` lives on the CPU, or when ``LLAMA_TRITON_CHECK_SEQLENS=1`` (which syncs the
device and so is not CUDA-graph safe: a debugging aid).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, cpu_value_check, num_programs_hint

MAX_Q_LEN = 16        # decode / speculative decoding; longer chunks belong to flash attention (prefill)
MAX_HEAD_DIM = 256
MAX_BLOCK_M = 64      # packed query rows per program (acc is BLOCK_M x BLOCK_D fp32 in registers)
MAX_SPLITS = 64       # the merge holds (splits, BLOCK_D) fp32 partials in registers
WAVES = 4             # target programs per SM for stage 1: several CTAs in flight hide memory latency


@triton.jit
def _rotate(X, offs_row, offs_d, mask, COS, SIN, pos, stride_cos, HALF: tl.constexpr):
    """Load rows X + offs_row[:, None] + offs_d[None, :] and apply HF's rotary embedding at positions
    pos (rows,) from the (n, head_dim) cos/sin tables: x * cos + rotate_half(x) * sin, in fp32."""
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)                 # rotate_half's source
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    x = tl.load(X + offs_row[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(X + offs_row[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    c_offs = pos[:, None].to(tl.int64) * stride_cos + offs_d[None, :]
    cos = tl.load(COS + c_offs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + c_offs, mask=mask, other=0.0).to(tl.float32)
    return x * cos + sign[None, :] * xp * sin


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, O, LSE, K_NEW, V_NEW, COS, SIN, LEFTPAD,  # pointers (K_NEW..LEFTPAD: when enabled)
    q_len, group, m_tiles, max_seqlen, window_left,     # sizes (runtime: no recompiles)
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_sl,                                          # SEQLENS (b,)
    stride_ob, stride_os, stride_ot, stride_oh,         # O (b, splits, q_len, h, d), d contiguous
    stride_lb, stride_ls, stride_lt,                    # LSE (b, splits, q_len, h), h contiguous
    stride_knb, stride_knt, stride_knh,                 # K_NEW (b, q_len, h_kv, d), d contiguous
    stride_vnb, stride_vnt, stride_vnh,                 # V_NEW likewise
    stride_cos,                                         # COS/SIN (n, d) tables, d contiguous
    stride_lp,                                          # LEFTPAD (b,)
    qk_scale,                                           # softmax_scale * log2(e)
    HEAD_DIM: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    IEEE_DOT: tl.constexpr,                             # fp32 inputs: exact fp32 dots, not tf32
    APPEND: tl.constexpr,                               # write K_NEW/V_NEW at SEQLENS (lengths before) first
    ROTARY: tl.constexpr,                               # rotate q and the new k (HF rotate_half convention)
    HAS_LEFTPAD: tl.constexpr,                          # keys [0, LEFTPAD[b]) are padding (left-padded batch)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = (tl.program_id(1) // m_tiles).to(tl.int64)    # head-major caches: kvh * stride_kh can pass 2**31
    m_tile = tl.program_id(1) % m_tiles
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # packed query rows: row r = t * group + g  ->  token t, query head kvh * group + g
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)                       # (BLOCK_M,)
    row_mask = rows < q_len * group
    t = rows // group
    head = kvh * group + rows % group
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    seqlen = tl.load(SEQLENS + b * stride_sl).to(tl.int32)
    seqlen = tl.minimum(tl.maximum(seqlen, 0), max_seqlen)
    old_len = seqlen
    if APPEND:                                                            # SEQLENS: lengths before the append
        seqlen = tl.minimum(seqlen + q_len, max_seqlen)
    pos = seqlen - q_len + t                                              # (BLOCK_M,) key position of each row

    # this split's slice of the valid range [kv_lo, seqlen), cut from the runtime length
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(seqlen - q_len - window_left, 0)
        kv_lo = (kv_lo // BLOCK_N) * BLOCK_N                              # block-aligned loads
    if HAS_LEFTPAD:
        first_key = tl.load(LEFTPAD + b * stride_lp).to(tl.int32)
        first_key = tl.minimum(tl.maximum(first_key, 0), seqlen)
        kv_lo = tl.maximum(kv_lo, (first_key // BLOCK_N) * BLOCK_N)
    chunk = tl.cdiv(tl.cdiv(seqlen - kv_lo, num_splits), BLOCK_N) * BLOCK_N
    lo = kv_lo + split * chunk
    hi = tl.minimum(lo + chunk, seqlen)

    q_mask = row_mask[:, None] & d_mask[None, :]
    if ROTARY:                                      # q rotated in fp32, rounded once to q's dtype (as ops.rope)
        q = _rotate(Q + b * stride_qb, t * stride_qt + head * stride_qh, offs_d, q_mask, COS, SIN,
                    tl.maximum(pos, 0), stride_cos, HEAD_DIM // 2).to(Q.dtype.element_ty)
    else:
        q_ptrs = Q + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)                      # (BLOCK_M, BLOCK_D)

    if APPEND:  # -- the new tokens' k/v into the cache: written by the split whose key range holds them --
        offs_t = tl.arange(0, BLOCK_T)
        new_pos = old_len + offs_t                                        # (BLOCK_T,) cache rows
        t_mask = (offs_t < q_len) & (new_pos >= lo) & (new_pos < hi)
        nd_mask = t_mask[:, None] & d_mask[None, :]
        if ROTARY:
            k_new = _rotate(K_NEW + b * stride_knb + kvh * stride_knh, offs_t * stride_knt, offs_d, nd_mask,
                            COS, SIN, new_pos, stride_cos, HEAD_DIM // 2).to(K_NEW.dtype.element_ty)
        else:
            k_new = tl.load(K_NEW + b * stride_knb + kvh * stride_knh + offs_t[:, None] * stride_knt
                            + offs_d[None, :], mask=nd_mask, other=0.0)
        v_new = tl.load(V_NEW + b * stride_vnb + kvh * stride_vnh + offs_t[:, None] * stride_vnt + offs_d[None, :],
                        mask=nd_mask, other=0.0)
        rows64 = new_pos[:, None].to(tl.int64)
        tl.store(K + b * stride_kb + kvh * stride_kh + rows64 * stride_kn + offs_d[None, :] * stride_kd,
                 k_new.to(K.dtype.element_ty), mask=nd_mask)
        tl.store(V + b * stride_vb + kvh * stride_vh + rows64 * stride_vn + offs_d[None, :] * stride_vd,
                 v_new.to(V.dtype.element_ty), mask=nd_mask)
        tl.debug_barrier()                          # the whole program sees them before the loop reads them

    lo64 = lo.to(tl.int64)
    k_ptrs = (K + b * stride_kb + kvh * stride_kh + (lo64 + offs_n[:, None]) * stride_kn
              + offs_d[None, :] * stride_kd)                              # (BLOCK_N, BLOCK_D)
    v_ptrs = (V + b * stride_vb + kvh * stride_vh + (lo64 + offs_n[:, None]) * stride_vn
              + offs_d[None, :] * stride_vd)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n                                             # (BLOCK_N,)
        n_mask = cols < hi
        k = tl.load(k_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale                                                # (BLOCK_M, BLOCK_N) log2 units
        valid = n_mask[None, :] & (cols[None, :] <= pos[:, None])
        if HAS_WINDOW:
            valid = valid & (cols[None, :] >= pos[:, None] - window_left)
        if HAS_LEFTPAD:
            valid = valid & (cols[None, :] >= first_key)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)             # fully masked row so far
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE_DOT:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)                           # p in the cache dtype, as FA2
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = (O + b * stride_ob + split * stride_os + t[:, None] * stride_ot + head[:, None] * stride_oh
              + offs_d[None, :])
    # an empty split (its key range past the sequence's end) writes only lse = -inf: the merge never reads
    # its partial. With one split the output is final and always written (0 for an empty sequence).
    keep = (hi > lo) | (split + num_splits == 1)                           # (split 0 of 1: final output)
    o_rows = rows < tl.where(keep, q_len * group, 0)      # a vector mask (the interpreter mis-types bool scalars)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_rows[:, None] & d_mask[None, :])
    tl.store(LSE + b * stride_lb + split * stride_ls + t * stride_lt + head, lse, mask=row_mask)


@triton.jit
def _decode_merge_kernel(
    O_PART, LSE_PART, OUT, LSE,                         # pointers
    q_len, num_splits,                                  # sizes
    stride_pb, stride_ps, stride_pt, stride_ph,         # O_PART (b, splits, q_len, h, d), d contiguous
    stride_lpb, stride_lps, stride_lpt,                 # LSE_PART (b, splits, q_len, h), h contiguous
    stride_ob, stride_ot, stride_oh,                    # OUT (b, q_len, h, d), d contiguous
    stride_lb, stride_lt,                               # LSE (b, q_len, h), h contiguous
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // q_len
    t = pid % q_len
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    lse_s = tl.load(LSE_PART + b * stride_lpb + s * stride_lps + t * stride_lpt + h, mask=s < num_splits,
                    other=float("-inf"))                                  # (BLOCK_S,)
    live = lse_s > float("-inf")                                          # empty splits: never loaded
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)                                            # 0 for empty splits
    denom = tl.sum(w, 0)
    o = tl.load(O_PART + b * stride_pb + s[:, None] * stride_ps + t * stride_pt + h * stride_ph + offs_d[None, :],
                mask=live[:, None] & d_mask[None, :], other=0.0)          # (BLOCK_S, BLOCK_D) fp32
    out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(OUT + b * stride_ob + t * stride_ot + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=d_mask)
    lse = tl.where(denom == 0.0, float("-inf"), m_safe + tl.log(tl.where(denom == 0.0, 1.0, denom)))
    tl.store(LSE + b * stride_lb + t * stride_lt + h, lse)


# ------------------------------------------------------------------------------------------ launchers
def check_inputs(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, window_size=(-1, -1)):
    """Validate decode_attention's arguments on the host (shapes, dtypes, devices; never tensor values,
    so this is cheap, sync-free and traceable). Raises TypeError/ValueError naming the argument."""
    check_tensor("q", q, FLOAT_DTYPES, ndim=4)
    check_tensor("k_cache", k_cache, FLOAT_DTYPES, ndim=4)
    check_tensor("v_cache", v_cache, FLOAT_DTYPES, ndim=4)
    check_tensor("cache_seqlens", cache_seqlens, (torch.int32,), ndim=1)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    b, q_len, h, d = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}; "
                         "they must match (batch, max_seqlen, heads_kv, head_dim)")
    kb, _, h_kv, kd = k_cache.shape
    if kb != b:
        raise ValueError(f"k_cache has batch {kb} but q has batch {b}; they must match")
    if kd != d:
        raise ValueError(f"k_cache has head_dim {kd} but q has head_dim {d}; they must match")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    if h_kv < 1 or h % h_kv != 0:
        raise ValueError(f"q's heads ({h}) must be a multiple of k_cache's heads_kv ({h_kv}) (GQA): not divisible")
    if not 1 <= q_len <= MAX_Q_LEN:
        raise ValueError(f"q's q_len (dim 1) must be in [1, {MAX_Q_LEN}] for decode attention, got {q_len}; "
                         "use flash_attention for longer chunks (prefill)")
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens has shape {tuple(cache_seqlens.shape)} but the batch is {b}; "
                         "it must be (batch,)")
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (left, right; -1 = unbounded), got {window_size!r}")


def check_seqlens_values(cache_seqlens: torch.Tensor, max_seqlen: int) -> None:
    """Raise ValueError if some cache_seqlens is < 0 or > max_seqlen: on the CPU (free), or on a GPU with
    LLAMA_TRITON_CHECK_SEQLENS=1 (syncs). The kernel itself clamps lengths to [0, max_seqlen], so it never
    reads out of bounds."""
    on_cpu = cache_seqlens.device.type == "cpu"
    if (not on_cpu and os.environ.get("LLAMA_TRITON_CHECK_SEQLENS", "0") != "1") or cache_seqlens.numel() == 0:
        return
    if on_cpu:
        with cpu_value_check():
            lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    else:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0 or hi > max_seqlen:
        raise ValueError(f"cache_seqlens must be in [0, max_seqlen={max_seqlen}] (k_cache dim 1), got values in "
                         f"[{lo}, {hi}]")


def _block_m(rows: int) -> int:
    return min(max(16, triton.next_power_of_2(rows)), MAX_BLOCK_M)


def split_config(head_dim: int, rows: int) -> dict:
    """Stage-1 meta-parameters for a head_dim and `rows = q_len * group` packed query rows.

    A fixed heuristic, not autotuning: an autotuner would pick the config on the first call's cache length
    (often a short prompt) for every later length, and its benchmarking must not run inside a CUDA graph
    capture. One small config on Triton's interpreter keeps CPU tests fast; the choice keys on the
    interpreter, not on the device, so that tests/lowering_check.py (CPU tensors, no interpreter) compiles
    the config a GPU runs.
    """
    block_m, block_d = _block_m(rows), max(16, triton.next_power_of_2(head_dim))
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=block_d, num_warps=4, num_stages=1)
    block_n = 64 if block_d <= 128 else 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=3 if block_d <= 128 else 2)


def choose_num_splits(batch: int, heads_kv: int, m_tiles: int, max_seqlen: int, block_n: int,
                      device: torch.device) -> int:
    """How many splits of the cache: enough stage-1 programs for ~WAVES per SM, never more splits than
    blocks in the buffer. Depends on shapes and the device only, never on the runtime lengths."""
    programs = batch * heads_kv * m_tiles
    target = WAVES * num_programs_hint(device)
    n_blocks = max(1, triton.cdiv(max_seqlen, block_n))
    return max(1, min(triton.cdiv(target, programs), n_blocks, MAX_SPLITS))


def check_append_inputs(q, k_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None):
    """Validate the append / rotary arguments of decode_attention_fwd (shapes, dtypes, devices only)."""
    b, q_len, _, d = q.shape
    want = (b, q_len, k_cache.shape[2], d)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, FLOAT_DTYPES, ndim=4)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (batch, q_len, heads_kv, head_dim) = {want}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    check_same_device(q=q, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is None:
        return
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        check_tensor(name, t, FLOAT_DTYPES, ndim=2)
        if t.shape[1] != d or t.shape[0] < k_cache.shape[1] or t.stride(1) != 1:
            raise ValueError(f"{name} must be a (n, head_dim={d}) table with n >= max_seqlen={k_cache.shape[1]} "
                             f"and a contiguous last dim, got shape {tuple(t.shape)} strides {t.stride()}")
    if rotary_sin.stride() != rotary_cos.stride() or rotary_cos.dtype != rotary_sin.dtype:
        raise ValueError("rotary_cos and rotary_sin must have the same dtype and strides")
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {d}")


def decode_attention_fwd(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, window_size=(-1, -1),
                         num_splits: int | None = None, k=None, v=None, rotary_cos=None, rotary_sin=None,
                         cache_leftpad=None):
    """q (b, q_len, h, d); k_cache/v_cache (b, max_seqlen, h_kv, d) any strides; cache_seqlens int32 (b,)
    -> out (b, q_len, h, d) contiguous in q's dtype, lse (b, h, q_len) fp32 (-inf for empty rows).

    `num_splits` forces the number of cache splits (tests); None picks it from the shapes and the device.
    With ``k``/``v`` ``(b, q_len, h_kv, d)`` (flash-attn's ``flash_attn_with_kvcache`` append): the cache
    holds ``cache_seqlens`` entries *before* this call; the kernel writes k/v at rows ``cache_seqlens[i] + t``
    (in place, in the cache's dtype) and attends over ``cache_seqlens[i] + q_len`` entries; cache_seqlens
    is not changed. ``rotary_cos``/``rotary_sin`` ``(n >= max_seqlen, d)`` tables (``layers.RotaryEmbedding
    .table``): q and the new k are rotated at their positions (HF ``rotate_half``, fp32 math, one rounding)
    in the same launch. ``cache_leftpad`` int32 ``(b,)`` (flash-attn's): sequence i's keys start at that
    index (a left-padded batch in a dense cache: the slots before it are never attended to).
    """
    check_inputs(q, k_cache, v_cache, cache_seqlens, softmax_scale, window_size)
    if cache_leftpad is not None:
        check_tensor("cache_leftpad", cache_leftpad, (torch.int32,), ndim=1)
        check_same_device(q=q, cache_leftpad=cache_leftpad)
        if cache_leftpad.shape[0] != q.shape[0]:
            raise ValueError(f"cache_leftpad has shape {tuple(cache_leftpad.shape)}; it must be (batch,)")
    b, q_len, h, d = q.shape
    max_seqlen, h_kv = k_cache.shape[1], k_cache.shape[2]
    append = k is not None or v is not None
    rotary = rotary_cos is not None or rotary_sin is not None
    if rotary and not append:
        raise ValueError("rotary_cos/rotary_sin need the new k and v (the append form)")
    if append:
        check_append_inputs(q, k_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)
        k, v = k if k.stride(-1) == 1 else k.contiguous(), v if v.stride(-1) == 1 else v.contiguous()
        if rotary and q.stride(-1) != 1:
            q = q.contiguous()
        if cache_seqlens.device.type == "cpu" and cache_seqlens.numel():
            with cpu_value_check():
                lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
            if lo < 0 or hi + q_len > max_seqlen:
                raise ValueError(f"cache_seqlens + q_len must be in [q_len, max_seqlen={max_seqlen}] for the append, "
                                 f"got cache_seqlens in [{lo}, {hi}] and q_len={q_len}")
    else:
        check_seqlens_values(cache_seqlens, max_seqlen)
    group = h // h_kv
    rows = q_len * group
    cfg = split_config(d, rows)
    m_tiles = triton.cdiv(rows, cfg["BLOCK_M"])
    if num_splits is None:
        num_splits = choose_num_splits(b, h_kv, m_tiles, max_seqlen, cfg["BLOCK_N"], q.device)
    if not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    scale = float(softmax_scale) if softmax_scale is not None else d ** -0.5
    window_left = window_size[0]

    out = torch.empty((b, q_len, h, d), dtype=q.dtype, device=q.device)
    if b == 0:
        return out, torch.empty((b, h, q_len), dtype=torch.float32, device=q.device)
    direct = num_splits == 1
    if direct:  # stage 1 writes the final output and lse
        o_part, lse_part = out.unsqueeze(1), torch.empty((b, 1, q_len, h), dtype=torch.float32, device=q.device)
    else:       # (b, splits, q_len, h, d) fp32 partials
        o_part = torch.empty((b, num_splits, q_len, h, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((b, num_splits, q_len, h), dtype=torch.float32, device=q.device)
    kn, vn = (k, v) if append else (q, q)                 # placeholders when not appending (never read)
    cos, sin = (rotary_cos, rotary_sin) if rotary else (q, q)
    leftpad = cache_leftpad if cache_leftpad is not None else cache_seqlens
    _decode_split_kernel[(b, h_kv * m_tiles, num_splits)](
        q, k_cache, v_cache, cache_seqlens, o_part, lse_part, kn, vn, cos, sin, leftpad,
        q_len, group, m_tiles, max_seqlen, max(window_left, 0),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), cache_seqlens.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        kn.stride(0), kn.stride(1), kn.stride(2), vn.stride(0), vn.stride(1), vn.stride(2),
        cos.stride(0) if rotary else 0, leftpad.stride(0),
        scale * math.log2(math.e),
        HEAD_DIM=d, HAS_WINDOW=window_left >= 0,
        IEEE_DOT=q.dtype == torch.float32, APPEND=append, ROTARY=rotary, HAS_LEFTPAD=cache_leftpad is not None,
        BLOCK_T=MAX_Q_LEN,
        **cfg,
    )
    if direct:
        return out, lse_part[:, 0].transpose(1, 2)
    lse = torch.empty((b, q_len, h), dtype=torch.float32, device=q.device)
    _decode_merge_kernel[(b * q_len, h)](
        o_part, lse_part, out, lse,
        q_len, num_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        HEAD_DIM=d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=cfg["BLOCK_D"],
        num_warps=4,
    )
    return out, lse.transpose(1, 2)


def describe_config(batch: int, q_len: int, heads: int, heads_kv: int, head_dim: int, max_seqlen: int,
                    device: torch.device) -> str:
    """The launch configuration decode_attention_fwd picks for these shapes (for benchmark output)."""
    rows = q_len * (heads // heads_kv)
    cfg = split_config(head_dim, rows)
    m_tiles = triton.cdiv(rows, cfg["BLOCK_M"])
    splits = choose_num_splits(batch, heads_kv, m_tiles, max_seqlen, cfg["BLOCK_N"], device)
    return (f"splits={splits} BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} BLOCK_D={cfg['BLOCK_D']} "
            f"warps={cfg['num_warps']} stages={cfg['num_stages']}")
