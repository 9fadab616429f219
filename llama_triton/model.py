"""LlamaForCausalLM built from llama_triton.layers, with Hugging Face parameter names.

    model = LlamaForCausalLM(LlamaConfig.preset("tiny")).init_weights(seed=0)
    out = model(input_ids, labels=input_ids)                  # training: full sequence, out.logits, out.loss
    model = LlamaForCausalLM.from_pretrained("dir", dtype=torch.bfloat16, device="cuda")
    ids = model.generate(input_ids, max_new_tokens=32)        # prefill + decode over a static KVCache per layer

Parameter names match transformers (``model.embed_tokens.weight``, ``model.layers.0.self_attn.q_proj.weight``,
``model.layers.0.mlp.gate_proj.weight``, ``model.norm.weight``, ``lm_head.weight``), so HF checkpoints load
unchanged (llama_triton.checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import PRESETS, LlamaConfig
from .layers import DecoderLayer, KVCache, RMSNorm, RotaryEmbedding

__all__ = ["PRESETS", "CausalLMOutput", "LlamaConfig", "LlamaForCausalLM", "LlamaModel"]


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None          # (b, s, vocab) (last logits_to_keep positions); None: fused loss only
    loss: torch.Tensor | None = None     # scalar fp32 mean next-token cross-entropy over labels != -100
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss (config.output_router_logits; issue 17)


class LlamaModel(nn.Module):
    """embed_tokens -> layers -> norm. ``forward(input_ids (b, s), position_ids, caches)`` -> (b, s, hidden)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def reset_rotary(self, device=None) -> None:
        """Rebuild the rotary tables (fp32) on `device`: after a meta-device build or a dtype cast."""
        self.rotary_emb = RotaryEmbedding(self.config, device=device)

    def forward(self, input_ids, position_ids=None, caches=None, fresh_cache: bool = False, cu_seqlens=None,
                max_seqlen=None):
        b, s = input_ids.shape
        x = self.embed_tokens(input_ids)                                              # (b, s, hidden)
        packed = {}
        if cu_seqlens is not None:                     # packed documents: varlen attention over b*s tokens
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())            # one host sync
            packed = dict(cu_seq_lens_q=cu_seqlens, max_length_q=max_seqlen)
        table = self._decode_table(caches, x) if position_ids is None and not fresh_cache else None
        if table is not None:              # decode step: positions = seqlens + t, RoPE inside the attention kernel
            packed["rope_table"] = table
        elif position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device)[None].expand(b, s)
            if caches is not None and not fresh_cache:
                position_ids = position_ids + caches[0].seqlens[:, None].long()
        cos_sin = self.rotary_emb(x, position_ids) if table is None else None        # (b, s, head_dim) x2
        residual = None                    # layers hand (out, residual) on: the add happens in the next norm
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, position_ids=position_ids, cache=None if caches is None else caches[i],
                                position_embeddings=cos_sin, fresh_cache=fresh_cache, residual=residual,
                                return_residual=True, **packed)
        if table is not None:
            caches[0].seqlens.add_(s)      # one seqlens for every layer: advanced once per step
        return self.norm(x, residual)[0]

    def _decode_table(self, caches, x):
        """The (cos, sin) tables for a decode step over `caches` when it can take the fused path (our
        KVCaches sharing one seqlens, at most 16 new tokens, a static rope type), else None."""
        from .kernels.decode_attention import MAX_Q_LEN

        if (caches is None or x.shape[1] > MAX_Q_LEN or torch.is_grad_enabled()
                or not all(getattr(c, "seqlens", None) is caches[0].seqlens for c in caches)):
            return None
        return self.rotary_emb.table(caches[0].max_seqlen, x.device, x.dtype)


def _init_parameters(model: nn.Module, normal_) -> None:
    """HF's init rule: norm weights 1, biases 0, every other parameter drawn by ``normal_(p)`` in place."""
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            normal_(p)


