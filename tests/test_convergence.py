"""Convergence (Liger-Kernel's method, issue 16): the same tiny model trained N steps from the same seed with
our Triton kernels (interpreter, fp32) and with the plain-PyTorch reference ops agrees step by step (loss),
in the final weights and in the held-out log-probabilities; likewise a patched transformers model against the
stock one (our AdamW loop, and transformers' Trainer where accelerate is installed).

Tolerances (fp32): losses rtol 1e-5; log-probs atol 1e-4; weights after 3 AdamW steps at lr 3e-3: at most
0.5% of the elements of any tensor differ by more than 1e-6 and none by more than 3 x lr. (The gradients agree
to ~1e-9, but Adam's normalised update m / sqrt(v) turns a 1e-9 difference on a coordinate whose gradient is
itself ~1e-9 into a step of up to lr: seen, 0.1% of a tensor's elements at up to 3e-5.)"""
import pytest
import torch

from test_train import _cfg

STEPS = 3
LR = 3e-3


def _assert_weights_agree(params, ref):
    for n, p in params:
        d = (p.detach() - ref[n].detach()).abs()
        assert d.max() <= STEPS * LR, (n, d.max())
        assert (d > 1e-6).float().mean() <= 5e-3, (n, (d > 1e-6).float().mean())


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model.eval()(ids).logits.float(), -1)


def test_our_kernels_train_like_the_reference(tmp_path, monkeypatch):
    from llama_triton.train import train

    ours = train(_cfg(tmp_path / "ours", steps=STEPS, lr=LR, plot=False, eval_tokens=32))
    held = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    lp_ours = _logprobs(ours.model, held)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    ref = train(_cfg(tmp_path / "ref", steps=STEPS, lr=LR, plot=False, eval_tokens=32))
    lp_ref = _logprobs(ref.model, held)
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
    assert ours.losses[-1] < ours.losses[0]                       # it trains
    _assert_weights_agree(ours.model.named_parameters(), dict(ref.model.named_parameters()))
    torch.testing.assert_close(lp_ours, lp_ref, rtol=0, atol=1e-4)
    assert abs(ours.held_out_ppl - ref.held_out_ppl) <= 1e-4 * ref.held_out_ppl


def _hf_pair():
    pytest.importorskip("transformers")
    from _hf_tiny import hf_model

    from llama_triton import hf

    stock = hf_model("gqa", num_hidden_layers=1).train()
    patched = hf_model("gqa", num_hidden_layers=1).train()
    hf.patch(patched)
    return stock, patched


def test_patched_transformers_model_trains_like_stock():
    """hf.patch also installs the fused loss: in training with labels the patched model returns no logits
    (and takes the Trainer's num_items_in_batch); unpatch restores the stock forward."""
    stock, patched = _hf_pair()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, stock.config.vocab_size, (2, 12), generator=g) for _ in range(STEPS)]
    losses = {}
    for name, m in (("stock", stock), ("patched", patched)):
        opt = torch.optim.AdamW(m.parameters(), lr=LR, foreach=True)
        losses[name] = []
        for ids in batches:
            labels = ids.clone()
            labels[0, :4] = -100
            out = m(input_ids=ids, labels=labels, num_items_in_batch=(labels[:, 1:] != -100).sum())
            assert (out.logits is None) == (name == "patched")
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(out.loss.item())
    torch.testing.assert_close(torch.tensor(losses["patched"]), torch.tensor(losses["stock"]), rtol=1e-5, atol=1e-6)
    _assert_weights_agree(patched.named_parameters(), dict(stock.named_parameters()))
    ids = batches[0]
    torch.testing.assert_close(_logprobs(patched, ids), _logprobs(stock, ids), rtol=0, atol=1e-4)
    from llama_triton import hf

    hf.unpatch(patched)
    assert "forward" not in vars(patched)


def test_transformers_trainer_on_patched_model_matches_stock(tmp_path):
    pytest.importorskip("accelerate")                # transformers' Trainer needs it (in the [test] extra)
    from transformers import Trainer, TrainingArguments

    stock, patched = _hf_pair()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(0, stock.config.vocab_size, (8, 12), generator=g)]
    logs = {}
    for name, m in (("stock", stock), ("patched", patched)):
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=3e-3, logging_steps=1,
                                 report_to=[], use_cpu=True, seed=0, data_seed=0, save_strategy="no")
        trainer = Trainer(model=m, args=args, train_dataset=rows)
        trainer.train()
        logs[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logs["patched"]) == 2
    torch.testing.assert_close(torch.tensor(logs["patched"]), torch.tensor(logs["stock"]), rtol=1e-4, atol=1e-5)


def test_patched_model_packed_documents_like_one_by_one():
    """transformers' DataCollatorWithFlattening packs documents into one row with position_ids restarting
    (and, with return_flash_attn_kwargs, cu_seq_lens_q): a patched model in training keeps them apart
    (varlen attention), so its loss equals the stock model's over the documents run one by one."""
    stock, patched = _hf_pair()
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, stock.config.vocab_size, (n,), generator=g) for n in (5, 7)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    labels[0, len(docs[0])] = -100                        # the collator's separator: no cross-document target
    n = (labels[:, 1:] != -100).sum()
    stock_sum = sum(stock(input_ids=d[None], labels=d[None], num_items_in_batch=n).loss for d in docs)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    for kw in ({}, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 7, "max_length_k": 7}):
        loss = patched(input_ids=ids, labels=labels, position_ids=pos, num_items_in_batch=n, **kw).loss
        torch.testing.assert_close(loss, stock_sum, rtol=1e-5, atol=1e-6)
