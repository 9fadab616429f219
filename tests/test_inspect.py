"""llama_triton.inspect on small synthetic kernels whose compiled facts are known (vector vs scalar loads,
wgmma vs mma.sync, a kernel that spills, an autotuner with an early prune), its parsers, occupancy, the
roofline estimate and `llama-triton inspect`'s argument errors. Compiling needs no GPU (Triton's bundled
ptxas); each snippet compiles in one fresh process (the interpreter is on in this one), once per session."""
import json

import pytest
import torch

from llama_triton import cli
from llama_triton.inspect import (TARGETS, estimates, format_table, inspect_code, main, occupancy, ptx_facts,
                                  ptxas_facts, sass_facts)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="static checks for a GPU this machine lacks")

_SYNTHETIC = r'''
import torch
import triton
import triton.language as tl


@triton.jit
def vec_copy(X, Y, N, BLOCK: tl.constexpr):                 # aligned pointers, contiguous: 8 x fp16 = 128 bits
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    tl.store(Y + offs, tl.load(X + offs, mask=m), mask=m)


@triton.jit
def strided_load(X, Y, N, stride, BLOCK: tl.constexpr):     # runtime stride: one fp16 (16 bits) per load
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    tl.store(Y + offs, tl.load(X + offs * stride, mask=m), mask=m)


@triton.jit
def dot_tile(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C (BM, BN) fp32 = A (BM, K) @ B (K, BN), both row-major."""
    m, n, k = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(A + m[:, None] * K + (k0 + k)[None, :])
        b = tl.load(B + (k0 + k)[:, None] * BN + n[None, :])
        acc += tl.dot(a, b)
    tl.store(C + m[:, None] * BN + n[None, :], acc)


@triton.jit
def spill(X, Y, BLOCK: tl.constexpr):                       # 8192 fp32 live across a reduction, one warp
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(Y + offs, x / tl.sum(x * x, 0))


@triton.autotune(configs=[triton.Config({"BLOCK": 256}, num_warps=2), triton.Config({"BLOCK": 1024}, num_warps=4),
                          triton.Config({"BLOCK": 4096}, num_warps=8)], key=["N"],
                 prune_configs_by={"early_config_prune": lambda cs, named, **kw: [c for c in cs if c.kwargs["BLOCK"] <= 1024]})
@triton.jit
def tuned_copy(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)


def dots():
    a, b = torch.empty(128, 256, dtype=torch.bfloat16), torch.empty(256, 128, dtype=torch.bfloat16)
    dot_tile[(1,)](a, b, torch.empty(128, 128), 256, BM=128, BN=128, BK=64, num_warps=4, num_stages=3)
    a, b = torch.empty(16, 256, dtype=torch.float16), torch.empty(256, 64, dtype=torch.float16)
    dot_tile[(1,)](a, b, torch.empty(16, 64), 256, BM=16, BN=64, BK=32, num_warps=4, num_stages=2)


if __name__ == "__inspected__":
    if ONLY_DOTS:
        dots()
    else:
        x = torch.empty(4096, dtype=torch.float16)
        vec_copy[(4,)](x, torch.empty_like(x), 4096, BLOCK=1024)
        strided_load[(4,)](x, torch.empty_like(x), 1024, 3, BLOCK=1024)
        dots()
        spill[(1,)](torch.empty(8192), torch.empty(8192), BLOCK=8192, num_warps=1)
        tuned_copy[lambda meta: (triton.cdiv(4096, meta["BLOCK"]),)](x, torch.empty_like(x), 4096)
'''


@pytest.fixture(scope="module")
def sm90():
    return {r.kernel + (f"[{r.config}]" if r.kernel in ("dot_tile", "tuned_copy") else ""): r
            for r in inspect_code(_SYNTHETIC.replace("ONLY_DOTS", "False"), arch="sm_90")}


