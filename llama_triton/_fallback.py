"""Which implementation the model uses for each op, and plain-PyTorch stand-ins for ops not built yet.

The model (llama_triton.model / layers.Attention / DecoderLayer) asks ``op(name)`` / ``layer(name)`` for
each piece. When the Triton op exists in this checkout it is used; otherwise the stand-in here (or the
``llama_triton.reference`` function) runs and ``status()`` says so, so the demo's per-op table can show it.
Delete a stand-in once its op has landed everywhere.
"""
from __future__ import annotations

import math
from importlib import import_module

import torch
import torch.nn.functional as F
from torch import nn

from . import reference


# ---------------------------------------------------------------------------------- plain-torch stand-ins
def rope_inv_freq(config, device=None) -> tuple[torch.Tensor, float]:
    """inv_freq (head_dim/2,) fp32 and the attention scaling for config.rope_parameters (HF numerics)."""
    rp = dict(getattr(config, "rope_parameters", None) or {})
    base = float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    kind = rp.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rp["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old_ctx = rp["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama), 1.0
    raise ValueError(f"rope_parameters['rope_type'] = {kind!r} is not supported (default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Stand-in for layers.RotaryEmbedding (HF LlamaRotaryEmbedding numerics): forward(x, position_ids)."""

    def __init__(self, config, device=None):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (b, s, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                                       # (b, s, d)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Stand-in for llama_triton.apply_rotary_pos_emb: q (b, h, s, d), k (b, h_kv, s, d), cos/sin (b, s, d)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class SwiGLUMLP(nn.Module):
    """Stand-in for layers.SwiGLUMLP (HF LlamaMLP): down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KVCache(nn.Module):
    """Stand-in for layers.KVCache: static (batch, max_seqlen, n_kv_heads, head_dim) buffers + int32 seqlens."""

    def __init__(self, batch, max_seqlen, n_kv_heads, head_dim, dtype=None, device=None):
        super().__init__()
        shape = (batch, max_seqlen, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("seqlens", torch.zeros(batch, dtype=torch.int32, device=device), persistent=False)

    def update(self, positions, k, v):
        b = torch.arange(k.shape[0], device=k.device)[:, None]          # (b, 1)
        self.k[b, positions] = k.to(self.k.dtype)
        self.v[b, positions] = v.to(self.v.dtype)
        self.seqlens.copy_(torch.maximum(self.seqlens, (positions[:, -1] + 1).to(torch.int32)))
        return self.k, self.v

    def reset(self):
        self.seqlens.zero_()


# ------------------------------------------------------------------------------------------ resolution
# op name -> (public function or layers class, what runs when it is missing)
_OPS = {
    "flash_attention": reference.attention,
    "decode_attention": reference.decode_attention,
    "apply_rotary_pos_emb": apply_rotary_pos_emb,
}
_LAYERS = {"RotaryEmbedding": RotaryEmbedding, "SwiGLUMLP": SwiGLUMLP, "KVCache": KVCache}
# what the demo/status reports, in model order: (label, kind, name)
MODEL_OPS = [("rms_norm", "op", "rms_norm"), ("rotary", "op", "apply_rotary_pos_emb"),
             ("flash_attention", "op", "flash_attention"), ("decode_attention", "op", "decode_attention"),
             ("kv_cache", "layer", "KVCache"), ("swiglu_mlp", "layer", "SwiGLUMLP")]


_OP_MODULES = {"flash_attention": "llama_triton.ops.flash_attention",
               "decode_attention": "llama_triton.ops.decode_attention", "apply_rotary_pos_emb": "llama_triton.ops.rope"}


def op(name: str):
    """The public Triton op `name` (llama_triton.<name>, or its llama_triton.ops module) when it exists here,
    else its stand-in."""
    for module in ("llama_triton", _OP_MODULES[name]):
        try:
            return getattr(import_module(module), name)
        except (ImportError, AttributeError):
            pass
    return _OPS[name]


def layer(name: str):
    """The class llama_triton.layers.<name> when it exists here, else its plain-torch stand-in."""
    return getattr(import_module("llama_triton.layers"), name, None) or _LAYERS[name]


def is_fallback(kind: str, name: str) -> bool:
    if kind == "op":
        return name != "rms_norm" and op(name) is _OPS[name]
    return layer(name) is _LAYERS[name]


def status() -> dict[str, str]:
    """label -> 'triton' or 'fallback (plain torch: op not built yet)' for each op the model uses."""
    return {label: ("fallback (plain torch: op not built yet)" if is_fallback(kind, name) else "triton")
            for label, kind, name in MODEL_OPS}
