"""CLI user errors (issue 11): one clear line on stderr, no traceback, a non-zero exit; eval checks its text
file before loading the model; generate on a model without a tokenizer refuses a vocab the byte tokenizer
does not fit, and uses the model's eos_token_id when it falls back to bytes."""
import subprocess
import sys

import pytest

from llama_triton import cli


def _tiny_dir(tmp_path, **overrides):
    from llama_triton.model import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM.random(LlamaConfig.preset("tiny", num_hidden_layers=1, **overrides)).save_pretrained(tmp_path)
    return str(tmp_path)


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("llama-triton") and all(w in err for w in words), err


@pytest.mark.parametrize("argv,words", [
    (["verify", "--op", "no_such_op"], ["no_such_op", "rms_norm"]),
    (["bench", "--op", "no_such_op"], ["no_such_op"]),
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], ["/no/such/dir"]),
    (["eval", "--model", "/no/such/dir", "--text", "/no/such/file.txt"], ["/no/such/file.txt"]),
    (["profile", "--preset", "no_such_preset"], ["no_such_preset", "tiny"]),
])
def test_user_errors_one_line(argv, words, capsys):
    _one_line_error(capsys, cli.main(argv), *words)


def test_eval_checks_the_text_file_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("model loaded before the text was checked"))
    _one_line_error(capsys, cli.main(["eval", "--model", str(tmp_path), "--text", str(tmp_path / "none.txt")]),
                    "none.txt")


def test_generate_refuses_a_vocab_the_byte_tokenizer_does_not_fit(tmp_path, capsys):
    _one_line_error(capsys, cli.main(["generate", "--model", _tiny_dir(tmp_path, vocab_size=96), "--prompt", "hi"]),
                    "vocab", "96", "tokenizer")


def test_byte_fallback_uses_the_models_eos(tmp_path):
    from llama_triton.model import LlamaConfig
    from llama_triton.tokenizer import ByteTokenizer, tokenizer_for_model

    tok = tokenizer_for_model(str(tmp_path), LlamaConfig.preset("tiny", eos_token_id=3))
    assert isinstance(tok, ByteTokenizer) and tok.eos_token_id == 3
    assert tokenizer_for_model(str(tmp_path), LlamaConfig.preset("tiny")).eos_token_id == 257
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_for_model(str(tmp_path), LlamaConfig.preset("tiny", vocab_size=200))


@pytest.mark.parametrize("argv,word", [(["verify", "--op", "no_such_op"], "no_such_op"),
                                       (["eval", "--model", "/no/dir", "--text", "/no/file.txt"], "/no/file.txt")])
def test_user_errors_as_a_subprocess(argv, word):
    r = subprocess.run([sys.executable, "-m", "llama_triton.cli", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and word in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