def test_load_widths(sm90):
    vec, scalar = sm90["vec_copy"], sm90["strided_load"]
    assert (vec.load_bits_min, vec.load_bits_max, vec.store_bits_min, vec.store_bits_max) == (128, 128, 128, 128)
    assert vec.load_widths == {"128": 1} and vec.widths_from == "ptx"
    assert scalar.load_bits_max == 16 and scalar.store_bits_max == 128
    assert vec.dot == scalar.dot == "none" and not vec.cp_async and vec.shared == 0 and not vec.spills
    assert vec.grid == (4, 1, 1) and vec.ctas == 4 and vec.sms == 132 and vec.arch == "sm_90"


def test_dot_lowering_and_occupancy(sm90):
    big, small = sm90["dot_tile[BM=128 BN=128 BK=64]"], sm90["dot_tile[BM=16 BN=64 BK=32]"]
    assert big.dot == "wgmma" and big.dot_instr.startswith("wgmma.m64n128k16.f32.bf16"), big
    assert small.dot == "mma.sync" and "m16n8k16" in small.dot_instr, small
    # the K loop is pipelined with cp.async through 3 shared buffers of each operand: 3 * (128x64 + 64x128) bf16
    assert big.cp_async and big.cp_async_depth == 3 and "3x128x64xbf16" in big.smem_buffers and not big.tma
    assert big.shared >= 3 * 2 * 128 * 64 * 2 and big.fits_shared
    assert big.ctas_per_sm == TARGETS["sm_90"].smem_per_sm // (big.shared + 1024) and big.occupancy_limit == "shared"
    assert big.warps_per_sm == 4 * big.ctas_per_sm and big.num_stages == 3 and not big.spills


def test_spills_are_reported(sm90):
    r = sm90["spill"]
    assert r.spills and r.spill_stores > 0 and r.spill_loads > 0 and r.registers == 255, r
    assert r.ctas_per_sm == 8 and r.occupancy_limit == "registers"


def test_autotune_configs_after_the_prune(sm90):
    tuned = [r for r in sm90.values() if r.kernel == "tuned_copy"]
    assert sorted((r.config, r.num_warps, r.grid[0]) for r in tuned) == [("BLOCK=1024", 4, 4), ("BLOCK=256", 2, 16)]
    assert all(r.autotuned for r in tuned) and not sm90["vec_copy"].autotuned


def test_chosen_config_mode():
    """configs="chosen" (benchmarks on a GPU): only the config the autotuner has on record for these arguments."""
    code = _SYNTHETIC.split("def dots():")[0] + (
        "x = torch.empty(4096, dtype=torch.float16)\n"
        "tuned_copy.cache[(4096, 'torch.float16', 'torch.float16')] = tuned_copy.configs[1]\n"
        "tuned_copy[lambda meta: (triton.cdiv(4096, meta['BLOCK']),)](x, torch.empty_like(x), 4096)\n"
        "vec_copy[(4,)](x, torch.empty_like(x), 4096, BLOCK=1024)\n")
    rows = inspect_code(code, configs="chosen")
    assert [(r.kernel, r.config, r.chosen) for r in rows] == [("tuned_copy", "BLOCK=1024", True),
                                                              ("vec_copy", "BLOCK=1024", True)], rows


def test_sm80_has_no_wgmma():
    rows = inspect_code(_SYNTHETIC.replace("ONLY_DOTS", "True"), arch="sm_80")
    assert [r.dot for r in rows] == ["mma.sync", "mma.sync"] and {r.sms for r in rows} == {108}, rows


