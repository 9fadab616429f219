"""One OpSpec per op. The generic parity test (tests/test_registry.py), `llama-triton verify` and the
benchmark runner (llama_triton/bench.py) iterate over REGISTRY, so a new op is tested, verified and
benchmarked by adding one entry here.

Shapes are dicts (e.g. ``{"rows": 17, "hidden": 4095}``): ``test_shapes`` are small enough for the CPU
interpreter, ``bench_shapes`` are the GPU benchmark sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference
from .ops.rms_norm import rms_norm
from .ops.cross_entropy import cross_entropy, fused_linear_cross_entropy
from .ops.rms_norm_matmul import rms_norm_matmul
from .ops.rope import apply_rotary_pos_emb
from .ops.swiglu import swiglu
from .ops.decode_attention import decode_attention


@dataclass(frozen=True)
class OpSpec:
    name: str
    fn: Callable                       # public op (dispatches to the Triton kernel where it can run)
    reference: Callable                # llama_triton.reference function with the same signature
    make_inputs: Callable              # (shape: dict, dtype, device) -> tuple of positional args
    flops: Callable                    # (shape) -> FLOPs of one forward call (0 for memory-bound ops)
    bytes: Callable                    # (shape, dtype, mode: "fwd" | "bwd") -> bytes moved at minimum
    test_shapes: list = field(default_factory=list)
    bench_shapes: list = field(default_factory=list)
    grad_inputs: tuple = ()            # indices of args that get gradients (empty: forward-only op)
    description: str = ""
    config: Callable | None = None     # (shape, dtype) -> str: kernel config used (the autotuned choice)

    @staticmethod
    def label(shape: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in shape.items())


def _elt(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------- RMSNorm
def _rms_inputs(shape, dtype, device, residual=False):
    rows, hidden = shape["rows"], shape["hidden"]
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    w = (1 + 0.1 * torch.randn(hidden, dtype=torch.float32, device=device)).to(dtype)
    if residual:
        return x, torch.randn(rows, hidden, dtype=dtype, device=device), w
    return x, w


def _rms_bytes(n_tensors_fwd, n_tensors_bwd):
    def f(shape, dtype, mode):
        n = n_tensors_fwd if mode == "fwd" else n_tensors_bwd
        return n * shape["rows"] * shape["hidden"] * _elt(dtype) + shape["hidden"] * _elt(dtype)
    return f


_RMS_TEST_SHAPES = [
    {"rows": 1, "hidden": 1}, {"rows": 3, "hidden": 5}, {"rows": 17, "hidden": 127},
    {"rows": 4, "hidden": 4095}, {"rows": 2, "hidden": 16384},
]
_RMS_BENCH_SHAPES = [{"rows": r, "hidden": h} for h in (4096, 8192) for r in (4096, 8192, 16384, 32768)] + \
    [{"rows": r, "hidden": 4096} for r in (1, 16, 64)]       # decode-sized: timed from a CUDA graph (bench.py)

REGISTRY: list[OpSpec] = [
    OpSpec(
        name="rms_norm",
        fn=lambda x, w: rms_norm(x, w, 1e-6),
        reference=lambda x, w: reference.rms_norm(x, w, 1e-6),
        make_inputs=_rms_inputs,
        flops=lambda s: 0,
        bytes=_rms_bytes(2, 3),  # fwd: read x, write y; bwd: read dy, x, write dx
        test_shapes=_RMS_TEST_SHAPES,
        bench_shapes=_RMS_BENCH_SHAPES,
        grad_inputs=(0, 1),
        description="HF LlamaRMSNorm",
    ),
    OpSpec(
        name="add_rms_norm",
        fn=lambda x, r, w: rms_norm(x, w, 1e-6, residual=r),
        reference=lambda x, r, w: reference.rms_norm(x, w, 1e-6, residual=r),
        make_inputs=lambda s, d, dev: _rms_inputs(s, d, dev, residual=True),
        flops=lambda s: 0,
        bytes=_rms_bytes(4, 4),  # fwd: read x, r, write y, r+x; bwd: read dy, s, dres, write dx
        test_shapes=_RMS_TEST_SHAPES,
        bench_shapes=_RMS_BENCH_SHAPES,
        grad_inputs=(0, 1, 2),
        description="residual add fused with RMSNorm",
    ),
    OpSpec(
        name="rms_norm_gemma",
        fn=lambda x, w: rms_norm(x, w, 1e-6, offset=1.0, casting_mode="gemma"),
        reference=lambda x, w: reference.rms_norm(x, w, 1e-6, offset=1.0, casting_mode="gemma"),
        make_inputs=_rms_inputs,
        flops=lambda s: 0,
        bytes=_rms_bytes(2, 3),
        test_shapes=[{"rows": 17, "hidden": 127}, {"rows": 2, "hidden": 16384}],
        bench_shapes=_RMS_BENCH_SHAPES[:2],
        grad_inputs=(0, 1),
        description="HF GemmaRMSNorm: (1 + w), product in fp32 (Liger offset=1, casting_mode='gemma')",
    ),
]


# ------------------------------------------------------------------------------ decode attention (issue 5)
def _decode_inputs(shape, dtype, device):
    """q (b, q_len, h, d), k/v caches (b, max_seqlen, h_kv, d), cache_seqlens int32 (b,): every sequence at
    shape["seqlen"] when given (benchmarks), else ragged random lengths in [0, max_seqlen], the last full."""
    b, q_len, h, h_kv, d, n = (shape[k] for k in ("batch", "q_len", "heads", "heads_kv", "head_dim", "max_seqlen"))
    q = torch.randn(b, q_len, h, d, dtype=dtype, device=device)
    k = torch.randn(b, n, h_kv, d, dtype=dtype, device=device)
    v = torch.randn(b, n, h_kv, d, dtype=dtype, device=device)
    if "seqlen" in shape:
        seqlens = torch.full((b,), shape["seqlen"], dtype=torch.int32)
    else:
        seqlens = torch.randint(0, n + 1, (b,), dtype=torch.int32)
        seqlens[-1] = n
    return q, k, v, seqlens.to(device)


def _decode_bytes(shape, dtype, mode):
    """K and V entries read (the valid prefix; max_seqlen for ragged shapes), plus q and out."""
    b, q_len, h, h_kv, d = (shape[k] for k in ("batch", "q_len", "heads", "heads_kv", "head_dim"))
    n = shape.get("seqlen", shape["max_seqlen"])
    return (2 * b * n * h_kv * d + 2 * b * q_len * h * d) * _elt(dtype)


def _decode_config(shape, dtype):
    from .kernels.decode_attention import describe_config

    return describe_config(*(shape[k] for k in ("batch", "q_len", "heads", "heads_kv", "head_dim", "max_seqlen")),
                           torch.device("cuda"))


def _decode_shape(batch, q_len, heads, heads_kv, head_dim, max_seqlen, seqlen=None):
    s = {"batch": batch, "q_len": q_len, "heads": heads, "heads_kv": heads_kv, "head_dim": head_dim,
         "max_seqlen": max_seqlen}
    return s if seqlen is None else {**s, "seqlen": seqlen}


REGISTRY.append(OpSpec(
    name="decode_attention",
    fn=lambda q, k, v, s: decode_attention(q, k, v, s),
    reference=lambda q, k, v, s: reference.decode_attention(q, k, v, s),
    make_inputs=_decode_inputs,
    flops=lambda s: 0,  # memory-bound: the roofline is copy bandwidth
    bytes=_decode_bytes,
    test_shapes=[_decode_shape(3, 1, 8, 2, 64, 40), _decode_shape(2, 4, 8, 1, 32, 129),
                 _decode_shape(1, 1, 4, 4, 128, 17)],
    bench_shapes=[_decode_shape(b, 1, 32, 8, 128, n, n) for b in (1, 8, 64) for n in (1024, 8192)]
    + [_decode_shape(b, 1, 32, 8, 128, 32768, 32768) for b in (1, 8)],
    description="split-K decode attention over a KV cache (GQA packed, ragged lengths)",
    config=_decode_config,
))


# ------------------------------------------------------------------------------ quantized matmul (issue 7)
def _quant_inputs(bits, sym):
    def make(shape, dtype, device):
        """x (M, K) in dtype; an RTN-quantized random weight (N, K) with scales in dtype."""
        from .quant import quantize_weight

        x = torch.randn(shape["M"], shape["K"], dtype=dtype, device=device)
        w = (torch.randn(shape["N"], shape["K"], device=device) * shape["K"] ** -0.5).to(dtype)
        return x, quantize_weight(w, bits=bits, group_size=shape["group"], sym=sym)
    return make


def _quant_bytes(bits, sym):
    def f(shape, dtype, mode):
        """Weight codes + scales (+ zero points) + x + y: what one call must move at least."""
        M, K, N = shape["M"], shape["K"], shape["N"]
        G = K // shape["group"] if shape["group"] != -1 else 1
        zero_bytes = 0 if sym else G * N * (1 if bits == 4 else 2)
        return K * N * bits // 8 + G * N * _elt(dtype) + zero_bytes + (M * K + M * N) * _elt(dtype)
    return f


def _quant_flops(shape):
    """2MNK for prefill shapes; 0 for decode (M <= 16) so that `bench` reports % of copy bandwidth there."""
    return 2 * shape["M"] * shape["N"] * shape["K"] if shape["M"] > 16 else 0


def _quant_config(bits, sym):
    def f(shape, dtype):
        """The config the autotuner chose for this shape's key (race-free lookup; "" before the first call)."""
        from .kernels.quant_gemm import chosen_config

        K = shape["K"]
        return chosen_config(shape["M"], shape["N"], K, bits, shape["group"] if shape["group"] != -1 else K, not sym)
    return f


