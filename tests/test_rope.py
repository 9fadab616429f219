"""Rotary embeddings: the kernel vs the reference under the 2x rule (layouts, GQA, odd lengths, cos/sin
shapes, backward), the in-place variant, the drop-in RotaryEmbedding vs transformers for every rope type,
opcheck, bad input."""
import pytest
import torch

from conftest import DEVICE, DTYPES
from llama_triton import layers, reference, testing
from llama_triton.ops import rope as rope_ops
from llama_triton.ops.rope import apply_rotary_pos_emb


@pytest.fixture(autouse=True)
def _deterministic_inputs():
    """Every test draws its random inputs from the same seed, whatever ran before it."""
    torch.manual_seed(0)


def _tables(b, s, d, dtype, theta=10000.0, positions=None):
    pos = torch.arange(s, device=DEVICE)[None].expand(b, s) if positions is None else positions
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=DEVICE, dtype=torch.float32) / d)
    emb = torch.cat([pos[..., None].float() * inv] * 2, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _check(q, k, cos, sin, unsqueeze_dim=1, backward=True):
    """Forward and (q, k) grads of ours vs the low-precision reference vs the fp64 oracle."""
    gen = torch.Generator().manual_seed(1)
    res = []
    for fn, args in ((apply_rotary_pos_emb, (q, k, cos, sin)), (reference.apply_rotary_pos_emb, (q, k, cos, sin)),
                     (reference.apply_rotary_pos_emb, testing.to_oracle((q, k, cos, sin)))):
        qq, kk = (a.detach().clone().requires_grad_(backward) for a in args[:2])
        outs = fn(qq, kk, *args[2:], unsqueeze_dim=unsqueeze_dim)
        grads = ()
        if backward:
            gen.manual_seed(1)
            gs = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
            grads = torch.autograd.grad(outs, (qq, kk), gs)
        res.append((tuple(o.detach() for o in outs), grads))
    (ours, og), (low, lg), (hi, hg) = res
    for name, o, l, h in zip(("q_embed", "k_embed", "dq", "dk"), ours + og, low + lg, hi + hg):
        assert o.dtype == l.dtype and o.shape == l.shape and o.stride() == l.stride(), name
        testing.assert_close(name, o, l, h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,h,hk,s,d", [(1, 1, 1, 1, 2), (2, 4, 1, 17, 64), (1, 8, 2, 5, 128), (2, 3, 3, 129, 6)])
def test_matches_reference(b, h, hk, s, d, dtype):
    q = torch.randn(b, h, s, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, hk, s, d, dtype=dtype, device=DEVICE)
    cos, sin = _tables(b, s, d, dtype)
    _check(q, k, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_table_shapes_and_arbitrary_positions(dtype):
    b, s, d = 3, 7, 32
    q = torch.randn(b, 4, s, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, 2, s, d, dtype=dtype, device=DEVICE)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [40, 41, 42, 43, 44, 45, 46], [9, 3, 100, 7, 7, 0, 5]], device=DEVICE)
    cos, sin = _tables(b, s, d, dtype, positions=pos)
    _check(q, k, cos, sin)                                   # (b, s, d): per-sequence positions
    _check(q, k, cos[1], sin[1])                             # (s, d): shared table
    _check(q, k, cos[1:2], sin[1:2])                         # (1, s, d): broadcast over batch
    # a general table (halves differ) checks the exact transpose in the backward
    _check(q, k, torch.randn(s, d, dtype=dtype, device=DEVICE), torch.randn(s, d, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts_and_strides(dtype):
    b, s, h, hk, d = 2, 9, 4, 2, 16
    # flash-attn layout (b, s, h, d) with unsqueeze_dim=2, and HF's usual transposed view of it
    q = torch.randn(b, s, h, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, s, hk, d, dtype=dtype, device=DEVICE)
    cos, sin = _tables(b, s, d, dtype)
    _check(q, k, cos, sin, unsqueeze_dim=2)
    _check(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    # a fused qkv projection sliced into q and k (strided heads), and a last dim that is not contiguous
    qkv = torch.randn(b, s, h + 2 * hk, d, dtype=dtype, device=DEVICE)
    _check(qkv[:, :, :h].transpose(1, 2), qkv[:, :, h:h + hk].transpose(1, 2), cos, sin)
    wide = torch.randn(b, h, s, 2 * d, dtype=dtype, device=DEVICE)[..., ::2]
    assert wide.stride(-1) == 2
    _check(wide, k.transpose(1, 2), cos.transpose(1, 2).contiguous().transpose(1, 2), sin)


def test_mixed_dtypes_promote_like_hf():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float16, device=DEVICE)
    k = torch.randn(1, 1, 5, 8, dtype=torch.float16, device=DEVICE)
    cos, sin = _tables(1, 5, 8, torch.float32)
    qe, ke = apply_rotary_pos_emb(q, k, cos, sin)
    assert qe.dtype == ke.dtype == torch.float32
    _check(q, k, cos, sin)


def test_only_one_output_used_in_backward():
    q = torch.randn(1, 2, 5, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, device=DEVICE, requires_grad=True)
    cos, sin = _tables(1, 5, 8, torch.float32)
    qe, _ = apply_rotary_pos_emb(q, k, cos, sin)
    qe.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    ref = torch.autograd.grad(reference.apply_rotary_pos_emb(q, k, cos, sin)[0].sum(), q)[0]
    torch.testing.assert_close(q.grad, ref)


def test_inplace():
    q = torch.randn(2, 4, 6, 16, device=DEVICE)
    k = torch.randn(2, 2, 6, 16, device=DEVICE)
    cos, sin = _tables(2, 6, 16, torch.float32)
    eq, ek = reference.apply_rotary_pos_emb(q, k, cos, sin)
    q2, k2 = q.clone(), k.clone()
    out = apply_rotary_pos_emb(q2, k2, cos, sin, inplace=True)
    assert out[0] is q2 and out[1] is k2
    torch.testing.assert_close(q2, eq)
    torch.testing.assert_close(k2, ek)
    with pytest.raises(ValueError, match="inference"):
        apply_rotary_pos_emb(q.requires_grad_(), k, cos, sin, inplace=True)
    with pytest.raises(TypeError, match="inplace"):
        apply_rotary_pos_emb(q.detach().half(), k.half(), cos, sin, inplace=True)


def test_opcheck():
    q = torch.randn(2, 4, 5, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 5, 8, device=DEVICE, requires_grad=True)
    cos, sin = _tables(2, 5, 8, torch.float32)
    torch.library.opcheck(rope_ops._rope, (q, k, cos, sin, False))
    torch.library.opcheck(rope_ops._rope, (q.transpose(1, 2).contiguous().transpose(1, 2), k, cos[0], sin[0], True))
    torch.library.opcheck(rope_ops._rope_, (q.detach().clone(), k.detach().clone(), cos, sin))


def test_torch_compile_fullgraph():
    q = torch.randn(1, 2, 5, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, device=DEVICE)
    cos, sin = _tables(1, 5, 8, torch.float32)
    qe, ke = torch.compile(apply_rotary_pos_emb, fullgraph=True)(q, k, cos, sin)
    rq, rk = reference.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(qe, rq)
    torch.testing.assert_close(ke, rk)
    qe.sum().backward()
    assert q.grad is not None


# ------------------------------------------------------------------------------ RotaryEmbedding vs HF
ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_rotary_embedding_matches_transformers(rope_type):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_parameters=dict(ROPE_TYPES[rope_type]))
    hf, ours = LlamaRotaryEmbedding(cfg).to(DEVICE), layers.RotaryEmbedding(cfg, device=DEVICE)
    assert torch.equal(ours.inv_freq, hf.inv_freq)
    x = torch.randn(2, 3, 64, device=DEVICE)
    cases = [
        torch.arange(40, device=DEVICE)[None].expand(2, 40),                # prefill
        torch.tensor([[17], [63]], device=DEVICE),                          # decode at positions p
        torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]], device=DEVICE),         # packed sequences
        torch.tensor([[100, 101, 150]], device=DEVICE),                     # past max_position_embeddings
        torch.tensor([[5, 6]], device=DEVICE),                              # back within (dynamic resets)
    ]
    for pos in cases:
        for dtype in (torch.float32, torch.float16):
            hc, hs = hf(x.to(dtype), pos)
            oc, os_ = ours(x.to(dtype), pos)
            assert oc.dtype == hc.dtype == dtype
            assert torch.equal(oc, hc) and torch.equal(os_, hs), (rope_type, pos)
        assert torch.equal(ours.inv_freq, hf.inv_freq)
        q = torch.randn(pos.shape[0], 4, pos.shape[1], 16, device=DEVICE)
        k = torch.randn(pos.shape[0], 2, pos.shape[1], 16, device=DEVICE)
        for a, b in zip(apply_rotary_pos_emb(q, k, oc, os_), hf_apply(q, k, hc, hs)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_rotary_embedding_with_our_config():
    from llama_triton.config import LlamaConfig as OurConfig
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
    ours = layers.RotaryEmbedding(OurConfig(hidden_size=128, num_attention_heads=2, rope_parameters=dict(params)))
    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=dict(params)))
    pos = torch.arange(9)[None]
    assert torch.equal(ours(torch.ones(1), pos)[0], hf(torch.ones(1), pos)[0])


