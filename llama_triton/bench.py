"""Benchmark runner over the op registry: ours vs torch eager vs torch.compile, in one run.

Every row: ``triton.testing.do_bench`` median milliseconds of each implementation, the achieved GB/s
(memory-bound ops) or TFLOP/s (compute-bound ops) of ours from the OpSpec's byte/FLOP model, and the
percent of a roofline measured in the same run: device copy bandwidth (a large ``copy_``) or a large bf16
``torch.mm``. Results go to ``benchmarks/results/<gpu-name>/ops.{json,md,png}``. Each JSON row also records,
under ``inspect``, the compiler's static facts (llama_triton.inspect, arch "local") for every kernel of the
op at the config its autotuner chose in the run: registers, spills, shared memory, dot lowering, widths.

On a machine without CUDA the interpreter's timings mean nothing: the runner says so, runs each op once
on its smallest test shape as a smoke test, writes no result files, and returns 0.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from . import registry, testing
from .inspect import chosen_facts

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def gpu_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


GRAPH_TIMING_BELOW_MS = 0.05   # calls this short (decode-sized) are re-timed from a CUDA graph


def _do_bench_graph(fn) -> float:
    """``triton.testing.do_bench_cudagraph`` median: many calls replayed from one CUDA graph, so a decode-sized
    call is timed as its kernels, not as Python's launch overhead."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def time_call(fn) -> tuple[float, str]:
    """(median ms, timer): ``do_bench``, and for calls under GRAPH_TIMING_BELOW_MS ``do_bench_cudagraph``
    (kept when the call can be captured; a call that syncs the host cannot, and says so in the timer name)."""
    ms = _do_bench(fn)
    if ms >= GRAPH_TIMING_BELOW_MS:
        return ms, "do_bench"
    try:
        return _do_bench_graph(fn), "do_bench_cudagraph"
    except Exception as e:  # not capturable: keep the eager timing, and record why in the row
        return ms, f"do_bench (graph capture failed: {type(e).__name__})"


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms * 1e-6


