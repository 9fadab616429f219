"""Flash attention forward for Hopper (sm_90+): K/V/Q/O through tensor descriptors (TMA), same semantics as
kernels/flash_attention.py's portable forward (layout, GQA, bottom-right causal, sliding window, varlen,
softcap, lse), which it replaces on GPUs and Tritons that have `tl.make_tensor_descriptor`.

Each program builds 2-D descriptors over its own (sequence, head) slice, ``[seq_len, head_dim]`` with strides
``[stride_seq, 1]``: the descriptor's bounds do the masking (rows past the sequence load as zeros and are
not stored), so the same kernel serves dense batches and packed varlen sequences, and the inner loop holds
no pointer or bounds tensors (the portable kernel's pointer/mask state is what pushed it into spills).
Descriptors need a global scratch allocator (``triton.set_allocator``): the launcher installs a torch one
when none is set. Requirements (else the portable path runs): fp16/bf16, head_dim in {16, 32, 64, 128},
last-dim contiguous q/k/v, 16-byte aligned base pointers and strides.

No warp specialisation: Triton 3.9's Hopper warp-spec pass (`tl.range(..., warp_specialize=True)` on the
fully visible loop) fails on this kernel for sm_90 (an assertion in TaskIdPropagation with the early return;
"'scf.for' op operation destroyed but still has uses" without it, 128x64 w4), so it is not offered.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._checks import interpreting
from .flash_attention import LOG2E, _kv_range, _lse_strides, _seq_bounds, _seq_bucket, _softmax_step, _strides4

_DESC_HEAD_DIMS = (16, 32, 64, 128)


def available() -> bool:
    """This Triton has device-side tensor descriptors (3.4+: `tl.make_tensor_descriptor`)."""
    return hasattr(tl, "make_tensor_descriptor")


def supports(q, k, v) -> bool:
    """The descriptor forward can run these inputs (dtype, head_dim, contiguous last dim, 16-byte alignment)."""
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in _DESC_HEAD_DIMS:
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return False
    return True


def use_for(q, k, v) -> bool:
    """Selected by flash_attention.attention_fwd: a CUDA sm_90+ device, a Triton with descriptors, inputs it
    supports, and LLAMA_TRITON_FLASH_FWD not "portable" (the interpreter runs this kernel too, but only when
    a caller asks: tests force use_for)."""
    if os.environ.get("LLAMA_TRITON_FLASH_FWD", "auto") == "portable":
        return False
    if not (q.is_cuda and available() and supports(q, k, v)):
        return False
    return torch.cuda.get_device_capability(q.device)[0] >= 9


def _torch_alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")   # the launch runs under the tensors' device guard


def _ensure_allocator() -> None:
    """Device-side descriptors live in a per-launch global scratch buffer that Triton asks an allocator for;
    install a torch one unless one is set in this context (Triton keeps it in a ContextVar: per thread, so
    this is checked at every launch; through Triton's private state where it exists, else always set)."""
    try:
        from triton.runtime import _allocation
        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_torch_alloc)


