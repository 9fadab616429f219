"""Broken checkpoints give a CheckpointError naming the file (and the tensor) (issue 11): a truncated, empty
or corrupt safetensors file, a bad config.json, an integer-dtype tensor for a float parameter."""
import json
import os

import pytest
import torch

from llama_triton.checkpoint import CheckpointError, load_pretrained
from llama_triton.model import LlamaConfig, LlamaForCausalLM


@pytest.fixture
def ckpt(tmp_path):
    LlamaForCausalLM(LlamaConfig.preset("tiny", num_hidden_layers=1)).init_weights(0).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "empty", "corrupt"])
def test_broken_safetensors_file(ckpt, damage):
    fn = ckpt / "model.safetensors"
    data = fn.read_bytes()
    fn.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "corrupt": b"\x07" * 64 + data[64:]}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LlamaForCausalLM.from_pretrained(ckpt)


def test_bad_config_json(ckpt):
    (ckpt / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(CheckpointError, match="config.json"):
        LlamaForCausalLM.from_pretrained(ckpt)


def test_integer_tensor_for_a_float_parameter(ckpt):
    from safetensors.torch import load_file, save_file

    fn = os.fspath(ckpt / "model.safetensors")
    tensors = load_file(fn)
    tensors["model.norm.weight"] = torch.ones_like(tensors["model.norm.weight"], dtype=torch.int32)
    save_file(tensors, fn)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.norm\.weight.*int|model\.norm\.weight.*int"):
        LlamaForCausalLM.from_pretrained(ckpt)
    with open(ckpt / "config.json") as f:
        assert json.load(f)["hidden_size"] == 64


def _rewrite(ckpt, edit):
    from safetensors.torch import load_file, save_file

    fn = os.fspath(ckpt / "model.safetensors")
    tensors = load_file(fn)
    edit(tensors)
    save_file(tensors, fn)


def test_non_strict_load_never_broadcasts_a_mis_shaped_tensor(ckpt):
    """strict=False tolerates missing/unexpected names, not a tensor of another shape (copy_ would broadcast)."""
    _rewrite(ckpt, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:1].clone()))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_pretrained(ckpt, strict=False)


def test_non_strict_load_initialises_missing_parameters(ckpt):
    """A missing tensor gets HF's init rule (norm weights 1), not to_empty's uninitialised memory."""
    _rewrite(ckpt, lambda t: t.pop("model.norm.weight"))
    model = load_pretrained(ckpt, strict=False)
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
