"""Quantized matmul (W4A16 / W8A16): every weight format against ``x @ dequantize(W).T`` under the 2x rule,
both kernel paths, exact GPTQ/AWQ import (tensors built by small packers written from the format
descriptions), QuantLinear, quantize_model on a transformers Llama, and bad input."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import lowering_check
from conftest import DEVICE, DTYPES
from llama_triton import backend, layers, quant, reference, testing
from llama_triton.kernels import quant_gemm
from llama_triton.ops import quant_matmul as qops
from llama_triton.ops.quant_matmul import quant_matmul


# ------------------------------------------------------------------- checkpoint packers (from the specs)
def _words(acc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(acc.astype(np.uint32).view(np.int32).copy())


def gptq_pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q (K, N) codes -> int32 (K*bits/32, N): word j of column n holds rows j*PACK .. j*PACK+PACK-1, row
    j*PACK+i at bits [i*bits, (i+1)*bits)."""
    pack = 32 // bits
    qn = q.numpy().astype(np.uint64)
    out = np.zeros((q.shape[0] // pack, q.shape[1]), dtype=np.uint64)
    for j in range(out.shape[0]):
        for i in range(pack):
            out[j] |= qn[j * pack + i] << np.uint64(bits * i)
    return _words(out)


def gptq_pack_qzeros(z: torch.Tensor, bits: int, v1: bool) -> torch.Tensor:
    """z (G, N) zero points -> int32 (G, N*bits/32) packed along N; v1 stores (z - 1) masked to `bits`."""
    pack, maxq = 32 // bits, (1 << bits) - 1
    zn = z.numpy().astype(np.int64)
    zn = ((zn - 1) & maxq) if v1 else zn
    zn = zn.astype(np.uint64)
    out = np.zeros((z.shape[0], z.shape[1] // pack), dtype=np.uint64)
    for c in range(out.shape[1]):
        for i in range(pack):
            out[:, c] |= zn[:, c * pack + i] << np.uint64(bits * i)
    return _words(out)


def awq_pack(q: torch.Tensor) -> torch.Tensor:
    """AutoAWQ: (R, C) 4-bit codes -> int32 (R, C/8); nibble i of word c is column 8c + [0,2,4,6,1,3,5,7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    qn = q.numpy().astype(np.uint64)
    out = np.zeros((q.shape[0], q.shape[1] // 8), dtype=np.uint64)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= qn[:, 8 * c + order[i]] << np.uint64(4 * i)
    return _words(out)


def _random_checkpoint(K, N, bits, group, scale_dtype=torch.float16, seed=0):
    """Integer codes q (K, N), zero points z (G, N), scales s (G, N) (positive, in scale_dtype)."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    G = K // group
    q = torch.randint(0, maxq + 1, (K, N), generator=gen)
    z = torch.randint(0, maxq + 1, (G, N), generator=gen)
    s = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    return q, z, s


def _act_order_g_idx(K, group, seed=0):
    """GPTQ desc_act: feature perm0[i] is the i-th quantized and belongs to group i // group."""
    perm0 = torch.randperm(K, generator=torch.Generator().manual_seed(seed + 1))
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm0] = (torch.arange(K) // group).to(torch.int32)
    return g_idx


def _expected_weight(q, z_eff, s, g_idx):
    """W (N, K) fp32 from the format's definition: W[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n]."""
    g = g_idx.long()
    return ((q - z_eff[g]).float() * s.float()[g]).t()


# ----------------------------------------------------------------------------------- weight formats
K_GROUPED, K_CHANNEL, N = 192, 264, 104   # K/N not multiples of the block sizes (N: of 32; K: of 32 per channel)


def _fmt(name):
    """A QuantizedWeight of the named format (fp16 scales, the checkpoint convention)."""
    torch.manual_seed(0)
    if name.startswith("rtn"):
        _, bits, group, sym = name.split("-")
        K = K_CHANNEL if group == "ch" else (256 if group == "128" else K_GROUPED)
        w = torch.randn(N, K, dtype=torch.float16)
        return quant.quantize_weight(w, int(bits), -1 if group == "ch" else int(group), sym == "sym")
    if name.startswith("gptq"):  # gptq-<bits>-<v1|v2>-<plain|act>
        _, bits, ver, order = name.split("-")
        bits, group = int(bits), 64
        q, z, s = _random_checkpoint(K_GROUPED, N, bits, group)
        g_idx = _act_order_g_idx(K_GROUPED, group) if order == "act" else torch.arange(K_GROUPED, dtype=torch.int32) // group
        return quant.import_gptq(gptq_pack_qweight(q, bits), gptq_pack_qzeros(z, bits, ver == "v1"), s, g_idx,
                                 bits=bits, checkpoint_format="gptq" if ver == "v1" else "gptq_v2")
    if name == "awq":
        q, z, s = _random_checkpoint(K_GROUPED, N, 4, 32)
        return quant.import_awq(awq_pack(q), awq_pack(z), s)
    raise KeyError(name)


FORMATS = ["rtn-4-32-sym", "rtn-4-64-asym", "rtn-4-128-sym", "rtn-4-ch-asym", "rtn-8-ch-sym", "rtn-8-ch-asym",
           "rtn-8-64-asym", "gptq-4-v1-act", "gptq-4-v2-plain", "gptq-8-v1-plain", "gptq-8-v2-act", "awq"]


def _check(x, qw):
    ours = quant_matmul(x, qw)
    low = reference.quant_matmul(x, qw)
    hi = reference.quant_matmul(x.double(), qw)
    assert ours.dtype == x.dtype and ours.shape == low.shape
    return testing.assert_close("y", ours, low, hi)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 128])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_matches_dequantized_matmul(fmt, M, dtype):
    qw = _fmt(fmt).to(DEVICE)
    _check(torch.randn(M, qw.in_features, dtype=dtype, device=DEVICE), qw)


@pytest.mark.parametrize("fmt,M,dtype", [
    ("rtn-4-64-asym", 2, torch.float16), ("rtn-4-64-asym", 4, torch.float32), ("rtn-4-64-asym", 5, torch.float16),
    ("rtn-4-64-asym", 8, torch.float32), ("gptq-4-v1-act", 4, torch.float16), ("gptq-8-v2-act", 2, torch.float32),
    ("gptq-8-v2-act", 5, torch.float16), ("awq", 8, torch.float16), ("rtn-8-ch-asym", 4, torch.float16),
    ("rtn-8-ch-asym", 5, torch.float32)], ids=str)
def test_decode_row_counts(fmt, M, dtype):
    """The rest of M in 1..16 (every GEMV row count, the dot path's smallest; the grid above has 1, 3, 16),
    spread over the formats and both dtypes."""
    qw = _fmt(fmt).to(DEVICE)
    _check(torch.randn(M, qw.in_features, dtype=dtype, device=DEVICE), qw)


@pytest.mark.parametrize("M", [1, 8])
def test_split_k_is_deterministic_and_leaves_the_counters_at_zero(M):
    """The in-launch split-K reduction sums the partials in split order: bit-identical on repeat; every
    ticket counter is back at 0 for the next launch."""
    qw = _fmt("rtn-4-32-sym").to(DEVICE)
    x = torch.randn(M, qw.in_features, device=DEVICE)
    kernel = quant_gemm._kernel(quant_gemm.path_for(M))
    assert DEVICE == "cuda" or kernel.configs[0].kwargs["SPLIT_K"] > 1
    first = quant_matmul(x, qw)
    assert torch.equal(quant_matmul(x, qw), first)
    assert int(quant_gemm._locks(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("bits,K", [(4, 192), (4, 256), (8, 264), (8, 64)])
def test_repack_round_trip(bits, K):
    """kernels/quant_layout.py: repack -> unrepack is the identity (K padded to whole chunks, not a multiple
    of them too); value i of word c*16 + w holds k = c*16*PACK + 16*i + w; GPTQ layout in and out."""
    from llama_triton.kernels import quant_layout as QL

    q = torch.randint(0, 1 << bits, (K, 24))
    words = QL.repack_codes(q, bits)
    assert tuple(words.shape) == QL.repacked_shape(K, 24, bits) and words.shape[1] * (32 // bits) >= K
    assert torch.equal(QL.unrepack_codes(words, K, bits), q)
    pack, k = 32 // bits, min(K - 1, 16 * (32 // bits) + 16 * 2 + 5)        # chunk 1, value 2, word 5
    c, i, w = k // (16 * pack), (k % (16 * pack)) // 16, k % 16
    assert (int(words[3, c * 16 + w]) >> (bits * i)) & ((1 << bits) - 1) == int(q[k, 3])
    qw = quant.QuantizedWeight(quant.pack_rows(q, bits), torch.ones(1, 24), None, bits, K)
    assert torch.equal(qw.qweight, words) and torch.equal(qw.gptq_qweight(), quant.pack_rows(q, bits))


@pytest.mark.parametrize("fmt", ["gptq-4-v1-act", "gptq-8-v2-act", "rtn-4-64-asym", "rtn-8-ch-sym", "awq"])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_to_gptq_reads_back_exactly(fmt, checkpoint_format):
    """What we write is a standard GPTQ linear (features in their own order, g_idx, packed qzeros): our
    importer gives back the same weight, bit for bit."""
    qw = _fmt(fmt)
    z = qw.zeros if qw.zeros is not None else torch.full((1,), 1 << (qw.bits - 1))
    unrepresentable = bool((z == 0).any()) if checkpoint_format == "gptq" else bool((z >> qw.bits).any())
    if unrepresentable:   # v1 cannot hold a zero point 0, v2 not v1's overflow 2**bits: a clear error
        with pytest.raises(ValueError, match="zero point"):
            quant.to_gptq(qw, checkpoint_format)
        return
    t = quant.to_gptq(qw, checkpoint_format)
    assert t["qweight"].shape == (qw.in_features * qw.bits // 32, N) and t["g_idx"].shape == (qw.in_features,)
    back = quant.import_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=qw.bits,
                             checkpoint_format=checkpoint_format)
    assert torch.equal(quant.dequantize(back, torch.float32), quant.dequantize(qw, torch.float32))


def test_save_gptq_checkpoint_loads_back(tmp_path, monkeypatch):
    """quantize_model -> save_gptq (safetensors + quantize_config.json) -> a fresh model's
    load_quantized_state_dict: the same logits (on the PyTorch path: the checkpoint is under test here)."""
    import json

    from safetensors.torch import load_file

    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    model, fresh = _tiny_llama(), _tiny_llama()
    quant.quantize_model(model, bits=4, group_size=32, sym=True)
    quant.save_gptq(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "quantize_config.json").read_text())
    assert cfg["bits"] == 4 and cfg["group_size"] == 32 and cfg["checkpoint_format"] == "gptq"
    assert sd["model.layers.0.mlp.up_proj.qweight"].shape == (64 // 8, 128)          # GPTQ's (K / 8, N)
    assert sd["model.layers.0.mlp.up_proj.qzeros"].shape == (64 // 32, 128 // 8)
    names = quant.load_quantized_state_dict(fresh, sd, "gptq", bits=4, checkpoint_format="gptq")
    assert len(names) == 14
    fresh.load_state_dict({k: v for k, v in sd.items() if k.rpartition(".")[0] not in names}, strict=False)
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_format_module_does_not_import_the_layers():
    """llama_triton.quant (the format, below the ops) imports neither the layers nor the model surgery at
    module level (read from its source); the surgery names stay reachable from it (lazy re-export)."""
    import ast
    import inspect

    from llama_triton import quantize

    tree = ast.parse(inspect.getsource(quant))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {(n.module or "") for n in top if isinstance(n, ast.ImportFrom)} | {a.name for n in top for a in n.names}
    assert not {m for m in names if m.split(".")[-1] in ("layers", "quantize", "model", "ops")}, names
    assert quant.quantize_model is quantize.quantize_model
    assert quant.load_quantized_state_dict is quantize.load_quantized_state_dict


@pytest.mark.parametrize("fmt", ["rtn-4-64-asym", "gptq-4-v1-act"])
def test_leading_dims_and_non_contiguous_x(fmt):
    qw = _fmt(fmt).to(DEVICE)
    K = qw.in_features
    x = torch.randn(2, 3, K, dtype=torch.float16, device=DEVICE)
    assert quant_matmul(x, qw).shape == (2, 3, N)
    _check(x, qw)
    xt = torch.randn(K, 5, dtype=torch.float16, device=DEVICE).t()          # strided K
    assert not xt.is_contiguous()
    _check(xt, qw)
    rows = torch.randn(40, K, dtype=torch.float32, device=DEVICE)[::2]       # strided rows (M = 20: prefill)
    _check(rows, qw)


def test_paths_chosen_by_m(monkeypatch):
    """M <= 4 -> GEMV, M <= 16 -> the decode dot kernel, M > 16 -> the tiled GEMM; all exercised above."""
    seen = []
    real = quant_gemm._kernel
    monkeypatch.setattr(quant_gemm, "_kernel", lambda path: seen.append(path) or real(path))
    qw = _fmt("rtn-4-32-sym").to(DEVICE)
    for M in (1, 4, 5, 16, 17):
        quant_matmul(torch.randn(M, qw.in_features, device=DEVICE), qw)
    assert seen == ["gemv", "gemv", "dot", "dot", "prefill"]
    if DEVICE != "cuda":  # the CPU tests cover the in-launch split-K reduction on both decode paths
        assert all(real(p).configs[0].kwargs["SPLIT_K"] > 1 for p in ("gemv", "dot"))


@pytest.mark.parametrize("group", [16, -1])
@pytest.mark.parametrize("M", [1, 20])
def test_fewer_k_tiles_than_splits(group, M):
    """K = 16: one K tile, so split-K programs past it have nothing to add and must contribute zeros."""
    torch.manual_seed(0)
    qw = quant.quantize_weight(torch.randn(40, 16), 4, group, sym=False).to(DEVICE)
    _check(torch.randn(M, 16, device=DEVICE), qw)


def test_empty_rows():
    qw = _fmt("rtn-4-32-sym").to(DEVICE)
    assert quant_matmul(torch.randn(0, qw.in_features, device=DEVICE), qw).shape == (0, N)


def test_the_check_can_fail():
    """A wrong weight (one zero point off by one) must not pass the comparison."""
    qw = _fmt("rtn-4-64-asym").to(DEVICE)
    bad = dataclasses.replace(qw, zeros=qw.zeros + 1)
    x = torch.randn(3, qw.in_features, device=DEVICE)
    c = testing.compare("y", quant_matmul(x, bad), reference.quant_matmul(x, qw), reference.quant_matmul(x.double(), qw))
    assert not c.ok


# ------------------------------------------------------------------------------- exact format import
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("ver", ["v1", "v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_import_dequantizes_exactly(bits, ver, act_order):
    K, Nn, group = 128, 16, 32
    q, z, s = _random_checkpoint(K, Nn, bits, group, seed=bits)
    if ver == "v1":
        z[0, :3] = 0   # v1 stores zero - 1: a zero point 0 wraps to 2**bits - 1 and reads back as 2**bits
    g_idx = _act_order_g_idx(K, group) if act_order else (torch.arange(K) // group).to(torch.int32)
    qw = quant.import_gptq(gptq_pack_qweight(q, bits), gptq_pack_qzeros(z, bits, ver == "v1"), s, g_idx, bits=bits,
                           checkpoint_format="gptq" if ver == "v1" else "gptq_v2")
    maxq = (1 << bits) - 1
    z_eff = (((z - 1) & maxq) + 1) if ver == "v1" else z
    assert torch.equal(quant.dequantize(qw, torch.float32), _expected_weight(q, z_eff, s, g_idx))
    assert (qw.perm is not None) == act_order and qw.group_size == group and qw.source.startswith("gptq")
    if ver == "v1":
        assert int(qw.zeros[0, 0]) == 1 << bits


def test_gptq_symmetric_checkpoint_drops_zero_points():
    K, Nn, group = 64, 16, 32
    q, _, s = _random_checkpoint(K, Nn, 4, group)
    z = torch.full((K // group, Nn), 8)
    qw = quant.import_gptq(gptq_pack_qweight(q, 4), gptq_pack_qzeros(z, 4, True), s)
    assert qw.zeros is None                                   # all at the midpoint: the kernel skips the loads
    g_idx = torch.arange(K) // group
    assert torch.equal(quant.dequantize(qw, torch.float32), _expected_weight(q, z, s, g_idx))


def test_awq_import_dequantizes_exactly():
    K, Nn, group = 128, 24, 64
    q, z, s = _random_checkpoint(K, Nn, 4, group)
    qw = quant.import_awq(awq_pack(q), awq_pack(z), s)
    assert qw.group_size == group and qw.source == "awq"
    assert torch.equal(quant.dequantize(qw, torch.float32), _expected_weight(q, z, s, torch.arange(K) // group))


def test_int8_import_dequantizes_exactly_and_runs():
    w8 = torch.randint(-128, 128, (40, 64), dtype=torch.int8)
    s = torch.rand(40) * 0.01 + 0.001
    qw = quant.import_int8(w8, s)
    assert qw.bits == 8 and qw.group_size == 64 and qw.zeros is None and qw.source == "int8"
    assert torch.equal(quant.dequantize(qw, torch.float32), w8.float() * s[:, None])
    _check(torch.randn(3, 64, device=DEVICE), qw.to(DEVICE))


def test_pack_helpers_round_trip():
    q = torch.randint(0, 16, (32, 24))
    assert torch.equal(quant.unpack_rows(quant.pack_rows(q, 4), 4), q)
    assert torch.equal(quant.pack_rows(q, 4), gptq_pack_qweight(q, 4))
    assert torch.equal(quant.unpack_cols(quant.pack_cols(q, 4, quant.AWQ_ORDER), 4, quant.AWQ_ORDER), q)
    assert torch.equal(quant.pack_cols(q, 4, quant.AWQ_ORDER), awq_pack(q))
    q8 = torch.randint(0, 256, (16, 8))
    assert torch.equal(quant.unpack_rows(quant.pack_rows(q8, 8), 8), q8)


# ------------------------------------------------------------------------------------ RTN quantizer
@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (8, -1, True), (8, -1, False)])
def test_quantize_weight_error_is_within_half_a_step(bits, group, sym):
    w = torch.randn(40, 128)
    qw = quant.quantize_weight(w, bits, group, sym)
    deq = quant.dequantize(qw, torch.float32)
    step = qw.scales.float().repeat_interleave(qw.group_size, 0).t()      # (N, K)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert qw.error["max_abs"] == pytest.approx((deq - w).abs().max().item())
    assert qw.error["rel_fro"] == pytest.approx(((deq - w).norm() / w.norm()).item())
    assert qw.error["rel_fro"] < (0.15 if bits == 4 else 0.01)
    assert (qw.zeros is None) == sym


# ------------------------------------------------------------------------------------ custom op, grads
def test_opcheck():
    qw = _fmt("gptq-4-v1-act").to(DEVICE)
    x = torch.randn(3, qw.in_features, device=DEVICE, requires_grad=True)
    torch.library.opcheck(qops._quant_matmul, (x, qw.qweight, qw.scales, qw.zeros, qw.perm, qw.bits, qw.group_size))


def test_backward_gives_x_grad_only():
    qw = _fmt("gptq-4-v2-plain").to(DEVICE)
    x = torch.randn(5, qw.in_features, device=DEVICE, requires_grad=True)
    dy = torch.randn(5, N, device=DEVICE)
    (gx,) = torch.autograd.grad(quant_matmul(x, qw), x, dy)
    torch.testing.assert_close(gx, dy @ quant.dequantize(qw, torch.float32), rtol=1e-5, atol=1e-5)


def test_dispatch_forced_torch(monkeypatch):
    qw = _fmt("rtn-4-32-sym")
    x = torch.randn(2, qw.in_features)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    assert backend.use_triton(x) is False
    torch.testing.assert_close(quant_matmul(x, qw), reference.quant_matmul(x, qw))


# ----------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("bits,group,sym", [(4, 64, True), (4, 32, False), (8, -1, True)])
def test_quant_linear_from_linear_and_state_dict_round_trip(bits, group, sym):
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=True).to(DEVICE)
    ql = layers.QuantLinear.from_linear(lin, bits=bits, group_size=group, sym=sym)
    assert ql.quant_error["rel_fro"] < 0.15
    x = torch.randn(2, 5, 128, device=DEVICE)
    expected = nn.functional.linear(x, quant.dequantize(ql.quantized_weight, torch.float32), lin.bias)
    torch.testing.assert_close(ql(x), expected, rtol=1e-5, atol=1e-5)
    fresh = layers.QuantLinear(128, 40, bias=True, bits=bits, group_size=group, sym=sym).to(DEVICE)
    fresh.load_state_dict(ql.state_dict())
    torch.testing.assert_close(fresh(x), ql(x), rtol=0, atol=0)
    assert set(ql.state_dict()) == {"qweight", "scales", "bias"} | (set() if sym else {"zeros"})


def _check_linear(ours, x, w, bias):
    """ours vs F.linear(x, w, bias) under the 2x rule: plain PyTorch in x's dtype vs the fp64 oracle."""
    low = nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    hi = nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    testing.assert_close("y", ours, low, hi)


def test_quant_linear_from_gptq_act_order_and_awq():
    K, Nn, group = 128, 24, 32
    q, z, s = _random_checkpoint(K, Nn, 4, group)
    g_idx = _act_order_g_idx(K, group)
    bias = torch.randn(Nn, dtype=torch.float16)
    ql = layers.QuantLinear.from_gptq(gptq_pack_qweight(q, 4), gptq_pack_qzeros(z, 4, False), s, g_idx, bias=bias,
                                      checkpoint_format="gptq_v2").to(DEVICE)
    x = torch.randn(3, K, dtype=torch.float16, device=DEVICE)
    w = _expected_weight(q, z, s, g_idx).to(DEVICE)
    _check_linear(ql(x), x, w, bias.to(DEVICE))
    fresh = layers.QuantLinear(K, Nn, bias=True, group_size=group, sym=False, act_order=True, dtype=torch.float16)
    fresh.load_state_dict(ql.state_dict())
    torch.testing.assert_close(fresh.to(DEVICE)(x), ql(x), rtol=0, atol=0)
    awq = layers.QuantLinear.from_awq(awq_pack(q), awq_pack(z), s).to(DEVICE)
    w_awq = _expected_weight(q, z, s, torch.arange(K) // group).to(DEVICE)
    _check_linear(awq(x), x, w_awq, None)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEVICE).eval()


def test_quantize_model_on_transformers_llama():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 8), device=DEVICE)
    with torch.no_grad():
        ref_logits = model(ids).logits
        fake = _tiny_llama()                       # same weights, each Linear replaced by its dequantised copy
    quant.quantize_model(model, bits=4, group_size=32)
    quantized = [n for n, m in model.named_modules() if isinstance(m, layers.QuantLinear)]
    assert len(quantized) == 2 * 7 and type(model.lm_head) is nn.Linear
    with torch.no_grad():
        for name in quantized:
            lin = fake.get_submodule(name)
            lin.weight.copy_(quant.dequantize(model.get_submodule(name).quantized_weight, torch.float32))
        logits, fake_logits = model(ids).logits, fake(ids).logits
    torch.testing.assert_close(logits, fake_logits, rtol=1e-4, atol=1e-4)
    # perplexity of the model's own greedy-free sample text: quantised vs full precision
    nll = lambda lg: nn.functional.cross_entropy(lg[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))  # noqa: E731
    assert abs(nll(logits).exp() / nll(ref_logits).exp() - 1) < 0.05


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_load_quantized_state_dict_into_transformers_llama(method):
    """A whole GPTQ (v1, act-order) / AWQ checkpoint built here: every projection swapped in, forward equal to
    the same model with the dequantised weights."""
    model, fake = _tiny_llama(), _tiny_llama()
    sd, group = {}, 32
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    for i, name in enumerate(names):
        lin = model.get_submodule(name)
        K, Nn = lin.in_features, lin.out_features
        q, z, s = _random_checkpoint(K, Nn, 4, group, scale_dtype=torch.float32, seed=i)
        if method == "gptq":
            g_idx = _act_order_g_idx(K, group, seed=i)
            sd.update({f"{name}.qweight": gptq_pack_qweight(q, 4), f"{name}.qzeros": gptq_pack_qzeros(z, 4, True),
                       f"{name}.scales": s, f"{name}.g_idx": g_idx})
            z = ((z - 1) & 15) + 1
        else:
            g_idx = torch.arange(K) // group
            sd.update({f"{name}.qweight": awq_pack(q), f"{name}.qzeros": awq_pack(z), f"{name}.scales": s})
        with torch.no_grad():
            fake.get_submodule(name).weight.copy_(_expected_weight(q, z, s, g_idx))
    assert sorted(quant.load_quantized_state_dict(model, sd, method)) == sorted(names)
    assert all(isinstance(model.get_submodule(n), layers.QuantLinear) for n in names)
    ids = torch.randint(0, 128, (1, 6), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="qzeros"):
        quant.load_quantized_state_dict(model, {"model.layers.0.mlp.up_proj.qweight": sd[f"{names[0]}.qweight"]})


def test_quantize_model_generic_module_and_skip():
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 16)))
    quant.quantize_model(net, bits=8, group_size=-1, skip=("2.0",))
    assert isinstance(net[0], layers.QuantLinear) and type(net[2][0]) is nn.Linear
    with pytest.raises(ValueError, match="layer '0'"):
        quant.quantize_model(nn.Sequential(nn.Linear(48, 8)), group_size=32)


# ----------------------------------------------------------------------------------------- bad input
def _qw():
    return _fmt("rtn-4-32-sym")


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: quant.quantize_weight(torch.randn(8, 200), 4, 128), ValueError, "group_size=128"),
        (lambda: quant.quantize_weight(torch.randn(8, 96), 4, 48), ValueError, "power of two"),
        (lambda: quant.quantize_weight(torch.randn(8, 64), 3, 32), ValueError, "bits must be one of"),
        (lambda: quant.quantize_weight(torch.randn(8, 12), 4, -1), ValueError, "multiple of 8"),
        (lambda: quant_matmul(torch.randn(2, 104), _qw()), ValueError, "qweight has shape"),
        (lambda: quant_matmul(torch.randn(2, 100), _qw()), ValueError, "multiple of 8"),
        (lambda: quant_matmul(torch.randn(2, K_GROUPED).long(), _qw()), TypeError, "x has dtype int64"),
        (lambda: quant_matmul(torch.randn(2, K_GROUPED), _qw().qweight), TypeError, "QuantizedWeight"),
        (lambda: quant_matmul(torch.randn(2, K_GROUPED, device="meta"), _qw()), ValueError, "is on"),
        (lambda: quant_gemm.quant_matmul(torch.randn(2, 64), torch.zeros(4, 16, dtype=torch.int32),
                                         torch.ones(2, 4), bits=3, group_size=32), ValueError, "bits must be one of"),
        (lambda: quant_gemm.quant_matmul(torch.randn(2, 64), torch.zeros(4, 16, dtype=torch.int32),
                                         torch.ones(3, 4), group_size=32), ValueError, "scales has shape"),
        (lambda: quant_gemm.quant_matmul(torch.randn(2, 64), torch.zeros(4, 16, dtype=torch.int64),
                                         torch.ones(2, 4), group_size=32), TypeError, "qweight has dtype"),
        (lambda: quant_gemm.quant_matmul(torch.randn(2, 64), torch.zeros(4, 16, dtype=torch.int32),
                                         torch.ones(2, 4), torch.zeros(2, 5, dtype=torch.uint8), group_size=32),
         ValueError, "zeros has shape"),
        (lambda: quant_gemm.quant_matmul(torch.randn(2, 64), torch.zeros(8, 4, dtype=torch.int32),
                                         torch.ones(2, 4), group_size=32), ValueError, "repacked layout"),
        (lambda: quant.QuantizedWeight(torch.zeros(8, 4, dtype=torch.int32), torch.ones(3, 4), None, 4, 32),
         ValueError, "scales has shape"),
        (lambda: quant.import_gptq(torch.zeros(8, 16, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32),
                                   torch.ones(2, 16)), ValueError, "qzeros has shape"),
        (lambda: quant.import_gptq(torch.zeros(8, 16, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                                   torch.ones(2, 16), group_size=64), ValueError, "does not match the checkpoint"),
        (lambda: quant.import_gptq(torch.zeros(8, 16, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                                   torch.ones(2, 16), g_idx=torch.zeros(64, dtype=torch.int32)), ValueError, "g_idx"),
        (lambda: quant.import_gptq(torch.zeros(8, 16, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                                   torch.ones(2, 16), checkpoint_format="exllama"), ValueError, "checkpoint_format"),
        (lambda: quant.import_awq(torch.zeros(64, 2, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32),
                                  torch.ones(2, 16), bits=8), ValueError, "4-bit"),
        (lambda: quant.import_awq(torch.zeros(64, 2, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int32),
                                  torch.ones(2, 16)), ValueError, "qzeros has shape"),
        (lambda: quant.to_gptq(_fmt("rtn-4-64-asym"), "exllama"), ValueError, "checkpoint_format"),
        (lambda: quant.to_gptq(dataclasses.replace(_qw(), zeros=torch.zeros(6, N, dtype=torch.uint8)), "gptq"),
         ValueError, "v1"),
        (lambda: quant.QuantizedWeight(torch.zeros(8, 4, dtype=torch.int32), torch.ones(2, 4), None, 4, 32,
                                       layout="marlin"), ValueError, "layout must be one of"),
        (lambda: quant.QuantizedWeight(torch.zeros(4, 16, dtype=torch.int32), torch.ones(2, 4), None, 4, 32,
                                       layout="repacked", in_features=60), ValueError, "in_features"),
        (lambda: layers.QuantLinear(64, 8, bits=2), ValueError, "bits must be 4 or 8"),
        (lambda: layers.QuantLinear(60, 8, group_size=-1), ValueError, "multiple of 8"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_torch_compile_fullgraph_traces_quant_linear():
    torch.manual_seed(0)
    ql = layers.QuantLinear.from_linear(nn.Linear(64, 40), bits=4, group_size=32, sym=False).to(DEVICE)
    x = torch.randn(3, 64, device=DEVICE)
    torch.testing.assert_close(torch.compile(ql, fullgraph=True)(x), ql(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 7, 16, 100, 1024])
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (4, 128, True), (4, 32, False), (8, -1, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_shapes(M, bits, group, sym, dtype):
    for K, Nn in ((4096, 6144), (14336, 4096)):
        w = (torch.randn(Nn, K, device="cuda") * K ** -0.5).to(dtype)
        _check(torch.randn(M, K, dtype=dtype, device="cuda"), quant.quantize_weight(w, bits, group, sym))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", [1, 16, 300])
def test_gpu_formats_bf16(fmt, M):
    qw = _fmt(fmt).to("cuda")
    _check(torch.randn(M, qw.in_features, dtype=torch.bfloat16, device="cuda"), qw)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    lin = nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    ql = layers.QuantLinear.from_linear(lin, bits=4, group_size=128, sym=False)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(torch.compile(ql, fullgraph=True)(x), ql(x), rtol=0, atol=0)


def _markov_text(n_words=2500, seed=0) -> torch.Tensor:
    """Bytes of a text made here: each word is followed by one of three fixed successors at random."""
    g = torch.Generator().manual_seed(seed)
    words = "the quick brown fox jumps over lazy dog while seven wizards quietly hex jolly brave knights".split()
    nxt = torch.randint(0, len(words), (len(words), 3), generator=g)
    w, out = 0, []
    for _ in range(n_words):
        out.append(words[w])
        w = int(nxt[w, torch.randint(0, 3, (1,), generator=g)])
    return torch.tensor(list(" ".join(out).encode()), dtype=torch.long)


def test_quantize_model_perplexity_on_our_model(monkeypatch):
    """Train our tiny model briefly on a made-up text, quantize it, compare held-out perplexity (the README
    numbers come from this test: run it with -s), and check the quantized model's kernels vs the reference."""
    import copy

    from llama_triton.model import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")          # training and scoring on the PyTorch path
    data = _markov_text()
    train, held_out = data[:-1024], data[-1024:].view(-1, 64)
    g = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.preset("tiny")).init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(50):
        idx = torch.randint(0, len(train) - 33, (8,), generator=g)
        batch = torch.stack([train[i:i + 32] for i in idx])
        opt.zero_grad()
        model(batch, labels=batch).loss.backward()
        opt.step()
    model.eval()

    def ppl(m):
        with torch.no_grad():
            return m(held_out, labels=held_out).loss.exp().item()

    fp = ppl(model)
    results = {}
    for bits, group, sym in ((8, -1, True), (4, -1, False), (4, 16, True), (4, 16, False)):
        q = quant.quantize_model(copy.deepcopy(model), bits=bits, group_size=group, sym=sym)
        results[(bits, group, sym)] = ppl(q)
    print(f"\nheld-out perplexity: fp32 {fp:.4f}; " + "; ".join(
        f"w{b} {'g' + str(gs) if gs != -1 else 'per-channel'} {'sym' if s else 'zero-point'} {p:.4f} ({100 * (p / fp - 1):+.2f}%)"
        for (b, gs, s), p in results.items()))
    assert fp < 8, "the model did not learn the text: the comparison would mean nothing"
    assert abs(results[(8, -1, True)] / fp - 1) < 0.01
    assert all(abs(p / fp - 1) < 0.05 for p in results.values())
    # the Triton kernels (interpreter / GPU) on the quantized model agree with the reference path
    q = quant.quantize_model(copy.deepcopy(model), bits=4, group_size=16, sym=False).to(DEVICE)
    ids = held_out[:1, :16].to(DEVICE)
    with torch.no_grad():
        ref_logits = q(ids).logits
        monkeypatch.delenv("LLAMA_TRITON_BACKEND")
        logits = q(ids).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-3, atol=1e-3)


_LOWERING = r"""
import torch
L.all_configs = False
from llama_triton import quant
from llama_triton.kernels import quant_gemm as QG

# what the generic check (the registry's W4 g64 asym / W8 per-channel sym at M = 16 and 128, bf16/fp16) does
# not reach: g128 and g32 prefill variants, act-order, fp32 activations (ieee dots; GEMV and decode dot)
for dtype, bits, group, sym, M in ((torch.bfloat16, 4, 128, False, 128), (torch.bfloat16, 8, -1, True, 128),
                                   (torch.float32, 4, 32, True, 128), (torch.float32, 8, -1, False, 1),
                                   (torch.float32, 4, 32, False, 8)):
    qw = quant.quantize_weight(torch.randn(96, 256), bits, group, sym).to(dtype=dtype)
    perm = torch.arange(256, dtype=torch.int32) if bits == 4 else None
    QG.quant_matmul(torch.empty(M, 256, dtype=dtype), qw.qweight, qw.scales, qw.zeros, perm, bits, qw.group_size)
print("LOWERING OK", len(L.compiled))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_kernel_variants_lower_to_sm90_without_a_gpu():
    """tests/test_lowering.py compiles the registry shapes; this compiles other group sizes, act-order and
    fp32 with the same machinery (tests/lowering_check.py), first config each."""
    stdout = lowering_check.run_snippet(_LOWERING)
    assert stdout.count("compiled _prefill_kernel") == 3 and "HAS_PERM=True" in stdout, stdout
