"""transformers + our attention with a StaticCache and no attention_mask: the static buffer's unfilled tail
must not be attended to (issue 11). Greedy tokens of the patched model equal stock transformers'."""
import copy

import pytest
import torch

from _hf_tiny import hf_model
from llama_triton import hf


# mistral window 5: the window fills during the prompt; window 32: the sliding buffer keeps an unfilled tail
@pytest.mark.parametrize("name,kw", [("gqa", {}), ("mistral_window", {}), ("mistral_window", {"sliding_window": 32})])
def test_static_cache_without_mask_matches_stock(name, kw):
    stock = hf_model(name, num_hidden_layers=1, **kw)
    patched = copy.deepcopy(stock)
    hf.patch(patched)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = stock.generate(ids, **kw)
    assert torch.equal(stock.generate(ids, cache_implementation="static", **kw), want)
    assert torch.equal(patched.generate(ids, cache_implementation="static", **kw), want)
    assert torch.equal(patched.generate(ids, **kw), want)                 # dynamic cache, no mask


def test_static_cache_without_mask_attention_interface_only():
    """Stock transformers modules with only our attention function (attn_implementation="llama_triton")."""
    stock = hf_model("gqa", num_hidden_layers=1)
    ours = copy.deepcopy(stock)
    hf.register_attention()
    ours.set_attn_implementation("llama_triton")
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(ids, cache_implementation="static", **kw), stock.generate(ids, **kw))



def test_filled_count_mask_attends_only_the_filled_prefix():
    """hf_attention_forward with the (b,) filled-slot count: causal (queries are the last sq filled slots)
    and non-causal, each row against the reference on its own prefix; the unfilled tail is garbage."""
    from llama_triton import reference
    from llama_triton.attention import hf_attention_forward

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    k[0, :, 5:], v[0, :, 5:] = 1e4, 1e4                                   # row 0 holds 5 tokens: tail garbage
    filled = torch.tensor([5, 8], dtype=torch.int32)
    module = torch.nn.Module()
    for causal in (True, False):
        module.is_causal = causal
        out, _ = hf_attention_forward(module, q, k, v, filled, scaling=0.25)
        for i, n in enumerate((5, 8)):
            ref = reference.attention(q[i:i + 1].transpose(1, 2), k[i:i + 1, :, :n].transpose(1, 2),
                                      v[i:i + 1, :, :n].transpose(1, 2), causal=causal, softmax_scale=0.25)
            torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)
