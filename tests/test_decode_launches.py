"""The decode step's launch budget (DESIGN.md: the count is part of the design): launches per decoder layer
and fixed, from 2- and 3-layer tiny models, no host sync; the fused path's tokens equal the general path's;
packed projections keep HF names; the rotary tables are forward's values bit for bit."""
import pytest
import torch

from _hf_tiny import transformers
from llama_triton import packing, profiling
from llama_triton.model import LlamaConfig, LlamaForCausalLM

MAX_PER_LAYER, MAX_FIXED = 9, 6


def _model(layers, **kw):
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **kw)).init_weights(0).eval()


def _per_layer_and_fixed(make, layers=(2, 3)):
    n2, n3 = layers
    c2, c3 = (profiling.count_decode_step(make(n), prompt_len=2) for n in layers)
    assert c2.syncs == c3.syncs == 0, (c2.names, c3.names)
    per_layer = (c3.launches - c2.launches) // (n3 - n2)
    fixed = c2.launches - n2 * per_layer
    assert all(s.launches == per_layer for s in c3.scopes.values()) and c3.launches == fixed + n3 * per_layer          # the scopes agree with the difference
    assert c3.outside_scopes().launches == fixed
    return per_layer, fixed, c3


def test_decode_step_launches_per_layer_and_fixed():
    per_layer, fixed, c = _per_layer_and_fixed(_model)
    assert per_layer <= MAX_PER_LAYER and fixed <= MAX_FIXED, (per_layer, fixed, c.names)
    layer = c.scopes["layer 1"].names
    assert layer["triton:_decode_split_kernel"] == 1 and layer["aten:mm"] == 4, layer   # qkv, o, gate_up, down
    assert not any(k.startswith("triton:_rope") or "index_put" in k for k in c.names), c.names


def test_int4_decode_step_launches_and_packed_quant_gemms():
    """quantize_model's QuantLinears are packed too (qweight row blocks, scales/zeros column blocks of one
    buffer): one quant GEMM for q/k/v and one for gate/up. One layer, counted by scope (the quant kernel is
    slow in the interpreter; the fp32 test checks that scopes equal the 2-/3-layer differences)."""
    from llama_triton.ops.swiglu import swiglu
    from llama_triton.quant import quantize_model

    model = quantize_model(_model(1), bits=4, group_size=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    c = profiling.count_decode_step(model, prompt_len=2)
    layer, fixed = c.scopes["layer 0"], c.outside_scopes()
    assert layer.launches <= MAX_PER_LAYER and fixed.launches <= MAX_FIXED and c.syncs == 0, c.names
    assert layer.names["triton:_decode_split_kernel"] == 1 and layer.aten == 0, layer.names
    mlp = model.model.layers[0].mlp
    assert packing.fused_forward([mlp.gate_proj, mlp.up_proj]) is not None
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = mlp(x)
        ref = mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))           # one quant GEMM each
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    after = model.state_dict()                                                   # names and values kept
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_fused_decode_tokens_equal_the_general_path():
    """generate (packed GEMMs, RoPE + append inside the attention kernel) vs explicit positions (separate
    q/k/v GEMMs on a fresh unpacked copy, the rope kernel, index_put, decode attention): the same tokens."""
    model = _model(2, sliding_window=6, model_type="mistral")
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    fused = model.generate(ids, max_new_tokens=4)
    general = _model(2, sliding_window=6, model_type="mistral")
    caches = [type(c)(2, 9, c.k.shape[2], c.k.shape[3]) for c in general.make_caches(2, 9)]  # own seqlens
    for m in general.modules():                                                  # unpack: a copy per weight
        for n, p in m.named_parameters(recurse=False):
            p.data = p.data.clone()
    assert packing.packed_weight([general.model.layers[0].self_attn.q_proj, general.model.layers[0].self_attn.k_proj,
                                  general.model.layers[0].self_attn.v_proj]) is None
    with torch.no_grad():
        tok = general(ids, caches=caches, fresh_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        out = [tok]
        for t in range(5, 8):
            tok = general(tok, position_ids=torch.full((2, 1), t), caches=caches).logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
    assert torch.equal(fused[:, 5:], torch.cat(out, 1))


def test_packed_projections_keep_names_and_round_trip(tmp_path):
    model = _model(1)
    q = model.model.layers[0].self_attn.q_proj.weight
    names = [n for n, _ in model.named_parameters()]
    model.make_caches(1, 4)                                                      # packs
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight is q and [n for n, _ in model.named_parameters()] == names
    w, _ = packing.packed_weight([attn.q_proj, attn.k_proj, attn.v_proj])
    assert w.data_ptr() == q.data_ptr() and w.shape[0] == q.shape[0] + 2 * attn.k_proj.weight.shape[0]
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}])
def test_rotary_table_is_forward_and_transformers_bit_for_bit(rope):
    cfg = LlamaConfig(num_hidden_layers=1, max_position_embeddings=256, **({"rope_parameters": rope} if rope else {}))
    ours = LlamaForCausalLM(cfg).model.rotary_emb
    hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(
        transformers.LlamaConfig(**cfg.to_hf_dict()))
    cos_t, sin_t = ours.table(200, "cpu", torch.float16)
    pos = torch.tensor([[0, 1, 7, 63, 64, 65, 127, 150, 199]])
    x = torch.zeros(1, dtype=torch.float16)
    for got, want, ref in zip((cos_t[pos[0]], sin_t[pos[0]]), ours(x, pos), hf(x, pos)):
        assert torch.equal(got, want[0]) and torch.equal(got, ref[0])
    assert ours.table(100, "cpu", torch.float16)[0] is cos_t                     # built once


def test_generate_syncs_only_at_eos_checks():
    """No host sync per token: with an eos id, "all finished?" is read every eos_check_every tokens."""
    model = _model(1)
    ids = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(1))

    def syncs(n, every):
        return profiling.count_kernels(model.generate, ids, n, eos_token_id=10_000, eos_check_every=every)[1].syncs

    assert syncs(5, 2) - syncs(3, 2) == 1                    # 2 more tokens: one more check, not two


@pytest.mark.gpu
def test_gpu_generate_cuda_graph_tokens_equal_eager():
    model = LlamaForCausalLM.random(LlamaConfig(num_hidden_layers=2), dtype=torch.float32, device="cuda")
    ids = torch.randint(0, 256, (2, 9), device="cuda")
    eager = model.generate(ids, max_new_tokens=12, cuda_graph=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12), eager)                  # graph by default
    assert torch.equal(model.generate(ids, max_new_tokens=12, eos_token_id=int(eager[0, 12])),
                       model.generate(ids, max_new_tokens=12, eos_token_id=int(eager[0, 12]), cuda_graph=False))