class LlamaForCausalLM(nn.Module):
    """LLaMA-family causal LM (Llama 2/3/3.1/3.2, Mistral, Qwen2 configurations) over our Triton layers."""

    def __init__(self, config):
        super().__init__()
        if isinstance(config, str):
            config = LlamaConfig.preset(config)
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if getattr(config, "output_router_logits", False):      # issue 17: aux loss (+ coef * aux to the loss)
            from .moe import add_aux_loss

            self.register_forward_hook(add_aux_loss)

    def tie_weights(self) -> None:
        """lm_head shares embed_tokens' weight when config.tie_word_embeddings (LLaMA-3.2 1B/3B)."""
        if getattr(self.config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "LlamaForCausalLM":
        """Deterministic random weights (HF's init: normal(0, std), zero biases, unit norms); returns self."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        _init_parameters(self, lambda p: p.copy_(torch.randn(p.shape, generator=gen) * std))
        return self

    @classmethod
    @torch.no_grad()
    def random(cls, config, dtype=torch.float32, device=None, seed: int = 0, std: float = 0.02) -> "LlamaForCausalLM":
        """A model with random weights built directly on `device` in `dtype` (fast for 8B shapes on a GPU: no
        CPU init, no fp32 copy). Weights are not bit-identical across devices; use init_weights for that."""
        if isinstance(config, str):
            config = LlamaConfig.preset(config)
        with torch.device("meta"):
            model = cls(config)
        device = torch.device(device or "cpu")
        model = model.to(dtype=dtype).to_empty(device=device)
        model.tie_weights()
        gen = torch.Generator(device=device).manual_seed(seed)
        _init_parameters(model, lambda p: p.normal_(0.0, std, generator=gen))
        model.model.reset_rotary(device)
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, input_ids, labels=None, position_ids=None, caches=None, fresh_cache: bool = False,
                logits_to_keep: int = 0, shift_labels=None, num_items_in_batch=None, return_logits=None,
                cu_seqlens=None, max_seqlen=None) -> CausalLMOutput:
        """input_ids (b, s) int64 -> CausalLMOutput(logits (b, s, vocab) or None, loss).

        Training / scoring: ``caches=None`` (flash attention over the whole sequence); ``labels`` (b, s) gives
        HF's shifted next-token loss (ignore_index -100, fp32; ``shift_labels`` already shifted instead;
        ``num_items_in_batch``: sum / it, for gradient accumulation; llama_triton.loss). In training mode
        with labels the loss is the fused linear cross-entropy and logits are not built (``out.logits`` is
        None) unless ``return_logits=True``. Packed documents: ``cu_seqlens`` int32 (n_docs + 1,) offsets
        into the flattened b*s tokens (varlen attention: no token sees another document) with
        ``position_ids`` restarting per document (llama_triton.data). Inference: ``caches`` from
        ``make_caches``, ``position_ids`` (b, s) the tokens' absolute positions (default: each cache's
        seqlens onward); ``fresh_cache=True`` for a prefill into empty caches. ``logits_to_keep=n`` keeps the
        last n positions.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be (batch, seq) int64, got {tuple(input_ids.shape)} {input_ids.dtype}")
        hidden = self.model(input_ids, position_ids, caches, fresh_cache,
                            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)                # (b, s, hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        has_labels = labels is not None or shift_labels is not None
        if return_logits is None:
            return_logits = not (self.training and has_labels)
        if has_labels and shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:][:, -hidden.shape[1]:]  # (b, s) next tokens
        loss_kw = dict(shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
        if not return_logits:
            from .loss import causal_lm_loss

            return CausalLMOutput(None, causal_lm_loss(hidden, self.lm_head.weight, **loss_kw) if has_labels else None)
        logits = self.lm_head(hidden)                                                    # (b, s, vocab)
        if not has_labels:
            return CausalLMOutput(logits, None)
        from .loss import logits_loss

        return CausalLMOutput(logits, logits_loss(logits, **loss_kw))                    # fp32, Triton kernel

    def make_caches(self, batch: int, max_seqlen: int, dtype=None, device=None) -> list:
        """One static KVCache per layer: (batch, max_seqlen, n_kv_heads, head_dim) buffers."""
        from .packing import pack_model_

        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        pack_model_(self)                  # q/k/v and gate/up as one GEMM each (same parameters, one buffer)
        self.model.rotary_emb.table(max_seqlen, device or self.device, self.dtype)   # cos/sin, built once, here
        seqlens = torch.zeros(batch, dtype=torch.int32, device=device or self.device)   # one for all layers
        return [KVCache(batch, max_seqlen, c.num_key_value_heads, head_dim, dtype=dtype or self.dtype,
                        device=device or self.device, seqlens=seqlens) for _ in range(c.num_hidden_layers)]

    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """See llama_triton.generate.generate."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "LlamaForCausalLM":
        """Load a HF-format directory (config.json + model.safetensors or a sharded index)."""
        from .checkpoint import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_size: int | None = None) -> None:
        """Write config.json + model.safetensors (or shards + index) that transformers loads."""
        from .checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)
