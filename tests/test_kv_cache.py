"""layers.KVCache: writes, the seqlens rule, reset, bad input, and a prefill + decode loop through
decode_attention against reference attention over the whole sequence (CPU interpreter / GPU; CUDA graphs
on GPU)."""
import pytest
import torch

from conftest import DEVICE
from llama_triton import reference, testing
from llama_triton.layers import KVCache
from llama_triton.ops.decode_attention import decode_attention


def _pos(rows, device=DEVICE):
    return torch.tensor(rows, dtype=torch.int64, device=device)


def test_buffers_and_defaults():
    c = KVCache(3, 16, 2, 8, dtype=torch.float16, device=DEVICE)
    assert c.k.shape == c.v.shape == (3, 16, 2, 8) and c.k.dtype == torch.float16
    assert c.seqlens.dtype == torch.int32 and c.seqlens.shape == (3,) and (c.seqlens == 0).all()
    assert c.max_seqlen == 16
    assert dict(c.named_buffers()).keys() == {"k", "v", "seqlens"}
    assert c.state_dict() == {}  # a cache is state, not weights: model checkpoints must not carry it
    assert KVCache(1, 2, 1, 4).k.dtype == torch.get_default_dtype()


def test_update_writes_and_advances_lengths():
    torch.manual_seed(0)
    c = KVCache(2, 10, 2, 4, device=DEVICE)
    k, v = torch.randn(2, 4, 2, 4, device=DEVICE), torch.randn(2, 4, 2, 4, device=DEVICE)
    kb, vb = c.update(_pos([[0, 1, 2, 3], [0, 1, 2, 3]]), k, v)
    assert kb is c.k and vb is c.v
    assert torch.equal(c.k[:, :4], k) and torch.equal(c.v[:, :4], v) and (c.k[:, 4:] == 0).all()
    assert c.seqlens.tolist() == [4, 4]
    k1, v1 = torch.randn(2, 1, 2, 4, device=DEVICE), torch.randn(2, 1, 2, 4, device=DEVICE)
    c.update(_pos([[4], [1]]), k1, v1)           # row 1 rewrites an old position: its length does not shrink
    assert c.seqlens.tolist() == [5, 4]
    assert torch.equal(c.k[0, 4], k1[0, 0]) and torch.equal(c.k[1, 1], k1[1, 0]) and torch.equal(c.v[1, 1], v1[1, 0])
    assert torch.equal(c.k[1, 0], k[1, 0]) and torch.equal(c.k[1, 2], k[1, 2])   # neighbours untouched
    c.update(_pos([[7], [4]]).int(), k1, v1)     # int32 positions too; a gap is allowed
    assert c.seqlens.tolist() == [8, 5]
    c.reset()
    assert c.seqlens.tolist() == [0, 0]


def test_update_refuses_another_dtype_than_the_cache():
    """No silent cast (issue 11): a fp32 k into a fp16 cache raises; the cache's own dtype is written exactly."""
    c = KVCache(1, 4, 1, 8, dtype=torch.float16, device=DEVICE)
    k = torch.randn(1, 2, 1, 8, device=DEVICE)
    with pytest.raises(TypeError, match="but the cache holds torch.float16"):
        c.update(_pos([[1, 2]]), k, k)
    c.update(_pos([[1, 2]]), k.half(), k.half())
    assert c.k.dtype == torch.float16 and torch.equal(c.k[0, 1:3], k[0].half())


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (lambda: (torch.zeros(2, 1), torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4)), TypeError, "positions has dtype"),
        (lambda: (_pos([[0]]), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)), ValueError, "positions has shape"),
        (lambda: (_pos([0, 1]), torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4)), ValueError, "positions must have 2"),
        (lambda: (_pos([[0], [1]]), torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 2, 4)), ValueError, "k has shape"),
        (lambda: (_pos([[0], [1]]), torch.zeros(2, 1, 2, 4), torch.zeros(2, 2, 2, 4)), ValueError, "v has shape"),
        (lambda: (_pos([[0], [1]]), torch.zeros(2, 1, 2, 4, dtype=torch.int32), torch.zeros(2, 1, 2, 4)), TypeError,
         "k has dtype"),
        (lambda: (_pos([[0], [8]]), torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4)), ValueError,
         r"positions must be in \[0, max_seqlen=8\)"),
        (lambda: (_pos([[0], [-1]]), torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4)), ValueError, "positions must be in"),
        (lambda: (_pos([[0], [1]]), torch.zeros(2, 1, 2, 4, device="meta"), torch.zeros(2, 1, 2, 4)), ValueError,
         "k is on meta"),
    ],
)
def test_bad_update(args, exc, match):
    c = KVCache(2, 8, 2, 4)  # CPU: positions are range-checked there
    with pytest.raises(exc, match=match):
        c.update(*args())
    assert c.seqlens.tolist() == [0, 0]  # nothing half-written


