"""Sparse mixture-of-experts block (Mixtral, Qwen2-MoE, Qwen3-MoE) over ``llama_triton.ops.moe``.

Drop-ins for transformers 5's modules, same constructor arguments, parameter names and return values:

    TopKRouter(config)      MixtralTopKRouter / Qwen3MoeTopKRouter: ``weight (E, H)``;
                            forward(h) -> (router_logits (T, E), router_scores (T, k), router_indices (T, k))
    MoeExperts(config)      MixtralExperts / Qwen3MoeExperts: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``;
                            forward(h (T, H), top_k_index, top_k_weights) -> (T, H), our grouped-GEMM kernel
    SparseMoeBlock(config)  MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock / Qwen2MoeSparseMoeBlock:
                            ``gate``, ``experts`` (+ ``shared_expert``, ``shared_expert_gate`` for Qwen2-MoE);
                            forward(h (b, s, H)) -> (b, s, H)

Routing: softmax over all experts in fp32, top-k; Mixtral renormalises the k weights (and keeps them fp32),
Qwen2/3-MoE renormalise only when ``config.norm_topk_prob`` and cast them to the logits' dtype. The family is
read from ``config.model_type`` (transformers' Mixtral config also answers to ``num_experts``).

For the load-balancing loss, a block keeps its last router logits in ``last_router_logits`` (a reference,
no copy, no sync); ``llama_triton.ops.moe.load_balancing_loss`` takes them per layer (transformers'
``router_aux_loss_coef`` semantics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops.moe import moe_experts, route

_MIXTRAL_TYPES = ("mixtral",)


@dataclass(frozen=True)
class MoeSpec:
    """The MoE hyper-parameters of a config, whatever the family calls them."""
    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool
    cast_scores: bool                 # Qwen: router scores cast to the logits' dtype; Mixtral keeps fp32
    shared_intermediate_size: int     # 0: no shared expert
    jitter_noise: float

    @classmethod
    def from_config(cls, config) -> "MoeSpec":
        model_type = getattr(config, "model_type", "")
        mixtral = model_type in _MIXTRAL_TYPES or getattr(config, "num_local_experts", None)
        if mixtral:
            e = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
            inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        else:
            e = getattr(config, "num_experts", None)
            inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        k = getattr(config, "num_experts_per_tok", None)
        if not isinstance(e, int) or e < 1:
            raise ValueError(f"a MoE config needs num_local_experts (Mixtral) or num_experts (Qwen-MoE) >= 1, got {e!r}")
        if not isinstance(k, int) or not 1 <= k <= e:
            raise ValueError(f"num_experts_per_tok must be an int in [1, {e}] (the number of experts), got {k!r}")
        return cls(num_experts=e, top_k=k, intermediate_size=inter,
                   renormalize=True if mixtral else bool(getattr(config, "norm_topk_prob", False)),
                   cast_scores=not mixtral,
                   shared_intermediate_size=int(getattr(config, "shared_expert_intermediate_size", 0) or 0),
                   jitter_noise=float(getattr(config, "router_jitter_noise", 0.0) or 0.0))


def is_moe_layer(config, layer_idx: int) -> bool:
    """Whether decoder layer `layer_idx` has a sparse MoE block (Qwen's decoder_sparse_step / mlp_only_layers)."""
    e = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not e:
        return False
    if layer_idx in (getattr(config, "mlp_only_layers", None) or ()):
        return False
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx + 1) % step == 0


