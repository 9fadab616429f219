"""Static (sm_90) checks of the quantized decode GEMM (kernels/quant_gemm.py), without a GPU.

For x (M, K) @ W.T, W (N, K) W4 g128 with zero points and W8 per channel, at (K, N) = 4096 x 4096 and
4096 x 14336, M in {1, 4, 16} (the GEMV's largest row count and both ends of the decode dot path), bf16, a
fresh process without the interpreter runs the real launcher with every launch intercepted by
``llama_triton.inspect.capture`` (tests/lowering_check.py's machinery): each autotune config left by the
launcher's early prune is compiled for sm_90 by Triton's own tool chain (ptxas included). For each call:

* launches: the Triton launches one ``quant_gemm.quant_matmul`` call makes (an autotuned launch counts
  once, whatever the number of configs compiled for it) must be exactly 1 (split-K reduced in-launch);
* spills: ptxas's spill store/load bytes must be 0 for every surviving config;
* bytes: global->SM bytes per call, counted from the compiled kernel. Method: read the kernel's TTIR
  (Triton's cache keeps it next to the cubin, found by the kernel hash), take every ``tt.load`` with its
  tensor type (elements x element size = bytes one program moves each time it runs: masked-out lanes
  count, so this is an upper bound), and multiply by how often it runs, from where it sits: inside the K
  loop (``scf.for``) once per (N tile, K step), as the programs of one N tile split the
  ``cdiv(K, BLOCK_K)`` steps between them; at the top level once per program (grid[0] * grid[1]); inside
  the split-K reduction (``scf.if``) once per N tile (only the last program of a tile gets there). The
  grid comes from the launcher's own grid function. This count must equal the launcher's byte model
  (``decode_load_bytes``, which its early prune uses), and be <= 1.25x the bytes the call must move:
  packed weights + scales + zero points + x (``ideal_bytes``). Loads of the packed weights are 128-bit.
The static loops over chunks / values are unrolled before TTIR, so their loads appear one by one.
"""
import json

import pytest
import torch

import lowering_check

_SNIPPET = r'''
import glob, json, os, re
import torch, triton
from llama_triton import quant
from llama_triton.kernels import quant_gemm as QG

cap = L.capture
depth = [0]
launches = [0]
real_at, real_jr = cap.autotune_run, cap.jit_run
def autotune_run(*a, **k):
    launches[0] += depth[0] == 0
    depth[0] += 1
    try:
        return real_at(*a, **k)
    finally:
        depth[0] -= 1
def jit_run(*a, **k):
    launches[0] += depth[0] == 0
    return real_jr(*a, **k)
cap.autotune_run, cap.jit_run = autotune_run, jit_run

SIZES = {"i8": 1, "i16": 2, "i32": 4, "i64": 8, "f16": 2, "bf16": 2, "f32": 4}
LOAD = re.compile(r"tt\.load .*: (?:tensor<([\dx]+)x)?!tt\.ptr<(\w+)>")

def ttir(h):
    for meta in glob.glob(os.path.join(triton.knobs.cache.dir, "*", "_decode_kernel.json")):
        with open(meta) as f:
            if json.load(f).get("hash") == h:
                return open(meta[:-5] + ".ttir").read()
    raise FileNotFoundError(f"no TTIR for kernel hash {h} in {triton.knobs.cache.dir}")

def load_bytes(text):
    """{'for': b, 'top': b, 'if': b}: bytes per execution of the tt.loads at each nesting."""
    out, stack = {"for": 0, "top": 0, "if": 0}, []
    for line in text.splitlines():
        ind = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= ind and line.strip().startswith("}"):
            stack.pop()
            break
        m = LOAD.search(line)
        if m:
            n = 1
            for d in (m.group(1) or "1").split("x"):
                n *= int(d)
            where = "for" if any(k == "for" for _, k in stack) else "if" if stack else "top"
            out[where] += n * SIZES[m.group(2)]
        s = line.strip()
        if s.endswith("{") and ("scf.for" in s or "scf.if" in s or s.startswith("} else")):
            stack.append((ind, "for" if "scf.for" in s else "if"))
    return out

for K, N in ((4096, 4096), (4096, 14336)):
    for bits, group, sym, Ms in ((4, 128, False, (1, 4, 16)), (8, -1, True, (1,))):
        w = torch.randn(N, K, dtype=torch.bfloat16)
        qw = quant.quantize_weight(w, bits, group, sym)
        for M in Ms:
            first, launches[0] = len(cap.rows), 0
            cap.context = {"shape": f"{K}x{N} W{bits} M{M}"}   # a row per call, even for a kernel compiled before
            QG.quant_matmul(torch.empty(M, K, dtype=torch.bfloat16), qw.qweight, qw.scales, qw.zeros, None, bits,
                            qw.group_size)
            gs = qw.group_size
            zb = qw.zeros.element_size() if qw.zeros is not None else 0
            ideal = QG.ideal_bytes(M, N, K, bits, gs, qw.zeros is not None, 2, 2, zb)
            for r in cap.rows[first:]:
                c = r.constexprs
                per = load_bytes(ttir(r.hash))
                tiles, split = r.grid[0], r.grid[1]
                block_k = c["CHUNKS"] * (32 // bits) * 16
                counted = per["for"] * tiles * -(-K // block_k) + per["top"] * tiles * split + per["if"] * tiles
                model = QG.decode_load_bytes({**c, "BLOCK_M": c["BLOCK_M"]}, M, N, K, bits, gs, qw.zeros is not None,
                                             False, 2, 2, zb)
                print("ROW " + json.dumps(dict(K=K, N=N, bits=bits, group=group, M=M, config=r.config, grid=r.grid,
                      warps=r.num_warps, regs=r.registers, spill=r.spill_stores + r.spill_loads, smem=r.shared,
                      dot=r.dot, load_widths=r.load_widths, counted=counted, model=model, ideal=ideal,
                      launches=launches[0])))
w = torch.randn(4096, 4096, dtype=torch.bfloat16)
qw = quant.quantize_weight(w, 4, 128, False)
first, launches[0] = len(cap.rows), 0
cap.context = {"shape": "prefill"}
QG.quant_matmul(torch.empty(1024, 4096, dtype=torch.bfloat16), qw.qweight, qw.scales, qw.zeros, None, 4, 128)
for r in cap.rows[first:]:
    print("PREFILL " + json.dumps(dict(config=r.config, regs=r.registers, spill=r.spill_stores + r.spill_loads,
                                       dot=r.dot, smem=r.shared, fits=r.fits_shared, launches=launches[0])))
print("LOWERING OK")
'''


