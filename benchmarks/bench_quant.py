"""Quantized GEMM benchmark (GPU): W4A16 / W8A16 ``quant_matmul`` vs ``torch.mm`` in bf16 on the Llama-3-8B
projection shapes, with the copy-bandwidth and bf16-matmul rooflines measured in the same run.

    python benchmarks/bench_quant.py [--out DIR] [--quick]

Rows: (K, N) in {4096x6144 (qkv), 4096x4096 (o), 4096x28672 (gate_up), 14336x4096 (down)}, M in 1..16 (decode)
and >= 1024 (prefill), for W4 g128 with zero points (GPTQ/AWQ-like), W4 g128 symmetric and W8 per-channel.
Reports medians of ours, bf16 ``F.linear`` (cuBLAS), the plain-PyTorch W4A16/W8A16
(``reference.quant_matmul``: dequantize then mm) eager and under ``torch.compile``: at decode sizes (M <= 16)
ours and bf16 are timed with ``triton.testing.do_bench_cudagraph`` (one CUDA graph of many calls: the kernel,
not Python's launch overhead), elsewhere with ``do_bench``. Speed-up over bf16, GB/s counting weight + scale
(+ zero point) + activation bytes and its % of the copy bandwidth measured in the same run, TFLOP/s and % of
the bf16 mm roofline, the autotuned config (race-free lookup by the call's key), and the targets (issue 14:
W4 g128 M<=16 >= 3.2x bf16 and >= 80% of copy bandwidth; W8 M=1 >= 1.8x bf16; issue 7: W4 M>=1024 >= 0.9x
bf16). Writes ``benchmarks/results/<gpu>/quant.{json,md,png}``.
Without CUDA it prints that interpreter timings are not performance figures and writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
M_DECODE = [1, 2, 4, 8, 16]
M_PREFILL = [1024, 4096]
VARIANTS = [("w4g128", 4, 128, False), ("w4g128sym", 4, 128, True), ("w8", 8, -1, True)]


def _target(variant: str, M: int, speedup: float, pct_copy: float):
    """(target text, met?) for the issue-14 / issue-7 targets, or ("", None)."""
    if variant == "w4g128" and M <= 16:
        return ">=3.2x bf16, >=80% copy", speedup >= 3.2 and pct_copy >= 80
    if variant.startswith("w4") and M >= 1024:
        return ">=0.9x bf16", speedup >= 0.9
    if variant == "w8" and M == 1:
        return ">=1.8x bf16", speedup >= 1.8
    return "", None


def run(out_dir: Path | None, quick: bool) -> int:
    if not torch.cuda.is_available():
        print("No CUDA device: Triton-interpreter timings are not performance figures; nothing written.")
        return 0
    from llama_triton import bench, quant, reference
    from llama_triton.kernels.quant_gemm import chosen_config
    from llama_triton.ops.quant_matmul import quant_matmul

    copy_gbps, mm_tflops = bench.measure_copy_bandwidth(), bench.measure_matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s, bf16 mm {mm_tflops:.0f} TFLOP/s")
    shapes = SHAPES[:2] if quick else SHAPES
    ms_list = ([1, 16, 1024] if quick else M_DECODE + M_PREFILL)
    compiled = torch.compile(reference.quant_matmul)
    rows = []
    for K, N in shapes:
        w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
        for vname, bits, group, sym in VARIANTS:
            qw = quant.quantize_weight(w, bits=bits, group_size=group, sym=sym)
            for M in ms_list:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                quant_matmul(x, qw)                                  # autotune outside any graph capture
                timer = _cudagraph_bench if M <= 16 else bench._do_bench
                ours_ms = timer(lambda: quant_matmul(x, qw))
                bf16_ms = timer(lambda: torch.nn.functional.linear(x, w))
                ms = {"ours": ours_ms, "bf16_mm": bf16_ms}
                for name, fn in (("eager", reference.quant_matmul), ("compile", compiled)):
                    try:  # plain PyTorch W4A16/W8A16 (dequantize, then mm) and its torch.compile
                        ms[name] = bench._do_bench(lambda: fn(x, qw))
                    except Exception as e:  # noqa: BLE001  an optional comparison (e.g. out of memory)
                        print(f"  {name} failed at K={K} N={N} M={M}: {type(e).__name__}: {e}")
                G = K // qw.group_size
                zbytes = qw.zeros.numel() * qw.zeros.element_size() if qw.zeros is not None else 0
                nbytes = K * N * bits // 8 + G * N * 2 + zbytes + 2 * (M * K + M * N)
                gbps = nbytes / ours_ms * 1e-6
                tflops = 2 * M * N * K / ours_ms * 1e-9
                speedup = bf16_ms / ours_ms
                pct_copy = 100 * gbps / copy_gbps
                target, met = _target(vname, M, speedup, pct_copy)
                row = {"K": K, "N": N, "M": M, "variant": vname, "ms": ms,
                       "speedup_vs_bf16": speedup, "gbps": gbps, "pct_copy": pct_copy, "tflops": tflops,
                       "pct_mm": 100 * tflops / mm_tflops, "timer": "cudagraph" if M <= 16 else "do_bench",
                       "config": chosen_config(M, N, K, bits, qw.group_size, not sym),
                       "target": target, "target_met": met}
                rows.append(row)
                print(f"  K={K:5d} N={N:5d} M={M:5d} {vname:10s} ours {ours_ms:.4f} ms  bf16 {bf16_ms:.4f} ms  "
                      f"x{speedup:.2f}  {gbps:6.0f} GB/s ({pct_copy:4.0f}% copy)  {tflops:6.1f} TFLOP/s  "
                      f"{row['config']}  {target} {'' if met is None else ('MET' if met else 'MISSED')}")
    result = {**bench.environment(), "copy_gbps": copy_gbps, "mm_tflops": mm_tflops, "rows": rows}
    bench.write_results(result, "quant", to_markdown(result), out_dir, plot)
    return 0


def _cudagraph_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def _ms(row: dict, name: str) -> str:
    return f"{row['ms'][name]:.4f}" if name in row["ms"] else "-"


def to_markdown(result: dict) -> str:
    lines = [
        f"# Quantized GEMM on {result['gpu']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, {result['date']}. Measured in the same run: copy "
        f"{result['copy_gbps']:.0f} GB/s, bf16 mm {result['mm_tflops']:.0f} TFLOP/s. bf16 activations; times are "
        "medians (ms): `do_bench_cudagraph` for ours and bf16 at M <= 16, `do_bench` otherwise; GB/s counts weight + "
        "scale (+ zero point) + x + y bytes.",
        "",
        "| K | N | M | weights | ours ms | bf16 mm ms | eager ms | compile ms | vs bf16 | GB/s | % copy | TFLOP/s | % mm "
        "| config | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        met = "" if r["target_met"] is None else (" met" if r["target_met"] else " MISSED")
        lines.append(
            f"| {r['K']} | {r['N']} | {r['M']} | {r['variant']} | {r['ms']['ours']:.4f} | {r['ms']['bf16_mm']:.4f} | "
            f"{_ms(r, 'eager')} | {_ms(r, 'compile')} | "
            f"{r['speedup_vs_bf16']:.2f}x | {r['gbps']:.0f} | {r['pct_copy']:.0f}% | {r['tflops']:.1f} | "
            f"{r['pct_mm']:.0f}% | {r['config']} | {r['target']}{met} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["K"], r["N"]) for r in result["rows"]})
    fig, axes = plt.subplots(len(shapes), 1, figsize=(8, 3 * len(shapes)), squeeze=False)
    for ax, (K, N) in zip(axes[:, 0], shapes):
        for v in sorted({r["variant"] for r in result["rows"]}):
            rs = [r for r in result["rows"] if (r["K"], r["N"], r["variant"]) == (K, N, v)]
            ax.plot([str(r["M"]) for r in rs], [r["speedup_vs_bf16"] for r in rs], marker="o", label=v)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(f"K={K} N={N}: speed-up over bf16 torch.mm ({result['gpu']})")
        ax.set_xlabel("M")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output directory (default benchmarks/results/<gpu>)")
    p.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16, 1024}")
    args = p.parse_args(argv)
    return run(args.out, args.quick)


if __name__ == "__main__":
    sys.exit(main())