def _configs():
    """BLOCK_M x BLOCK_N tiles; every one compiles spill-free for sm_90 (bf16/fp16, head_dim 64/128, static)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 4, 4),
                                 (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 2))]   # 128x64 w4 s3 spills (68/80)


def _prune(configs, named_args, **kwargs):
    d = {**named_args, **kwargs}["HEAD_DIM"]
    keep = [c for c in configs
            if 2 * d * (c.kwargs["BLOCK_M"] * 2 + 2 * c.kwargs["BLOCK_N"] * max(c.num_stages - 1, 1)) <= 200 * 1024]
    return keep or configs[-1:]


@triton.jit
def _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, rows_pos, k_len, lo, hi, qk_scale, softcap,
                   window_left, window_right, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        # -- compute qk (rows past k_len load as zeros; the mask phase drops them) --
        k = desc_k.load([start_n, 0])                                                     # (N, D)
        qk = tl.dot(q, k.T)                                                               # (M, N), raw scores
        # -- online softmax (exp2, qk_scale folded into the FMA with the running max) --
        p, alpha, m_i, l_i = _softmax_step(qk, m_i, l_i, rows_pos, start_n + offs_n, k_len, qk_scale, softcap,
                                           window_left, window_right, MASKED, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP)
        # -- acc = acc * alpha + p v --
        v = desc_v.load([start_n, 0])                                                     # (N, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_i


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "seq_bucket", "HAS_LEFT", "HAS_RIGHT", "IS_VARLEN", "HAS_SOFTCAP"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=("seqlen_q", "seqlen_k", "window_left", "window_right"))
def _attn_fwd_tma_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,                                # pointers
    seqlen_q, seqlen_k, group, seq_bucket,                      # sizes (dense lengths; heads per kv head)
    stride_qb, stride_qm, stride_qh,                            # last-dim strides are 1 (descriptors)
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,                                       # lse: (b, h, sq) or (h, total_q)
    qk_scale, softcap, window_left, window_right,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    q_base = b64 * stride_qb + q_start.to(tl.int64) * stride_qm + off_h.to(tl.int64) * stride_qh
    o_base = b64 * stride_ob + q_start.to(tl.int64) * stride_om + off_h.to(tl.int64) * stride_oh
    # -- 2-D descriptors over this (sequence, head): [len, HEAD_DIM], bounds = the sequence --
    kv_rows = tl.maximum(k_len, 1)                             # (an empty key sequence loads nothing)
    desc_q = tl.make_tensor_descriptor(Q + q_base, shape=[q_len, HEAD_DIM], strides=[stride_qm, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_o = tl.make_tensor_descriptor(O + o_base, shape=[q_len, HEAD_DIM], strides=[stride_om, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    desc_k = tl.make_tensor_descriptor(K + b64 * stride_kb + k_start.to(tl.int64) * stride_kn
                                       + off_hk.to(tl.int64) * stride_kh, shape=[kv_rows, HEAD_DIM],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    desc_v = tl.make_tensor_descriptor(V + b64 * stride_vb + k_start.to(tl.int64) * stride_vn
                                       + off_hk.to(tl.int64) * stride_vh, shape=[kv_rows, HEAD_DIM],
                                       strides=[stride_vn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    offs_m = tl.arange(0, BLOCK_M)
    q = desc_q.load([m0, 0])                                   # (M, D)
    rows_pos = m0 + offs_m + (k_len - q_len)                   # key position of each query (bottom right)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _kv_range(m0, q_len, k_len, window_left, window_right,
                                         HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, rows_pos, k_len, lo, full_lo, qk_scale, softcap,
                                   window_left, window_right, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N)
    acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, rows_pos, k_len, full_lo, full_hi, qk_scale,
                                   softcap, window_left, window_right, False, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N)
    acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, rows_pos, k_len, full_hi, hi, qk_scale, softcap,
                                   window_left, window_right, True, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N)

    empty = l_i == 0.0                                          # nothing visible: out 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    desc_o.store([m0, 0], out.to(O.dtype.element_ty))          # rows past q_len are not written
    LSE += b64 * stride_lb + off_h.to(tl.int64) * stride_lh + q_start.to(tl.int64) + m0
    tl.store(LSE + offs_m, lse, mask=(m0 + offs_m) < q_len)


def launch_fwd(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
               softmax_scale: float, window_left: int, window_right: int, softcap: float = 0.0) -> None:
    """Fills out/lse like flash_attention.attention_fwd's portable launch, through tensor descriptors. Called by
    attention_fwd (which validated, allocated out (q's shape) and lse, and made softmax_scale >= 0) when
    `use_for(q, k, v)`."""
    varlen = cu_seqlens_q is not None
    heads, head_dim, heads_kv = q.shape[-2], q.shape[-1], k.shape[-2]
    n_seqs = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
    if q.is_cuda:
        _ensure_allocator()
    seqlen_q, seqlen_k = (0, 0) if varlen else (q.shape[1], k.shape[1])
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), heads, n_seqs)  # noqa: E731
    _attn_fwd_tma_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q if varlen else q, cu_seqlens_k if varlen else q,
        seqlen_q, seqlen_k, heads // heads_kv, _seq_bucket(max(max_seqlen_q, max_seqlen_k)),
        *_strides4(q, varlen)[:3], *_strides4(k, varlen)[:3], *_strides4(v, varlen)[:3], *_strides4(out, varlen)[:3],
        *_lse_strides(q, varlen),
        float(softmax_scale) * LOG2E, float(softcap) * LOG2E, window_left, window_right,
        IS_VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0,
        HEAD_DIM=head_dim,
    )
