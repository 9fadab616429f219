"""Hugging Face transformers integration: swap our Triton layers into a Llama / Mistral / Qwen2 model.

    from llama_triton import hf
    report = hf.patch(model)          # in place, weights kept (shared); prints what was swapped
    model.generate(...)               # HF generate with its caches keeps working
    hf.unpatch(model)

    hf.register()                     # or: from_pretrained(..., attn_implementation="llama_triton") builds
                                      # our modules directly (transformers.monkey_patching); global until
    with hf.registered(): ...         # hf.unregister(), or scoped to a block

Three official hooks (DESIGN.md): ``AttentionInterface.register("llama_triton", fn)`` (+ the flash-attention
style mask function, so the attention receives None or a 2D padding mask), ``register_patch_mapping`` and
in-place ``patch``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from . import hf_loss
from .attention import hf_attention_forward
from .layers import Attention, RMSNorm, RotaryEmbedding, SwiGLUMLP
from .ops.rope import SUPPORTED_ROPE_TYPES

ATTN_IMPLEMENTATION = "llama_triton"
_ORIGINALS = "_llama_triton_originals"
_OLD_ATTN = "_llama_triton_old_attn_implementation"
_FAMILIES = ("Llama", "Mistral", "Qwen2")
# issue 17: sparse MoE blocks patch() swaps for llama_triton.moe.SparseMoeBlock (with mlp=True)
_MOE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock")


@dataclass
class PatchReport:
    swapped: list = field(default_factory=list)     # (module path, old class, new class)
    kept: list = field(default_factory=list)        # (module path, class, why it was not swapped)
    attn_implementation: str | None = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, old, new in self.swapped:
            key = f"{old} -> {new}"
            out[key] = out.get(key, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"attn_implementation = {self.attn_implementation!r}"]
        lines += [f"swapped {n} x {k}" for k, n in self.counts().items()]
        kept: dict[str, int] = {}
        for _, cls, why in self.kept:
            kept[f"{cls} ({why})"] = kept.get(f"{cls} ({why})", 0) + 1
        lines += [f"kept {n} x {k}" for k, n in kept.items()]
        return "\n".join(lines)


def attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """The mask function registered for ``attn_implementation="llama_triton"``: transformers' flash-attention
    convention (None, or the 2D padding mask), except for a cache whose key buffer is longer than what it
    holds without padding (a StaticCache: ``kv_length`` is the buffer, only its first ``q_offset + q_length -
    kv_offset`` slots are filled): then an int32 ``(batch,)`` tensor of that count, so that
    ``hf_attention_forward`` never attends over the unfilled tail. ``q_offset`` is a tensor for a
    StaticCache: no host sync here. A 1D mask passed in is ours already and is returned as it is."""
    from transformers.masking_utils import flash_attention_mask

    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
        return attention_mask       # ours, made for this step already (generate pre-builds compilable caches' masks)
    mask = flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                attention_mask=attention_mask, **kwargs)
    filled = q_offset + q_length - kv_offset
    if mask is None and isinstance(filled, torch.Tensor):
        return filled.to(torch.int32).reshape(-1).expand(batch_size)
    if mask is None and filled < kv_length:
        return torch.full((batch_size,), filled, dtype=torch.int32, device=kwargs.get("device"))
    return mask


def register_attention() -> None:
    """Register our attention (and its mask convention) as ``attn_implementation="llama_triton"``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, attention_mask)


def patch_mapping() -> dict[str, type]:
    """transformers class name -> our class, for the modules whose constructors we mirror."""
    mapping: dict[str, type] = {}
    # RotaryEmbedding is left out: transformers' _init_weights re-initialises rotary modules through HF-only
    # hooks (compute_default_rope_parameters); patch() swaps it in place instead.
    for fam in _FAMILIES:
        mapping[f"{fam}RMSNorm"] = RMSNorm
        mapping[f"{fam}Attention"] = Attention
        mapping[f"{fam}MLP"] = SwiGLUMLP
    return mapping


def register() -> dict[str, type]:
    """Register our attention function and the class patch mapping with transformers, so that
    ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="llama_triton")`` builds our modules.
    Returns the mapping registered.

    Global until ``unregister()``: EVERY later ``from_pretrained`` / ``from_config`` of a Llama, Mistral or
    Qwen2 model builds our modules, whatever its attn_implementation (transformers' patch mapping is
    keyed on class names only). To scope it, use ``with hf.registered(): ...``."""
    from transformers.monkey_patching import register_patch_mapping

    register_attention()
    register_experts()
    mapping = patch_mapping()
    register_patch_mapping(mapping, overwrite=True)
    return mapping


def register_experts() -> None:
    """Register our grouped-GEMM experts as ``experts_implementation="llama_triton"`` in transformers'
    ``ExpertsInterface`` (MoE models whose experts class uses ``@use_experts_implementation``)."""
    from transformers.integrations.moe import ExpertsInterface

    from .moe import hf_experts_forward

    ExpertsInterface.register(ATTN_IMPLEMENTATION, hf_experts_forward)


