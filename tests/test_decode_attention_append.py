"""decode_attention_with_kvcache: RoPE + KV-cache append + decode attention in one kernel, against the
reference (and bit for bit against the separate rope kernel + cache write + decode attention it replaces)."""
import pytest
import torch

from conftest import DEVICE, DTYPES
from llama_triton import reference, testing
from llama_triton.ops.decode_attention import decode_attention, decode_attention_with_kvcache
from llama_triton.ops.rope import apply_rotary_pos_emb


def _tables(n, d, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    emb = torch.cat([torch.arange(n).float()[:, None] * inv] * 2, -1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def _inputs(b, q_len, h, h_kv, d, n, seqlens, dtype):
    g = torch.Generator().manual_seed(b * 100 + q_len)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    return (r(b, q_len, h, d), r(b, n, h_kv, d), r(b, n, h_kv, d), r(b, q_len, h_kv, d), r(b, q_len, h_kv, d),
            torch.tensor(seqlens, dtype=torch.int32, device=DEVICE))


CASES = [  # (batch, q_len, heads, heads_kv, head_dim, max_seqlen, lengths before the append)
    (2, 1, 4, 2, 32, 40, [0, 17]),       # an empty cache, ragged
    (1, 3, 8, 2, 16, 70, [64]),          # q_len 3 whose keys straddle two splits
    (2, 2, 6, 2, 24, 33, [31, 5]),       # group 3, non-power-of-2 head_dim, the cache filled to the end
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-q{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}" for c in CASES])
def test_matches_reference_and_writes_the_cache(case, num_splits, dtype):
    b, q_len, h, h_kv, d, n, lens = case
    q, kc, vc, k, v, s = _inputs(b, q_len, h, h_kv, d, n, lens, dtype)
    cos, sin = _tables(n + 3, d, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = decode_attention_with_kvcache(q, kc, vc, k, v, s, cos, sin, num_splits=num_splits)
    low = reference.decode_attention_with_kvcache(q, kc_ref, vc_ref, k, v, s, cos, sin)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0)          # same rotation, same single rounding
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)
    hi = reference.decode_attention_with_kvcache(*testing.to_oracle((q, kc.clone(), vc.clone(), k, v)), s,
                                                 cos.double(), sin.double())
    testing.assert_close("out", out, low, hi)
    assert s.tolist() == lens                                        # lengths are the caller's to advance


@pytest.mark.parametrize("window, num_splits", [((-1, -1), 1), ((-1, -1), 4), ((6, 0), 2)])
def test_bit_identical_to_rope_then_append_then_decode_attention(window, num_splits):
    """The path it replaces: apply_rotary_pos_emb (Triton) -> index_put into the cache -> decode_attention."""
    b, q_len, h, h_kv, d, n = 2, 2, 8, 2, 32, 50
    q, kc, vc, k, v, s = _inputs(b, q_len, h, h_kv, d, n, [9, 40], torch.float32)
    cos, sin = _tables(n, d, torch.float32)
    pos = s.long()[:, None] + torch.arange(q_len, device=DEVICE)
    qr, kr = apply_rotary_pos_emb(q, k, cos[pos], sin[pos], unsqueeze_dim=2)
    kc2, vc2 = kc.clone(), vc.clone()
    rows = torch.arange(b, device=DEVICE)[:, None].expand(b, q_len)
    kc2[rows, pos], vc2[rows, pos] = kr, v
    ref = decode_attention(qr, kc2, vc2, s + q_len, window_size=window, num_splits=num_splits)
    out = decode_attention_with_kvcache(q, kc, vc, k, v, s, cos, sin, window_size=window, num_splits=num_splits)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and torch.equal(out, ref)
    # without rotary: a plain append
    kc3, vc3 = kc.clone(), vc.clone()
    out = decode_attention_with_kvcache(qr, kc3, vc3, kr, v, s, window_size=window, num_splits=num_splits)
    assert torch.equal(kc3, kc2) and torch.equal(out, ref)


def test_bad_input():
    q, kc, vc, k, v, s = _inputs(2, 1, 4, 2, 16, 20, [3, 4], torch.float32)
    cos, sin = _tables(20, 16, torch.float32)
    with pytest.raises(ValueError, match="rotary_cos"):
        decode_attention_with_kvcache(q, kc, vc, k, v, s, cos[:10], sin[:10])        # table shorter than the cache
    with pytest.raises(ValueError, match="together"):
        decode_attention_with_kvcache(q, kc, vc, k, v, s, cos, None)
    with pytest.raises(ValueError, match="k has shape"):
        decode_attention_with_kvcache(q, kc, vc, k[:, :, :1], v, s)
    with pytest.raises(TypeError, match="v has dtype"):
        decode_attention_with_kvcache(q, kc, vc, k, v.half(), s)
    with pytest.raises(ValueError, match="q_len"):
        decode_attention_with_kvcache(q, kc, vc, k, v, torch.tensor([3, 20], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_cache_leftpad(num_splits):
    """flash-attn's cache_leftpad: the first leftpad[i] slots of row i are padding (a left-padded batch)."""
    q, kc, vc, _, _, s = _inputs(3, 2, 4, 2, 16, 70, [70, 40, 5], torch.float32)
    pad = torch.tensor([0, 37, 5], dtype=torch.int32, device=DEVICE)             # row 2: all padding
    out = decode_attention(q, kc, vc, s, num_splits=num_splits, cache_leftpad=pad)
    ref = reference.decode_attention(q, kc, vc, s, cache_leftpad=pad)
    hi = reference.decode_attention(*testing.to_oracle((q, kc, vc)), s, cache_leftpad=pad)
    testing.assert_close("out", out, ref, hi)
    torch.testing.assert_close(out[1:2], reference.decode_attention(q[1:2], kc[1:2, 37:], vc[1:2, 37:], s[1:2] - 37))
    assert (out[2] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, num_splits", [(1, None), (4, None), (4, 1)])
def test_gpu_llama_shapes_bf16(q_len, num_splits):
    """Llama-3-8B attention shapes, a 4k cache split over programs (the new keys' split writes them, then a
    barrier, then reads them back through the pipelined loads), under the 2x rule."""
    b, h, h_kv, d, n = 2, 32, 8, 128, 4096
    q, kc, vc, k, v, s = _inputs(b, q_len, h, h_kv, d, n, [4000, 63], torch.bfloat16)
    cos, sin = _tables(n, d, torch.bfloat16)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = decode_attention_with_kvcache(q, kc, vc, k, v, s, cos, sin, num_splits=num_splits)
    low = reference.decode_attention_with_kvcache(q, kc_ref, vc_ref, k, v, s, cos, sin)
    assert torch.equal(vc, vc_ref)                                   # values: a plain copy
    torch.testing.assert_close(kc, kc_ref, rtol=2 ** -7, atol=1e-3)  # keys: fp32 rotation (FMA may differ by 1 ulp)
    hi = reference.decode_attention_with_kvcache(*testing.to_oracle((q, kc.clone(), vc.clone(), k, v)), s,
                                                 cos.double(), sin.double())
    testing.assert_close("out", out, low, hi)
