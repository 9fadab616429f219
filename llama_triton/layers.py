"""Drop-in nn.Modules over llama_triton.ops.

Each layer takes the constructor arguments of the Hugging Face class it replaces, has the same parameter
names (so state_dicts load unchanged), returns the same things from ``forward``, and has
``from_module(hf_module)`` that builds it around the existing module's parameters (shared, not copied).
"""
from __future__ import annotations

import torch
from torch import nn

from .ops.rms_norm import rms_norm
from .ops.rms_norm_matmul import fold_norm_weight, rms_norm_matmul
from .ops.rope import compute_inv_freq, rope_parameters
from .ops.swiglu import swiglu
from .loss_modules import CrossEntropyLoss, FusedLinearCrossEntropyLoss  # noqa: F401  (Liger-style losses)


class RMSNorm(nn.Module):
    """Drop-in for ``LlamaRMSNorm(hidden_size, eps)``: ``weight (hidden,)``, ``variance_epsilon``.

    ``forward(x)`` -> ``y``; ``forward(x, residual)`` -> ``(y, residual + x)`` (fused add + norm).
    Liger's options for other families: ``offset`` (scale ``offset + weight``; Gemma: 1.0), ``casting_mode``
    ("llama", "gemma", "none": see ``llama_triton.rms_norm``) and ``init_fn`` ("ones", or "zeros" for
    Gemma-style weights). ``from_module`` of an HF ``Gemma*RMSNorm`` sets offset=1.0, casting_mode="gemma".
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None, offset: float = 0.0,
                 casting_mode: str = "llama", init_fn: str = "ones"):
        super().__init__()
        from .kernels.rms_norm import check_norm_options

        check_norm_options(offset, casting_mode)
        if init_fn not in ("ones", "zeros"):
            raise ValueError(f"init_fn must be 'ones' or 'zeros', got {init_fn!r}")
        init = torch.ones if init_fn == "ones" else torch.zeros
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps
        self.offset, self.casting_mode = float(offset), casting_mode

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, residual, offset=self.offset,
                        casting_mode=self.casting_mode)

    @classmethod
    def from_module(cls, module: nn.Module) -> "RMSNorm":
        """Build from an HF ``LlamaRMSNorm`` (or any module with ``weight`` and ``variance_epsilon``/``eps``);
        an HF ``GemmaRMSNorm`` (class name starting with "Gemma") gets offset=1.0, casting_mode="gemma"."""
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise TypeError(f"from_module needs a module with `weight` and `variance_epsilon`, got {type(module).__name__}")
        gemma = type(module).__name__.startswith("Gemma")
        new = cls(module.weight.shape[0], eps, device="meta", offset=1.0 if gemma else 0.0,
                  casting_mode="gemma" if gemma else "llama")
        new.weight = module.weight
        return new

    def extra_repr(self) -> str:
        opts = "" if self.offset == 0.0 and self.casting_mode == "llama" else \
            f", offset={self.offset}, casting_mode={self.casting_mode!r}"
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}{opts}"


# ------------------------------------------------------------------------------------------- KV cache
class KVCache(nn.Module):
    """Static (preallocated) KV cache, gpt-fast style, for ``llama_triton.decode_attention``.

    Buffers: ``k``, ``v`` ``(batch, max_seqlen, n_kv_heads, head_dim)`` and ``seqlens`` int32 ``(batch,)``
    (valid entries per sequence). Fixed shapes and no host sync in ``update``, so a decode step that uses
    it can be captured in a CUDA graph / compiled with static shapes.
    """

    def __init__(self, batch: int, max_seqlen: int, n_kv_heads: int, head_dim: int, dtype=None, device=None,
                 seqlens: torch.Tensor | None = None):
        super().__init__()
        for name, val in (("batch", batch), ("max_seqlen", max_seqlen), ("n_kv_heads", n_kv_heads),
                          ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {val!r}")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        shape = (batch, max_seqlen, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if seqlens is None:                  # one per model (LlamaForCausalLM.make_caches): pass it to every layer
            seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        elif seqlens.shape != (batch,) or seqlens.dtype != torch.int32:
            raise ValueError(f"KVCache: seqlens must be an int32 ({batch},) tensor, got {seqlens.dtype} {tuple(seqlens.shape)}")
        self.register_buffer("seqlens", seqlens, persistent=False)

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write new entries and advance the lengths; returns the ``(k, v)`` buffers.

        positions: int64 (or int32) ``(batch, q_len)`` absolute positions of the new tokens;
        k, v: ``(batch, q_len, n_kv_heads, head_dim)`` in the cache's dtype (TypeError otherwise). Sets
        ``seqlens = max(seqlens, positions[:, -1] + 1)``. Positions are range-checked (ValueError) when they
        live on the CPU; on a GPU an out-of-range position is an indexing error of ``index_put_``.
        """
        from .kernels._checks import check_same_device, check_tensor, cpu_value_check

        check_tensor("positions", positions, (torch.int64, torch.int32), ndim=2)
        check_tensor("k", k, None, ndim=4)
        check_tensor("v", v, None, ndim=4)
        check_same_device(cache=self.k, positions=positions, k=k, v=v)
        b, q_len = positions.shape
        want = (b, q_len) + tuple(self.k.shape[2:])
        if b != self.k.shape[0] or q_len < 1:
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected (batch={self.k.shape[0]}, q_len>=1)")
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {want} (batch, q_len, n_kv_heads, head_dim)")
            if t.dtype != self.k.dtype:            # no silent cast (a fp16 k rounded into a fp32 cache, ...)
                raise TypeError(f"{name} has dtype {t.dtype} but the cache holds {self.k.dtype}; build the "
                                f"KVCache with dtype={t.dtype} or cast {name}")
        if positions.device.type == "cpu" and not torch.compiler.is_compiling():
            with cpu_value_check():
                lo, hi = int(positions.min()), int(positions.max())
            if lo < 0 or hi >= self.max_seqlen:
                raise ValueError(f"positions must be in [0, max_seqlen={self.max_seqlen}), got values in [{lo}, {hi}]")
        positions = positions.long()
        rows = torch.arange(b, device=positions.device)[:, None].expand(b, q_len)   # (b, q_len)
        self.k.index_put_((rows, positions), k)                                      # k[b, pos[b, t]] = k[b, t]
        self.v.index_put_((rows, positions), v)
        torch.maximum(self.seqlens, (positions[:, -1] + 1).to(torch.int32), out=self.seqlens)
        return self.k, self.v

    def reset(self) -> None:
        """Forget every sequence (lengths to 0; the buffers' stale contents are never read)."""
        self.seqlens.zero_()

    def extra_repr(self) -> str:
        return f"{tuple(self.k.shape)}, dtype={self.k.dtype}"


