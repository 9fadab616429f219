"""What the compiler made of each kernel, for a GPU this machine may not have (static facts, no GPU).

Every fact comes from Triton's own compile for the target (sm_90 = H100, sm_80 = A100, or "local"):
registers/thread, spill bytes, shared memory, occupancy, how `tl.dot` lowered (wgmma / mma.sync / fma),
TMA, cp.async pipelining depth, global load/store widths, grid vs SM count; plus a roofline ESTIMATE per
op from the registry's byte/FLOP model and datasheet peaks. It predicts; only a GPU run measures.

Inspect one registry op (from pytest too: with TRITON_INTERPRET set, a fresh process does the compiling):

    from llama_triton.inspect import inspect_ops

    rows = inspect_ops("flash_attention", shape="model", dtype="bfloat16", arch="sm_90")
    for r in rows:                       # one KernelRow per kernel, autotune config and fwd/bwd
        print(r.mode, r.kernel, r.config, r.num_warps, r.num_stages)
        print(r.registers, r.spill_stores, r.spill_loads)          # ptxas: 0/0 = no spills
        print(r.dot, r.dot_instr, r.tma, r.cp_async_depth)         # "wgmma", "wgmma.m64n64k16.f32.bf16.bf16", False, 3
        print(r.load_bits_min, r.load_bits_max, r.store_bits_max)  # 128 = 16-byte vector accesses
        print(r.shared, r.fits_shared, r.warps_per_sm, r.occupancy_limit, r.ctas, r.waves)
    spilling = [r for r in rows if r.spills]

`shape`: "model" (default: Llama-3-8B dimensions at a few tokens, so the kernels and configs of a real model
but inputs a CPU builds in seconds; MODEL_SHAPES), "bench" (the op's smallest benchmark shape), "all" (every
benchmark shape: big, and the torch matmuls around some kernels really run), "test", a dict, or
"rows=16,hidden=4096". `configs`: "all" (every
autotune config the early prune leaves), "first", "chosen" (what the autotuner picked on this GPU).

Your own kernel or launcher, at the arguments you choose (source run as a file in a fresh process):

    rows = inspect_code('''
    import torch, triton, triton.language as tl
    @triton.jit
    def copy(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)
    x = torch.empty(4096, dtype=torch.float16); copy[(4,)](x, torch.empty_like(x), 4096, BLOCK=1024)
    ''')
    assert rows[0].load_bits_max == 128

In a process without the interpreter, `with capture("sm_90") as cap: my_launcher(...)` records `cap.rows`
directly. `estimates(...)` gives the roofline rows; `format_table(rows, estimates)` the CLI's table.
Command line: `llama-triton inspect [--op NAME] [--shape PRESET] [--dtype D] [--arch sm_90|sm_80|local] [--json F]`.
"""
from .capture import Capture, KernelRow, capture
from .facts import ptx_facts, ptxas_facts, sass_facts
from .report import (MODEL_SHAPES, SHAPE_PRESETS, Estimate, chosen_facts, estimates, format_table, inspect_code, inspect_ops,
                     main, resolve_shapes, to_json)
from .targets import ARCHS, TARGETS, Target, get_target, occupancy

__all__ = ["ARCHS", "Capture", "Estimate", "KernelRow", "MODEL_SHAPES", "SHAPE_PRESETS", "TARGETS", "Target",
           "capture", "chosen_facts", "estimates", "format_table", "get_target", "inspect_code", "inspect_ops", "main", "occupancy",
           "ptx_facts", "ptxas_facts", "resolve_shapes", "sass_facts", "to_json"]
