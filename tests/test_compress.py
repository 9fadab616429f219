"""Pruning and low-rank factorization (llama_triton.compress) and LowRankLinear.

The fused low-rank kernel itself is checked against the two-matmul reference by the registry parity test
(tests/test_registry.py -k low_rank: M 1/3/16/17/128, odd ranks, fp32/fp16, forward and backward)."""
import pytest
import torch
from torch import nn

from llama_triton import compress
from llama_triton.compress import calibration, low_rank, pruning
from llama_triton.layers import LowRankLinear, QuantLinear
from llama_triton.model import LlamaConfig, LlamaForCausalLM
from llama_triton.quant import quantize_model


def _groups_nonzero(w, m):
    return (w.reshape(w.shape[0], -1, m) != 0).sum(-1)


# ------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_mask_is_exact_and_keeps_the_top_scores(pattern):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(0)
    lin = nn.Linear(32, 6, bias=False)
    w0 = lin.weight.detach().clone()
    rep = pruning.prune_linear("lin", lin, "magnitude", pattern=pattern)
    w = lin.weight.detach()
    assert (_groups_nonzero(w, m) == n).all()                       # exactly n non-zeros per group along K
    assert rep.zeros == w.numel() * (m - n) // m and rep.sparsity == pytest.approx(1 - n / m)
    kept = w0.abs().reshape(6, -1, m).topk(n, -1).indices.sort(-1).values
    got = (w.reshape(6, -1, m) != 0).nonzero()[:, 2].reshape(6, -1, n)
    assert torch.equal(kept, got)                                   # the n largest |w| of each group
    assert torch.equal(w[w != 0], w0[w != 0])                       # kept weights untouched


def test_unstructured_sparsity_is_exact():
    torch.manual_seed(0)
    w = torch.randn(7, 30)
    for per_row in (True, False):
        mask = pruning.unstructured_mask(w.abs(), 0.6, per_row=per_row)
        if per_row:
            assert ((~mask).sum(1) == 18).all()
        else:
            assert int((~mask).sum()) == int(0.6 * 210)
            assert w.abs()[~mask].max() <= w.abs()[mask].min()      # the smallest magnitudes went


def test_wanda_picks_by_weight_times_activation_norm():
    """|W| = [4, 3, 2, 1] with input-feature norms [0.1, 1, 1, 10]: Wanda scores [0.4, 3, 2, 10] keep
    features 1 and 3 at 50%; magnitude keeps 0 and 1."""
    w = torch.tensor([[4.0, -3.0, 2.0, 1.0]])
    x = torch.tensor([[0.1, 1.0, 1.0, 10.0]]) * torch.tensor([[1.0], [-1.0]])   # (2 tokens, 4), norms * sqrt(2)
    for method, keep in (("wanda", [0, 1, 0, 1]), ("magnitude", [1, 1, 0, 0])):
        model = nn.Sequential(nn.Linear(4, 1, bias=False))
        model[0].weight.data.copy_(w)
        rep = compress.prune_model(model, method, sparsity=0.5, calibration=[x])
        assert (model[0].weight[0] != 0).int().tolist() == keep, method
        assert rep[0].name == "0" and rep[0].zeros == 2