def _qshape(M, K, N, group):
    return {"M": M, "K": K, "N": N, "group": group}


def _quant_matmul_fn(x, qw):
    from .ops.quant_matmul import quant_matmul

    return quant_matmul(x, qw)


_QUANT_BENCH_KN = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # Llama-3-8B projections
for _bits, _sym, _group in ((4, False, 128), (8, True, -1)):
    REGISTRY.append(OpSpec(
        name=f"quant_matmul_w{_bits}",
        fn=_quant_matmul_fn,
        reference=reference.quant_matmul,
        make_inputs=_quant_inputs(_bits, _sym),
        flops=_quant_flops,
        bytes=_quant_bytes(_bits, _sym),
        test_shapes=[_qshape(m, 256, 96, 64 if _group != -1 else -1) for m in (1, 3, 16, 17, 128)],
        bench_shapes=[_qshape(m, k, n, _group) for (k, n) in _QUANT_BENCH_KN for m in (1, 16, 1024)],
        description=(f"W{_bits}A16 " + ("group-wise g128 with zero points" if _group != -1 else "per-channel symmetric")
                     + " weight-only quantized matmul (GEMV / decode mma, split-K in the launch / prefill tiled)"),
        config=_quant_config(_bits, _sym),
    ))


# ---------------------------------------------------------------------- rotary embeddings (issue 6)
def _rope_inputs(shape, dtype, device):
    """q (b, h, s, d) and k (b, h_kv, s, d) as HF's transposed views of one (b, s, h + 2 h_kv, d) qkv
    projection, and LLaMA-3 cos/sin tables (b, s, d)."""
    b, s, h, hk, d = (shape[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim"))
    qkv = torch.randn(b, s, h + 2 * hk, d, dtype=dtype, device=device)
    inv = 1.0 / 500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    emb = torch.arange(s, device=device, dtype=torch.float32)[:, None] * inv
    emb = torch.cat((emb, emb), -1).expand(b, s, d)
    return qkv[:, :, :h].transpose(1, 2), qkv[:, :, h:h + hk].transpose(1, 2), emb.cos().to(dtype), emb.sin().to(dtype)


def _rope_bytes(shape, dtype, mode):
    """Read and write q and k once (cos/sin are re-read per position: counted once)."""
    b, s, h, hk, d = (shape[k] for k in ("batch", "seq", "heads", "kv_heads", "head_dim"))
    return (2 * b * s * (h + hk) * d + 2 * b * s * d) * _elt(dtype)


def _rope_shape(batch, seq, heads, kv_heads, head_dim):
    return {"batch": batch, "seq": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}


REGISTRY.append(OpSpec(
    name="rope",
    fn=lambda q, k, c, s: apply_rotary_pos_emb(q, k, c, s),
    reference=lambda q, k, c, s: reference.apply_rotary_pos_emb(q, k, c, s),
    make_inputs=_rope_inputs,
    flops=lambda s: 0,
    bytes=_rope_bytes,
    test_shapes=[_rope_shape(1, 1, 1, 1, 2), _rope_shape(2, 17, 4, 1, 64), _rope_shape(1, 33, 8, 2, 128)],
    bench_shapes=[_rope_shape(b, s, 32, 8, 128) for b, s in ((1, 8192), (2, 8192), (4, 8192), (1, 32768))],
    grad_inputs=(0, 1),
    description="HF apply_rotary_pos_emb on q and k in one launch (GQA, strided q/k)",
))


# -------------------------------------------------------------------------------------- SwiGLU (issue 6)
def _swiglu_inputs(packed):
    def make(shape, dtype, device):
        g = torch.randn(shape["rows"], 2 * shape["inter"] if packed else shape["inter"], dtype=dtype, device=device)
        return (g,) if packed else (g, torch.randn_like(g))
    return make


def _swiglu_bytes(shape, dtype, mode):
    """fwd: read gate, up, write out; bwd: read dy, gate, up, write dgate, dup."""
    return (3 if mode == "fwd" else 5) * shape["rows"] * shape["inter"] * _elt(dtype)


_SWIGLU_TEST_SHAPES = [{"rows": 1, "inter": 1}, {"rows": 17, "inter": 129}, {"rows": 3, "inter": 1000}]
_SWIGLU_BENCH_SHAPES = [{"rows": r, "inter": i} for i in (14336,) for r in (8192, 16384, 32768)]

REGISTRY.append(OpSpec(
    name="swiglu",
    fn=lambda g, u: swiglu(g, u),
    reference=lambda g, u: reference.swiglu(g, u),
    make_inputs=_swiglu_inputs(False),
    flops=lambda s: 0,
    bytes=_swiglu_bytes,
    test_shapes=_SWIGLU_TEST_SHAPES,
    bench_shapes=_SWIGLU_BENCH_SHAPES,
    grad_inputs=(0, 1),
    description="silu(gate) * up (HF LlamaMLP activation)",
))
REGISTRY.append(OpSpec(
    name="swiglu_packed",
    fn=lambda gu: swiglu(gu),
    reference=lambda gu: reference.swiglu(gu),
    make_inputs=_swiglu_inputs(True),
    flops=lambda s: 0,
    bytes=_swiglu_bytes,
    test_shapes=_SWIGLU_TEST_SHAPES,
    bench_shapes=_SWIGLU_BENCH_SHAPES,
    grad_inputs=(0,),
    description="SwiGLU on a concatenated gate_up (..., 2I) projection",
))


# ------------------------------------------------------------------------ cross-entropy (issue 6)
def _labels(n, vocab, device):
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[torch.rand(n, device=device) < 0.2] = -100                     # some ignored tokens
    return labels


def _ce_inputs(shape, dtype, device):
    logits = 2 * torch.randn(shape["rows"], shape["vocab"], dtype=torch.float32, device=device)
    return logits.to(dtype), _labels(shape["rows"], shape["vocab"], device)


def _flce_inputs(shape, dtype, device):
    t, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
    hidden = torch.randn(t, h, dtype=dtype, device=device)
    weight = (torch.randn(v, h, dtype=torch.float32, device=device) * h ** -0.5).to(dtype)
    return hidden, weight, _labels(t, v, device)


REGISTRY.append(OpSpec(
    name="cross_entropy",
    fn=lambda x, y: cross_entropy(x, y),
    reference=lambda x, y: reference.cross_entropy(x, y),
    make_inputs=_ce_inputs,
    flops=lambda s: 0,
    # fwd (with grad, as in training): read the logits twice, write dlogits; bwd: read and write dlogits
    bytes=lambda s, dt, mode: (3 if mode == "fwd" else 2) * s["rows"] * s["vocab"] * _elt(dt),
    test_shapes=[{"rows": 1, "vocab": 1}, {"rows": 17, "vocab": 1000}, {"rows": 4, "vocab": 32000}],
    bench_shapes=[{"rows": r, "vocab": v} for v in (32000, 128256) for r in (4096, 8192)],
    grad_inputs=(0,),
    description="token cross-entropy, online softmax over vocab blocks, grad computed in the forward",
))
REGISTRY.append(OpSpec(
    name="fused_linear_cross_entropy",
    fn=lambda h, w, y: fused_linear_cross_entropy(h, w, y),
    reference=lambda h, w, y: reference.fused_linear_cross_entropy(h, w, y),
    make_inputs=_flce_inputs,
    flops=lambda s: 6 * s["tokens"] * s["hidden"] * s["vocab"],  # logits + both gradients, all in the forward
    bytes=lambda s, dt, mode: (s["vocab"] * s["hidden"] * 2 + s["tokens"] * s["hidden"] * 2) * _elt(dt),
    test_shapes=[{"tokens": 5, "hidden": 33, "vocab": 129}, {"tokens": 17, "hidden": 64, "vocab": 1000}],
    bench_shapes=[{"tokens": 8192, "hidden": 4096, "vocab": 128256}, {"tokens": 4096, "hidden": 4096, "vocab": 32000}],
    grad_inputs=(0, 1),
    description="lm_head matmul + cross-entropy in token chunks, never materialising (tokens, vocab) logits",
))


def _flce_options_inputs(shape, dtype, device):
    hidden, weight, labels = _flce_inputs(shape, dtype, device)
    bias = (0.1 * torch.randn(shape["vocab"], device=device)).to(dtype)
    class_weight = (0.5 + torch.rand(shape["vocab"], device=device)).to(dtype)
    return hidden, weight, bias, labels, class_weight


_FLCE_OPTIONS = dict(label_smoothing=0.1, lse_square_scale=1e-4, softcap=30.0)   # Gemma-2's final-logit cap
REGISTRY.append(OpSpec(
    name="fused_linear_cross_entropy_options",
    fn=lambda h, w, b, y, cw: fused_linear_cross_entropy(h, w, y, bias=b, ce_weight=cw, **_FLCE_OPTIONS),
    reference=lambda h, w, b, y, cw: reference.fused_linear_cross_entropy(h, w, y, bias=b, ce_weight=cw,
                                                                          **_FLCE_OPTIONS),
    make_inputs=_flce_options_inputs,
    flops=lambda s: 6 * s["tokens"] * s["hidden"] * s["vocab"],
    bytes=lambda s, dt, mode: (s["vocab"] * s["hidden"] * 2 + s["tokens"] * s["hidden"] * 2) * _elt(dt),
    test_shapes=[{"tokens": 17, "hidden": 64, "vocab": 1000}],
    bench_shapes=[{"tokens": 8192, "hidden": 4096, "vocab": 128256}],
    grad_inputs=(0, 1, 2),
    description="FLCE with Liger's options: lm_head bias, class weights, label smoothing 0.1, z-loss 1e-4, "
                "softcap 30",
))


# ------------------------------------------------------------------------ RMSNorm + matmul (issue 6)
def _rmm_inputs(residual):
    def make(shape, dtype, device):
        m, k, n = shape["rows"], shape["hidden"], shape["out"]
        x = torch.randn(m, k, dtype=dtype, device=device)
        nw = (1 + 0.1 * torch.randn(k, device=device)).to(dtype)
        w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
        return (x, torch.randn(m, k, dtype=dtype, device=device), nw, w) if residual else (x, nw, w)
    return make


def _rmm_bytes(shape, dtype, mode):
    m, k, n = shape["rows"], shape["hidden"], shape["out"]
    return (m * k + n * k + m * n) * _elt(dtype) * (1 if mode == "fwd" else 2)


def _rmm_config(shape, dtype):
    from .kernels.rms_norm_matmul import describe_config

    return describe_config(shape["rows"], shape["out"], shape["hidden"])


_RMM_TEST_SHAPES = [{"rows": 1, "hidden": 1, "out": 1}, {"rows": 17, "hidden": 129, "out": 40},
                    {"rows": 5, "hidden": 4095, "out": 33}]
_RMM_BENCH_SHAPES = [{"rows": m, "hidden": 4096, "out": n} for n in (6144, 28672) for m in (1, 16, 256, 2048, 8192)]

REGISTRY.append(OpSpec(
    name="rms_norm_matmul",
    fn=lambda x, nw, w: rms_norm_matmul(x, nw, w, 1e-6),
    reference=lambda x, nw, w: reference.rms_norm_matmul(x, nw, w, 1e-6),
    make_inputs=_rmm_inputs(False),
    flops=lambda s: 2 * s["rows"] * s["hidden"] * s["out"],
    bytes=_rmm_bytes,
    test_shapes=_RMM_TEST_SHAPES,
    bench_shapes=_RMM_BENCH_SHAPES,
    grad_inputs=(0, 1, 2),
    description="RMSNorm fused into the following GEMM (q/k/v or gate/up), Llama-3-8B shapes",
    config=_rmm_config,
))
REGISTRY.append(OpSpec(
    name="add_rms_norm_matmul",
    fn=lambda x, r, nw, w: rms_norm_matmul(x, nw, w, 1e-6, residual=r),
    reference=lambda x, r, nw, w: reference.rms_norm_matmul(x, nw, w, 1e-6, residual=r),
    make_inputs=_rmm_inputs(True),
    flops=lambda s: 2 * s["rows"] * s["hidden"] * s["out"],
    bytes=_rmm_bytes,
    test_shapes=_RMM_TEST_SHAPES[1:],
    bench_shapes=[s for s in _RMM_BENCH_SHAPES if s["out"] == 6144],
    grad_inputs=(0, 1, 2, 3),
    description="residual add + RMSNorm fused into the following GEMM",
    config=_rmm_config,
))


# ------------------------------------------------------------------------------- flash attention (issue 4)
def _fa_inputs(shape, dtype, device):
    """q (b, s, h, d), k/v (b, s, h_kv, d)."""
    b, s, h, hk, d = (shape[k] for k in ("batch", "seqlen", "heads", "heads_kv", "head_dim"))
    return (torch.randn(b, s, h, d, dtype=dtype, device=device), torch.randn(b, s, hk, d, dtype=dtype, device=device),
            torch.randn(b, s, hk, d, dtype=dtype, device=device))


def _fa_flops(causal):
    def f(shape):
        """4 * b * h * s * s * d (QK^T and PV), halved when causal; `bench` takes 2.5x for the backward."""
        b, s, h, d = (shape[k] for k in ("batch", "seqlen", "heads", "head_dim"))
        return 4 * b * h * s * s * d // (2 if causal else 1)
    return f


def _fa_bytes(shape, dtype, mode):
    """fwd: read q, k, v, write out; bwd: read q, k, v, out, dout, write dq, dk, dv."""
    b, s, h, hk, d = (shape[k] for k in ("batch", "seqlen", "heads", "heads_kv", "head_dim"))
    q, kv = b * s * h * d, b * s * hk * d
    return ((2 * q + 2 * kv) if mode == "fwd" else (4 * q + 4 * kv)) * _elt(dtype)


def _fa_config(shape, dtype):
    from .kernels.flash_attention import chosen_configs

    return chosen_configs()


def _fa_shape(batch, seqlen, heads, heads_kv, head_dim):
    return {"batch": batch, "seqlen": seqlen, "heads": heads, "heads_kv": heads_kv, "head_dim": head_dim}


_FA_SOFTCAP = 50.0   # Gemma-2's attn_logit_softcapping


def _softcap_attention(q, k, v):
    from .ops.flash_attention import flash_attention

    return flash_attention(q, k, v, causal=True, softcap=_FA_SOFTCAP)


def _flash_attention(causal):
    def fn(q, k, v):
        from .ops.flash_attention import flash_attention

        return flash_attention(q, k, v, causal=causal)
    return fn


# bf16, head_dim 128, batch * seqlen = 16k; the eager reference materialises (b, h, s, s) fp32 scores, so the
# registry sweep stops at 4k: benchmarks/bench_attention.py runs 512..16k against SDPA
_FA_BENCH_SHAPES = [_fa_shape(16384 // s, s, 16, 16, 128) for s in (512, 1024, 2048, 4096)]
for _name, _causal in (("flash_attention", True), ("flash_attention_noncausal", False)):
    REGISTRY.append(OpSpec(
        name=_name,
        fn=_flash_attention(_causal),
        reference=lambda q, k, v, _c=_causal: reference.attention(q, k, v, causal=_c),
        make_inputs=_fa_inputs,
        flops=_fa_flops(_causal),
        bytes=_fa_bytes,
        test_shapes=[_fa_shape(2, 17, 4, 1, 32), _fa_shape(1, 65, 2, 2, 64), _fa_shape(1, 1, 2, 1, 16)],
        bench_shapes=_FA_BENCH_SHAPES,
        grad_inputs=(0, 1, 2),
        description=f"flash attention fwd/bwd ({'causal' if _causal else 'non-causal'}, GQA, flash-attn layout)",
        config=_fa_config,
    ))
REGISTRY.append(OpSpec(
    name="flash_attention_softcap",
    fn=_softcap_attention,
    reference=lambda q, k, v: reference.attention(q, k, v, causal=True, softcap=_FA_SOFTCAP),
    make_inputs=_fa_inputs,
    flops=_fa_flops(True),
    bytes=_fa_bytes,
    test_shapes=[_fa_shape(2, 17, 4, 1, 32)],
    bench_shapes=_FA_BENCH_SHAPES[:2],
    grad_inputs=(0, 1, 2),
    description="causal flash attention with Gemma-2's score soft-capping (softcap=50)",
    config=_fa_config,
))


# ------------------------------------------------------------------------------- low-rank matmul (issue 18)
def _low_rank_inputs(shape, dtype, device):
    """x (M, K), a (r, K), b (N, r): factors scaled so that y has O(1) entries."""
    M, K, N, r = shape["M"], shape["K"], shape["N"], shape["rank"]
    x = torch.randn(M, K, dtype=dtype, device=device)
    a = (torch.randn(r, K, device=device) * K ** -0.5).to(dtype)
    b = (torch.randn(N, r, device=device) * r ** -0.5).to(dtype)
    return x, a, b


def _low_rank_fn(x, a, b):
    from .ops.low_rank import low_rank_matmul

    return low_rank_matmul(x, a, b)


def _low_rank_config(shape, dtype):
    from .kernels.low_rank import chosen_config

    return chosen_config()


REGISTRY.append(OpSpec(
    name="low_rank_matmul",
    fn=_low_rank_fn,
    reference=reference.low_rank_matmul,
    make_inputs=_low_rank_inputs,
    flops=lambda s: 2 * s["M"] * s["rank"] * (s["K"] + s["N"]) if s["M"] > 16 else 0,  # decode: % of bandwidth
    bytes=lambda s, dt, mode: (s["rank"] * (s["K"] + s["N"]) + s["M"] * (s["K"] + s["N"])) * _elt(dt),
    # M in {1, 3, 16, 17, 128}, odd ranks (one below, one above a BLOCK_R chunk), N/K not tile multiples
    test_shapes=[{"M": 1, "K": 48, "N": 40, "rank": 5}, {"M": 3, "K": 64, "N": 33, "rank": 13},
                 {"M": 16, "K": 40, "N": 72, "rank": 17}, {"M": 17, "K": 96, "N": 50, "rank": 33},
                 {"M": 128, "K": 64, "N": 48, "rank": 7}],
    bench_shapes=[{"M": m, "K": 4096, "N": n, "rank": r} for n in (4096, 14336) for r in (256, 1024)
                  for m in (1, 16, 1024)],
    grad_inputs=(0, 1, 2),
    description="(x @ A.T) @ B.T in one launch, rank-r intermediate on chip (low-rank linear, decode)",
    config=_low_rank_config,
))


# ---------------------------------------------------------------------------- mixture of experts (issue 17)
def _moe_inputs(shape, dtype, device):
    """x (T, H), gate_up_proj (E, 2I, H), down_proj (E, H, I) in dtype; Mixtral routing of random logits:
    topk_ids (T, top_k) int64, fp32 topk_weights (T, top_k). With shape["skew"], every token's first choice is
    expert 0 (one overloaded expert, some experts left without tokens). Routed by the torch reference (the
    inputs of the op under test)."""
    t, h, e, i, k = (shape[n] for n in ("tokens", "hidden", "experts", "inter", "top_k"))
    x = torch.randn(t, h, dtype=dtype, device=device)
    gate_up = (torch.randn(e, 2 * i, h, device=device) * h ** -0.5).to(dtype)
    down = (torch.randn(e, h, i, device=device) * i ** -0.5).to(dtype)
    logits = torch.randn(t, e, device=device)
    if shape.get("skew"):
        logits[:, 0] += 20.0
    weights, ids = reference.moe_route(logits, k)
    return x, gate_up, down, ids, weights


def _moe_fn(x, gate_up, down, ids, weights):
    from .ops.moe import moe_experts

    return moe_experts(x, gate_up, down, ids, weights)


def _moe_shape(tokens, hidden, experts, inter, top_k, skew=False):
    s = {"tokens": tokens, "hidden": hidden, "experts": experts, "inter": inter, "top_k": top_k}
    return {**s, "skew": True} if skew else s


def _moe_bytes(shape, dtype, mode):
    """The weights of the experts that can be selected (min(E, T * top_k)) read once, x and out."""
    t, h, e, i, k = (shape[n] for n in ("tokens", "hidden", "experts", "inter", "top_k"))
    return (3 * h * i * min(e, t * k) + 2 * t * h) * _elt(dtype)


def _moe_config(shape, dtype):
    from .kernels.moe import chosen_configs

    return chosen_configs()


REGISTRY.append(OpSpec(
    name="moe_experts",
    fn=_moe_fn,
    reference=reference.moe_experts,
    make_inputs=_moe_inputs,
    # 2 * T * top_k * 3 * H * I for prefill; 0 at decode sizes so that `bench` reports % of copy bandwidth
    flops=lambda s: 6 * s["tokens"] * s["top_k"] * s["hidden"] * s["inter"] if s["tokens"] > 16 else 0,
    bytes=_moe_bytes,
    # 1 token top-1; 7 tokens top-2 of 4; 40 tokens top-2 of 8 with every token on expert 0 (empty experts);
    # the last (one expert, the fewest rows with > 256 per expert) makes the sm_90 lowering check (middle and
    # last shape) compile the decode tiles (BLOCK_M 16) and the largest prefill tiles (BLOCK_M 128)
    test_shapes=[_moe_shape(1, 32, 4, 16, 1), _moe_shape(7, 48, 4, 40, 2), _moe_shape(40, 32, 8, 24, 2, skew=True),
                 _moe_shape(257, 32, 1, 16, 1)],
    bench_shapes=[_moe_shape(t, 4096, 8, 14336, 2) for t in (1, 16, 512, 4096)]        # Mixtral-8x7B experts
    + [_moe_shape(t, 2048, 128, 768, 8) for t in (1, 16, 512, 4096)],                  # Qwen3-30B-A3B experts
    grad_inputs=(0, 1, 2, 4),
    description="grouped SwiGLU experts (sorted by expert on the device, one launch per projection, top-k combine)",
    config=_moe_config,
))


def _route_inputs(shape, dtype, device):
    """Router logits with distinct values in each row (a random permutation of an even grid over [-4, 4),
    exact in fp16/bf16), so that the top-k set and order are unambiguous (ties are not)."""
    t, e = shape["tokens"], shape["experts"]
    perm = torch.argsort(torch.rand(t, e, device=device), dim=-1)
    return ((perm.float() * (8.0 / e) - 4.0).to(dtype),)


def _route_fn(renormalize, top_k):
    def fn(logits):
        from .ops.moe import route

        return route(logits, top_k, renormalize)
    return fn


# Mixtral (8 experts top-2, renormalised) and Qwen3-30B-A3B-like (128 experts top-8, norm_topk_prob off)
for _renorm, _e, _k in ((True, 8, 2), (False, 128, 8)):
    REGISTRY.append(OpSpec(
        name=f"moe_route_e{_e}_k{_k}" + ("" if _renorm else "_nonorm"),
        fn=_route_fn(_renorm, _k),
        reference=lambda x, _k=_k, _r=_renorm: reference.moe_route(x, _k, _r),
        make_inputs=_route_inputs,
        flops=lambda s: 0,
        bytes=lambda s, dt, mode, _k=_k: s["tokens"] * (s["experts"] * _elt(dt) + _k * 12),   # logits; w fp32 + ids
        test_shapes=[{"tokens": t, "experts": _e} for t in (1, 5)],
        bench_shapes=[{"tokens": t, "experts": _e} for t in (1, 16, 1024, 8192)],
        grad_inputs=(0,),
        description=f"MoE routing: softmax + top-{_k} of {_e}" + (" + renormalise" if _renorm else "")
        + " in one launch",
    ))


def get(name: str) -> OpSpec:
    for spec in REGISTRY:
        if spec.name == name:
            return spec
    raise KeyError(f"no op named {name!r}; registered: {', '.join(s.name for s in REGISTRY)}")