@pytest.mark.parametrize("bad", [dict(batch=0), dict(max_seqlen=-1), dict(head_dim=2.0)])
def test_bad_constructor(bad):
    kw = {**dict(batch=1, max_seqlen=4, n_kv_heads=1, head_dim=4), **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        KVCache(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_prefill_then_decode_loop_matches_full_attention(dtype):
    """A generate loop: prefill 6 tokens, decode 4 one at a time, then a 2-token (speculative) step; every
    step's output equals causal attention over the whole sequence so far."""
    torch.manual_seed(1)
    b, h, h_kv, d, total = 2, 8, 2, 32, 12
    q = torch.randn(b, total, h, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, total, h_kv, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b, total, h_kv, d, dtype=dtype, device=DEVICE)
    cache = KVCache(b, 20, h_kv, d, dtype=dtype, device=DEVICE)
    steps = [(0, 6)] + [(t, t + 1) for t in range(6, 10)] + [(10, 12)]
    for start, end in steps:
        pos = torch.arange(start, end, device=DEVICE).expand(b, -1)
        kc, vc = cache.update(pos, k[:, start:end], v[:, start:end])
        out = decode_attention(q[:, start:end], kc, vc, cache.seqlens)
        assert cache.seqlens.tolist() == [end] * b
        qq = q[:, :end]
        low = reference.attention(qq, k[:, :end], v[:, :end], causal=True)[:, start:end]
        hi = reference.attention(*testing.to_oracle((qq, k[:, :end], v[:, :end])), causal=True)[:, start:end]
        testing.assert_close(f"step {start}:{end}", out, low, hi)


def test_ragged_batch_decode():
    """Sequences at different lengths in one batch (each at its own position)."""
    torch.manual_seed(2)
    b, h, h_kv, d = 3, 4, 1, 16
    cache = KVCache(b, 32, h_kv, d, device=DEVICE)
    lens = [5, 17, 1]
    for i, n in enumerate(lens):  # fill each sequence's prefix directly, as a prefill would
        cache.k[i, :n] = torch.randn(n, h_kv, d, device=DEVICE)
        cache.v[i, :n] = torch.randn(n, h_kv, d, device=DEVICE)
    cache.seqlens.copy_(torch.tensor(lens, dtype=torch.int32))
    kn, vn = torch.randn(b, 1, h_kv, d, device=DEVICE), torch.randn(b, 1, h_kv, d, device=DEVICE)
    cache.update(_pos([[n] for n in lens]), kn, vn)
    assert cache.seqlens.tolist() == [n + 1 for n in lens]
    q = torch.randn(b, 1, h, d, device=DEVICE)
    out = decode_attention(q, cache.k, cache.v, cache.seqlens)
    for i, n in enumerate(lens):
        ref = reference.attention(q[i:i + 1], cache.k[i:i + 1, :n + 1], cache.v[i:i + 1, :n + 1], causal=True)
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)


def test_torch_compile_decode_step_with_cache():
    torch.manual_seed(3)
    cache = KVCache(2, 16, 2, 16, device=DEVICE)

    def step(pos, q, k, v):
        kc, vc = cache.update(pos, k, v)
        return decode_attention(q, kc, vc, cache.seqlens)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ks = torch.randn(2, 3, 2, 16, device=DEVICE)
    vs = torch.randn(2, 3, 2, 16, device=DEVICE)
    qs = torch.randn(2, 3, 8, 16, device=DEVICE)
    for t in range(3):
        out = compiled(_pos([[t], [t]]), qs[:, t:t + 1], ks[:, t:t + 1], vs[:, t:t + 1])
        ref = reference.attention(qs[:, :t + 1], ks[:, :t + 1], vs[:, :t + 1], causal=True)[:, t:t + 1]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert cache.seqlens.tolist() == [3, 3]


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_step():
    """Capture update + decode_attention once, replay it for successive tokens with new inputs."""
    torch.manual_seed(4)
    b, h, h_kv, d, total = 4, 32, 8, 128, 40
    dt = torch.bfloat16
    q, k, v = (torch.randn(b, total, n, d, device="cuda", dtype=dt) for n in (h, h_kv, h_kv))
    cache = KVCache(b, 256, h_kv, d, dtype=dt, device="cuda")
    cache.update(torch.arange(8, device="cuda").expand(b, -1), k[:, :8], v[:, :8])
    s_pos = torch.zeros(b, 1, dtype=torch.int64, device="cuda")
    s_q, s_k, s_v = q[:, :1].clone(), k[:, :1].clone(), v[:, :1].clone()

    def step():
        kc, vc = cache.update(s_pos, s_k, s_v)
        return decode_attention(s_q, kc, vc, cache.seqlens)

    s_pos.fill_(8)
    s_q.copy_(q[:, 8:9]), s_k.copy_(k[:, 8:9]), s_v.copy_(v[:, 8:9])
    step()  # warm-up compiles outside the capture (it rewrites position 8 with the same values)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for t in range(8, total):
        s_pos.fill_(t)
        s_q.copy_(q[:, t:t + 1]), s_k.copy_(k[:, t:t + 1]), s_v.copy_(v[:, t:t + 1])
        graph.replay()
        low = reference.attention(q[:, :t + 1], k[:, :t + 1], v[:, :t + 1], causal=True)[:, t:t + 1]
        hi = reference.attention(*testing.to_oracle((q[:, :t + 1], k[:, :t + 1], v[:, :t + 1])), causal=True)[:, t:t + 1]
        testing.assert_close(f"token {t}", out, low, hi)
    assert cache.seqlens.tolist() == [total] * b
