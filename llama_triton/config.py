"""LlamaConfig: the model hyper-parameters, with Hugging Face attribute names, named presets and HF config.json
conversion. Re-exported as ``llama_triton.model.LlamaConfig``.

    cfg = LlamaConfig.preset("llama-3-8b")
    cfg = LlamaConfig.from_hf_config("path/to/model_dir")      # or a config.json path, or a dict
    json.dump(cfg.to_hf_dict(), f)                              # what transformers' LlamaConfig(**d) accepts
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

# HF model_type -> architectures entry written by to_hf_dict
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# issue 17: MoE fields; to_hf_dict writes only those of the config's own family
_MOE_FIELDS = {"mixtral": ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits",
                           "router_jitter_noise"),
               "qwen2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                             "shared_expert_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                             "router_aux_loss_coef", "output_router_logits")}
_ALL_MOE_FIELDS = sorted({f for fields in _MOE_FIELDS.values() for f in fields})


@dataclass
class LlamaConfig:
    """LLaMA-family decoder hyper-parameters (attribute names as in transformers 5 ``LlamaConfig``).

    ``rope_parameters`` is HF 5's dict: ``{"rope_type": "default"|"linear"|"llama3", "rope_theta": float,
    ...}`` (llama3 adds factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    ``o_proj_bias`` (None: same as ``attention_bias``) covers Qwen2, whose q/k/v have a bias and o_proj not.
    ``layer_types`` (None: every layer uses ``sliding_window`` when it is set) marks per-layer
    "sliding_attention" / "full_attention" as Qwen2 does.
    """

    vocab_size: int = 260
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool | None = None
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list | None = None
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    model_type: str = "llama"
    bos_token_id: int | None = 256
    eos_token_id: int | list | None = 257
    pad_token_id: int | None = 258
    torch_dtype: str | None = None
    # mixture of experts (issue 17): Mixtral (num_local_experts; the experts' size is intermediate_size) or
    # Qwen2-MoE (num_experts, moe_intermediate_size, optional shared expert); None: a dense model
    num_local_experts: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list | None = None
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    router_jitter_noise: float = 0.0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        self.rope_parameters = dict(self.rope_parameters or {})
        self.mlp_only_layers = list(self.mlp_only_layers or []) or None      # [] and None: no dense-only layers
        self.rope_parameters.setdefault("rope_type", "default")
        self.rope_parameters.setdefault("rope_theta", 10000.0)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the attribute when the hyper-parameters cannot describe a model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"LlamaConfig.hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"LlamaConfig.sliding_window must be None or > 0, got {self.sliding_window}")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"LlamaConfig.layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        experts = self.num_local_experts or self.num_experts
        if experts is not None:
            if self.model_type not in _MOE_FIELDS:
                raise ValueError(f"LlamaConfig: experts are set but model_type {self.model_type!r} is not a MoE family "
                                 f"({', '.join(_MOE_FIELDS)})")
            if not isinstance(experts, int) or experts < 1:
                raise ValueError(f"LlamaConfig.num_local_experts / num_experts must be a positive int, got {experts!r}")
            if not isinstance(self.num_experts_per_tok, int) or not 1 <= self.num_experts_per_tok <= experts:
                raise ValueError(f"LlamaConfig.num_experts_per_tok must be in [1, {experts}] (the number of experts), "
                                 f"got {self.num_experts_per_tok!r}")

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer `layer_idx` (None: full causal attention)."""
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    # ------------------------------------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str = "tiny", **overrides) -> "LlamaConfig":
        """A named configuration: one of ``PRESETS`` (``tiny`` is the demo model), with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---------------------------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_config(cls, config) -> "LlamaConfig":
        """From a HF config: a dict, a transformers config object, a config.json path or a model directory.

        Accepts both HF 5 (``rope_parameters``) and older (``rope_theta`` + ``rope_scaling``) rope fields and
        the llama, mistral and qwen2 model types.
        """
        if isinstance(config, (str, os.PathLike)):
            path = os.path.join(config, "config.json") if os.path.isdir(config) else config
            with open(path) as f:
                config = json.load(f)
        elif not isinstance(config, dict):
            config = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        d = dict(config)
        model_type = d.get("model_type", "llama")
        if model_type not in _ARCHITECTURES:
            raise ValueError(f"from_hf_config: model_type {model_type!r} is not supported; "
                             f"supported: {', '.join(_ARCHITECTURES)}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope = dict(rope)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", float(d.get("rope_theta", 10000.0)))
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {**_HF_DEFAULTS, **{k: v for k, v in d.items() if k in names and k != "rope_parameters"}}
        kwargs["rope_parameters"] = rope
        kwargs["model_type"] = model_type
        if model_type in ("qwen2", "qwen2_moe"):
            kwargs["attention_bias"], kwargs["o_proj_bias"] = bool(d.get("qkv_bias", True)), False
            if not d.get("use_sliding_window", False):
                kwargs["sliding_window"], kwargs["layer_types"] = None, None
        if model_type == "llama":
            kwargs["sliding_window"] = None
        dtype = d.get("dtype") or d.get("torch_dtype")
        kwargs["torch_dtype"] = str(dtype).replace("torch.", "") if dtype else None
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """A config.json dict that transformers (5.x) loads as the matching Llama/Mistral/Qwen2 config."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        o_bias = d.pop("o_proj_bias")
        d.pop("torch_dtype")
        d["architectures"] = [_ARCHITECTURES[self.model_type]]
        d["rope_theta"] = self.rope_parameters.get("rope_theta", 10000.0)
        if self.torch_dtype:
            d["dtype"] = self.torch_dtype
        if self.model_type in ("qwen2", "qwen2_moe"):
            if not (self.attention_bias and not o_bias):
                raise ValueError("qwen2 configs must have q/k/v bias and no o_proj bias")
            d.pop("attention_bias")
            d["use_sliding_window"] = self.sliding_window is not None
        elif o_bias != self.attention_bias:
            raise ValueError(f"model_type {self.model_type!r} cannot express o_proj_bias != attention_bias")
        for name in _ALL_MOE_FIELDS:                    # issue 17: only the family's own MoE fields
            if name not in _MOE_FIELDS.get(self.model_type, ()):
                d.pop(name)
        if self.layer_types is None:
            d.pop("layer_types")
        if self.model_type == "llama":
            d.pop("sliding_window")
        return d


# transformers' defaults for fields a config.json may leave out (not the tiny preset's)
_HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=None, head_dim=None, rms_norm_eps=1e-6,
                    max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                    sliding_window=None, layer_types=None, hidden_act="silu", attention_dropout=0.0,
                    bos_token_id=1, eos_token_id=2, pad_token_id=None)

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3_TOKENS = {"bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": None}

PRESETS: dict[str, dict] = {
    # the demo model: byte-level tokenizer (256 bytes + <bos> <eos> <pad> <unk>), small enough for the interpreter
    "tiny": {},
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=None, torch_dtype="float16"),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       max_position_embeddings=8192, torch_dtype="bfloat16", **_LLAMA3_TOKENS),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_parameters=_LLAMA3_ROPE,
                         max_position_embeddings=131072, torch_dtype="bfloat16", **_LLAMA3_TOKENS),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
                         tie_word_embeddings=True, torch_dtype="bfloat16", **_LLAMA3_TOKENS),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, sliding_window=4096,
                       max_position_embeddings=32768, model_type="mistral", bos_token_id=1, eos_token_id=2,
                       pad_token_id=None, torch_dtype="bfloat16"),
    # issue 17: mixture of experts (the tiny one: the demo tokenizer, 4 experts top-2, for the interpreter)
    "tiny-moe": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=96),
    "mixtral-8x7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=32768,
                         model_type="mixtral", num_local_experts=8, num_experts_per_tok=2, bos_token_id=1,
                         eos_token_id=2, pad_token_id=None, torch_dtype="bfloat16"),
}
