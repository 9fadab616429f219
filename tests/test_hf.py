"""llama_triton.hf: a patched transformers model gives the stock model's logits (with and without padding)
and the same 20 greedy tokens from HF generate (dynamic and static caches); unpatch; register() +
attn_implementation="llama_triton"."""
import copy

import pytest
import torch

from _hf_tiny import hf_model, rel_err, transformers
from llama_triton import hf, layers, reference
from llama_triton.attention import hf_attention_forward


@pytest.mark.parametrize("name", ["gqa", "mistral_window", "qwen2_bias", "tied_llama3"])
def test_patched_model_matches_stock(name):
    stock = hf_model(name, num_hidden_layers=1)
    patched = copy.deepcopy(stock)
    before = dict(patched.named_modules())
    report = hf.patch(patched)
    assert report.attn_implementation == "llama_triton"
    n_layers = stock.config.num_hidden_layers
    counts = report.counts()
    assert any(k.endswith("Attention -> Attention") and v == n_layers for k, v in counts.items()), counts
    assert any(k.endswith("RMSNorm -> RMSNorm") and v == 2 * n_layers + 1 for k, v in counts.items()), counts
    assert isinstance(patched.model.layers[0].self_attn, layers.Attention)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        assert rel_err(patched(ids).logits, stock(ids).logits) < 1e-4
        keep = mask.bool()
        got, ref = patched(ids, attention_mask=mask).logits[keep], stock(ids, attention_mask=mask).logits[keep]
        assert rel_err(got, ref) < 1e-4
    if name == "gqa":       # HF generate, dynamic and static caches, left padding: identical greedy tokens
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(patched.generate(ids, max_new_tokens=20, **kw), stock.generate(ids, max_new_tokens=20, **kw))
        assert torch.equal(patched.generate(ids, max_new_tokens=6, cache_implementation="static", **kw),
                           stock.generate(ids, max_new_tokens=6, **kw))
    assert hf.unpatch(patched) == len(report.swapped)
    after = dict(patched.named_modules())                  # the very same module objects, nothing extra
    assert after.keys() == before.keys() and all(after[n] is m for n, m in before.items())
    assert patched.config._attn_implementation == stock.config._attn_implementation
    assert not [a for a in vars(patched) if a.startswith("_llama_triton")]
    hf.patch(patched)                                      # patchable again


def test_patch_shares_weights_and_rejects_double_patch():
    model = hf_model("gqa", num_hidden_layers=1)
    q = model.model.layers[0].self_attn.q_proj
    norm_w = model.model.norm.weight
    hf.patch(model)
    assert model.model.layers[0].self_attn.q_proj is q and model.model.norm.weight is norm_w
    with pytest.raises(ValueError, match="already patched"):
        hf.patch(model)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.patch(torch.nn.Linear(2, 2))


def test_register_builds_our_modules_from_pretrained(tmp_path):
    hf_model("gqa", num_hidden_layers=1).save_pretrained(tmp_path)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    mapping = hf.register()
    try:
        ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="llama_triton").eval()
    finally:
        hf.unregister()
    assert mapping["LlamaRMSNorm"] is layers.RMSNorm and mapping["LlamaAttention"] is layers.Attention
    assert isinstance(ours.model.layers[0].self_attn, layers.Attention)
    assert isinstance(ours.model.norm, layers.RMSNorm)
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, stock(ids).logits) < 1e-4
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not isinstance(fresh.model.norm, layers.RMSNorm)                # unregistered again


def test_attention_function_masks_and_errors():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    module = torch.nn.Module()
    # a 4D bool mask (someone else's mask function) runs the plain-torch path
    mask4 = torch.ones(2, 1, 5, 7, dtype=torch.bool).tril(diagonal=2)
    out, _ = hf_attention_forward(module, q, k, v, mask4, scaling=0.25)
    ref, _ = hf_attention_forward(module, q, k, v, None, scaling=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask"):
        hf_attention_forward(module, q, k, v, torch.ones(2, 1, 7), scaling=0.25)
    # is_causal=False (HF kwarg, else module.is_causal), with and without a padding mask, and a window
    ref = reference.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=False, softmax_scale=0.25)
    out, _ = hf_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    module.is_causal = False
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, :2] = False
    out, _ = hf_attention_forward(module, q, k, v, pad, scaling=0.25)
    ref1 = reference.attention(*(t[1:].transpose(1, 2) for t in (q, k[:, :, 2:], v[:, :, 2:])), causal=False,
                               softmax_scale=0.25)
    torch.testing.assert_close(out[:1], ref[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], ref1, rtol=1e-5, atol=1e-5)
    out, _ = hf_attention_forward(module, q, k, v, None, scaling=0.25, sliding_window=2)
    ref = reference.attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=False, softmax_scale=0.25,
                              window_size=(1, 1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    module.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        hf_attention_forward(module, q, k, v, None, scaling=0.25, dropout=0.1)
