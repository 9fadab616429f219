"""Decode attention over a KV cache (kernels/decode_attention.py) against reference.decode_attention:
cache lengths, ragged batches, GQA packing, q_len > 1, split-K merging, windows, empty sequences, strided
caches, the lse, bad input, the custom op (opcheck, torch.compile) and, on a GPU, bf16 / no recompiles as
the cache grows / CUDA-graph capture."""
import pytest
import torch

import lowering_check
from conftest import DEVICE, DTYPES
from llama_triton import reference, testing
from llama_triton.kernels import decode_attention as K
from llama_triton.ops import decode_attention as ops
from llama_triton.ops.decode_attention import decode_attention


def _inputs(b, q_len, h, h_kv, d, max_seqlen, seqlens, dtype=torch.float32, device=DEVICE):
    q = torch.randn(b, q_len, h, d, dtype=dtype, device=device)
    k = torch.randn(b, max_seqlen, h_kv, d, dtype=dtype, device=device)
    v = torch.randn(b, max_seqlen, h_kv, d, dtype=dtype, device=device)
    return q, k, v, torch.tensor(seqlens, dtype=torch.int32, device=device)


def _ref_lse(q, k, v, seqlens, scale=None, window=(-1, -1)):
    """fp64 oracle lse (b, h, q_len) per sequence (reference._attention_dense over the valid prefix)."""
    out = []
    for i in range(q.shape[0]):
        n = int(seqlens[i])
        out.append(reference._attention_dense(q[i:i + 1].double(), k[i:i + 1, :n].double(), v[i:i + 1, :n].double(),
                                              True, scale, window)[1])
    return torch.cat(out, 0)


def _check(q, k, v, seqlens, scale=None, window=(-1, -1), num_splits=None):
    """Our out under the 2x rule vs the fp64 oracle, and our lse vs the oracle's (same -inf pattern)."""
    out, lse = K.decode_attention_fwd(q, k, v, seqlens, scale, window, num_splits=num_splits)
    low = reference.decode_attention(q, k, v, seqlens, scale, window)
    hi = reference.decode_attention(*testing.to_oracle((q, k, v)), seqlens, scale, window)
    assert out.shape == q.shape and out.dtype == q.dtype
    testing.assert_close("out", out, low, hi)
    ref = _ref_lse(q, k, v, seqlens, scale, window)
    assert lse.shape == ref.shape
    assert torch.equal(torch.isinf(lse).cpu(), torch.isinf(ref).cpu()), "empty rows (lse -inf) differ"
    fin = torch.isfinite(ref)
    if fin.any():
        err = (lse.double()[fin] - ref[fin]).abs().max().item()
        assert err <= 1e-4 * max(1.0, ref[fin].abs().max().item()), f"lse err {err:.3e}"
    return out


