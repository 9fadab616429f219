"""llama-triton: hand-written Triton kernels for LLaMA-family models, with drop-in nn.Module layers.

Public functions and submodules (``llama_triton.layers``, ``.model``, ``.quant``, ``.hf``, ...) are imported
lazily (PEP 562), so ``import llama_triton`` does not import triton: the CLI
must be able to switch on Triton's CPU interpreter (TRITON_INTERPRET=1) before any kernel is defined.

    import llama_triton
    y = llama_triton.rms_norm(x, weight, eps=1e-6)
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "flash_attention": "llama_triton.ops.flash_attention",
    "rms_norm": "llama_triton.ops.rms_norm",
    "apply_rotary_pos_emb": "llama_triton.ops.rope",
    "swiglu": "llama_triton.ops.swiglu",
    "cross_entropy": "llama_triton.ops.cross_entropy",
    "fused_linear_cross_entropy": "llama_triton.ops.cross_entropy",
    "rms_norm_matmul": "llama_triton.ops.rms_norm_matmul",
    "decode_attention": "llama_triton.ops.decode_attention",
    "decode_attention_with_kvcache": "llama_triton.ops.decode_attention",
    "quant_matmul": "llama_triton.ops.quant_matmul",
    "moe_experts": "llama_triton.ops.moe",
    "low_rank_matmul": "llama_triton.ops.low_rank",
    # flash-attn's names and defaults (causal=False), thin wrappers
    "flash_attn_func": "llama_triton.flash_attn_interface",
    "flash_attn_varlen_func": "llama_triton.flash_attn_interface",
    "flash_attn_with_kvcache": "llama_triton.flash_attn_interface",
}

__all__ = sorted(_EXPORTS)


def _submodules() -> list[str]:
    """The package's submodules (``layers``, ``model``, ``quant``, ``hf``, ...), found without importing them."""
    import pkgutil

    return [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if not name.startswith("_") and name in _submodules():     # llama_triton.layers etc., imported on first use
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'llama_triton' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_submodules()))