def _tiny(layers=2, seed=0):
    return LlamaForCausalLM(LlamaConfig.preset("tiny", num_hidden_layers=layers)).init_weights(seed).eval()


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_calibration_hooks_are_removed_and_blocks_see_pruned_inputs(monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    model = _tiny()
    batches = calibration.token_batches(torch.randint(0, 256, (600,)), n_samples=4, seq_len=32, batch_size=2)
    seen = []
    real = calibration.record

    def spy(model_, batches_, linears, covariance=False, stop_after=None):
        seen.append((sorted(linears), _hooks(model)))
        return real(model_, batches_, linears, covariance, stop_after)

    monkeypatch.setattr(calibration, "record", spy)
    rep = compress.prune_model(model, "wanda", pattern="2:4", calibration=batches)
    assert _hooks(model) == 0 and all(h == 0 for _, h in seen)
    assert [names[0].split(".")[2] for names, _ in seen] == ["0", "1"]            # one block at a time
    assert len(rep) == 14 and all(r.sparsity == 0.5 for r in rep)
    assert all(r.sparsity == 0.5 for r in compress.sparsity_report(model, skip=("lm_head",)))
    with pytest.raises(RuntimeError):                                            # removed also on error
        with calibration.hooks({"q": model.model.layers[0].self_attn.q_proj}):
            raise RuntimeError
    assert _hooks(model) == 0


# ------------------------------------------------------------------------------------------ low rank
def test_svd_error_is_the_eckart_young_optimum():
    torch.manual_seed(0)
    w = torch.randn(24, 40, dtype=torch.float64)
    for r in (1, 7, 24):
        b, a, s = low_rank.svd_factors(w, r)
        assert b.shape == (24, r) and a.shape == (r, 40)
        assert ((w - b @ a) ** 2).sum().item() == pytest.approx((s[r:] ** 2).sum().item(), rel=1e-9, abs=1e-9)


def test_whitened_svd_beats_plain_on_activation_weighted_error():
    torch.manual_seed(0)
    w = torch.randn(24, 40, dtype=torch.float64)
    x = torch.randn(400, 40, dtype=torch.float64) * torch.logspace(-2, 1, 40, dtype=torch.float64)  # anisotropic
    cov = x.t() @ x
    for r in (3, 11):
        b, a, _ = low_rank.svd_factors(w, r)
        bw, aw, sw = low_rank.whitened_svd_factors(w, cov, r, damp=0.0)
        plain, white = low_rank.activation_error(w, b @ a, cov), low_rank.activation_error(w, bw @ aw, cov)
        assert white == pytest.approx((sw[r:] ** 2).sum().item(), rel=1e-6)      # its own optimum
        assert white < 0.5 * plain
        assert ((x @ (w - bw @ aw).t()) ** 2).sum().item() == pytest.approx(white, rel=1e-6)


def test_rank_choice_by_ratio_and_energy():
    assert low_rank.rank_for_ratio(64, 64, 0.5) == 16 and low_rank.rank_for_ratio(176, 64, 0.25) == 11
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])                                     # energies 9, 4, 1, 1 of 15
    assert [low_rank.rank_for_energy(s, e) for e in (0.5, 0.6, 0.61, 13 / 15, 0.9, 1.0)] == [1, 1, 2, 2, 3, 4]