# ------------------------------------------------------------------------------ Attention, DecoderLayer
def _layer_window(config, layer_idx: int):
    """Sliding window of layer `layer_idx` (None: full attention); HF Mistral/Qwen2 conventions."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)


class Attention(nn.Module):
    """Drop-in for HF ``LlamaAttention(config, layer_idx)`` (and Mistral/Qwen2 attention): q/k/v/o_proj with
    the config's bias flags, GQA, rotary via ``apply_rotary_pos_emb``, and three paths in ``forward``:

    * ``cache=None, attention_mask=None`` (training, full-sequence forward): flash_attention, causal.
    * ``cache`` a static ``KVCache`` (our model's inference): writes k/v at ``position_ids`` (b, s) int64,
      then decode_attention over the cache (``fresh_cache=True``: the chunk starts an empty cache, so
      flash_attention over the chunk itself).
    * otherwise (inside a transformers model: HF ``Cache`` and/or HF padding mask): ``cache.update`` as HF
      does, then ``llama_triton.attention.hf_attention_forward``.

    ``forward(hidden_states (b, s, hidden), position_embeddings=(cos, sin) (b, s, head_dim), ...)`` ->
    ``(out (b, s, hidden), None)``.
    """

    def __init__(self, config, layer_idx: int = 0, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0) or 0.0
        self.is_causal = True
        self.sliding_window = _layer_window(config, layer_idx)
        bias = bool(getattr(config, "attention_bias", False))
        o_bias = getattr(config, "o_proj_bias", None)
        if getattr(config, "model_type", None) == "qwen2":
            bias, o_bias = True, False
        o_bias = bias if o_bias is None else bool(o_bias)
        kw = dict(device=device, dtype=dtype)
        h, nh, nkv, hd = config.hidden_size, self.num_heads, self.num_key_value_heads, self.head_dim
        self.q_proj = nn.Linear(h, nh * hd, bias=bias, **kw)
        self.k_proj = nn.Linear(h, nkv * hd, bias=bias, **kw)
        self.v_proj = nn.Linear(h, nkv * hd, bias=bias, **kw)
        self.o_proj = nn.Linear(nh * hd, h, bias=o_bias, **kw)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, position_ids=None,
                fresh_cache: bool = False, **kwargs):
        from .attention import cached_attention, causal_attention, hf_attention_forward
        from .ops.rope import apply_rotary_pos_emb

        rope_table = kwargs.pop("rope_table", None)
        if rope_table is not None and hasattr(cache, "seqlens"):                      # our decode step
            return self._decode_step(hidden_states, cache, rope_table), None
        if position_embeddings is None:
            raise ValueError("Attention.forward needs position_embeddings=(cos, sin) from RotaryEmbedding")
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if self.training and self.attention_dropout > 0:
            raise NotImplementedError("Attention: attention dropout is not implemented; set attention_dropout=0")
        b, s, _ = hidden_states.shape
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in self._qkv(hidden_states))  # (b, s, h | h_kv, d)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)   # (b, h, s, d), (b, h_kv, s, d)
        if cache is None and attention_mask is None:             # packed documents: cu_seq_lens_q (varlen)
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v, self.scaling, self.sliding_window,
                                   cu_seqlens=kwargs.get("cu_seq_lens_q"), max_seqlen=kwargs.get("max_length_q"))
        elif hasattr(cache, "seqlens"):                                              # our static KVCache
            if position_ids is None:
                raise ValueError("Attention.forward with a KVCache needs position_ids (b, s) int64")
            dt = cache.k.dtype      # explicit: under autocast k (rotated with fp32 cos/sin) and v differ
            k_buf, v_buf = cache.update(position_ids.expand(b, s), k.transpose(1, 2).to(dt), v.to(dt))
            if fresh_cache:
                out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v, self.scaling, self.sliding_window)
            else:
                out = cached_attention(q.transpose(1, 2), k_buf, v_buf, cache.seqlens, self.scaling,
                                       self.sliding_window)
        else:                                                                        # inside transformers
            v = v.transpose(1, 2)                                                    # (b, h_kv, s, d)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
            packed = {n: kwargs[n] for n in ("cu_seq_lens_q", "max_length_q") if n in kwargs}   # flattened docs
            out, _ = hf_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling,
                                          sliding_window=self.sliding_window, position_ids=position_ids, **packed)
        return self.o_proj(out.reshape(b, s, -1)), None                              # (b, s, hidden)

    def _qkv(self, x):
        """q, k, v projections of x (b, s, hidden): one GEMM over the packed weight when q/k/v_proj are packed
        (``llama_triton.packing``) and no gradient is needed, else one per projection."""
        from .packing import fused_forward

        fused = None if torch.is_grad_enabled() else fused_forward((self.q_proj, self.k_proj, self.v_proj))
        if fused is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        y = fused(x)                                                                 # (b, s, (h + 2 h_kv) d)
        return y.split([self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], -1)

    def _decode_step(self, hidden_states, cache, rope_table):
        """The decode step over our KVCache, 3 launches: q/k/v GEMM, RoPE + KV append + attention
        (``decode_attention_with_kvcache``, + a merge launch when the cache is split), o_proj. ``cache.seqlens``
        holds the lengths before this step (the model advances it once per step, for all layers)."""
        from .attention import window_size
        from .ops.decode_attention import decode_attention_with_kvcache

        b, s, _ = hidden_states.shape
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in self._qkv(hidden_states))
        out = decode_attention_with_kvcache(q, cache.k, cache.v, k, v, cache.seqlens, rope_table[0], rope_table[1],
                                            softmax_scale=self.scaling, window_size=window_size(self.sliding_window))
        return self.o_proj(out.reshape(b, s, -1))                                    # (b, s, hidden)

    @classmethod
    def from_module(cls, module: nn.Module) -> "Attention":
        """Build around an HF LlamaAttention / MistralAttention / Qwen2Attention, sharing its projections."""
        if not all(hasattr(module, n) for n in ("config", "q_proj", "k_proj", "v_proj", "o_proj")):
            raise TypeError(f"from_module needs an HF attention module with config and q/k/v/o_proj, "
                            f"got {type(module).__name__}")
        new = cls(module.config, getattr(module, "layer_idx", 0), device="meta")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(new, name, getattr(module, name))
        new.head_dim, new.scaling = module.head_dim, module.scaling
        if hasattr(module, "sliding_window"):
            new.sliding_window = module.sliding_window
        return new

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"sliding_window={self.sliding_window}")


class DecoderLayer(nn.Module):
    """Drop-in for HF ``LlamaDecoderLayer(config, layer_idx)``: x + attn(norm(x)), then + mlp(norm(.)), with the
    second residual add fused into post_attention_layernorm. ``forward(hidden_states, ...)`` -> hidden_states."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SparseMoeBlock(config) if is_moe_layer(config, layer_idx) else SwiGLUMLP(config)   # issue 17
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, residual=None, return_residual: bool = False, **kwargs):
        """``residual`` given: the layer input is ``residual + hidden_states`` (the previous layer's unsummed
        output), added inside input_layernorm; ``return_residual=True`` returns ``(mlp_out, residual)``
        unsummed, for the next layer's (or the final) norm to add: no separate add launch per layer."""
        if residual is None:
            residual = hidden_states
            h = self.input_layernorm(hidden_states)
        else:
            h, residual = self.input_layernorm(hidden_states, residual)             # residual + x, normed
        h, _ = self.self_attn(h, position_embeddings=position_embeddings, attention_mask=attention_mask,
                              cache=cache, position_ids=position_ids, **kwargs)
        h, residual = self.post_attention_layernorm(h, residual)                    # residual + attn, normed
        h = self.mlp(h)
        return (h, residual) if return_residual else residual + h


