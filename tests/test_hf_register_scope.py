"""hf.register() is global (documented); hf.registered() scopes it (issue 11): inside the block
from_pretrained builds our modules, after it the stock ones, and a mapping someone else had is restored."""
import pytest
import torch

from _hf_tiny import hf_model, transformers
from llama_triton import hf, layers


def test_registered_is_scoped(tmp_path):
    from transformers.monkey_patching import get_patch_mapping, register_patch_mapping, unregister_patch_mapping

    hf_model("gqa", num_hidden_layers=1).save_pretrained(tmp_path)

    class OtherNorm(torch.nn.Module):          # someone else's patch for the same class
        pass

    register_patch_mapping({"LlamaRMSNorm": OtherNorm}, overwrite=True)
    try:
        with hf.registered() as mapping:
            assert mapping["LlamaRMSNorm"] is layers.RMSNorm
            ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="llama_triton")
        assert isinstance(ours.model.norm, layers.RMSNorm)
        assert get_patch_mapping().get("LlamaRMSNorm") is OtherNorm        # put back, not deleted
    finally:
        unregister_patch_mapping(["LlamaRMSNorm"])
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not isinstance(stock.model.norm, layers.RMSNorm)
    assert not isinstance(stock.model.layers[0].self_attn, layers.Attention)
    with pytest.raises(RuntimeError, match="inside"):
        with hf.registered():
            raise RuntimeError("inside")
    assert "LlamaRMSNorm" not in get_patch_mapping()                      # unregistered on an error too