def test_low_rank_linear_state_dict_round_trip_and_forward(device):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=True)
    b, a, _ = low_rank.svd_factors(lin.weight, 13)
    m = LowRankLinear.from_factors(b, a, lin.bias).to(device)
    assert set(m.state_dict()) == {"weight_a", "weight_b", "bias"}
    fresh = LowRankLinear(48, 40, 13, bias=True).to(device)
    fresh.load_state_dict(m.state_dict())
    for rows in (1, 17):                                                       # fused kernel / two GEMMs
        x = torch.randn(rows, 48, device=device)
        want = x.double() @ (b @ a).double().t().to(device) + lin.bias.double().to(device)
        torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
        for fused in (None, True, False):                                      # the rule, forced either way
            fresh.fused = fused
            torch.testing.assert_close(fresh(x).double(), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ whole models
def _gen(model, ids):
    return model.generate(ids, max_new_tokens=6)


@pytest.mark.parametrize("kind", ["wanda_2_4_int4", "asvd"])
def test_compressed_model_saves_loads_and_generates(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")                      # model plumbing, not kernels
    model = _tiny(layers=1)
    ids = torch.randint(0, 256, (800,))
    batches = calibration.token_batches(ids, n_samples=4, seq_len=32, batch_size=4)
    if kind == "asvd":
        rep = compress.factorize_model(model, "asvd", ratio=0.5, calibration=batches)
        assert all(r.rank is not None and r.ratio <= 0.5 for r in rep)
        assert isinstance(model.model.layers[0].mlp.up_proj, LowRankLinear)
    else:
        compress.prune_model(model, "wanda", pattern="2:4", calibration=batches)
        quantize_model(model, bits=4, group_size=16)
        assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    compress.save_compressed(model, tmp_path, {"method": kind})
    loaded, info = compress.load_compressed(tmp_path)
    assert info["method"] == kind and len(info["layers"]) == 7
    prompt = ids[:9][None]
    torch.testing.assert_close(loaded(prompt).logits, model(prompt).logits, rtol=0, atol=0)
    out = _gen(loaded, prompt)
    assert out.shape == (1, 15) and torch.equal(out, _gen(model, prompt))


def test_pruned_dense_checkpoint_loads_with_from_pretrained(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    model = _tiny(layers=1)
    compress.prune_model(model, "magnitude", sparsity=0.7)
    compress.save_compressed(model, tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path)
    _, info = compress.load_compressed(tmp_path, semi_structured=True)          # CPU: reasons, no conversion
    assert set(info["semi_structured"].values()) == {pruning.semi_structured_support("cpu")[1]}
    w = again.model.layers[0].self_attn.q_proj.weight
    assert (w == 0).sum().item() == int(0.7 * w.numel())


def test_semi_structured_conversion_is_feature_detected():
    model = nn.Sequential(nn.Linear(64, 32))
    compress.prune_model(model, "magnitude", pattern="2:4")
    ok, why = pruning.semi_structured_support("cpu")
    assert not ok and why
    assert compress.to_semi_structured(model) == {"0": why}
    assert type(model[0].weight) is nn.Parameter and pruning.is_2_4_sparse(model[0].weight)


@pytest.mark.gpu
def test_semi_structured_linear_matches_dense_on_gpu():
    if not pruning.semi_structured_support("cuda")[0]:
        pytest.skip(pruning.semi_structured_support("cuda")[1])
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, bias=True).half().cuda()
    compress.prune_model(nn.Sequential(lin), "magnitude", pattern="2:4")
    x = torch.randn(2, 32, 256, dtype=torch.float16, device="cuda")             # (b, s, K) as in the model
    dense = lin(x)
    assert compress.to_semi_structured(nn.Sequential(lin)) == {"0": "converted"}
    torch.testing.assert_close(lin(x), dense, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors():
    lin = nn.Linear(8, 4)
    for s in (1.0, -0.1, 1.5, "half"):
        with pytest.raises(ValueError, match="sparsity"):
            pruning.prune_linear("l", lin, "magnitude", sparsity=s)
    for p in ("4:4", "3:2", "0:4", "2-4", (2,)):
        with pytest.raises(ValueError, match="pattern|N:M"):
            compress.prune_model(nn.Sequential(nn.Linear(8, 4)), "magnitude", pattern=p)
    with pytest.raises(ValueError, match="not a multiple of M=8"):
        pruning.prune_linear("l", nn.Linear(12, 4), "magnitude", pattern="4:8")
    with pytest.raises(ValueError, match="method"):
        compress.prune_model(nn.Sequential(lin), "random")
    with pytest.raises(ValueError, match="calibration"):
        compress.prune_model(nn.Sequential(lin), "wanda")
    w = torch.randn(6, 10)
    for r in (0, 7, 2.0):
        with pytest.raises(ValueError, match="rank"):
            low_rank.svd_factors(w, r)
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(10, 6, 7)
    with pytest.raises(ValueError, match="ratio"):
        compress.factorize_model(nn.Sequential(nn.Linear(8, 4)), "svd", ratio=0.0)
    with pytest.raises(ValueError, match="energy"):
        compress.factorize_model(nn.Sequential(nn.Linear(8, 4)), "svd", energy=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        compress.factorize_model(nn.Sequential(nn.Linear(8, 4)), "svd", rank=2, ratio=0.5)
    with pytest.raises(ValueError, match="calibration"):
        compress.factorize_model(nn.Sequential(nn.Linear(8, 4)), "asvd", ratio=0.5)
    from llama_triton.ops.low_rank import low_rank_matmul
    with pytest.raises(ValueError, match="rank r=3"):
        low_rank_matmul(torch.randn(2, 10), torch.randn(3, 10), torch.randn(6, 4))
    with pytest.raises(TypeError, match="dtype"):
        low_rank_matmul(torch.randn(2, 10), torch.randn(3, 10).half(), torch.randn(6, 3))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_compress_writes_a_loadable_checkpoint(tmp_path, monkeypatch, capsys):
    from llama_triton import cli

    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")            # the demo model's plumbing, fast
    out = tmp_path / "wanda"
    assert cli.main(["compress", "--method", "wanda", "--pattern", "2:4", "--calib-samples", "2", "--calib-len", "32",
                     "--quantize", "4", "--group-size", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "wrote" in text
    model, info = compress.load_compressed(out)
    assert info["method"] == "wanda" and info["pattern"] == "2:4"
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert cli.main(["compress", "--method", "wanda", "--pattern", "4:4", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["compress", "--method", "svd", "--sparsity", "0.5", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "1 <= N < M" in err[0] and "--ratio" in err[1]


def test_bench_compress_tables_from_a_synthetic_result(tmp_path):
    """The GPU benchmark's markdown and plot code on made-up numbers (the GPU run must not die at the end)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_compress", Path(__file__).parent.parent / "benchmarks" / "bench_compress.py")
    bc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bc)
    lr = {"kind": "low_rank", "K": 64, "N": 32, "rank": 8, "M": 1, "config": "BM16",
          "ms": {"ours_fused": 0.01, "two_mm": 0.02, "compile": None, "dense_mm": 0.03},
          "speedup_vs_dense": 3.0, "speedup_vs_two_mm": 2.0, "gbps": 1.0, "pct_copy": 1.0, "tflops": 0.1}
    sp = {"kind": "sparse_2_4", "K": 64, "N": 32, "M": 1, "ms": {"sparse_2_4": 0.01, "dense_mm": 0.02},
          "speedup_vs_dense": 2.0, "gbps": 1.0, "pct_copy": 1.0}
    result = {"gpu": "fake", "torch": "x", "triton": "y", "date": "d", "copy_gbps": 1.0, "mm_tflops": 1.0,
              "rows": [lr, sp, {"kind": "sparse_2_4", "skipped": "why"}]}
    md = bc.to_markdown(result)
    assert "| 64 | 32 | 8 | 1 | 0.0100 | 0.0200 | - | 0.0300 | 3.00x |" in md and "skipped: why" in md
    bc.plot(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_model_size_counts_each_format():
    from llama_triton.compress import report

    cfg = LlamaConfig.preset("tiny")
    n_lin = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 176)                      # 92160 decoder-linear weights
    other = 2 * 260 * 64 + 5 * 64                                                # embed + lm_head + norms
    lin, whole = report.model_size(LlamaForCausalLM(cfg))
    assert (lin.params, lin.bytes, whole.bytes) == (n_lin, 2 * n_lin, 2 * (n_lin + other))
    tied = report.model_size(LlamaForCausalLM(LlamaConfig.preset("tiny", tie_word_embeddings=True)))[1]
    assert tied.bytes == 2 * (n_lin + other - 260 * 64)                          # lm_head stored once
    m = LlamaForCausalLM(cfg)
    compress.prune_model(m, "magnitude", pattern="2:4")
    lin, _ = report.model_size(m, "2:4")
    assert (lin.params, lin.bytes) == (n_lin // 2, n_lin + n_lin // 2 * 2 // 8)  # values + 2-bit indices
    quantize_model(m, bits=4, group_size=16)
    lin, whole = report.model_size(m)
    assert lin.bytes == n_lin // 2 + 2 * n_lin // 16 and whole.bytes == lin.bytes + 2 * other   # codes + scales


def test_factorize_model_energy_and_layers_that_would_not_shrink():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24, bias=True), nn.Linear(8, 4))
    with torch.no_grad():                                                        # rank 3 + a little noise
        model[0].weight.copy_(torch.randn(24, 3) @ torch.randn(3, 32) + 0.01 * torch.randn(24, 32))
    rep = compress.factorize_model(model, "svd", energy=0.9)
    big, small = rep
    assert big.rank <= 3 and big.energy >= 0.9 and isinstance(model[0], LowRankLinear)
    assert small.rank is None and type(model[1]) is nn.Linear                     # r (N + K) >= N K: kept dense
    x = torch.randn(3, 32)
    assert model[0](x).shape == (3, 24)


def test_cli_compress_default_model_is_the_embedded_trained_one():
    """README and --help say `llama-triton compress` without --model compresses the embedded demo model (the
    trained one shipped in the package), not random weights."""
    from argparse import Namespace

    from llama_triton import embedded
    from llama_triton.compress.cli import _load

    model, _, source = _load(Namespace(model=None, seed=0), "cpu")
    want = embedded.load_embedded()
    assert "embedded" in source
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), want.state_dict().values()))


def test_cli_compress_refuses_calibration_windows_longer_than_the_model(tmp_path, monkeypatch, capsys):
    from llama_triton import cli

    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    assert cli.main(["compress", "--method", "wanda", "--calib-samples", "1", "--calib-len", "4096",
                     "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calib-len" in err[0] and "2048" in err[0]
    assert not (tmp_path / "w").exists()


def test_cli_compress_out_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    """--out naming an existing file (OSError while writing) is a user error: one line, exit 2."""
    from llama_triton import cli

    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli.main(["compress", "--method", "magnitude", "--sparsity", "0.5", "--calib-samples", "1",
                     "--calib-len", "16", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a_file" in err[0]