def test_parsers():
    log = ("ptxas info    : Function properties for k\n    8 bytes stack frame, 584 bytes spill stores, 1108 bytes "
           "spill loads\nptxas info    : Used 255 registers, used 1 barriers")
    assert ptxas_facts(log) == {"registers": 255, "spill_stores": 584, "spill_loads": 1108, "stack": 8}
    with pytest.raises(ValueError, match="ptxas"):
        ptxas_facts("nothing")
    f = ptx_facts("@%p1 ld.global.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
                  "ld.global.b16 { %rs1 }, [ %rd2 + 0 ];\nst.global.v2.b32 [ %rd3 + 0 ], { %r5, %r6 };\n"
                  "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd4, {%r2, %r3}], [%r4];")
    assert (f["load_bits_max"], f["load_bits_min"], f["store_bits_max"], f["tma"], f["dot"]) == (128, 16, 64, True, "none")
    assert ptx_facts("", ttir="%0 = tt.dot %a, %b, %c")["dot"] == "fma"
    s = sass_facts("LDG.E.128 R4, desc[UR4][R2.64] ;\nLDG.E.U16 R6, desc[UR4][R2.64] ;\nSTG.E.64 desc[UR4][R8.64], R4 ;\n"
                   "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;\nUTMALDG.2D [UR8], [UR4] ;")
    assert (s["load_bits_max"], s["load_bits_min"], s["store_bits_max"], s["tma"]) == (128, 16, 64, True)


def test_occupancy_and_estimate():
    h100, a100 = TARGETS["sm_90"], TARGETS["sm_80"]
    assert occupancy(h100, 255, 0, 4) == (2, "registers")          # 8192 registers per warp
    assert occupancy(h100, 32, 0, 8) == (8, "warps")               # 64 warps/SM: full
    assert occupancy(h100, 64, 160 * 1024, 8) == (1, "shared")
    assert occupancy(a100, 64, 160 * 1024, 8) == (1, "shared") and occupancy(a100, 64, 170 * 1024, 4)[0] == 0
    est = {e.mode: e for e in estimates("rms_norm", shape={"rows": 4096, "hidden": 4096}, arch="sm_90")}
    assert est["fwd"].bytes == 2 * 4096 * 4096 * 2 + 4096 * 2 and est["fwd"].bound == "memory"
    assert est["fwd"].estimate_us == pytest.approx(est["fwd"].bytes / 3350e3, abs=1e-3) and est["fwd"].flops == 0
    fa = estimates("flash_attention", shape={"batch": 1, "seqlen": 8192, "heads": 32, "heads_kv": 8,
                                             "head_dim": 128}, arch="sm_80", backward=False)
    assert [e.bound for e in fa] == ["compute"] and fa[0].compute_us == pytest.approx(fa[0].flops / 312e6, abs=1e-3)


def test_registry_op_table_and_json(tmp_path, capsys):
    path = tmp_path / "rms.json"
    assert main(op="rms_norm", shape="model", json_path=str(path), sass=False) == 0
    out = capsys.readouterr().out
    assert "rms_norm rows=16 hidden=4096 bfloat16 [sm_90, static]" in out and "roofline estimate fwd" in out
    assert "_rms_norm_fwd_kernel" in out and "_rms_norm_bwd_kernel" in out
    data = json.loads(path.read_text())
    assert data["kind"].startswith("static") and data["arch"] == "sm_90" and data["estimates"]
    assert {r["mode"] for r in data["rows"]} == {"fwd", "bwd"} and all(r["op"] == "rms_norm" for r in data["rows"])
    assert format_table([]).startswith("static facts")


@pytest.mark.parametrize("argv, message", [
    (["--op", "no_such_op"], "unknown op 'no_such_op'"),
    (["--arch", "sm_75"], "arch must be one of sm_90, sm_80, local"),
    (["--dtype", "int8"], "dtype must be one of"),
    (["--op", "rms_norm", "--shape", "rows=4"], "needs the keys hidden, rows"),
    (["--op", "rms_norm", "--shape", "rows=four"], "--shape must be one of"),
] + ([] if torch.cuda.is_available() else [(["--arch", "local"], "needs a CUDA GPU")]))
def test_bad_arguments_one_line_exit_2(argv, message, capsys):
    assert cli.main(["inspect", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("llama-triton inspect: error:"), err
