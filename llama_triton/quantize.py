"""Quantized-model surgery (above the layers): swap ``nn.Linear`` modules for ``layers.QuantLinear``
(RTN ``quantize_model``, a GPTQ/AWQ checkpoint's ``load_quantized_state_dict``) and write a quantized model
as a standard GPTQ checkpoint (``gptq_state_dict`` / ``save_gptq``). The weight format itself is
``llama_triton.quant`` (below the ops), which re-exports these names.
"""
from __future__ import annotations

import json
import os

from torch import nn

from .layers import QuantLinear
from .quant import _check_bits, to_gptq


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, skip=("lm_head",),
                   sym: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a ``layers.QuantLinear`` with RTN-quantized
    weights, except those whose name (full dotted name or last component) is in ``skip``.

    Works on any nn.Module (our model, a transformers Llama, ...). Layers whose in_features the group size
    does not divide raise ValueError naming the layer (pass group_size=-1 for per-channel scales).
    Returns the model.
    """
    _check_bits(bits)
    if isinstance(skip, str):
        skip = (skip,)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and name and not _skipped(name, skip)]
    for name, lin in targets:
        gs = lin.in_features if group_size == -1 else group_size
        if lin.in_features % gs:
            raise ValueError(f"layer {name!r}: in_features={lin.in_features} is not divisible by group_size={group_size}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(lin, bits=bits, group_size=group_size, sym=sym))
    return model


def load_quantized_state_dict(model: nn.Module, state_dict: dict, quant_method: str = "gptq", bits: int = 4,
                              checkpoint_format: str = "gptq") -> list:
    """Swap in the quantized linears of a GPTQ / AWQ checkpoint (in place) and return their names.

    ``state_dict`` maps HF-style names to tensors (e.g. a safetensors file's contents): every
    ``<name>.qweight`` with its ``<name>.qzeros``, ``<name>.scales`` (and for GPTQ an optional
    ``<name>.g_idx``; an optional ``<name>.bias``) replaces the ``nn.Linear`` (or QuantLinear) ``<name>`` of
    ``model`` by ``layers.QuantLinear.from_gptq`` / ``from_awq``, on that module's device, checking its
    shape. The remaining (unquantized) tensors are not touched: load them with ``model.load_state_dict(...,
    strict=False)``.
    """
    if quant_method not in ("gptq", "awq"):
        raise ValueError(f"quant_method must be 'gptq' or 'awq', got {quant_method!r}")
    replaced = []
    for key in sorted(k for k in state_dict if k.endswith(".qweight")):
        name = key[: -len(".qweight")]
        missing = [f"{name}.{s}" for s in ("qzeros", "scales") if f"{name}.{s}" not in state_dict]
        if missing:
            raise ValueError(f"checkpoint has {key} but not {', '.join(missing)}")
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"checkpoint tensor {key} has no module {name!r} in the model") from e
        t = lambda s: state_dict.get(f"{name}.{s}")  # noqa: E731
        if quant_method == "gptq":
            new = QuantLinear.from_gptq(t("qweight"), t("qzeros"), t("scales"), t("g_idx"), t("bias"), bits=bits,
                                        checkpoint_format=checkpoint_format)
        else:
            new = QuantLinear.from_awq(t("qweight"), t("qzeros"), t("scales"), t("bias"))
        shape = (getattr(old, "out_features", None), getattr(old, "in_features", None))
        if shape != (new.out_features, new.in_features):
            raise ValueError(f"{name}: the checkpoint holds a {new.out_features}x{new.in_features} weight but the "
                             f"model's module is {shape[0]}x{shape[1]}")
        ref = next(iter(old.buffers()), None) if not isinstance(old, nn.Linear) else old.weight
        new = new.to(ref.device if ref is not None else "cpu")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.append(name)
    return replaced


def gptq_state_dict(model: nn.Module, checkpoint_format: str = "gptq") -> dict:
    """``model.state_dict()`` with every QuantLinear ``<name>`` written as a standard GPTQ linear:
    ``<name>.qweight`` / ``.qzeros`` / ``.scales`` / ``.g_idx`` (``quant.to_gptq``; the kernel layout stays in
    memory) and ``<name>.bias`` when it has one. ``load_quantized_state_dict(model, sd, "gptq",
    checkpoint_format=...)`` reads it back; so do the usual GPTQ loaders."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = {}
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in quantized:
            out[key] = value
    for name, m in quantized.items():
        for leaf, t in to_gptq(m.quantized_weight, checkpoint_format).items():
            out[f"{name}.{leaf}"] = t
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach()
    return out


def quantization_config(model: nn.Module, checkpoint_format: str = "gptq") -> dict:
    """The HF ``quantization_config`` of a model quantized with one bits/group_size (ValueError if mixed)."""
    specs = {(m.bits, m.group_size if m.group_size != m.in_features else -1, m.sym, m.act_order)
             for m in model.modules() if isinstance(m, QuantLinear)}
    if not specs:
        raise ValueError("model has no QuantLinear layers: quantize it first (quantize_model)")
    if len({s[:2] for s in specs}) > 1:
        raise ValueError(f"model mixes bits/group sizes {sorted({s[:2] for s in specs})}; a GPTQ config holds one")
    bits, group = next(iter(specs))[:2]
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": all(s[2] for s in specs),
            "desc_act": any(s[3] for s in specs), "checkpoint_format": checkpoint_format}


def save_gptq(model: nn.Module, path, checkpoint_format: str = "gptq") -> None:
    """Write ``model`` to directory ``path`` as ``model.safetensors`` (``gptq_state_dict``) and
    ``quantize_config.json`` (``quantization_config``)."""
    from safetensors.torch import save_file

    cfg = quantization_config(model, checkpoint_format)
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in gptq_state_dict(model, checkpoint_format).items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "quantize_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