def measure_matmul_tflops(n: int = 8192) -> float:
    """TFLOP/s of an n x n x n bf16 torch.mm (cuBLAS)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = _do_bench(lambda: torch.mm(a, b))
    return 2 * n**3 / ms * 1e-9


def _fwd_bwd_closures(fn, args, grad_idx):
    """(forward closure, backward closure) for fn on args; backward re-uses one recorded graph."""
    args = tuple(a.detach().requires_grad_(i in grad_idx) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
    fwd = lambda: fn(*args)  # noqa: E731
    if not grad_idx:
        return fwd, None
    outs = [o for o in testing.as_tuple(fwd()) if o.requires_grad]
    grads = [torch.randn_like(o) for o in outs]
    inputs = [args[i] for i in grad_idx]
    bwd = lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)  # noqa: E731
    return fwd, bwd


def bench_spec(spec, shape, dtype, copy_gbps, mm_tflops) -> list[dict]:
    impls = {"ours": spec.fn, "eager": spec.reference, "compile": torch.compile(spec.reference, dynamic=False)}
    args = spec.make_inputs(shape, dtype, "cuda")
    ms = {"fwd": {}, "bwd": {}}
    timers = {}
    for name, fn in impls.items():
        fwd, bwd = _fwd_bwd_closures(fn, args, spec.grad_inputs)
        ms["fwd"][name], timers[("fwd", name)] = time_call(fwd)
        if bwd is not None:
            ms["bwd"][name], timers[("bwd", name)] = time_call(bwd)
    rows = []
    for mode, times in ms.items():
        if not times:
            continue
        nbytes, flops = spec.bytes(shape, dtype, mode), spec.flops(shape) * (1 if mode == "fwd" else 2.5)
        ours = times["ours"]
        row = {
            "op": spec.name, "mode": mode, "shape": shape, "dtype": str(dtype).replace("torch.", ""),
            "ms": times, "gbps": nbytes / ours * 1e-6, "tflops": flops / ours * 1e-9,
            "speedup_vs_eager": times["eager"] / ours, "speedup_vs_compile": times["compile"] / ours,
            "config": spec.config(shape, dtype) if spec.config else "",
            "timers": {name: timers[(mode, name)] for name in times},
        }
        row["pct_roofline"] = 100 * (row["tflops"] / mm_tflops if flops else row["gbps"] / copy_gbps)
        rows.append(row)
    # the compiler's facts (registers, spills, smem, dot lowering, load widths) for the configs chosen above
    facts = chosen_facts(spec.name, shape, str(dtype).replace("torch.", ""))
    for row in rows:
        row["inspect"] = [f for f in facts if f.get("mode", row["mode"]) == row["mode"]]
    return rows


def to_markdown(result: dict) -> str:
    lines = [
        f"# Op benchmarks on {result['gpu']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, {result['date']}. Roofline measured in the same run: "
        f"copy {result['copy_gbps']:.0f} GB/s, bf16 mm {result['mm_tflops']:.0f} TFLOP/s. Times are "
        "`triton.testing.do_bench` medians (ms).",
        "",
        "| op | mode | shape | dtype | ours ms | eager ms | compile ms | ours GB/s | ours TFLOP/s | % roofline | vs eager | vs compile | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t = r["ms"]
        lines.append(
            f"| {r['op']} | {r['mode']} | {registry.OpSpec.label(r['shape'])} | {r['dtype']} | {t['ours']:.4f} | "
            f"{t['eager']:.4f} | {t['compile']:.4f} | {r['gbps']:.0f} | {r['tflops']:.1f} | {r['pct_roofline']:.0f}% | "
            f"{r['speedup_vs_eager']:.2f}x | {r['speedup_vs_compile']:.2f}x | {r['config']} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["op"], r["mode"]) for r in result["rows"]})
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3 * len(groups)), squeeze=False)
    for ax, (op, mode) in zip(axes[:, 0], groups):
        rows = [r for r in result["rows"] if r["op"] == op and r["mode"] == mode]
        labels = [registry.OpSpec.label(r["shape"]) for r in rows]
        for impl in ("ours", "eager", "compile"):
            ax.plot(labels, [r["ms"]["ours"] / r["ms"][impl] * 100 for r in rows], marker="o",
                    label=f"{impl} (relative speed, ours = 100)" if impl != "ours" else "ours")
        ax.set_title(f"{op} {mode} on {result['gpu']}")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(op: str | None = None, out_dir: Path | None = None, dtype=torch.bfloat16) -> int:
    specs = [registry.get(op)] if op else registry.REGISTRY
    if not torch.cuda.is_available():
        print("No CUDA device: timings of Triton's CPU interpreter are not performance figures. Running a smoke "
              "pass (each op once on its smallest test shape); no results are written.")
        for spec in specs:
            shape = spec.test_shapes[0]
            t0 = time.perf_counter()
            spec.fn(*spec.make_inputs(shape, torch.float32, "cpu"))
            print(f"  {spec.name:24s} {spec.label(shape):30s} ok ({time.perf_counter() - t0:.2f}s, interpreter)")
        return 0
    copy_gbps, mm_tflops = measure_copy_bandwidth(), measure_matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s, bf16 mm {mm_tflops:.0f} TFLOP/s")
    rows = []
    for spec in specs:
        for shape in spec.bench_shapes:
            for row in bench_spec(spec, shape, dtype, copy_gbps, mm_tflops):
                rows.append(row)
                print(f"  {row['op']:18s} {row['mode']:3s} {spec.label(shape):28s} ours {row['ms']['ours']:.4f} ms "
                      f"{row['gbps']:7.0f} GB/s {row['pct_roofline']:5.1f}%  x{row['speedup_vs_eager']:.2f} eager "
                      f"x{row['speedup_vs_compile']:.2f} compile")
    result = {**environment(), "copy_gbps": copy_gbps, "mm_tflops": mm_tflops, "rows": rows}
    write_results(result, f"ops-{op}" if op else "ops", to_markdown(result), out_dir, plot)
    return 0


def environment() -> dict:
    """Provenance for every result file: the GPU, torch and triton versions, the date."""
    import triton

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d")}


def write_results(result: dict, stem: str, markdown: str, out_dir=None, plot_fn=None) -> Path:
    """Write ``<stem>.json``, ``<stem>.md`` and (with ``plot_fn(result, path)`` and matplotlib) ``<stem>.png``
    under ``out_dir`` (default ``benchmarks/results/<gpu-name>/``); returns the directory."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR / gpu_slug()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown)
    written = [f"{stem}.json", f"{stem}.md"]
    if plot_fn is not None:
        try:
            plot_fn(result, out_dir / f"{stem}.png")
            written.append(f"{stem}.png")
        except ImportError:
            print("matplotlib not installed (pip install -e .[plot]): no plot written")
    print(f"wrote {', '.join(written)} in {out_dir}")
    return out_dir
