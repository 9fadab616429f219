"""Save and load compressed models: config.json + model.safetensors + compression.json.

``compression.json`` names every layer whose module is not the dense ``nn.Linear`` of the architecture and
how to rebuild it (``{"type": "low_rank", "rank": r, "bias": b}`` or ``{"type": "quant", "bits", "group_size",
"sym", "act_order", "bias"}``), plus what was done (method, levels, per-layer report). Pruned-only models
have no such layers: their model.safetensors holds dense tensors with the same names as the original, so
``LlamaForCausalLM.from_pretrained`` (and transformers) load them too.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..layers import LowRankLinear, QuantLinear

COMPRESSION = "compression.json"


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """name -> rebuild spec of each LowRankLinear / QuantLinear in `model`."""
    specs = {}
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            specs[name] = {"type": "low_rank", "rank": m.rank, "bias": m.bias is not None}
        elif isinstance(m, QuantLinear):
            specs[name] = {"type": "quant", "bits": m.bits, "group_size": m.group_size, "sym": m.sym,
                           "act_order": m.act_order, "bias": m.bias is not None}
    return specs


def save_compressed(model, path, info: dict | None = None) -> None:
    """Write `model` (a LlamaForCausalLM, possibly pruned / factorized / quantized) to directory `path`;
    `info` (JSON-serialisable: method, levels, reports) goes into compression.json."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)                           # stored once, as embed_tokens.weight
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, COMPRESSION), "w") as f:
        json.dump({"layers": layer_specs(model), **(info or {})}, f, indent=2)


def _build(spec: dict, old: nn.Module, name: str) -> nn.Module:
    kind = spec.get("type")
    n_in, n_out = old.in_features, old.out_features
    if kind == "low_rank":
        return LowRankLinear(n_in, n_out, int(spec["rank"]), bias=bool(spec["bias"]), device="meta")
    if kind == "quant":
        return QuantLinear(n_in, n_out, bias=bool(spec["bias"]), bits=int(spec["bits"]),
                           group_size=int(spec["group_size"]), sym=bool(spec["sym"]),
                           act_order=bool(spec["act_order"]), device="meta")
    raise ValueError(f"{COMPRESSION}: layer {name!r} has unknown type {kind!r} (expected 'low_rank' or 'quant')")


def load_compressed(path, dtype=None, device=None, semi_structured: bool = False):
    """The model saved by ``save_compressed`` in directory `path` (float tensors in `dtype`, default the
    saved one) on `device` (default cpu). Returns ``(model, info)``, info the compression.json contents.
    ``semi_structured=True``: convert the 2:4-sparse linears to PyTorch's semi-structured sparse tensors
    (``pruning.to_semi_structured``: a supporting GPU, fp16/bf16); ``info["semi_structured"]`` says per
    layer what happened."""
    from safetensors.torch import load_file

    from ..config import LlamaConfig
    from ..model import LlamaForCausalLM

    meta_path = os.path.join(path, COMPRESSION)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no {COMPRESSION} in {os.fspath(path)!r}: not a compressed checkpoint "
                                "(a dense one loads with LlamaForCausalLM.from_pretrained)")
    with open(meta_path) as f:
        info = json.load(f)
    config = LlamaConfig.from_hf_config(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for name, spec in info.get("layers", {}).items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{COMPRESSION} names layer {name!r}, which the model does not have") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _build(spec, old, name))
    state = load_file(os.path.join(path, "model.safetensors"))
    saved = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model = model.to(dtype=dtype or saved).to_empty(device=torch.device(device or "cpu"))
    model.tie_weights()
    if getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    model.model.reset_rotary(device)
    if semi_structured:
        from .pruning import to_semi_structured

        info["semi_structured"] = to_semi_structured(model)
    return model.eval(), info