class TopKRouter(nn.Module):
    """Drop-in for ``MixtralTopKRouter(config)`` / ``Qwen3MoeTopKRouter(config)``."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        spec = MoeSpec.from_config(config)
        self.top_k, self.num_experts, self.hidden_dim = spec.top_k, spec.num_experts, config.hidden_size
        self.norm_topk_prob, self.cast_scores = spec.renormalize, spec.cast_scores
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim, device=device, dtype=dtype))

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)                               # (T, E)
        scores, indices = route(router_logits, self.top_k, self.norm_topk_prob,
                                router_logits.dtype if self.cast_scores else None)
        return router_logits, scores, indices


class MoeExperts(nn.Module):
    """Drop-in for ``MixtralExperts(config)`` / ``Qwen3MoeExperts(config)``: the experts as fused 3-D tensors,
    run by ``llama_triton.moe_experts`` (all experts in one grouped GEMM per projection)."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        spec = MoeSpec.from_config(config)
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"MoeExperts implements hidden_act 'silu' (SwiGLU experts), got {act!r}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = spec.num_experts, config.hidden_size, \
            spec.intermediate_size
        kw = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim, **kw))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim, **kw))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return moe_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)

    @classmethod
    def from_module(cls, module: nn.Module) -> "MoeExperts":
        """Around an HF experts module's ``gate_up_proj`` / ``down_proj`` (shared, not copied)."""
        gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.dim() != 3:
            raise TypeError(f"from_module needs an experts module with 3-D gate_up_proj and down_proj, got "
                            f"{type(module).__name__}")
        for flag, want in (("has_bias", False), ("is_transposed", False), ("has_gate", True), ("is_concatenated", True),
                           ("has_post_expert_norm", False)):
            if getattr(module, flag, want) != want:
                raise ValueError(f"{type(module).__name__}.{flag}={getattr(module, flag)} is not supported "
                                 f"(MoeExperts: concatenated gate/up, (E, out, in) layout, no bias)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate_up_proj, new.down_proj = gu, down
        new.num_experts, two_i, new.hidden_dim = gu.shape
        new.intermediate_dim = two_i // 2
        return new

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"


class SparseMoeBlock(nn.Module):
    """Drop-in for ``MixtralSparseMoeBlock(config)``, ``Qwen3MoeSparseMoeBlock(config)`` and
    ``Qwen2MoeSparseMoeBlock(config)`` (shared expert with a sigmoid gate when
    ``config.shared_expert_intermediate_size``): router linear, routing, our grouped experts kernel.

    ``forward(hidden_states (b, s, H) or (T, H))`` -> same shape. Keeps ``last_router_logits (T, E)``.
    Launches per call (tokens > 0): the router matmul, one routing launch (softmax + top-k + renormalise),
    4 (top-1) or 5 (top-k) for the experts (alignment 2, gate_up+SwiGLU 1, down 1, top-k combine 1). At decode
    sizes (<= 16 pairs per expert on average) each M block holds one expert's rows, so each selected expert's
    weights are read once and the others not at all.
    """

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        spec = MoeSpec.from_config(config)
        self.top_k, self.num_experts, self.jitter_noise = spec.top_k, spec.num_experts, spec.jitter_noise
        self.gate = TopKRouter(config, device=device, dtype=dtype)
        self.experts = MoeExperts(config, device=device, dtype=dtype)
        self.shared_expert = self.shared_expert_gate = None
        if spec.shared_intermediate_size:
            from types import SimpleNamespace

            from .layers import SwiGLUMLP

            sub = SimpleNamespace(hidden_size=config.hidden_size, intermediate_size=spec.shared_intermediate_size,
                                  hidden_act=getattr(config, "hidden_act", "silu"), mlp_bias=False)
            self.shared_expert = SwiGLUMLP(sub, device=device, dtype=dtype)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False, device=device, dtype=dtype)
        self.last_router_logits = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:       # Mixtral's router jitter (multiplicative, training only)
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        h = hidden_states.reshape(-1, shape[-1])                                                  # (T, H)
        router_logits, weights, ids = self.gate(h)
        self.last_router_logits = router_logits
        out = self.experts(h, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        return out.reshape(shape)

    @classmethod
    def from_module(cls, module: nn.Module) -> "SparseMoeBlock":
        """Build around an HF sparse MoE block: its router module is kept as it is (so transformers'
        ``output_router_logits`` recording still sees it), its experts run our kernel, a shared expert becomes
        our SwiGLUMLP over the same projections. Parameters are shared, not copied."""
        gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module) or not hasattr(gate, "top_k"):
            raise TypeError(f"from_module needs an HF sparse MoE block with `gate` (a top-k router) and `experts`, "
                            f"got {type(module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate = gate
        new.experts = experts if isinstance(experts, MoeExperts) else MoeExperts.from_module(experts)
        new.top_k = gate.top_k
        new.num_experts = new.experts.num_experts
        new.jitter_noise = float(getattr(module, "jitter_noise", 0.0) or 0.0)
        new.shared_expert = new.shared_expert_gate = None
        if getattr(module, "shared_expert", None) is not None:
            from .layers import SwiGLUMLP

            new.shared_expert = SwiGLUMLP.from_module(module.shared_expert)
            new.shared_expert_gate = module.shared_expert_gate
        new.last_router_logits = None
        return new


def hf_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``transformers.integrations.moe.ExpertsInterface`` function ("llama_triton"): an HF experts module's
    forward on our kernel. Layouts the kernel does not cover (bias, transposed or interleaved weights, a
    post-expert norm, expert parallelism, a non-SwiGLU activation) go to transformers' grouped_mm path."""
    act = getattr(getattr(self, "config", None), "hidden_act", "silu")
    plain = (getattr(self, "has_gate", True) and not getattr(self, "has_bias", False)
             and not getattr(self, "is_transposed", False) and getattr(self, "is_concatenated", True)
             and not getattr(self, "has_post_expert_norm", False) and not getattr(self, "_is_expert_parallel", False)
             and act in ("silu", "swish"))
    if not plain:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    out = moe_experts(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)
    return out.to(hidden_states.dtype)


# ------------------------------------------------------------------------------ checkpoint key conversion
_LEGACY_PARTS = {  # checkpoint naming of one expert's projections -> (gate, up, down) weight names
    "mixtral": ("w1", "w3", "w2"),
    "qwen": ("gate_proj", "up_proj", "down_proj"),
}


def legacy_expert_plan(names) -> dict:
    """How to build the fused expert tensors from a hub checkpoint that stores one Linear per expert
    (transformers 5 still saves that layout: Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2.weight`` and
    ``block_sparse_moe.gate.weight``; Qwen-MoE ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``).

    Returns ``{our name: [[source names], ...]}``: our tensor is ``stack([cat(sources, 0) for each entry])``
    for ``experts.gate_up_proj`` / ``experts.down_proj`` (one entry per expert, in expert order), or the one
    source renamed (the Mixtral router). Names that need no conversion are not in the result."""
    import re

    pat = re.compile(r"^(.*\.layers\.\d+\.)(block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)"
                     r"\.weight$")
    found: dict[str, dict[int, dict[str, str]]] = {}
    plan: dict[str, list] = {}
    for name in names:
        m = pat.match(name)
        if m:
            layer, _, e, part = m.groups()
            found.setdefault(layer, {}).setdefault(int(e), {})[part] = name
        elif ".block_sparse_moe.gate." in name:
            plan[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = [[name]]
    for layer, experts in found.items():
        n = max(experts) + 1
        seen = {part for names in experts.values() for part in names}
        parts = next(p for p in _LEGACY_PARTS.values() if seen & set(p))          # the family's naming
        missing = [f"{layer}...experts.{e}.{p}" for e in range(n) for p in parts if p not in experts.get(e, {})]
        if missing:
            raise ValueError(f"checkpoint experts are incomplete: missing {', '.join(missing[:4])}")
        plan[f"{layer}mlp.experts.gate_up_proj"] = [[experts[e][parts[0]], experts[e][parts[1]]] for e in range(n)]
        plan[f"{layer}mlp.experts.down_proj"] = [[experts[e][parts[2]]] for e in range(n)]
    return plan


def fused_shape(plan_entry, shapes: dict) -> tuple:
    """The shape of one converted tensor, from the checkpoint shapes of its sources."""
    if len(plan_entry) == 1 and len(plan_entry[0]) == 1 and "experts" not in plan_entry[0][0]:
        return tuple(shapes[plan_entry[0][0]])                                     # a renamed router
    first = [shapes[n] for n in plan_entry[0]]
    return (len(plan_entry), sum(s[0] for s in first), *first[0][1:])


def build_fused(plan_entry, get_tensor) -> torch.Tensor:
    """The converted tensor: ``get_tensor(name)`` reads one checkpoint tensor."""
    if len(plan_entry) == 1 and len(plan_entry[0]) == 1 and "experts" not in plan_entry[0][0]:
        return get_tensor(plan_entry[0][0])
    return torch.stack([torch.cat([get_tensor(n) for n in names], 0) for names in plan_entry])


def add_aux_loss(model: nn.Module, args, output):
    """Forward hook of a causal LM over SparseMoeBlocks (llama_triton.model, when
    ``config.output_router_logits``): sets ``output.aux_loss`` to transformers' load-balancing loss over the
    blocks' router logits of this call and, when there is an LM loss, adds ``router_aux_loss_coef * aux``
    to it (MixtralForCausalLM's semantics)."""
    from .ops.moe import load_balancing_loss

    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock) and m.last_router_logits is not None]
    if not blocks:
        return output
    aux = load_balancing_loss(tuple(b.last_router_logits for b in blocks), blocks[0].num_experts, blocks[0].top_k)
    output.aux_loss = aux
    if output.loss is not None:
        output.loss = output.loss + model.config.router_aux_loss_coef * aux.to(output.loss.device)
    return output
