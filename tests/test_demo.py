"""The main job (`llama-triton demo`) and the model tools (generate, eval, profile) run end to end, and the
sliding-window perplexity scores every token exactly once."""
import math

import pytest
import torch

from llama_triton import cli, demo
from llama_triton.evaluate import perplexity
from llama_triton.model import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=1)).init_weights(seed=0).save_pretrained(path)
    return path


def test_demo_prints_parity_table_and_generates(capsys):
    assert cli.main(["demo", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    for op in ("rms_norm", "rotary", "flash_attention", "decode_attention", "swiglu_mlp"):
        line = next(ln for ln in out.splitlines() if ln.startswith(op + " "))
        assert "PASS" in line and ("triton" in line or "fallback" in line), line
    assert "whole model" in out and "tokens/s" in out and "all checks passed" in out and "FAIL" not in out


def test_demo_whole_model_check_detects_a_wrong_model():
    """The whole-model check can fail: perturb one weight of our model only (the oracle reads the same
    parameters, so break the forward instead)."""
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1)).init_weights(seed=0)
    ids = torch.tensor([[256, 72, 105, 33]])
    assert demo.model_check(model, ids)[2]
    model.model.layers[0].self_attn.scaling *= 1.5              # oracle uses head_dim ** -0.5
    assert not demo.model_check(model, ids)[2]


def test_generate_eval_profile_commands(model_dir, tmp_path, capsys):
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert "tokens/s" in capsys.readouterr().out
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 3)
    assert cli.main(["eval", "--model", str(model_dir), "--text", str(text), "--max-length", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out
    trace = tmp_path / "trace.json"
    assert cli.main(["profile", "--preset", "tiny", "--layers", "1", "--prompt-len", "8", "--decode-steps", "1",
                     "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert trace.exists() and "ours" in out and str(trace) in out


def test_perplexity_scores_each_token_once():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1)).init_weights(seed=1)
    ids = torch.randint(0, 256, (21,))
    full = perplexity(model, ids, max_length=32)                    # one window covers everything
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss
    assert full.tokens == 20 and full.windows == 1
    assert math.isclose(full.nll, loss.item(), rel_tol=1e-5)
    strided = perplexity(model, ids, max_length=8, stride=3)
    assert strided.tokens == 20
    # by hand: window [b, b+8) scores tokens not yet scored, with the context the window gives
    nll, done = 0.0, 1
    with torch.no_grad():
        for b in range(0, 21, 3):
            e = min(b + 8, 21)
            logp = torch.log_softmax(model(ids[None, b:e]).logits[0, :-1], -1)
            for j in range(max(done, b + 1), e):
                nll -= logp[j - b - 1, ids[j]].item()
            done = e
            if e == 21:
                break
    assert math.isclose(strided.nll, nll / 20, rel_tol=1e-5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, max_length=8, stride=9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, ids[:1])


def test_byte_tokenizer_round_trip():
    from llama_triton.tokenizer import ByteTokenizer, load_tokenizer

    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == LlamaConfig().vocab_size
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_token_id and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == "héllo"
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=False) == "<bos>héllo<eos>"


def test_hf_tokenizer_loaded_from_model_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from llama_triton.tokenizer import HFTokenizer, load_tokenizer

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]").save_pretrained(
        tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.eos_token_id == 3 and tok.pad_token_id == 3
    assert tok.encode("hello world", add_bos=False) == [1, 2]
    assert tok.decode([1, 2, 3]) == "hello world"
