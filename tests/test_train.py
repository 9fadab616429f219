"""Training (issue 16): packing keeps documents apart, data errors are clear, resume is bit-identical, our
kernels train like the reference path (Liger's convergence test), and transformers' Trainer trains a patched
model like the stock one."""
import json
import math

import pytest
import torch

from llama_triton import data as D
from llama_triton.model import LlamaConfig, LlamaForCausalLM
from llama_triton.train import TrainConfig, lr_lambda, train

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def _corpus(path, n_docs=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "kernel", "triton", "llama", "token", "loss", "step"]
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = int(torch.randint(8, 30, (1,), generator=g))
            text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


def _cfg(tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = dict(data=_corpus(tmp_path / "c.jsonl"), out_dir=str(tmp_path / "run"), preset="tiny",
                model_overrides=SMALL, seq_len=16, batch_size=2, steps=4, warmup_steps=1, lr=3e-3,
                eval_tokens=64, progress=False, held_out=0.2)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------ data
def test_clean_and_read(tmp_path):
    assert D.clean("x\t\ty  \r\n\n\n\nz") == "x        y\n\nz"
    assert D.clean_documents(["a", " \n", "a", "b"]) == ["a", "b"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.txt").write_text("first doc")
    (tmp_path / "d" / "two.jsonl").write_text('{"text": "second"}\n"third"\n')
    assert D.read_documents(tmp_path / "d") == ["first doc", "second", "third"]
    assert len(D.read_documents(D.PYDOC_TOPICS)) > 50
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.read_documents(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        D.read_documents(tmp_path / "bad.jsonl")


def test_bad_input_errors(tmp_path, capsys):
    from llama_triton import cli

    (tmp_path / "empty.txt").write_text(" \n\n")
    cases = [(["--data", str(tmp_path / "nope.txt")], "does not exist"),
             (["--data", str(tmp_path / "empty.txt")], "corpus is empty"),
             (["--data", _corpus(tmp_path / "c.jsonl"), "--seq-len", "4096"], "above the model's max_position")]
    for args, msg in cases:
        assert cli.main(["train", "--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_collate_segments_positions_labels():
    ids = torch.arange(12).view(2, 6)
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[0, 0] = starts[0, 4] = True                  # row 0: docs [0, 4) and [4, 6); row 1 continues a doc
    b = D.collate(ids, starts)
    assert b["cu_seqlens"].tolist() == [0, 4, 6, 12] and b["max_seqlen"] == 6
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert b["shift_labels"].tolist() == [[1, 2, 3, -100, 5, -100], [7, 8, 9, 10, 11, -100]]


def test_packed_documents_do_not_attend_to_each_other():
    """Two documents packed in one row (varlen flash attention, positions restarting) give the same logits
    as each document run alone."""
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).init_weights(seed=0).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (1, 5), generator=g), torch.randint(0, 256, (1, 7), generator=g)
    starts = torch.zeros(1, 12, dtype=torch.bool)
    starts[0, 0] = starts[0, 5] = True
    batch = D.collate(torch.cat([a, b], 1), starts)
    batch.pop("shift_labels")
    with torch.no_grad():
        packed = model(**batch).logits[0]
        alone = torch.cat([model(a).logits[0], model(b).logits[0]])
        unpacked = model(torch.cat([a, b], 1)).logits[0]              # without cu_seqlens: b sees a
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed[5:], unpacked[5:], atol=1e-3)


def test_split_and_loader_positions():
    tok = __import__("llama_triton.tokenizer", fromlist=["ByteTokenizer"]).ByteTokenizer()
    g = torch.Generator().manual_seed(0)
    docs = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (40,), generator=g)) for _ in range(20)]
    ds = D.PackedDataset.build(docs, tok, seq_len=16, held_out=0.1, seed=0)
    assert ds.n_docs == 20 and len(ds.held_out) >= 1
    held = {tuple(r.tolist()) for r in ds.held_out.ids}
    assert not held & {tuple(r.tolist()) for r in ds.train.ids}
    loader = D.PackedLoader(ds.train, batch_size=3, seed=1)
    first = [loader.next()["input_ids"] for _ in range(2)]
    state = loader.state_dict()
    nxt = loader.next()["input_ids"]
    again = D.PackedLoader(ds.train, batch_size=3, seed=1)
    again.load_state_dict(state)
    assert torch.equal(again.next()["input_ids"], nxt) and not torch.equal(first[0], first[1])


def test_lr_schedule():
    assert lr_lambda(0, 4, 20, 0.1) == 0.25 and lr_lambda(3, 4, 20, 0.1) == 1.0
    assert math.isclose(lr_lambda(20, 4, 20, 0.1), 0.1) and 0.1 < lr_lambda(12, 4, 20, 0.1) < 1.0


# ---------------------------------------------------------------------------------------------- training
def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    """2N steps straight == N steps, checkpoint, resume, N steps: every loss and every weight bit-identical
    (N = 2 here to stay small; the PyTorch reference ops, LLAMA_TRITON_BACKEND=torch, for speed: resume
    exactness does not depend on which kernels run). Gradient accumulation 2 and clipping are on."""
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    kw = dict(grad_accum=2, grad_clip=0.5, steps=4, eval_tokens=32)
    straight = train(_cfg(tmp_path / "a", **kw))
    half = train(_cfg(tmp_path / "b", **kw, stop_after=2, plot=False))
    assert half.steps == 2 and half.losses == straight.losses[:2]
    resumed = train(_cfg(tmp_path / "b", **kw, resume=True, plot=False))
    assert resumed.losses == straight.losses                      # the history carries the first 2
    assert resumed.held_out_ppl == straight.held_out_ppl
    for n, p in _params(straight.model).items():
        assert torch.equal(p, _params(resumed.model)[n]), n
    run = tmp_path / "a" / "run"
    assert (run / "loss_curve.png").exists() and (run / "model" / "config.json").exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_activation_checkpointing_same_loss_and_grads():
    """Each decoder layer recomputed in the backward (our custom ops run twice): same loss and gradients."""
    from llama_triton.train import checkpoint_layers

    ref = LlamaForCausalLM(LlamaConfig(**SMALL)).init_weights(seed=0).train()
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).init_weights(seed=0).train()
    checkpoint_layers(model)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    for m in (ref, model):
        m(ids, labels=ids).loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=n)


def test_train_command(tmp_path, monkeypatch, capsys):
    """`llama-triton train` end to end (1 step, PyTorch reference ops for speed): options reach TrainConfig
    (--set overrides the preset), outputs are written."""
    from llama_triton import cli

    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    out = tmp_path / "run"
    sets = [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]
    assert cli.main(["train", "--data", _corpus(tmp_path / "c.jsonl"), "--out", str(out), "--steps", "1",
                     "--seq-len", "16", "--batch-size", "2", "--grad-accum", "2", "--held-out", "0.2",
                     "--eval-tokens", "32", "--no-progress", "--no-plot", *sets]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["config"]["grad_accum"] == 2
    assert json.loads((out / "model" / "config.json").read_text())["hidden_size"] == 32
