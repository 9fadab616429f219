"""HF-format checkpoints: save/load round trips (single file and sharded), transformers reading what we save,
dtype/device arguments, and one clear error for missing / unexpected / mis-shaped tensors."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from _hf_tiny import rel_err, transformers
from llama_triton.checkpoint import CheckpointError, load_pretrained
from llama_triton.model import LlamaConfig, LlamaForCausalLM


def _tiny(**kw):
    cfg = LlamaConfig(num_hidden_layers=1, vocab_size=64, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    return LlamaForCausalLM(cfg).init_weights(seed=0)


def _same_params(a, b):
    sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
    assert sa.keys() == sb.keys()
    for n in sa:
        assert torch.equal(sa[n].float(), sb[n].float()), n


@pytest.mark.parametrize("shard", [None, 20_000])
def test_round_trip_single_and_sharded(tmp_path, shard):
    model = _tiny()
    model.save_pretrained(tmp_path, max_shard_size=shard)
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    _same_params(model, loaded)
    assert loaded.config == dataclasses.replace(model.config, torch_dtype="float32")


def test_transformers_loads_what_we_save_tied(tmp_path):
    model = _tiny(tie_word_embeddings=True)
    model.save_pretrained(tmp_path, max_shard_size=30_000)
    assert "lm_head.weight" not in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert rel_err(model(ids).logits, hf(ids).logits) < 1e-4
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_dtype_and_device_arguments(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path)
    half = load_pretrained(tmp_path, dtype="float16", device="cpu")
    assert half.dtype == torch.float16 and half.device.type == "cpu"
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32        # rope tables stay fp32
    assert torch.equal(half.lm_head.weight, model.lm_head.weight.half())
    with pytest.raises(ValueError, match="dtype"):
        load_pretrained(tmp_path, dtype="int8")


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.norm.weight"]
    del sd["model.layers.0.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    sd["model.layers.7.extra.weight"] = torch.zeros(1)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)     # old exports: ignored
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        LlamaForCausalLM.from_pretrained(tmp_path)
    msg = str(e.value)
    for s in ("missing (2)", "model.norm.weight", "up_proj", "unexpected (1)", "layers.7.extra",
              "mis-shaped (1)", "q_proj.weight: checkpoint (3, 3) vs model (64, 64)"):
        assert s in msg, msg
    assert "inv_freq" not in msg


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        LlamaForCausalLM.from_pretrained(tmp_path)        # no config.json
    _tiny().save_pretrained(tmp_path, max_shard_size=20_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_lm_head_may_be_absent_only_when_tied(tmp_path):
    untied = _tiny()
    untied.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" in sd
    sd.pop("lm_head.weight")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \(1\): lm_head.weight"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    tied = _tiny(tie_word_embeddings=True)
    tied.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in sd                          # the shared tensor is written once
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()   # some exports write it anyway: accepted
    save_file(sd, tmp_path / "model.safetensors")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, tied.model.embed_tokens.weight)
