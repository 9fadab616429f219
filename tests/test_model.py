"""Our LlamaForCausalLM against transformers on the same weights (loaded from a dir written by transformers'
save_pretrained), the training forward/backward, cached decode vs full recompute, and LlamaConfig."""
import json

import pytest
import torch

from _hf_tiny import CONFIGS, hf_model, rel_err, transformers
from llama_triton.model import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(name, HF model, our model loaded from HF's save_pretrained directory)."""
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, LlamaForCausalLM.from_pretrained(path)


def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4, f"{name}: max rel err {rel_err(out, ref):.2e}"


def test_cached_decode_matches_full_recompute(pair):
    """Prefill 3 tokens into static caches, append a 17-token chunk (more than decode attention's 16 queries:
    flash attention over the cache prefix), then 3 one-token steps: the logits == the full forward."""
    name, _, ours = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(ids).logits                                                  # (2, 23, vocab)
        caches = ours.make_caches(2, 24)
        pre = ours(ids[:, :3], caches=caches, fresh_cache=True).logits
        chunk = ours(ids[:, 3:20], caches=caches).logits                        # positions 3..19
        steps = [ours(ids[:, t:t + 1], caches=caches).logits for t in range(20, 23)]
    assert caches[0].seqlens.tolist() == [23, 23]
    got = torch.cat([pre, chunk] + steps, 1)
    assert rel_err(got, full) < 1e-4, f"{name}: {rel_err(got, full):.2e}"


def test_long_chunk_appended_to_ragged_caches():
    """Rows holding different lengths (as generate's right-aligned prefill leaves them) take a 17-token chunk,
    each at its own positions, under a sliding window."""
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, sliding_window=9, model_type="mistral")).init_weights(0)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 256, (1, 20), generator=g), torch.randint(0, 256, (1, 22), generator=g)
    with torch.no_grad():
        caches = model.make_caches(2, 24)
        model(torch.cat([a[:, :5], b[:, :5]]), caches=caches, fresh_cache=True)
        for c in caches:                                                         # a holds 3 tokens, b 5
            c.seqlens.copy_(torch.tensor([3, 5], dtype=torch.int32))
        got = model(torch.cat([a[:, 3:20], b[:, 5:22]]), caches=caches).logits   # (2, 17, vocab)
        ref_a, ref_b = model(a).logits[:, 3:20], model(b).logits[:, 5:22]
    assert caches[0].seqlens.tolist() == [20, 22]
    assert rel_err(got[:1], ref_a) < 1e-4 and rel_err(got[1:], ref_b) < 1e-4


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name, params", [("llama-2-7b", 6.74e9), ("llama-3-8b", 8.03e9), ("llama-3.1-8b", 8.03e9),
                                          ("llama-3.2-1b", 1.24e9), ("mistral-7b", 7.24e9)])
def test_presets_have_the_published_sizes(name, params):
    cfg = LlamaConfig.preset(name)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01, f"{name}: {n:.3e} parameters"
    hf_cfg = getattr(transformers, {"llama": "LlamaConfig", "mistral": "MistralConfig"}[cfg.model_type])(
        **cfg.to_hf_dict())
    assert LlamaConfig.from_hf_config(hf_cfg) == cfg


def test_tiny_preset_is_the_default():
    cfg = LlamaConfig()
    assert cfg == LlamaConfig.preset("tiny") and cfg.vocab_size == 260 and cfg.head_dim == 16


def test_from_hf_config_reads_old_style_rope_scaling(tmp_path):
    d = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 500000.0,
         "rope_scaling": {"type": "linear", "factor": 2.0}}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = LlamaConfig.from_hf_config(tmp_path)
    assert cfg.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16


def test_old_style_llama3_rope_scaling_gives_transformers_tables(tmp_path):
    """A LLaMA-3.1 style config.json (rope_theta + rope_scaling {rope_type: llama3, ...}): the same inv_freq and
    (cos, sin) as transformers builds from that file."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    d = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 128,
         "rope_theta": 500000.0, "rope_scaling": scaling}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = LlamaConfig.from_hf_config(tmp_path)
    assert cfg.rope_parameters == {**scaling, "rope_theta": 500000.0}
    hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
        transformers.AutoConfig.from_pretrained(tmp_path))
    ours = LlamaForCausalLM(cfg).model.rotary_emb
    assert torch.equal(ours.inv_freq, hf_rope.inv_freq)
    x, pos = torch.zeros(1, 1), torch.arange(0, 120, 7)[None]
    for a, b in zip(ours(x, pos), hf_rope(x, pos)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=7), "head_dim"),
])
def test_bad_config_raises_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**kwargs)


def test_unknown_preset_and_model_type():
    with pytest.raises(ValueError, match="unknown preset"):
        LlamaConfig.preset("gpt-2")
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig.from_hf_config({"model_type": "gpt2"})


def test_forward_rejects_bad_input_ids():
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_gpu_logits_close_to_transformers(name, tmp_path):
    hf = hf_model(name).to("cuda", torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, device="cuda")
    assert ours.dtype == torch.bfloat16
    ids = torch.randint(0, hf.config.vocab_size, (2, 200), device="cuda")
    with torch.no_grad():
        ref = hf(ids).logits.float()
        out = ours(ids).logits.float()
        exact = hf.float()(ids).logits
    # the 2x rule: our bf16 error vs the fp32 model at most 2x transformers' bf16 error (+ small atol)
    assert (out - exact).abs().max() <= 2 * (ref - exact).abs().max() + 1e-2
