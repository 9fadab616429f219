"""The registry inspector: every op's launchers at a shape preset, the roofline estimate, table and JSON.

Runs in this process when the kernels can be compiled here (TRITON_INTERPRET unset), else in a fresh
Python without the interpreter (pytest's conftest sets it), transparently.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from .capture import KernelRow, capture
from .targets import ARCHS, get_target

DTYPES = ("bfloat16", "float16", "float32")
SHAPE_PRESETS = ("bench", "model", "all", "test")

# "model": Llama-3-8B dimensions at a few tokens, so a CPU builds the inputs in seconds. The kernels see
# the model's hidden/intermediate/vocab/head sizes (their block sizes and autotune configs follow those);
# only the token count is small, and it enters only the grid. Ops not listed use their "bench" shape.
MODEL_SHAPES = {
    "rms_norm": [{"rows": 16, "hidden": 4096}],
    "add_rms_norm": [{"rows": 16, "hidden": 4096}],
    "rope": [{"batch": 1, "seq": 16, "heads": 32, "kv_heads": 8, "head_dim": 128}],
    "swiglu": [{"rows": 16, "inter": 14336}],
    "swiglu_packed": [{"rows": 16, "inter": 14336}],
    "cross_entropy": [{"rows": 16, "vocab": 128256}],
    # the CE kernel sees (tokens, vocab) logits chunks; hidden only enters the torch matmuls around it
    "fused_linear_cross_entropy": [{"tokens": 64, "hidden": 256, "vocab": 128256}],
    "fused_linear_cross_entropy_options": [{"tokens": 64, "hidden": 256, "vocab": 128256}],
    "rms_norm_gemma": [{"rows": 16, "hidden": 4096}],
    "decode_attention": [{"batch": 1, "q_len": 1, "heads": 32, "heads_kv": 8, "head_dim": 128, "max_seqlen": 1024,
                          "seqlen": 1024}],
    "low_rank_matmul": [{"M": 1, "K": 4096, "N": 4096, "rank": 256}, {"M": 256, "K": 4096, "N": 4096, "rank": 256}],
    # Mixtral's hidden size with a narrower expert (inter 1024, 4 experts): 8 x 14336 experts are 1.4G weights
    "moe_experts": [{"tokens": 64, "hidden": 4096, "experts": 4, "inter": 1024, "top_k": 2}],
    "rms_norm_matmul": [{"rows": 1, "hidden": 4096, "out": 6144}, {"rows": 256, "hidden": 4096, "out": 6144}],
    "add_rms_norm_matmul": [{"rows": 1, "hidden": 4096, "out": 6144}, {"rows": 256, "hidden": 4096, "out": 6144}],
    "quant_matmul_w4": [{"M": 1, "K": 4096, "N": 4096, "group": 128}, {"M": 256, "K": 4096, "N": 4096, "group": 128}],
    "quant_matmul_w8": [{"M": 1, "K": 4096, "N": 4096, "group": -1}, {"M": 256, "K": 4096, "N": 4096, "group": -1}],
    "flash_attention": [{"batch": 1, "seqlen": 512, "heads": 32, "heads_kv": 8, "head_dim": 128}],
    "flash_attention_noncausal": [{"batch": 1, "seqlen": 512, "heads": 32, "heads_kv": 8, "head_dim": 128}],
}


@dataclass
class Estimate:
    """Roofline ESTIMATE of one op call from the registry's byte/FLOP model and the target's datasheet
    peaks: the time the call cannot beat. Not a measurement."""
    op: str
    shape: str
    dtype: str
    mode: str            # "fwd" | "bwd"
    arch: str
    bytes: int
    flops: float
    memory_us: float     # bytes / datasheet bandwidth
    compute_us: float    # flops / datasheet tensor-core peak (0 for memory-bound ops)
    bound: str           # "memory" | "compute" | "unknown" (no datasheet for this GPU)
    estimate_us: float   # max(memory_us, compute_us)


def parse_shape(text: str) -> dict:
    """'rows=4096,hidden=4096' -> {"rows": 4096, "hidden": 4096} (ValueError naming --shape otherwise)."""
    shape = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        try:
            shape[key.strip()] = int(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise ValueError(f"--shape must be one of {', '.join(SHAPE_PRESETS)} or key=int pairs like "
                             f"'rows=4096,hidden=4096'; got {text!r}")
    return shape


def resolve_shapes(spec, shape="model") -> list[dict]:
    """The shapes to inspect `spec` at: a preset name ("model": MODEL_SHAPES, else like "bench"; "bench": its
    smallest benchmark shape; "all": every benchmark shape; "test": its largest test shape), a dict, or
    'k=v,...'."""
    if isinstance(shape, dict):
        shapes = [shape]
    elif shape == "all":
        return list(spec.bench_shapes)
    elif shape == "test":
        return [spec.test_shapes[-1]]
    elif shape in ("bench", "model"):
        if shape == "model" and spec.name in MODEL_SHAPES:
            return MODEL_SHAPES[spec.name]
        return [min(spec.bench_shapes or spec.test_shapes, key=lambda s: spec.bytes(s, _torch_dtype("bfloat16"), "fwd"))]
    else:
        shapes = [parse_shape(shape)]
    known = {k for s in spec.test_shapes + spec.bench_shapes for k in s}
    need = set(spec.test_shapes[0]) if spec.test_shapes else set()
    for s in shapes:
        if not need <= set(s) <= known:
            raise ValueError(f"--shape for {spec.name} needs the keys {', '.join(sorted(need))}"
                             + (f" (optional: {', '.join(sorted(known - need))})" if known - need else "")
                             + f"; got {', '.join(sorted(s)) or 'none'}")
    return shapes


def _torch_dtype(name):
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, name)


def _specs(ops):
    from .. import registry

    if ops is None:
        return list(registry.REGISTRY)
    names = [ops] if isinstance(ops, str) else list(ops)
    known = [s.name for s in registry.REGISTRY]
    for n in names:
        if n not in known:
            raise ValueError(f"unknown op {n!r}; registered: {', '.join(known)}")
    return [registry.get(n) for n in names]


def estimates(ops=None, shape="model", dtype: str = "bfloat16", arch: str = "sm_90", backward: bool = True) -> list[Estimate]:
    """Roofline estimates (see Estimate) of each op call at each shape: fwd, and bwd for ops with gradients
    (the backward's FLOPs are 2.5x the forward's, as in llama_triton.bench)."""
    target, torch_dtype, out = get_target(arch), _torch_dtype(dtype), []
    for spec in _specs(ops):
        for s in resolve_shapes(spec, shape):
            for mode in ("fwd", "bwd") if backward and spec.grad_inputs else ("fwd",):
                nbytes = int(spec.bytes(s, torch_dtype, mode))
                flops = float(spec.flops(s)) * (1 if mode == "fwd" else 2.5)
                bw, peak = target.hbm_gbps, target.tflops.get(dtype)
                mem = nbytes / (bw * 1e3) if bw else 0.0
                comp = flops / (peak * 1e6) if peak and flops else 0.0
                bound = "unknown" if not bw else "compute" if comp > mem else "memory"
                out.append(Estimate(spec.name, spec.label(s), dtype, mode, target.name, nbytes, flops, round(mem, 3),
                                    round(comp, 3), bound, round(max(mem, comp), 3)))
    return out


def _isolate() -> bool:
    from ..kernels._checks import interpreting

    return interpreting()


def _run_isolated(request: dict) -> list[KernelRow]:
    """Run `request` (inspect_ops' or inspect_code's arguments) in a fresh Python without the interpreter."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        r = subprocess.run([sys.executable, "-c", f"from llama_triton.inspect.report import _child; _child({out!r})"], input=json.dumps(request),
                           env=env, capture_output=True, text=True)
        if r.returncode or not os.path.exists(out):
            raise RuntimeError(f"the inspector's process failed:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
        with open(out) as f:
            return [KernelRow.from_dict(d) for d in json.load(f)]


def inspect_ops(ops=None, shape="model", dtype: str = "bfloat16", arch: str = "sm_90", backward: bool = True,
                configs: str = "all", sass: bool = False, progress=None) -> list[KernelRow]:
    """KernelRows of every kernel the registry ops `ops` (a name, a list, None: all) launch at `shape`
    (see resolve_shapes), forward and (with `backward`) backward, compiled for `arch`. `configs`: "all"
    autotune configs left by the prune, "first", or "chosen" (the autotuner's pick on this GPU)."""
    specs = _specs(ops)
    get_target(arch)
    _torch_dtype(dtype)
    for spec in specs:
        resolve_shapes(spec, shape)       # argument errors here, not in a child process
    if _isolate():
        return _run_isolated({"kind": "ops", "ops": [s.name for s in specs], "shape": shape, "dtype": dtype,
                              "arch": arch, "backward": backward, "configs": configs, "sass": sass})
    import torch

    from .. import testing

    torch_dtype = _torch_dtype(dtype)
    device = "cuda" if arch == "local" else "cpu"
    with capture(arch, configs=configs, sass=sass) as cap:
        for spec in specs:
            for s in resolve_shapes(spec, shape):
                if progress:
                    progress(f"{spec.name} {spec.label(s)} {dtype}")
                cap.context = {"op": spec.name, "shape": spec.label(s), "dtype": dtype, "mode": "fwd"}
                torch.manual_seed(0)
                args = spec.make_inputs(s, torch_dtype, device)
                grad = backward and spec.grad_inputs
                args = tuple(a.requires_grad_() if grad and i in spec.grad_inputs else a for i, a in enumerate(args))
                outs = [o for o in testing.as_tuple(spec.fn(*args)) if o.requires_grad]
                if grad and outs:
                    cap.context = {**cap.context, "mode": "bwd"}
                    torch.autograd.grad(outs, [args[i] for i in spec.grad_inputs],
                                        [torch.ones_like(o) for o in outs], allow_unused=True)
                del args, outs
    return cap.rows


_BENCH_FIELDS = ("mode", "kernel", "config", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads",
                 "shared", "warps_per_sm", "occupancy_limit", "dot", "tma", "cp_async_depth", "load_bits_min",
                 "load_bits_max", "store_bits_min", "store_bits_max", "grid", "waves", "chosen")


def chosen_facts(op: str, shape: dict, dtype: str = "bfloat16") -> list[dict]:
    """For llama_triton.bench on a GPU, after an op was timed: the static facts (arch "local") of each kernel
    it launches at `shape`, at the config its autotuner chose in this run (`chosen` False/None where the
    autotuner has no choice on record). A failure becomes [{"error": ...}] so a benchmark never dies here."""
    try:
        rows = inspect_ops(op, shape=shape, dtype=dtype, arch="local", configs="chosen")
    except Exception as e:  # the benchmark's timings matter more than these facts
        return [{"error": f"{type(e).__name__}: {e}"}]
    return [{k: getattr(r, k) for k in _BENCH_FIELDS} for r in rows]


def inspect_code(code: str, arch: str = "sm_90", configs: str = "all", sass: bool = False) -> list[KernelRow]:
    """KernelRows of every kernel that Python source `code` launches (run as a file, so @triton.jit can
    read its source) inside `capture(arch)`, in a fresh process without the interpreter. The way to
    inspect your own kernel or launcher at chosen arguments from a test."""
    get_target(arch)
    return _run_isolated({"kind": "code", "code": code, "arch": arch, "configs": configs, "sass": sass})


def _child(out_path: str) -> None:
    req = json.loads(sys.stdin.read())
    if req["kind"] == "ops":
        rows = inspect_ops(req["ops"], req["shape"], req["dtype"], req["arch"], req["backward"], req["configs"],
                           req["sass"])
    else:
        import runpy

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "inspected_code.py")
            with open(path, "w") as f:
                f.write(req["code"])
            with capture(req["arch"], configs=req["configs"], sass=req["sass"]) as cap:
                runpy.run_path(path, run_name="__inspected__")
            rows = cap.rows
    with open(out_path, "w") as f:
        json.dump([asdict(r) for r in rows], f)


