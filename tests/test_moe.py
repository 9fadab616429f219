"""Mixture of experts (issue 17): the grouped-GEMM experts kernel against the fp32/fp64 experts loop
(reference.moe_experts) forward and backward under the 2x rule, the device-side alignment, determinism,
launch counts, bad input; the SparseMoeBlock against transformers' Mixtral / Qwen3-MoE / Qwen2-MoE blocks;
patched and experts_implementation="llama_triton" transformers models and our model against stock
transformers (logits, loss, aux loss, greedy tokens)."""
import copy

import pytest
import torch

from conftest import DEVICE, DTYPES
from llama_triton import registry, testing
from llama_triton.kernels import moe as K
from llama_triton.ops.moe import load_balancing_loss, moe_experts, route

SPEC = registry.get("moe_experts")


def _shape(tokens, experts, top_k, skew=False, hidden=32, inter=24):
    return registry._moe_shape(tokens, hidden, experts, inter, top_k, skew)


# experts 4 and 8, top-1 / top-2, tokens 1 / 7 / 129 (129 once), skew: every token's first choice is expert 0
# (top-1 + skew: all tokens on one expert, the others get none)
CASES = [_shape(1, 8, 2), _shape(7, 8, 1), _shape(7, 4, 2, skew=True), _shape(129, 4, 1, skew=True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CASES, ids=SPEC.label)
def test_experts_match_reference_loop(shape, dtype):
    """Output and the grads of x, gate_up_proj, down_proj and the routing weights vs the fp64 loop."""
    for c in testing.parity(SPEC, shape, dtype, DEVICE):
        assert c.ok, f"{shape} {dtype} {c.name}: err {c.max_abs:.3e} > bound {c.bound:.3e}"


def test_parity_harness_catches_a_wrong_expert():
    """The 2x-rule check can fail here: swapping two experts' down weights is caught."""
    import dataclasses

    def swapped(x, gu, down, ids, w):
        return SPEC.fn(x, gu, down[[1, 0, *range(2, down.shape[0])]], ids, w)
    bad = dataclasses.replace(SPEC, fn=swapped)
    assert not all(c.ok for c in testing.parity(bad, _shape(7, 4, 2), torch.float32, DEVICE, backward=False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [registry._moe_shape(4, 1024, 8, 1408, 2), registry._moe_shape(515, 1024, 8, 1408, 2),
                                   registry._moe_shape(257, 512, 64, 256, 8), registry._moe_shape(2048, 512, 8, 384, 2,
                                                                                                  skew=True)],
                         ids=SPEC.label)
def test_gpu_experts_at_model_sizes(shape, dtype):
    """bf16/fp16 on a GPU, decode and prefill tiles (BLOCK_M 16..128), Mixtral- and Qwen-like expert counts."""
    for c in testing.parity(SPEC, shape, dtype, "cuda"):
        assert c.ok, f"{shape} {dtype} {c.name}: err {c.max_abs:.3e} > bound {c.bound:.3e}"


@pytest.mark.gpu
def test_gpu_deterministic_and_graph_capturable():
    """Bitwise-repeatable forward and backward at a prefill size; the forward replays in a CUDA graph (no sync)."""
    x, gu, down, ids, w = SPEC.make_inputs(registry._moe_shape(1000, 512, 8, 384, 2), torch.bfloat16, "cuda")
    leaves = [t.requires_grad_() for t in (x, gu, down, w)]
    runs = []
    for _ in range(2):
        out = moe_experts(x, gu, down, ids, w)
        runs.append((out, *torch.autograd.grad(out.float().square().sum(), leaves)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with torch.no_grad():
        xs = x.detach()[:4].clone()
        ids4, w4 = ids[:4].clone(), w.detach()[:4].clone()
        ref = moe_experts(xs, gu.detach(), down.detach(), ids4, w4)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = moe_experts(xs, gu.detach(), down.detach(), ids4, w4)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(static, ref)


def _align_reference(ids, E, bm):
    """Per expert: its flat indices in increasing order, padded to a multiple of bm with the sentinel S."""
    flat = ids.reshape(-1)
    S = flat.numel()
    runs, experts = [], []
    for e in range(E):
        idx = torch.nonzero(flat == e).flatten().to(torch.int32)
        pad = (-idx.numel()) % bm
        runs.append(torch.cat([idx, torch.full((pad,), S, dtype=torch.int32)]))
        experts += [e] * ((idx.numel() + pad) // bm)
    return torch.cat(runs), torch.tensor(experts, dtype=torch.int32)


@pytest.mark.parametrize("tokens,E,top_k", [(1, 4, 1), (37, 8, 2), (5, 16, 3)])
def test_alignment_sorts_and_pads_by_expert(tokens, E, top_k):
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(tokens)]).to(DEVICE)
    ids[ids == E - 1] = 0                                         # expert E-1 gets no tokens
    sorted_ids, block_expert, seg, npost = K.moe_align(ids, E, 16)
    ref_sorted, ref_blocks = _align_reference(ids.cpu(), E, 16)
    n = int(npost)
    assert n == ref_sorted.numel() and int(seg[-1]) == n
    assert torch.equal(sorted_ids[:n].cpu(), ref_sorted)
    assert torch.equal(block_expert[: n // 16].cpu(), ref_blocks)
    assert (block_expert[n // 16:] == -1).all() and (sorted_ids[n:] == ids.numel()).all()   # unused: defined
    assert int(seg[E - 1]) == int(seg[E])                         # the empty expert's run is empty


def test_decode_sizes_read_each_selected_expert_once(monkeypatch):
    """GPU tile choice: up to 16 tokens, BLOCK_M is 16 and (an expert gets at most one pair per token) every
    selected expert's rows fit one M block, so its weights are read once; bigger batches get bigger tiles."""
    monkeypatch.setattr(K, "interpreting", lambda: False)
    for tokens in (1, 7, 16):
        for experts, top_k in ((8, 2), (128, 8), (4, 4)):
            assert K.block_m(tokens * top_k, experts) == 16
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(16)])
    _, block_expert, _, npost = K.moe_align(ids.to(DEVICE), 8, 16)
    used = block_expert[: int(npost) // 16].cpu()
    assert torch.equal(used, torch.unique(ids))                   # one block per selected expert, none else
    assert K.block_m(4096 * 2, 8) == 128 and K.block_m(512 * 8, 128) == 32


def test_custom_op_fake_impl_and_compile_tracing():
    """The fake impl agrees with the kernel (shapes, dtypes) and a Qwen2-MoE block (routing, shared expert)
    compiles with fullgraph=True (no graph break, no host sync), forward and backward."""
    from llama_triton.layers import SparseMoeBlock

    x, gu, down, ids, w = SPEC.make_inputs(_shape(5, 4, 2), torch.float32, DEVICE)
    torch.library.opcheck(torch.ops.llama_triton.moe_experts_fwd.default, (x, gu.requires_grad_(), down, ids, w, True),
                          test_utils=("test_faketensor",))
    block = SparseMoeBlock(_hf_config("qwen2_moe", num_hidden_layers=1))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.1)
    h = torch.randn(1, 3, 32)
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(h)
    assert torch.equal(out, block(h))
    out.sum().backward()
    assert block.experts.gate_up_proj.grad is not None


def test_deterministic_and_decode_launches():
    """Bitwise repeatable (no atomics); per call: 2 alignment + gate_up + down (+ combine for top-k > 1)
    Triton launches and no host sync, at decode (1 token) and prefill sizes."""
    from llama_triton.profiling import count_kernels

    for tokens, top_k, launches in ((1, 2, 5), (9, 1, 4)):
        x, gu, down, ids, w = SPEC.make_inputs(_shape(tokens, 4, top_k), torch.float32, DEVICE)
        first = moe_experts(x, gu, down, ids, w)
        out, count = count_kernels(moe_experts, x, gu, down, ids, w)
        assert torch.equal(out, first)
        assert count.triton == launches and count.syncs == 0, count.names


def test_our_block_launches():
    """Our SparseMoeBlock at decode size: the router matmul, one routing launch (softmax + top-k +
    renormalise), the 5 expert launches; no host sync."""
    from llama_triton.layers import SparseMoeBlock
    from llama_triton.profiling import count_kernels

    block = SparseMoeBlock(_hf_config("mixtral", num_hidden_layers=1))
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.1)
    x = torch.randn(1, 1, 32, device=DEVICE)
    block(x)
    _, count = count_kernels(block, x)
    assert count.triton == 6 and count.aten == 1 and count.syncs == 0, count.names
    assert count.names["triton:_moe_route_kernel"] == 1


def test_bad_input_is_rejected():
    x, gu, down, ids, w = SPEC.make_inputs(_shape(3, 4, 2), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        moe_experts(x, gu, down, torch.zeros(3, 5, dtype=torch.int64, device=DEVICE), torch.ones(3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="down_proj"):
        moe_experts(x, gu, down[:, :, :-1], ids, w)
    with pytest.raises(ValueError, match="gate_up_proj"):
        moe_experts(x, gu[:, :, :-1], down, ids, w)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_experts(x, gu, down, ids, w[:, :1])
    with pytest.raises(TypeError, match="gate_up_proj"):
        moe_experts(x, gu.half(), down, ids, w)
    with pytest.raises(TypeError, match="topk_ids"):
        moe_experts(x, gu, down, ids.float(), w)
    with pytest.raises(ValueError, match="topk_ids must lie"):
        moe_experts(x, gu, down, ids + 4, w)
    with pytest.raises(ValueError, match="top_k"):
        route(torch.randn(3, 4), 5)


# ----------------------------------------------------------------------------------- transformers parity
try:      # the [hf] extra: only the parity tests below need it (a module-level importorskip skipped the whole file)
    import transformers
except ImportError:
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs transformers (the [hf] extra)")

_TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, num_experts_per_tok=2,
             router_aux_loss_coef=0.02, output_router_logits=True)
_FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=24, norm_topk_prob=False, head_dim=8)),
    "qwen3_moe_norm": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=24, norm_topk_prob=True,
                                              head_dim=8)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                         norm_topk_prob=False)),
}