# (batch, q_len, heads, heads_kv, head_dim, max_seqlen, cache_seqlens)
CASES = [
    (1, 1, 4, 1, 64, 1, [1]),                      # one key
    (2, 1, 8, 2, 64, 2, [2, 1]),                   # two keys, ragged
    (3, 1, 8, 8, 64, 20, [17, 5, 20]),             # GQA 1 (MHA)
    (2, 1, 8, 2, 128, 17, [17, 9]),                # GQA 4, head_dim 128
    (2, 4, 16, 2, 64, 40, [33, 4]),                # GQA 8, q_len 4 (32 packed rows)
    (2, 4, 8, 2, 32, 255, [255, 130]),             # 255 keys
    (2, 1, 8, 1, 16, 1000, [1000, 999]),           # 1000 keys, GQA 8, small head_dim
    (1, 4, 4, 1, 32, 1000, [1000]),                # 1000 keys, q_len 4
    (2, 3, 6, 2, 80, 30, [7, 30]),                 # non-power-of-2 head_dim and group (3)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-q{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}-n{c[5]}" for c in CASES])
def test_matches_reference(case, dtype):
    torch.manual_seed(0)
    b, q_len, h, h_kv, d, n, seqlens = case
    _check(*_inputs(b, q_len, h, h_kv, d, n, seqlens, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_splits_equal_one_split(dtype):
    torch.manual_seed(1)
    q, k, v, s = _inputs(3, 2, 8, 2, 32, 300, [300, 77, 3], dtype)
    outs = [_check(q, k, v, s, num_splits=n) for n in (1, 2, 5, 16, K.MAX_SPLITS)]
    for o in outs[1:]:  # the merge is exact up to fp32 rounding
        torch.testing.assert_close(o.float(), outs[0].float(), rtol=0, atol=2e-6 if dtype == torch.float32 else 2e-3)


def test_splits_beyond_the_sequence_are_ignored():
    """More splits than blocks of the valid prefix: the extra splits are empty (lse -inf) and must not
    contribute to the merge."""
    torch.manual_seed(2)
    q, k, v, s = _inputs(2, 1, 4, 2, 32, 500, [5, 40])
    _check(q, k, v, s, num_splits=K.MAX_SPLITS)


@pytest.mark.parametrize("window", [(0, 0), (5, -1), (40, 0), (1000, -1)])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_sliding_window(window, num_splits):
    torch.manual_seed(3)
    q, k, v, s = _inputs(2, 4, 8, 2, 32, 150, [150, 61])
    _check(q, k, v, s, window=window, num_splits=num_splits)


def test_softmax_scale():
    torch.manual_seed(4)
    _check(*_inputs(2, 1, 4, 2, 64, 33, [33, 20]), scale=0.3, num_splits=3)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_empty_and_short_sequences_give_zero(num_splits):
    """cache_seqlens 0: nothing to attend to -> 0 (not NaN); seqlen < q_len: the first rows see no key."""
    torch.manual_seed(5)
    q, k, v, s = _inputs(3, 4, 4, 2, 32, 20, [0, 2, 20])
    out = _check(q, k, v, s, num_splits=num_splits)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1, :2] == 0).all() and (out[1, 2:] != 0).any()


def test_non_contiguous_inputs():
    torch.manual_seed(6)
    b, q_len, h, h_kv, d, n = 2, 2, 8, 2, 32, 70
    qkv = torch.randn(b, q_len, h + 2 * h_kv, d, device=DEVICE)
    q = qkv[:, :, :h]                                                              # head-strided slice
    k = torch.randn(b, h_kv, n, d, device=DEVICE).transpose(1, 2)                  # (b, n, h_kv, d) head-major
    v = torch.randn(b, n, h_kv, 2 * d, device=DEVICE)[..., ::2]                    # last dim strided
    big = torch.randn(b + 1, n + 5, h_kv, d, device=DEVICE)
    k2 = big[1:, 5:]                                                               # offset view of a bigger cache
    s = torch.tensor([70, 31], dtype=torch.int32, device=DEVICE)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or k2.is_contiguous())
    _check(q, k, v, s, num_splits=3)
    _check(q, k2, v, s, num_splits=1)
    _check(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, s)              # batch-strided q
    _check(q, k, v, torch.tensor([[70, 0], [31, 0]], dtype=torch.int32, device=DEVICE)[:, 0])  # strided lengths


def test_large_group_uses_several_row_tiles():
    """q_len * group > MAX_BLOCK_M: the packed rows are split over several programs per kv head."""
    torch.manual_seed(7)
    _check(*_inputs(1, 8, 16, 1, 16, 40, [40]), num_splits=2)


def test_public_function_and_forced_torch_backend(monkeypatch):
    torch.manual_seed(8)
    q, k, v, s = _inputs(2, 1, 8, 2, 64, 50, [50, 3])
    ours = decode_attention(q, k, v, s)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    torch.testing.assert_close(ours, decode_attention(q, k, v, s), rtol=1e-5, atol=1e-5)


def test_dispatch_auto_runs_the_kernel_on_this_device(monkeypatch):
    monkeypatch.delenv("LLAMA_TRITON_BACKEND", raising=False)
    calls = []
    real = ops.K.decode_attention_fwd
    monkeypatch.setattr(ops.K, "decode_attention_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    decode_attention(*_inputs(1, 1, 4, 2, 16, 8, [8]))
    assert calls


def test_top_level_export():
    import llama_triton

    assert llama_triton.decode_attention is decode_attention


def test_opcheck():
    q, k, v, s = _inputs(2, 2, 4, 2, 16, 24, [24, 7])
    torch.library.opcheck(ops._decode_attention, (q, k, v, s, 0.25, -1, None))
    torch.library.opcheck(ops._decode_attention, (q, k, v, s, 0.25, 3, 2))


def test_torch_compile_fullgraph_traces_the_custom_op():
    torch.manual_seed(9)
    q, k, v, s = _inputs(2, 1, 8, 2, 32, 40, [40, 11])
    fn = torch.compile(lambda q, k, v, s: decode_attention(q, k, v, s) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v, s), 2 * reference.decode_attention(q, k, v, s), rtol=1e-5, atol=1e-5)