# ----------------------------------------------------------------------------------------- table, JSON
_COLUMNS = [  # header, width, cell
    ("mode", 4, lambda r: r.mode), ("kernel", 26, lambda r: r.kernel), ("config", 36, lambda r: r.config),
    ("w", 2, lambda r: r.num_warps), ("st", 2, lambda r: r.num_stages), ("regs", 4, lambda r: r.registers),
    ("spill st/ld", 11, lambda r: f"{r.spill_stores}/{r.spill_loads}"),
    ("smem KiB", 8, lambda r: f"{r.shared / 1024:.1f}" + ("" if r.fits_shared else "!")),
    ("occ w/SM", 12, lambda r: f"{r.warps_per_sm} {r.occupancy_limit[:4]}"), ("dot", 8, lambda r: r.dot),
    ("tma", 3, lambda r: "yes" if r.tma else "no"), ("cp.async", 8, lambda r: str(r.cp_async_depth) if r.cp_async else "-"),
    ("ld bits", 7, lambda r: f"{r.load_bits_min}-{r.load_bits_max}" if r.load_bits_max else "-"),
    ("st bits", 7, lambda r: f"{r.store_bits_min}-{r.store_bits_max}" if r.store_bits_max else "-"),
    ("grid/SMs", 12, lambda r: f"{r.ctas}/{r.sms}"), ("waves", 5, lambda r: f"{r.waves:.2f}"),
]


