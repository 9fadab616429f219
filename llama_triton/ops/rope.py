"""Rotary position embeddings as torch.library custom ops over kernels/rope.py: autograd, fake impls,
dispatch, and the in-place inference variant."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import rope as K


def _out_like(t: Tensor, dtype: torch.dtype) -> Tensor:
    """What the launcher allocates: t's strides (after its last-dim-contiguous copy), in `dtype`."""
    return torch.empty_like(t if t.stride(-1) == 1 else t.contiguous(), dtype=dtype)


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("llama_triton::rope", mutates_args=())
def _rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    return K.rope(q, k, cos, sin, backward=backward)


@_rope.register_fake
def _(q, k, cos, sin, backward):
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return _out_like(q, dtype), _out_like(k, dtype)


def _setup(ctx, inputs, output):
    _, _, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.shapes = (inputs[0].shape, inputs[1].shape)


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    out_dtype = torch.promote_types(ctx.dtypes[0], cos.dtype)
    dq = cos.new_zeros(ctx.shapes[0], dtype=out_dtype) if dq is None else dq   # an output that was not used
    dk = cos.new_zeros(ctx.shapes[1], dtype=out_dtype) if dk is None else dk
    gq, gk = _rope(dq, dk, cos, sin, not ctx.backward)   # the transpose of rope is rope with -sin
    return gq.to(ctx.dtypes[0]), gk.to(ctx.dtypes[1]), None, None, None


_rope.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("llama_triton::rope_", mutates_args=("q", "k"))
def _rope_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    K.rope(q, k, cos, sin, q_out=q, k_out=k)


@_rope_.register_fake
def _(q, k, cos, sin):
    return None


# ------------------------------------------------------------------------------------------ public API
@backend.public_op(promote=("q", "k"))
def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1,
                         inplace: bool = False) -> tuple[Tensor, Tensor]:
    """Rotary position embedding with Hugging Face's convention (``rotate_half``), q and k in one launch.

    Args:
        q: ``(batch, heads, seq, head_dim)`` (``unsqueeze_dim=1``, HF's layout) or ``(batch, seq, heads,
            head_dim)`` (``unsqueeze_dim=2``, flash-attn's layout); fp32/fp16/bf16, any strides.
        k: like q with ``kv_heads`` heads (GQA), same dtype.
        cos, sin: ``(batch, seq, head_dim)``, ``(1, seq, head_dim)`` or ``(seq, head_dim)`` as returned by
            ``layers.RotaryEmbedding`` / HF ``LlamaRotaryEmbedding``. Treated as constants: no gradient
            flows to them (passing ones that require grad raises ValueError).
        unsqueeze_dim: as in HF, the dim of q/k that holds the heads (1 or 2).
        inplace: rotate q and k in place and return them (inference only: q/k must not require grad,
            need a contiguous last dim, and the result dtype promote(q, cos) must be q's dtype).

    Returns:
        ``(q_embed, k_embed)`` with q's/k's shapes and strides in ``promote(q.dtype, cos.dtype)``.
        Differentiable in q and k (the backward is rope with ``-sin``, one launch).
    """
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q is (b, h, s, d)) or 2 (q is (b, s, h, d)), got {unsqueeze_dim!r}")
    if unsqueeze_dim == 2:
        for name, t in (("q", q), ("k", k)):
            K.check_tensor(name, t, K.FLOAT_DTYPES, ndim=4)
        qe, ke = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1, inplace)
        return qe.transpose(1, 2), ke.transpose(1, 2)
    try:
        K.check_inputs(q, k, cos, sin)
    except ValueError as e:        # q (b, s, h, d) given with HF's default unsqueeze_dim=1: say so
        flash = q.dim() == 4 and cos.dim() >= 2 and cos.shape[-2] == q.shape[1] != q.shape[2]
        if not flash:
            raise
        raise ValueError(f"{e}; q looks like (batch, seq, heads, head_dim) (flash-attn layout): pass "
                         "unsqueeze_dim=2") from e
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos/sin require grad, but apply_rotary_pos_emb treats them as constants (no gradient "
                         "flows to them); pass cos.detach() / sin.detach()")
    if inplace:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError("inplace=True is for inference: q/k require grad; use inplace=False")
        if torch.promote_types(q.dtype, cos.dtype) != q.dtype:
            raise TypeError(f"inplace=True needs cos/sin of q's dtype or lower (q {q.dtype}, cos {cos.dtype})")
        if q.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("inplace=True needs q and k with a contiguous last dim")
        if not backend.use_triton(q):
            qe, ke = reference.apply_rotary_pos_emb(q, k, cos, sin)
            q.copy_(qe)
            k.copy_(ke)
            return q, k
        _rope_(q, k, cos, sin)
        return q, k
    if not backend.use_triton(q):
        return reference.apply_rotary_pos_emb(q, k, cos, sin)
    return _rope(q, k, cos, sin, False)


# ------------------------------------------------------------------------ cos/sin tables (RotaryEmbedding)
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_parameters(config) -> dict:
    """The rope settings of a transformers 5 or llama_triton LlamaConfig as HF 5's ``rope_parameters`` dict
    (``rope_type``, ``rope_theta``, ...); transformers-4 style ``rope_theta``/``rope_scaling`` attributes are
    folded in when ``rope_parameters`` is absent."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if legacy and "rope_type" not in params and "type" not in params:
        params.update(legacy)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {params['rope_type']!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def compute_inv_freq(config, device=None, seq_len=None) -> tuple[Tensor, float]:
    """``(inv_freq (rotary_dim // 2,) fp32, attention_scaling)`` exactly as transformers computes them
    (``LlamaRotaryEmbedding.compute_default_rope_parameters`` and ``modeling_rope_utils``'s linear, dynamic
    and llama3 functions: same operations in the same order and dtypes, so the tables are bit-identical).
    ``seq_len`` (int or 0-d tensor) only matters for "dynamic"."""
    p = rope_parameters(config)
    rope_type, base = p["rope_type"], p["rope_theta"]
    head_dim = _head_dim(config)
    if rope_type == "default":  # HF's default ignores partial_rotary_factor
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim)), 1.0
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    if rope_type == "linear":
        inv_freq = 1.0 / (base ** exponent)
        inv_freq /= p["factor"]
        return inv_freq, 1.0
    if rope_type == "dynamic":
        factor, max_pos = p["factor"], config.max_position_embeddings
        if seq_len is None:
            seq_len = max_pos
        elif isinstance(seq_len, Tensor):
            seq_len = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device))
        else:
            seq_len = max(seq_len, max_pos)
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponent), 1.0
    # llama3 (LLaMA 3.1): low frequencies divided by factor, high ones kept, a smooth blend in between
    inv_freq = 1.0 / (base ** exponent)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0