class RotaryEmbedding(nn.Module):
    """Drop-in for transformers 5 ``LlamaRotaryEmbedding(config)``: ``forward(x, position_ids)`` ->
    ``(cos, sin)``, each ``(batch, seq, head_dim)`` in x's dtype, for arbitrary ``position_ids (batch, seq)``
    (decode at position p, packed sequences).

    Reads ``config.rope_parameters`` (rope_type default / linear / dynamic / llama3, rope_theta, factor,
    ...) and computes ``inv_freq`` with transformers' formulas (``llama_triton.ops.rope.compute_inv_freq``),
    so the tables are bit-identical to HF's; "dynamic" re-computes ``inv_freq`` when a position passes the
    cached length, as HF does. The tables are a few elementwise torch ops (not a kernel) so that they stay
    exactly HF's; the rotation itself is ``llama_triton.apply_rotary_pos_emb``.
    """

    inv_freq: torch.Tensor

    def __init__(self, config, device=None):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = getattr(config, "max_position_embeddings", 2048)
        self.rope_type = rope_parameters(config)["rope_type"]
        inv_freq, self.attention_scaling = compute_inv_freq(config)  # on the CPU, as HF (same bits)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone().to(device), persistent=False)

    def _dynamic_update(self, position_ids: torch.Tensor, device) -> None:
        """HF's dynamic_frequency_update: grow past the cached length, reset back within the original one."""
        seq_len = torch.max(position_ids) + 1
        if seq_len > self.max_seq_len_cached:
            inv_freq, self.attention_scaling = compute_inv_freq(self.config, device, seq_len=seq_len)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len and self.max_seq_len_cached > self.original_max_seq_len:
            self.original_inv_freq = self.original_inv_freq.to(device)
            self.register_buffer("inv_freq", self.original_inv_freq, persistent=False)
            self.max_seq_len_cached = self.original_max_seq_len

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if self.rope_type == "dynamic":
            self._dynamic_update(position_ids, x.device)
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (b, s, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                                        # (b, s, d)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def table(self, n: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cos, sin)`` ``(n, head_dim)`` for positions ``0..n-1`` in `dtype`, built once (cached while n,
        device and dtype fit) with ``forward``'s own ops, so row p is bit for bit ``forward`` at position p
        (HF's values). A decode step gathers its rows inside the attention kernel: no per-step table ops.
        None for "dynamic" rope (its frequencies depend on the sequence length)."""
        if self.rope_type == "dynamic":
            return None
        cached = getattr(self, "_table", None)
        device = torch.device(device)
        if cached is None or cached[0].shape[0] < n or cached[0].device != device or cached[0].dtype != dtype:
            with torch.no_grad():
                cos, sin = self.forward(torch.empty(0, device=device, dtype=dtype),
                                        torch.arange(n, device=device)[None])
            self._table = cached = (cos[0], sin[0])
        return cached

    def extra_repr(self) -> str:
        return f"rope_type={self.rope_type}, rotary_dim={2 * self.inv_freq.shape[0]}"


class SwiGLUMLP(nn.Module):
    """Drop-in for HF ``LlamaMLP(config)``: ``gate_proj``/``up_proj`` ``(I, H)``, ``down_proj`` ``(H, I)``
    (``bias=config.mlp_bias``); ``forward(x (..., H)) -> (..., H)`` = ``down(silu(gate(x)) * up(x))`` with
    the activation and product in one kernel (``llama_triton.swiglu``). The projections stay ``nn.Linear``
    (cuBLAS), so state_dicts and weight-swapping tools (quantization) see the usual modules."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"SwiGLUMLP implements hidden_act 'silu' (SwiGLU), got {act!r}")
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, **kw)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, **kw)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .packing import fused_forward

        fused = None if torch.is_grad_enabled() else fused_forward((self.gate_proj, self.up_proj))
        if fused is not None:                           # one GEMM over the packed gate/up weight (inference)
            return self.down_proj(swiglu(fused(x)))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    @classmethod
    def from_module(cls, module: nn.Module) -> "SwiGLUMLP":
        """Build around an HF ``LlamaMLP``'s projections (shared modules, not copies)."""
        if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
            raise TypeError(f"from_module needs a module with gate_proj/up_proj/down_proj, got {type(module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.config = getattr(module, "config", None)
        act = getattr(new.config, "hidden_act", "silu") if new.config is not None else "silu"
        if act not in ("silu", "swish"):
            raise ValueError(f"SwiGLUMLP implements hidden_act 'silu' (SwiGLU), got {act!r}")
        new.gate_proj, new.up_proj, new.down_proj = module.gate_proj, module.up_proj, module.down_proj
        new.hidden_size = module.gate_proj.in_features
        new.intermediate_size = module.gate_proj.out_features
        return new


class RMSNormLinear(nn.Module):
    """An RMSNorm and the linear layer(s) it feeds, as one fused GEMM (``llama_triton.rms_norm_matmul``):
    the input norm + concatenated q/k/v projections, or the post-attention norm + concatenated gate/up.

    Parameters: ``norm_weight (K,)`` (the RMSNorm's ``weight``; shared with the norm by ``from_modules``),
    ``weight (sum(out_features), K)`` the concatenated linear weights, optional ``bias``.
    ``forward(x)`` -> a tuple with one ``(..., out_i)`` tensor per linear (views of one output);
    ``forward(x, residual)`` -> ``(outputs, residual + x)``. ``fold_()`` pre-multiplies the norm weight into
    ``weight`` for inference (``norm_weight`` becomes None; not for training).
    """

    def __init__(self, hidden_size: int, out_features, eps: float = 1e-6, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.out_features = tuple(int(o) for o in (out_features if isinstance(out_features, (list, tuple))
                                                   else (out_features,)))
        self.variance_epsilon = eps
        self.norm_weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.weight = nn.Parameter(torch.empty(sum(self.out_features), hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(sum(self.out_features), device=device, dtype=dtype)) if bias else None
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    @classmethod
    def from_modules(cls, norm: nn.Module, linears) -> "RMSNormLinear":
        """Build from an HF ``LlamaRMSNorm`` (its weight is shared) and the ``nn.Linear``s it feeds (their
        weights are concatenated: a copy, so train this module, not the originals)."""
        linears = list(linears)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None or not isinstance(getattr(norm, "weight", None), torch.Tensor):
            raise TypeError(f"from_modules needs an RMSNorm with `weight` and `variance_epsilon`, got {type(norm).__name__}")
        if not linears or not all(isinstance(m, nn.Linear) for m in linears):
            raise TypeError("from_modules needs one or more nn.Linear modules after the norm")
        has_bias = [m.bias is not None for m in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("from_modules: either all linears have a bias or none")
        new = cls(norm.weight.shape[0], [m.out_features for m in linears], eps, bias=False, device="meta")
        new.norm_weight = norm.weight
        with torch.no_grad():
            new.weight = nn.Parameter(torch.cat([m.weight for m in linears], 0))
            new.bias = nn.Parameter(torch.cat([m.bias for m in linears], 0)) if all(has_bias) else None
        return new

    @torch.no_grad()
    def fold_(self) -> "RMSNormLinear":
        """Pre-fold the norm weight into ``weight`` (inference); afterwards ``norm_weight`` is None."""
        if self.norm_weight is not None:
            self.weight.copy_(fold_norm_weight(self.norm_weight, self.weight))
            self.norm_weight = None
        return self

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        out = rms_norm_matmul(x, self.norm_weight, self.weight, self.variance_epsilon, residual)
        y, res = (out if residual is not None else (out, None))
        if self.bias is not None:
            y = y + self.bias
        outs = tuple(y.split(self.out_features, dim=-1))
        return (outs, res) if residual is not None else outs

    def extra_repr(self) -> str:
        return f"hidden={self.weight.shape[1]}, out_features={self.out_features}, eps={self.variance_epsilon}"


# ----------------------------------------------------------------------------- quantized linear (issue 7)
from .ops.quant_matmul import quant_matmul  # noqa: E402
from .quant import (QuantizedWeight, check_group_size, import_awq, import_gptq, quantize_weight,  # noqa: E402
                    repack_codes, repacked_shape, unpack_rows, zeros_dtype)


class QuantLinear(nn.Module):
    """``nn.Linear`` with a weight-only quantized weight (W4A16 / W8A16), over ``llama_triton.quant_matmul``.

    Buffers (the format of ``llama_triton.quant``): ``qweight`` int32, in memory the kernels' repacked layout
    ``(out, KP // (32 // bits))``, in the state_dict GPTQ's ``(in // (32 // bits), out)`` (hooks convert);
    ``scales`` ``(in // group_size, out)``, ``zeros`` (``sym=False``; uint8 / int16) and ``perm`` int32
    ``(in,)`` (``act_order=True``); ``bias`` ``(out,)`` or None. ``forward(x (..., in)) -> (..., out)`` in x's
    dtype. Build one with ``from_linear`` (RTN), ``from_gptq``, ``from_awq`` or ``from_quantized``; a fresh
    ``QuantLinear(in, out, bias, bits, group_size, sym, act_order)`` loads the state_dict of any of them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4, group_size: int = 128,
                 sym: bool = True, act_order: bool = False, device=None, dtype=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        pack = 32 // bits
        if in_features % pack:
            raise ValueError(f"in_features={in_features} must be a multiple of {pack} for {bits}-bit weights")
        group_size = in_features if group_size == -1 else group_size
        check_group_size(group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym, self.act_order = bits, group_size, sym, act_order
        G = in_features // group_size
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.register_buffer("qweight", torch.zeros(repacked_shape(in_features, out_features, bits), dtype=torch.int32,
                                                    device=device))
        self.register_buffer("scales", torch.ones((G, out_features), dtype=dtype, device=device))
        self.register_buffer("zeros", None if sym else torch.full((G, out_features), 1 << (bits - 1),
                                                                  dtype=zeros_dtype(bits), device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device) if act_order else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._register_state_dict_hook(QuantLinear._gptq_layout_on_save)
        self._register_load_state_dict_pre_hook(QuantLinear._repack_on_load, with_module=True)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.perm,
                               layout="repacked", in_features=self.in_features)

    @staticmethod
    def _gptq_layout_on_save(module, state_dict, prefix, local_metadata):
        """state_dict holds qweight in GPTQ's (in // PACK, out) layout; the repacking stays in memory."""
        key = prefix + "qweight"
        if key in state_dict and module.qweight.device.type != "meta":
            state_dict[key] = module.quantized_weight.gptq_qweight()

    @staticmethod
    def _repack_on_load(module, state_dict, prefix, *args):
        """Repack a GPTQ-layout qweight (in // PACK, out) from a state_dict into the kernels' layout."""
        key = prefix + "qweight"
        q = state_dict.get(key)
        gptq_shape = (module.in_features * module.bits // 32, module.out_features)
        if isinstance(q, torch.Tensor) and tuple(q.shape) == gptq_shape:
            state_dict[key] = repack_codes(unpack_rows(q, module.bits), module.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x, self.quantized_weight)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap a QuantizedWeight (its tensors are shared, not copied) and an optional bias ``(out,)``."""
        new = cls(qw.in_features, qw.out_features, bias=bias is not None, bits=qw.bits, group_size=qw.group_size,
                  sym=qw.zeros is None, act_order=qw.perm is not None, device="meta", dtype=qw.scales.dtype)
        new.qweight, new.scales, new.zeros, new.perm = qw.qweight, qw.scales, qw.zeros, qw.perm
        if bias is not None:
            new.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = True) -> "QuantLinear":
        """RTN-quantize an ``nn.Linear`` (``quant.quantize_weight``); the bias is kept. The reconstruction
        error is in ``.quant_error``."""
        if not isinstance(getattr(linear, "weight", None), torch.Tensor) or linear.weight.dim() != 2:
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight.detach(), bits=bits, group_size=group_size, sym=sym)
        new = cls.from_quantized(qw, linear.bias)
        new.quant_error = qw.error
        return new

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx=None, bias=None, bits: int = 4, group_size: int | None = None,
                  checkpoint_format: str = "gptq") -> "QuantLinear":
        """From a GPTQ checkpoint's tensors (``quant.import_gptq``; act-order resolved at load time)."""
        return cls.from_quantized(import_gptq(qweight, qzeros, scales, g_idx, bits, group_size, checkpoint_format), bias)

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bias=None, group_size: int | None = None) -> "QuantLinear":
        """From an AutoAWQ (GEMM) checkpoint's tensors (``quant.import_awq``; re-packed along K)."""
        return cls.from_quantized(import_awq(qweight, qzeros, scales, 4, group_size), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, sym={self.sym}, act_order={self.act_order}")


from .low_rank_linear import LowRankLinear  # noqa: E402,F401  (issue 18: its own file)
from .moe import MoeExperts, SparseMoeBlock, TopKRouter, is_moe_layer  # noqa: E402,F401  (issue 17: its own file)