def format_table(rows: list[KernelRow], ests: list[Estimate] = ()) -> str:
    """One block per (op, shape, dtype): its roofline estimate, then one line per kernel and config."""
    lines = []
    header = " ".join(f"{h:<{w}s}" if i < 3 else f"{h:>{w}s}" for i, (h, w, _) in enumerate(_COLUMNS))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.op, r.shape, r.dtype, r.arch), []).append(r)
    for (op, shape, dtype, arch), group in groups.items():
        lines.append(f"{op or '(code)'} {shape} {dtype} [{arch}, static]")
        for e in ests:
            if (e.op, e.shape, e.dtype) == (op, shape, dtype):
                lines.append(f"  roofline estimate {e.mode}: {e.estimate_us:.1f} us ({e.bound}-bound: "
                             f"{e.bytes / 1e6:.1f} MB at datasheet bandwidth {e.memory_us:.1f} us"
                             + (f", {e.flops / 1e9:.1f} GFLOP at datasheet peak {e.compute_us:.1f} us" if e.flops else "")
                             + ")")
        lines.append("  " + header)
        for r in group:
            cells = [str(c(r)) for _, _, c in _COLUMNS]
            lines.append("  " + " ".join(f"{c:<{w}s}" if i < 3 else f"{c:>{w}s}"
                                         for i, (c, (_, w, _)) in enumerate(zip(cells, _COLUMNS))))
    lines.append("static facts from the compiler for the target (no GPU involved); 'smem !': over the "
                 "per-CTA limit; occ: resident warps/SM and what limits them; cp.async: pipeline depth (shared buffers); "
                 "roofline: an estimate from datasheet peaks, not a measurement")
    return "\n".join(lines)


