"""Static performance gates (CPU, sm_90): what the compiler makes of every registry kernel must keep holding.

Data: llama_triton.inspect over every registry op at its "model" shapes (Llama-3-8B dimensions at a few
tokens), bf16, forward and backward, every autotune config the early prune leaves, compiled for an H100
with Triton's bundled ptxas. It comes from the same fresh process as tests/test_lowering.py
(lowering_check.registry_check(), once per session). These are compiler facts, predictions; only a GPU
run measures (benchmarks/).
"""
import pytest
import torch

import lowering_check
from llama_triton import registry
from llama_triton.inspect import TARGETS

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and measured")

# bandwidth-bound elementwise/row kernels: the bulk of their global traffic must move 16 bytes per access
MEMORY_BOUND = ("rms_norm", "add_rms_norm", "rms_norm_gemma", "rope", "swiglu", "swiglu_packed", "cross_entropy")

# Known offenders: "kernel config wWARPS sSTAGES" per op whose ptxas output has spill stores/loads today
# (model shapes, bf16, sm_90). A new spilling kernel or config fails; so does an entry that no longer spills
# (remove it): the issues that fix these kernels shrink the list.
KNOWN_SPILLS = {
    "rms_norm_matmul": {
        "_rms_norm_matmul_kernel BLOCK_M=16 BLOCK_N=32 BLOCK_K=256 GROUP_M=8 w4 s3",
        "_rms_norm_matmul_kernel BLOCK_M=256 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 w8 s3",
    },
    "add_rms_norm_matmul": {
        "_rms_norm_matmul_kernel BLOCK_M=16 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 w4 s5",
        "_rms_norm_matmul_kernel BLOCK_M=16 BLOCK_N=32 BLOCK_K=256 GROUP_M=8 w4 s3",
        "_rms_norm_matmul_kernel BLOCK_M=128 BLOCK_N=256 BLOCK_K=64 GROUP_M=8 w8 s3",
        "_rms_norm_matmul_kernel BLOCK_M=256 BLOCK_N=128 BLOCK_K=64 GROUP_M=8 w8 s3",
        "_rms_norm_matmul_kernel BLOCK_M=128 BLOCK_N=128 BLOCK_K=32 GROUP_M=8 w4 s4",
    },
}


@pytest.fixture(scope="module")
def data():
    _, data = lowering_check.registry_check()
    return data


@pytest.fixture(scope="module")
def rows(data):
    if not data["rows"]:
        pytest.fail(f"the inspection produced no rows: {data['failures']}")
    return data["rows"]


def _name(r) -> str:
    return f"{r.kernel} {r.config} w{r.num_warps} s{r.num_stages}"


def test_every_registry_op_inspects(data):
    assert not data["failures"], "\n\n".join(f"{op}:\n{tb}" for op, tb in data["failures"].items())
    assert {r.op for r in data["rows"]} == {s.name for s in registry.REGISTRY}


def test_memory_bound_kernels_use_128_bit_global_accesses(rows):
    bad = []
    for r in rows:
        if r.op not in MEMORY_BOUND:
            continue
        for kind, widths in (("loads", r.load_widths), ("stores", r.store_widths)):
            n128, total = widths.get("128", 0), sum(widths.values())
            if 2 * n128 < total:  # the row-wise scalars (rstd, lse, a label) may be narrower; the bulk is not
                bad.append(f"{r.op} {r.mode} {_name(r)}: {kind} {widths} (bits: static instruction count)")
    assert not bad, "\n".join(bad)
    assert {r.op for r in rows if r.op in MEMORY_BOUND} == set(MEMORY_BOUND)


def test_large_dot_tiles_lower_to_wgmma(rows):
    """tl.dot with BLOCK_M >= 64 in bf16 must become Hopper wgmma (mma.sync or FMAs there waste the H100)."""
    checked, bad = 0, []
    for r in rows:
        block_m = r.constexprs.get("BLOCK_M")
        if r.dot == "none" or not isinstance(block_m, int) or block_m < 64 or r.dtype not in ("bfloat16", "float16"):
            continue
        checked += 1
        if "wgmma" not in r.dot:
            bad.append(f"{r.op} {r.mode} {_name(r)}: tl.dot lowered to {r.dot}")
    assert not bad, "\n".join(bad)
    assert checked >= 10, f"only {checked} rows with BLOCK_M >= 64 dots: the gate checks nothing"


def test_no_kernel_needs_more_shared_memory_than_an_h100(rows):
    limit = TARGETS["sm_90"].smem_per_block
    bad = [f"{r.op} {r.mode} {_name(r)}: {r.shared} bytes > {limit}" for r in rows if r.shared > limit]
    assert not bad, "\n".join(bad)


def test_spills_only_in_the_known_offenders(rows):
    spilling = {(r.op, _name(r)): f"{r.spill_stores}/{r.spill_loads} bytes" for r in rows if r.spills}
    known = {(op, name) for op, names in KNOWN_SPILLS.items() for name in names}
    new = [f"{op}: {name} spills {spilling[(op, name)]}" for op, name in sorted(set(spilling) - known)]
    assert not new, "new spilling kernels/configs (fix them; do not add them to KNOWN_SPILLS):\n" + "\n".join(new)
    fixed = [f"{op}: {name}" for op, name in sorted(known - set(spilling))]
    assert not fixed, "no longer spill (or no longer exist): remove from KNOWN_SPILLS:\n" + "\n".join(fixed)