def _hf_config(family, **kw):
    cls, extra = _FAMILIES[family]
    return getattr(transformers, cls)(**{**_TINY, **extra, **kw})


def _hf_model(family, seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(family, **kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "gate.weight" in n:                      # a visible, non-uniform routing
                p.normal_(0.0, 0.5)
    return model


@needs_hf
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe_norm", "qwen2_moe"])
def test_block_matches_transformers(family):
    from llama_triton.layers import SparseMoeBlock

    config = _hf_config(family, num_hidden_layers=1)
    hf_block = _hf_model(family, num_hidden_layers=1).model.layers[0].mlp
    ours = SparseMoeBlock(config)
    assert ours.load_state_dict(hf_block.state_dict()) is not None            # same parameter names
    wrapped = SparseMoeBlock.from_module(copy.deepcopy(hf_block))
    x = torch.randn(2, 5, 32)
    ref_x = x.clone().requires_grad_()
    ref = hf_block(ref_x)
    ref.square().sum().backward()
    for block in (ours, wrapped):
        xi = x.clone().requires_grad_()
        out = block(xi)
        assert out.shape == ref.shape and (out - ref).abs().max() < 1e-5
        out.square().sum().backward()
        assert (xi.grad - ref_x.grad).abs().max() < 1e-4
    mine = dict(ours.named_parameters())
    for name, p in hf_block.named_parameters():                                 # router and expert grads too
        assert (p.grad - mine[name].grad).abs().max() < 1e-4, name


def _names(count):
    return {n.split(":", 1)[1] for n in count.names if n.startswith("triton:")}


@needs_hf
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_patched_model_matches_stock(family):
    """hf.patch swaps the sparse blocks: logits, LM loss + router_aux_loss_coef * aux loss, aux loss and greedy
    tokens equal stock transformers'; the MoE layer runs 5 Triton launches (top-2)."""
    from llama_triton import hf
    from llama_triton.layers import SparseMoeBlock
    from llama_triton.profiling import count_kernels

    stock = _hf_model(family, num_hidden_layers=1)
    patched = copy.deepcopy(stock)
    report = hf.patch(patched)
    blocks = [m for m in patched.modules() if isinstance(m, SparseMoeBlock)]
    assert len(blocks) == 1 and any("SparseMoeBlock -> SparseMoeBlock" in k for k in report.counts())
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = stock(ids, labels=ids), patched(ids, labels=ids)
        assert (out.logits - ref.logits).abs().max() < 1e-4
        assert abs(out.aux_loss.item() - ref.aux_loss.item()) < 1e-5
        assert abs(out.loss.item() - ref.loss.item()) < 1e-5
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, output_router_logits=False)
        kw["attention_mask"] = torch.ones_like(ids[:1])
        assert torch.equal(patched.generate(ids[:1], **kw), stock.generate(ids[:1], **kw))
        _, count = count_kernels(blocks[0], torch.randn(1, 3, 32))
    assert count.triton == 5 and count.syncs == 0, count.names
    assert {"_moe_count_kernel", "_moe_align_kernel", "_moe_gate_up_kernel"} <= _names(count)
    hf.unpatch(patched)


@needs_hf
def test_register_experts_implementation(tmp_path):
    """hf.register() adds "llama_triton" to transformers' ExpertsInterface: from_pretrained(...,
    experts_implementation="llama_triton") runs our kernel and matches the stock model, gradients included."""
    from llama_triton import hf
    from llama_triton.profiling import count_kernels

    stock = _hf_model("mixtral", num_hidden_layers=1)
    stock.save_pretrained(tmp_path)
    hf.register()
    try:
        ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="llama_triton")
    finally:
        hf.unregister()
    assert ours.config._experts_implementation == "llama_triton"
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    out, count = count_kernels(ours, ids, labels=ids)
    ref = stock(ids, labels=ids)
    assert "_moe_gate_up_kernel" in _names(count)
    assert (out.logits - ref.logits).abs().max() < 1e-4 and abs(out.loss.item() - ref.loss.item()) < 1e-5
    out.loss.backward()
    ref.loss.backward()
    for name, p in stock.named_parameters():
        q = ours.get_parameter(name)
        assert (q.grad - p.grad).abs().max() < 1e-4, name