@pytest.fixture(scope="module")
def compiled():
    if torch.cuda.is_available():
        pytest.skip("compiles for sm_90 on a CPU machine; on a GPU the GPU tests measure")
    return lowering_check.run_snippet(_SNIPPET)


@pytest.fixture(scope="module")
def rows(compiled):
    got = [json.loads(line[4:]) for line in compiled.splitlines() if line.startswith("ROW ")]
    assert got, compiled[-3000:]
    return got


def test_prefill_configs_use_wgmma_without_spills(compiled):
    """The prefill path (M = 1024, 4096 x 4096) at every autotune config: one launch, wgmma, no spills."""
    got = [json.loads(line[8:]) for line in compiled.splitlines() if line.startswith("PREFILL ")]
    assert len(got) >= 2 and all(r["launches"] == 1 for r in got)
    assert all(r["dot"] == "wgmma" and r["spill"] == 0 and r["fits"] for r in got), got


def _label(r):
    return f"{r['K']}x{r['N']} W{r['bits']} M={r['M']} {r['config']}"


def test_every_shape_and_m_bucket_compiled(rows):
    seen = {(r["K"], r["N"], r["bits"], r["M"]) for r in rows}
    assert seen == {(k, n, 4, m) for k, n in ((4096, 4096), (4096, 14336)) for m in (1, 4, 16)} | \
        {(k, n, 8, 1) for k, n in ((4096, 4096), (4096, 14336))}


def test_one_launch_per_call(rows):
    assert all(r["launches"] == 1 for r in rows), [(_label(r), r["launches"]) for r in rows if r["launches"] != 1]


def test_no_spills(rows):
    assert all(r["spill"] == 0 for r in rows), [(_label(r), r["regs"], r["spill"]) for r in rows if r["spill"]]


def test_bytes_counted_from_the_kernel_match_the_model_and_the_budget(rows):
    assert all(r["counted"] == r["model"] for r in rows), [(_label(r), r["counted"], r["model"]) for r in rows
                                                          if r["counted"] != r["model"]]
    over = [(_label(r), round(r["counted"] / r["ideal"], 3)) for r in rows if r["counted"] > 1.25 * r["ideal"]]
    assert not over, over


def test_packed_weights_loaded_128_bits_wide(rows):
    """Every config has 128-bit global loads (the (BLOCK_N, 16)-word tiles), and the paths are the ones
    intended: no tl.dot in the GEMV (M <= 4), mma in the decode dot path."""
    for r in rows:
        assert r["load_widths"].get("128", 0) > 0, _label(r)
        assert (r["dot"] == "none") == (r["M"] <= 4), (_label(r), r["dot"])
