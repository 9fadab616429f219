"""generate(): greedy tokens identical to transformers' generate, batched prompts of different lengths,
sampling (top-k / top-p / temperature), eos handling, streaming, bad input."""
import pytest
import torch

from _hf_tiny import hf_model, rel_err
from llama_triton.generate import generate, sample
from llama_triton.model import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_model("gqa", num_hidden_layers=1)
    path = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(path)
    return hf, LlamaForCausalLM.from_pretrained(path)


def test_20_greedy_tokens_identical_to_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    out = ours.generate(ids, max_new_tokens=20)
    assert out.shape == (2, 27)
    assert torch.equal(out, ref)


@pytest.fixture(scope="module")
def mistral_pair(tmp_path_factory):
    hf = hf_model("mistral_window", num_hidden_layers=1)            # sliding window 5 < the prompts
    path = tmp_path_factory.mktemp("gen_mistral")
    hf.save_pretrained(path)
    return hf, LlamaForCausalLM.from_pretrained(path)


def test_left_padded_batch_matches_transformers_and_single_prompts(mistral_pair):
    hf, ours = mistral_pair
    g = torch.Generator().manual_seed(1)
    long, short = torch.randint(0, 96, (1, 8), generator=g), torch.randint(0, 96, (1, 5), generator=g)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])   # left padding
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = ours.generate(ids, max_new_tokens=12, attention_mask=mask)
    assert torch.equal(out, ref)
    assert torch.equal(out[1, 8:], ours.generate(short, max_new_tokens=12)[0, 5:])
    # the same prompts right-padded, given as prompt lengths
    right = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    out_r = ours.generate(right, max_new_tokens=12, prompt_lengths=torch.tensor([8, 5]))
    assert torch.equal(out_r[:, 8:], out[:, 8:])


def test_eos_pads_finished_rows_and_stops(pair):
    _, ours = pair
    ids = torch.randint(0, 96, (2, 4), generator=torch.Generator().manual_seed(2))
    free = ours.generate(ids, max_new_tokens=6)
    eos = int(free[0, 5])                                  # row 0 emits this at its 2nd new token
    out = ours.generate(ids, max_new_tokens=6, eos_token_id=[eos, 95], pad_token_id=-1)
    row0 = out[0, 4:].tolist()
    assert row0[1] == eos and all(t == -1 for t in row0[2:])
    for r in range(2):                     # each row: the free tokens up to its own first eos, then padding
        free_r = free[r, 4:].tolist()
        stop = next((i for i, t in enumerate(free_r) if t in (eos, 95)), len(free_r) - 1)
        assert out[r, 4:].tolist() == free_r[:stop + 1] + [-1] * (len(free_r) - stop - 1)
    seen = []
    ours.generate(ids, max_new_tokens=5, streamer=lambda tok: seen.append(tok.clone()))
    assert len(seen) == 5 and all(t.shape == (2,) for t in seen)


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    _, ours = pair
    ids = torch.randint(0, 96, (2, 4), generator=torch.Generator().manual_seed(3))
    greedy = ours.generate(ids, max_new_tokens=5)
    a = ours.generate(ids, 5, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = ours.generate(ids, 5, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(ours.generate(ids, 5, temperature=0.7, top_k=1), greedy)
    assert torch.equal(ours.generate(ids, 5, temperature=0.7, top_p=1e-6), greedy)


def test_sample_distribution_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    k2 = sample(logits, 1.0, top_k=2, generator=g)
    assert set(k2.tolist()) == {0, 1}
    assert abs((k2 == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    p = sample(logits, 1.0, top_p=0.7, generator=g)               # smallest prefix with mass > 0.7: {0, 1}
    assert set(p.tolist()) == {0, 1}
    # HF's boundary (TopPLogitsWarper): a prefix whose mass reaches top_p exactly is enough
    dyadic = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]])).expand(2000, 4)
    assert set(sample(dyadic, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample(dyadic, 1.0, top_p=0.75, generator=g).tolist()) == {0, 1}
    assert set(sample(dyadic, 1.0, top_p=0.0, generator=g).tolist()) == {0}
    full = sample(logits, 1.0, generator=g)
    assert abs((full == 3).float().mean().item() - 0.05) < 0.02
    assert torch.equal(sample(logits[:2], 0.0), torch.zeros(2, dtype=torch.long))


def test_bad_input():
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1))
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="input_ids"):
        generate(model, ids.int(), 2)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, ids, 2, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, ids, 2, attention_mask=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, -1)
    assert torch.equal(generate(model, ids, 0), ids)


def test_decode_step_traces_as_one_graph_without_recompiles():
    """CPU stand-in for CUDA-graph capture: the decode step (the fused path generate runs: positions from the
    cache lengths, tables built by make_caches) compiles with fullgraph=True (no host sync, no data-dependent
    Python branch) and advancing cache lengths never recompiles."""
    from llama_triton.generate import DecodeStep

    torch._dynamo.reset()
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1)).init_weights(seed=0)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(5))
    caches = model.make_caches(2, 12)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        model(ids, caches=caches, fresh_cache=True)
        fn = torch.compile(DecodeStep(model, caches)._step, backend="aot_eager", fullgraph=True, dynamic=False)
        tok = ids[:, -1:].clone()
        seq = [ids]
        for _ in range(3):
            logits = fn(tok)
            seq.append(tok.clone())
            tok.copy_(logits.argmax(-1, keepdim=True))
        ref = model(torch.cat(seq, 1)).logits[:, -1]
    assert caches[0].seqlens.tolist() == [8, 8]
    assert rel_err(logits, ref) < 1e-4


@pytest.mark.gpu
def test_gpu_compiled_and_graph_captured_decode_match_eager():
    """The decode step has static shapes and no host sync: torch.compile and a CUDA graph give the eager tokens."""
    from llama_triton.generate import DecodeStep

    # fp32: compiled and eager rounding may differ slightly; bf16 logits could then flip a near-tie argmax
    model = LlamaForCausalLM.random(LlamaConfig(num_hidden_layers=2), dtype=torch.float32, device="cuda")
    ids = torch.randint(0, 256, (2, 9), device="cuda")
    eager = model.generate(ids, max_new_tokens=12)
    assert torch.equal(model.generate(ids, max_new_tokens=12, compile=True), eager)

    caches = model.make_caches(2, 32)
    with torch.no_grad():
        model(ids, caches=caches, fresh_cache=True)
        step = DecodeStep(model, caches)
        tok = eager[:, 9:10].clone()
        pos = torch.full((2, 1), 9, dtype=torch.long, device="cuda")
        step(tok, pos)                                            # warm-up (autotune) outside the capture
        for c in caches:
            c.seqlens.fill_(9)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step(tok, pos)
        for c in caches:
            c.seqlens.fill_(9)
        got = []
        for _ in range(11):
            graph.replay()
            tok.copy_(logits.argmax(-1, keepdim=True))
            pos.add_(1)
            got.append(tok.clone())
    assert torch.equal(torch.cat(got, 1), eager[:, 10:])