def to_json(rows: list[KernelRow], ests: list[Estimate] = (), **extra) -> dict:
    import triton

    return {"kind": "static (compiler output; predicts, does not measure)", "triton": triton.__version__, **extra,
            "rows": [asdict(r) for r in rows], "estimates": [asdict(e) for e in ests]}


def main(op=None, shape="model", dtype="bfloat16", arch="sm_90", json_path=None, backward=True, sass=None) -> int:
    """`llama-triton inspect`: the table on stdout, optionally JSON; argument errors: one line, exit 2."""
    prog = "llama-triton inspect"
    try:
        from .facts import _tool

        target = get_target(arch)
        use_sass = bool(_tool("cuobjdump")) if sass is None else sass
        specs = _specs(op)
        for spec in specs:
            resolve_shapes(spec, shape)
        _torch_dtype(dtype)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    names = [s.name for s in specs]
    rows = inspect_ops(names, shape, dtype, arch, backward, "all", use_sass,
                       progress=lambda m: print(f"compiling {m} for {target.name} ...", file=sys.stderr, flush=True))
    ests = estimates(names, shape, dtype, arch, backward)
    print(format_table(rows, ests))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(to_json(rows, ests, arch=target.name, gpu=target.gpu), f, indent=1)
        print(f"wrote {json_path}", file=sys.stderr)
    return 0