@contextlib.contextmanager
def registered():
    """``with hf.registered() as mapping: model = AutoModelForCausalLM.from_pretrained(...)``: ``register()``
    for the block only. On exit (an error included) the class patch mapping is as before: our entries
    removed, any entry someone else had registered for the same class names put back."""
    from transformers.monkey_patching import get_patch_mapping, register_patch_mapping, unregister_patch_mapping

    before = dict(get_patch_mapping())
    mapping = register()
    try:
        yield mapping
    finally:
        current = get_patch_mapping()
        unregister_patch_mapping([k for k, v in mapping.items() if current.get(k) is v])
        restore = {k: before[k] for k in mapping if k in before}
        if restore:
            register_patch_mapping(restore, overwrite=True)


def unregister() -> None:
    """Undo ``register()``'s class patch mapping (the attention function stays registered: harmless)."""
    from transformers.monkey_patching import get_patch_mapping, unregister_patch_mapping

    current = get_patch_mapping()
    unregister_patch_mapping([k for k, v in patch_mapping().items() if current.get(k) is v])


def _replacement(module: nn.Module, report: PatchReport, path: str, norms, mlp, attention, rotary):
    cls = type(module).__name__
    if mlp and cls in _MOE_BLOCKS:                      # router kept (HF's router-logit recording sees it)
        from .moe import SparseMoeBlock

        return SparseMoeBlock.from_module(module)
    if not cls.startswith(_FAMILIES):
        return None
    if norms and cls.endswith("RMSNorm"):
        return RMSNorm.from_module(module)
    if attention and cls.endswith("Attention") and hasattr(module, "q_proj"):
        return Attention.from_module(module)
    if mlp and cls.endswith("MLP"):
        act = getattr(getattr(module, "config", None), "hidden_act", "silu")
        if act not in ("silu", "swish"):
            report.kept.append((path, cls, f"hidden_act {act!r} is not SwiGLU"))
        else:
            return SwiGLUMLP.from_module(module)
    if rotary and cls.endswith("RotaryEmbedding"):
        kind = getattr(module, "rope_type", "default")
        if kind not in SUPPORTED_ROPE_TYPES:
            report.kept.append((path, cls, f"rope_type {kind!r} not supported"))
        else:
            return RotaryEmbedding(module.config, device=module.inv_freq.device)
    return None


def patch(model: nn.Module, norms: bool = True, mlp: bool = True, attention: bool = True,
          rotary: bool = True, loss: bool = True) -> PatchReport:
    """Swap our layers into a transformers Llama/Mistral/Qwen2 model (ForCausalLM or base) in place.

    RMSNorm -> layers.RMSNorm, MLP -> layers.SwiGLUMLP, attention -> layers.Attention (our rotary
    application and attention), RotaryEmbedding -> layers.RotaryEmbedding; weights are shared, not copied.
    Sets ``attn_implementation="llama_triton"``. ``loss``: a ForCausalLM's forward computes its training
    loss with the fused linear cross-entropy, logits not returned (llama_triton.hf_loss, Liger's rule).
    Returns a PatchReport (str() it for a summary).
    """
    if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"patch needs a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(model, _ORIGINALS, None):
        raise ValueError("model is already patched; call unpatch(model) first")
    register_attention()
    report = PatchReport()
    originals: dict[str, nn.Module] = {}
    for path, module in list(model.named_modules()):
        if any(path.startswith(p + ".") for p in originals):       # inside a module already swapped
            continue
        new = _replacement(module, report, path, norms, mlp, attention, rotary)
        if new is None:
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
        originals[path] = module
        report.swapped.append((path, type(module).__name__, type(new).__name__))
    if loss and hasattr(model, "lm_head"):
        why = hf_loss.can_fuse(model)
        if why:
            report.kept.append(("lm_head", type(model).__name__, f"loss not fused: {why}"))
        else:
            hf_loss.install(model)
            report.swapped.append(("forward", "loss", "fused_linear_cross_entropy"))
    setattr(model, _OLD_ATTN, model.config._attn_implementation)
    if attention:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    setattr(model, _ORIGINALS, originals)
    report.attn_implementation = model.config._attn_implementation
    return report


def unpatch(model: nn.Module) -> int:
    """Put back the modules `patch` replaced, the stock forward and the previous attn_implementation. Returns
    how many things were put back (len(report.swapped))."""
    originals = getattr(model, _ORIGINALS, None)
    if not originals:
        raise ValueError("model is not patched")
    for path, module in originals.items():
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, module)
    model.set_attn_implementation(getattr(model, _OLD_ATTN, None) or "eager")
    fused_loss = hf_loss.uninstall(model)
    delattr(model, _ORIGINALS)
    if hasattr(model, _OLD_ATTN):
        delattr(model, _OLD_ATTN)
    return len(originals) + fused_loss