def test_unsupported_rope_type():
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        layers.RotaryEmbedding(cfg)


# ---------------------------------------------------------------------------------------- bad input
def _bad(**kw):
    args = dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 5, 8), cos=torch.randn(5, 8), sin=torch.randn(5, 8))
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(q=torch.randn(2, 4, 5, 8).long()), TypeError, "q has dtype int64"),
        (dict(k=torch.randn(2, 2, 5, 8).half()), TypeError, "k has dtype"),
        (dict(q=torch.randn(4, 5, 8)), ValueError, "q must have 4 dimensions"),
        (dict(k=torch.randn(2, 2, 6, 8)), ValueError, "k has shape"),
        (dict(q=torch.randn(2, 4, 5, 7), k=torch.randn(2, 2, 5, 7)), ValueError, "head_dim must be even"),
        (dict(cos=torch.randn(6, 8), sin=torch.randn(6, 8)), ValueError, "cos/sin must have shape"),
        (dict(cos=torch.randn(3, 5, 8), sin=torch.randn(3, 5, 8)), ValueError, "cos/sin must have shape"),
        (dict(sin=torch.randn(1, 5, 8)), ValueError, "sin has shape"),
        (dict(sin=torch.randn(5, 8).half()), TypeError, "sin has dtype"),
        (dict(cos=torch.randn(5, 8, device="meta")), ValueError, "cos is on meta"),
        (dict(cos=torch.randn(5, 8, requires_grad=True)), ValueError, "constants"),
    ],
)
def test_bad_input(kw, exc, match):
    with pytest.raises(exc, match=match):
        apply_rotary_pos_emb(**_bad(**kw))


def test_bad_unsqueeze_dim():
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        apply_rotary_pos_emb(**_bad(), unsqueeze_dim=3)


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,h,hk,s,d", [(1, 32, 8, 8192, 128), (4, 32, 8, 1000, 128), (2, 24, 8, 129, 64)])
def test_gpu_large(b, h, hk, s, d, dtype):
    qkv = torch.randn(b, s, h + 2 * hk, d, dtype=dtype, device="cuda")
    q, k = qkv[:, :, :h].transpose(1, 2), qkv[:, :, h:h + hk].transpose(1, 2)
    cos, sin = _tables(b, s, d, dtype, theta=500000.0)
    _check(q, k, cos, sin)