def test_forward_only():
    q, k, v, s = _inputs(1, 1, 4, 2, 16, 8, [8])
    out = decode_attention(q.requires_grad_(), k, v, s)
    with pytest.raises(RuntimeError):
        out.sum().backward()


def _bad(**over):
    q, k, v, s = _inputs(2, 1, 8, 2, 16, 10, [10, 4], device="cpu")
    args = {"q": q, "k_cache": k, "v_cache": v, "cache_seqlens": s, **over}
    return args


@pytest.mark.parametrize(
    "over,exc,match",
    [
        ({"q": torch.zeros(2, 1, 8, 16, dtype=torch.int64)}, TypeError, "q has dtype int64"),
        ({"k_cache": torch.zeros(2, 10, 2, 16, dtype=torch.float16)}, TypeError, "k_cache has dtype"),
        ({"v_cache": torch.zeros(2, 10, 2, 16, dtype=torch.float64)}, TypeError, "v_cache has dtype float64"),
        ({"q": torch.zeros(2, 1, 7, 16)}, ValueError, "not divisible"),
        ({"cache_seqlens": torch.tensor([10, 4])}, TypeError, "cache_seqlens has dtype int64"),
        ({"cache_seqlens": torch.tensor([10, 4, 1], dtype=torch.int32)}, ValueError, "cache_seqlens has shape"),
        ({"cache_seqlens": torch.tensor([[10, 4]], dtype=torch.int32)}, ValueError, "cache_seqlens must have 1"),
        ({"cache_seqlens": torch.tensor([11, 4], dtype=torch.int32)}, ValueError, r"cache_seqlens must be in \[0, max_seqlen=10\]"),
        ({"cache_seqlens": torch.tensor([-1, 4], dtype=torch.int32)}, ValueError, "cache_seqlens must be in"),
        ({"q": torch.zeros(2, 17, 8, 16)}, ValueError, "q_len"),
        ({"q": torch.zeros(2, 1, 8, 32)}, ValueError, "head_dim"),
        ({"q": torch.zeros(3, 1, 8, 16)}, ValueError, "batch"),
        ({"q": torch.zeros(2, 8, 16)}, ValueError, "q must have 4 dimensions"),
        ({"v_cache": torch.zeros(2, 12, 2, 16)}, ValueError, "v_cache has shape"),
        ({"k_cache": torch.zeros(2, 10, 2, 16, device="meta")}, ValueError, "k_cache is on meta"),
        ({"k_cache": [1.0]}, TypeError, "k_cache must be a torch.Tensor"),
    ],
)
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        decode_attention(**_bad(**over))


def test_bad_options():
    args = _bad()
    with pytest.raises(ValueError, match="window_size"):
        decode_attention(**args, window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size"):
        decode_attention(**args, window_size=5)
    with pytest.raises(TypeError, match="softmax_scale"):
        decode_attention(**args, softmax_scale="0.1")
    with pytest.raises(ValueError, match="num_splits"):
        K.decode_attention_fwd(*args.values(), num_splits=0)
    with pytest.raises(ValueError, match="head_dim must be in"):
        K.decode_attention_fwd(*_inputs(1, 1, 2, 1, 300, 4, [4], device="cpu"))


def test_split_heuristic_depends_on_shapes_not_lengths():
    cpu = torch.device("cpu")
    assert K.choose_num_splits(1, 1, 1, 32768, 64, cpu) > 1        # few programs, long buffer: split it
    assert K.choose_num_splits(1, 1, 1, 10, 64, cpu) == 1           # never more splits than cache blocks
    assert K.choose_num_splits(64, 8, 1, 32768, 64, cpu) == 1       # enough programs already
    assert "splits=" in K.describe_config(1, 1, 32, 8, 128, 4096, cpu)


# ------------------------------------------------------------------------------------------- GPU only
def _n_compiled(fn) -> int:
    """Number of compiled variants of a @triton.jit function (Triton 3.4-3.9 keep them per device)."""
    caches = getattr(fn, "device_caches", None)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    return sum(len(c) for c in fn.cache.values())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,q_len,h,h_kv,d,n", [(1, 1, 32, 8, 128, 4096), (8, 1, 32, 8, 128, 2048),
                                                (4, 4, 32, 4, 64, 3000), (3, 1, 64, 8, 128, 8192),
                                                (2, 2, 16, 16, 256, 1000)])
