"""The fused loss path (issue 16): our model and a patched transformers model compute transformers' causal-LM
loss (shift, ignore_index -100, num_items_in_batch) with the fused linear cross-entropy, never building the
logits; loss and gradients equal the materialised-logits path; a training step's peak memory is measured
lower; gradient accumulation over micro-batches equals one batch."""
import types

import pytest
import torch

from llama_triton.kernels import cross_entropy as K
from llama_triton.memory import peak_bytes
from llama_triton.model import LlamaConfig, LlamaForCausalLM


def _batch(vocab, b=2, s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100                           # a prompt that is not scored
    labels[-1, 7] = -100
    return ids, labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _hf_loss(logits, labels, **kw):
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], **kw)


@pytest.mark.parametrize("tied", [True])
def test_model_fused_loss_equals_logits_path(tied):
    pytest.importorskip("transformers")
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, tie_word_embeddings=tied)).init_weights(seed=0).train()
    ids, labels = _batch(model.config.vocab_size)
    out = model(ids, labels=labels)
    assert out.logits is None                                  # training with labels: fused, no logits
    out.loss.backward()
    fused, g_fused = out.loss.detach(), _grads(model)
    model.zero_grad()
    out = model(ids, labels=labels, return_logits=True)
    out.loss.backward()
    assert out.logits.shape == (*ids.shape, model.config.vocab_size)
    torch.testing.assert_close(fused, out.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach(), _hf_loss(out.logits.detach(), labels), rtol=1e-5, atol=1e-6)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g_fused[n], g, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():                                       # eval with labels: logits and the same loss
        ev = model.eval()(ids, labels=labels)
    assert ev.logits is not None and torch.allclose(ev.loss, fused, atol=1e-5)


def test_gradient_accumulation_equals_one_batch():
    """Two micro-batches with different numbers of scored tokens, each loss = sum / num_items_in_batch (all
    the scored tokens of the step), summed gradients == one batch of both (a mean of means would differ)."""
    pytest.importorskip("transformers")
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1)).init_weights(seed=1).train()
    ids, labels = _batch(model.config.vocab_size, b=2, s=12, seed=3)
    labels[1, :8] = -100                                        # row 1 scores far fewer tokens than row 0
    model(ids, labels=labels).loss.backward()
    whole = _grads(model)
    model.zero_grad()
    n_items = (labels[:, 1:] != -100).sum()
    losses = []
    for i in range(2):
        out = model(ids[i:i + 1], labels=labels[i:i + 1], num_items_in_batch=n_items)
        out.loss.backward()
        losses.append(out.loss.detach())
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, whole[n], rtol=1e-4, atol=1e-7, msg=n)
    with torch.no_grad():
        logits = model(ids, labels=labels, return_logits=True).logits
    ref = _hf_loss(logits, labels, num_items_in_batch=n_items)
    torch.testing.assert_close(sum(losses), ref, rtol=1e-5, atol=1e-6)
    mean_of_means = sum(_hf_loss(logits[i:i + 1], labels[i:i + 1]) for i in range(2)) / 2
    assert not torch.allclose(mean_of_means, ref, rtol=1e-3)    # the test can tell the two apart


def test_fused_loss_step_peak_memory_is_lower(monkeypatch):
    """One training step (forward + backward) at vocab 32768, 64 tokens: peak memory measured as the
    process's peak resident set (llama_triton.memory.peak_bytes on CPU), fused vs materialised logits, with
    the default chunking (all 64 tokens in one chunk) and with 8-token chunks. The decoder body runs the
    PyTorch reference (LLAMA_TRITON_BACKEND=torch) to keep the test fast; the loss runs the Triton kernels."""
    from llama_triton import backend
    from llama_triton.ops import cross_entropy as ce_ops

    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    monkeypatch.setattr(ce_ops, "backend", types.SimpleNamespace(use_triton=lambda t: backend.triton_can_run(t.device)))
    n, vocab = 64, 32768
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    model = LlamaForCausalLM(cfg).init_weights(seed=0).train()
    ids, labels = _batch(cfg.vocab_size, b=1, s=n)

    def peak(**kw):                                              # gradients freed before, not inside
        model.zero_grad(set_to_none=True)
        return peak_bytes(lambda: model(ids, labels=labels, **kw).loss.backward())

    peak()                                                       # warm up (kernel compile, allocator)
    materialised = peak(return_logits=True)
    fused = peak()
    monkeypatch.setattr(K, "default_chunk_size", lambda n, h, v: 8)
    chunked = peak()
    logits_mib = n * vocab * 4 / 2**20
    print(f"logits {logits_mib:.1f} MiB; peak MiB: materialised {materialised / 2**20:.1f}, fused "
          f"{fused / 2**20:.1f} ({materialised / fused:.2f}x lower), 8-token chunks {chunked / 2**20:.1f} "
          f"({materialised / chunked:.2f}x lower)")
    assert materialised >= 2.5 * logits_mib * 2**20             # logits, their gradient, the CE's saved grad
    assert materialised >= 2.0 * fused
    assert materialised >= 5.0 * chunked



@pytest.mark.gpu
def test_fused_loss_step_peak_memory_gpu():
    """GPU: one bf16 training step of a 1-layer model at V = 128256, 4096 tokens: peak of
    torch.cuda.max_memory_allocated above the start, fused vs materialised logits (bf16 logits alone are 1 GiB)."""
    cfg = LlamaConfig(vocab_size=128256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    model = LlamaForCausalLM.random(cfg, dtype=torch.bfloat16, device="cuda").train()
    ids = torch.randint(0, cfg.vocab_size, (1, 4096), device="cuda")

    def peak(**kw):
        model.zero_grad(set_to_none=True)
        return peak_bytes(lambda: model(ids, labels=ids, **kw).loss.backward(), "cuda")

    peak()
    materialised, fused = peak(return_logits=True), peak()
    print(f"peak GiB: materialised {materialised / 2**30:.2f}, fused {fused / 2**30:.2f}")
    assert fused <= 0.5 * materialised