@needs_hf
def test_load_balancing_loss_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = tuple(torch.randn(10, 4, generator=torch.Generator().manual_seed(i)) for i in range(2))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    for m in (None, mask):
        assert torch.allclose(load_balancing_loss(logits, 4, 2, m), load_balancing_loss_func(logits, 4, 2, m))


@needs_hf
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_our_model_loads_moe_checkpoints(family, tmp_path):
    """LlamaForCausalLM.from_pretrained on a transformers-saved Mixtral / Qwen2-MoE checkpoint (per-expert hub
    layout, fused on load): logits, loss, aux loss and greedy tokens equal the stock model's."""
    from llama_triton.config import LlamaConfig
    from llama_triton.layers import SparseMoeBlock
    from llama_triton.model import LlamaForCausalLM

    stock = _hf_model(family, num_hidden_layers=1)
    stock.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert isinstance(ours.model.layers[0].mlp, SparseMoeBlock)
    cfg = LlamaConfig.from_hf_config(tmp_path)
    assert (cfg.num_local_experts or cfg.num_experts) == 4 and cfg.num_experts_per_tok == 2
    assert LlamaConfig.from_hf_config(transformers.AutoConfig.for_model(**cfg.to_hf_dict())) == cfg   # round trip
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = stock(ids, labels=ids), ours(ids, labels=ids)
        assert (out.logits - ref.logits).abs().max() < 1e-4
        assert abs(out.aux_loss.item() - ref.aux_loss.item()) < 1e-5 and abs(out.loss.item() - ref.loss.item()) < 1e-5
        hf_tokens = stock.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0, eos_token_id=None, output_router_logits=False)
        assert torch.equal(ours.generate(ids[:1], max_new_tokens=4), hf_tokens)