def test_gpu_large_shapes(b, q_len, h, h_kv, d, n, dtype):
    torch.manual_seed(0)
    seqlens = torch.randint(1, n + 1, (b,)).tolist()
    seqlens[0] = n
    q, k, v, s = _inputs(b, q_len, h, h_kv, d, n, seqlens, dtype, "cuda")
    _check(q, k, v, s)
    _check(q, k, v, s, window=(511, 0))


def _assert_matches_reference(name, out, q, k, v, s):
    """out vs reference.decode_attention under the 2x rule (plain PyTorch in q's dtype vs the fp64 oracle)."""
    testing.assert_close(name, out, reference.decode_attention(q, k, v, s),
                         reference.decode_attention(*testing.to_oracle((q, k, v)), s))


@pytest.mark.gpu
def test_gpu_growing_cache_does_not_recompile():
    q, k, v, s = _inputs(2, 1, 32, 8, 128, 2048, [1, 1], torch.bfloat16, "cuda")
    decode_attention(q, k, v, s)
    n_split, n_merge = _n_compiled(K._decode_split_kernel), _n_compiled(K._decode_merge_kernel)
    for length in (2, 3, 17, 64, 65, 1000, 2048):
        s.fill_(length)
        _assert_matches_reference(f"length {length}", decode_attention(q, k, v, s), q, k, v, s)
    assert _n_compiled(K._decode_split_kernel) == n_split and _n_compiled(K._decode_merge_kernel) == n_merge


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    q, k, v, s = _inputs(4, 1, 32, 8, 128, 4096, [5, 100, 4096, 1], torch.bfloat16, "cuda")
    decode_attention(q, k, v, s)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, s)
    for lengths in ([6, 101, 4096, 2], [1000, 0, 3000, 4096]):
        s.copy_(torch.tensor(lengths, dtype=torch.int32))
        q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        _assert_matches_reference("graph out", out, q, k, v, s)


@pytest.mark.gpu
def test_gpu_torch_compile_decode_step():
    q, k, v, s = _inputs(2, 1, 32, 8, 128, 1024, [1024, 77], torch.bfloat16, "cuda")
    fn = torch.compile(lambda q, k, v, s: decode_attention(q, k, v, s), fullgraph=True)
    _assert_matches_reference("compiled", fn(q, k, v, s), q, k, v, s)


_LOWERING = r"""
import torch
from llama_triton.kernels import decode_attention as K

# what the generic check (registry shapes: bf16/fp16, no window, one split) does not reach: fp32 (ieee dots),
# the window, the split merge, head_dim 256 (its own config)
for dtype, d, window in ((torch.float32, 128, (100, 0)), (torch.bfloat16, 128, (100, 0)), (torch.bfloat16, 256, (-1, -1))):
    q, kv = torch.empty(2, 4, 32, d, dtype=dtype), torch.empty(2, 4096, 8, d, dtype=dtype)
    K.decode_attention_fwd(q, kv, kv, torch.full((2,), 4096, dtype=torch.int32), None, window, num_splits=8)
# the decode step's variant: RoPE + KV append (decode_attention_with_kvcache), with cache_leftpad (HF caches)
new, cos = torch.empty(2, 4, 8, 128, dtype=torch.bfloat16), torch.empty(4096, 128, dtype=torch.bfloat16)
kv = torch.empty(2, 4096, 8, 128, dtype=torch.bfloat16)
K.decode_attention_fwd(new.repeat(1, 1, 4, 1), kv, kv, torch.full((2,), 100, dtype=torch.int32), None, (-1, -1),
                       num_splits=1, k=new, v=new, rotary_cos=cos, rotary_sin=cos,
                       cache_leftpad=torch.zeros(2, dtype=torch.int32))
print("LOWERING OK", len(L.compiled))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_kernel_variants_lower_to_sm90_without_a_gpu():
    """tests/test_lowering.py compiles the registry shapes (bf16/fp16, no window, one split); this compiles
    the variants it does not reach with the same machinery (tests/lowering_check.py)."""
    stdout = lowering_check.run_snippet(_LOWERING)
    assert stdout.count("compiled _decode_merge_kernel") == 3, stdout      # fp32, bf16, head_dim 256
    assert "APPEND=True" in stdout and "ROTARY=True" in stdout and "HAS_LEFTPAD=True" in stdout, stdout
