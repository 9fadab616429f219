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