def test_moe_presets_and_bad_config():
    from llama_triton.config import LlamaConfig
    from llama_triton.model import LlamaForCausalLM

    with torch.device("meta"):
        mixtral = LlamaForCausalLM(LlamaConfig.preset("mixtral-8x7b"))
    assert round(sum(p.numel() for p in mixtral.parameters()) / 1e9, 1) == 46.7     # Mixtral-8x7B's 46.7B
    assert mixtral.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 2 * 14336, 4096)

    with pytest.raises(ValueError, match="num_experts_per_tok"):
        LlamaConfig(model_type="mixtral", num_local_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig(model_type="llama", num_experts=4)


def test_backward_does_not_read_the_autotuners_shared_best_config(monkeypatch):
    """The routing-weight gradient's partial sums are laid out by the N tiles of the launch that wrote them.
    Autograd runs each GPU's backward in its own thread, so another MoE layer's launch may change the
    autotuner's shared ``best_config`` in between: the backward must use its own launch's tile size."""
    import triton

    torch.manual_seed(0)
    x, gu, dn, ids, w = SPEC.make_inputs(_shape(5, 4, 2, inter=40), torch.float32, "cpu")
    real = K._gemm

    class OtherThreadLaunches:                         # after each launch, "another thread" tunes BLOCK_N=64
        def __getattr__(self, name):
            return getattr(real, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                real[grid](*args, **kwargs)
                real.best_config = triton.Config({"BLOCK_N": 64, "BLOCK_K": 32})
            return launch

    def grads(gemm):
        monkeypatch.setattr(K, "_gemm", gemm)
        wr = w.clone().requires_grad_()
        moe_experts(x, gu, dn, ids, wr).square().sum().backward()
        return wr.grad

    want = grads(real)
    torch.testing.assert_close(grads(OtherThreadLaunches()), want, rtol=0, atol=0)


def test_incomplete_per_expert_checkpoint_names_what_is_missing():
    """A hub checkpoint whose first expert lacks its gate projection: a ValueError naming the missing tensors
    (it was a bare StopIteration)."""
    from llama_triton.moe import legacy_expert_plan

    with pytest.raises(ValueError, match=r"missing .*experts\.0\.w1"):
        legacy_expert_plan(["model.layers.0.block_sparse_moe.experts.0.w2.weight",
                            "model.layers.0.block_sparse_moe.experts.0.w3.weight"])
