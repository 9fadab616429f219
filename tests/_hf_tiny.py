"""Tiny random transformers models (no downloads) shared by the model / checkpoint / generate / hf tests.

Sizes are small for the Triton interpreter: hidden 32-64, 1-2 layers, head_dim a multiple of 8 (the
flash-attention kernel's requirement)."""
import torch

transformers = __import__("pytest").importorskip("transformers")

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> (transformers config class, kwargs)
CONFIGS = {
    "gqa": ("LlamaConfig", {}),
    "tied_llama3": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=_LLAMA3)),
    # hidden 40 (not a power of 2), 5 heads of head_dim 8, MQA, odd intermediate size
    "odd_hidden": ("LlamaConfig", dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                                       intermediate_size=47)),
    "mistral_window": ("MistralConfig", dict(sliding_window=5)),
    "qwen2_bias": ("Qwen2Config", dict(num_hidden_layers=1)),
}


def hf_model(name: str, seed: int = 0, **overrides):
    """A fp32 eval-mode transformers CausalLM with deterministic random weights (biases non-zero)."""
    cls_name, kw = CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**_COMMON, **kw, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:       # make biases and norm weights visible in the output
                p.add_(0.1 * torch.randn_like(p))
    return model


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
