"""Compressed linear layers on the GPU (issue 18): the fused low-rank kernel and 2:4 semi-structured sparse
linears against dense ``torch.mm`` (cuBLAS), at decode and prefill sizes, in bf16.

    python benchmarks/bench_compress.py [--out DIR] [--quick]

Low-rank rows, for ``W (N, K) ~= B (N, r) @ A (r, K)`` on Llama-3-8B projection shapes and ranks r in
{64, 256, 1024}: ours (``low_rank_matmul``: one launch, intermediate on chip), two ``F.linear`` (cuBLAS,
what ``LowRankLinear`` runs above ``FUSED_MAX_M`` rows or ``FUSED_MAX_RK`` elements of A), their
``torch.compile``, and the dense ``F.linear`` with the full W (the rows say where the fused kernel wins, to
set ``FUSED_MAX_RK``). 2:4 rows: a 2:4-pruned W as ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS)
vs the same W dense. Times are ``triton.testing`` medians (``do_bench_cudagraph`` for M <= 16, where Python
overhead would dominate); GB/s counts weight + x + y bytes (decode), TFLOP/s the factored FLOPs (prefill);
percentages are of the copy bandwidth / bf16 mm measured in the same run. Writes
``benchmarks/results/<gpu>/compress.{json,md,png}``. Without CUDA it prints that interpreter timings are not
performance figures and writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]        # (K, N): o_proj, up/gate, down of Llama-3-8B
RANKS = [64, 256, 1024]
M_DECODE = [1, 4, 16]
M_PREFILL = [1024, 4096]


def _bench(fn, M: int) -> float:
    import triton.testing

    if M <= 16:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception:  # noqa: BLE001  graph capture unavailable for this call: plain do_bench
            pass
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _try(fn, M, label, errors):
    try:
        return _bench(fn, M)
    except Exception as e:  # noqa: BLE001  an optional comparison (unsupported shape, compile failure)
        errors.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def low_rank_rows(shapes, ranks, ms, copy_gbps, mm_tflops) -> list[dict]:
    from llama_triton import reference
    from llama_triton.kernels.low_rank import chosen_config
    from llama_triton.ops.low_rank import low_rank_matmul

    compiled = torch.compile(reference.low_rank_matmul)
    rows = []
    for K, N in shapes:
        w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
        for r in ranks:
            a = (torch.randn(r, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
            b = (torch.randn(N, r, device="cuda") * r ** -0.5).to(torch.bfloat16)
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                errors: list[str] = []
                ms_ = {"ours_fused": _try(lambda: low_rank_matmul(x, a, b), M, "fused", errors),
                       "two_mm": _try(lambda: F.linear(F.linear(x, a), b), M, "two_mm", errors),
                       "compile": _try(lambda: compiled(x, a, b), M, "compile", errors),
                       "dense_mm": _try(lambda: F.linear(x, w), M, "dense", errors)}
                best = ms_["ours_fused"]
                nbytes = 2 * (r * (K + N) + M * (K + N))
                flops = 2 * M * r * (K + N)
                rows.append({"kind": "low_rank", "K": K, "N": N, "rank": r, "M": M, "ms": ms_,
                             "speedup_vs_dense": ms_["dense_mm"] / best if best and ms_["dense_mm"] else None,
                             "speedup_vs_two_mm": ms_["two_mm"] / best if best and ms_["two_mm"] else None,
                             "gbps": nbytes / best * 1e-6 if best else None,
                             "pct_copy": 100 * nbytes / best * 1e-6 / copy_gbps if best else None,
                             "tflops": flops / best * 1e-9 if best else None,
                             "pct_mm": 100 * flops / best * 1e-9 / mm_tflops if best else None,
                             "config": chosen_config(), "errors": errors})
                print(f"  low-rank K={K:5d} N={N:5d} r={r:4d} M={M:5d} " + "  ".join(
                    f"{k} {v:.4f}" if v else f"{k} -" for k, v in ms_.items()) + f"  {rows[-1]['config']}"
                      + (f"  errors: {errors}" if errors else ""))
    return rows


def sparse_rows(shapes, ms, copy_gbps) -> list[dict]:
    from llama_triton.compress.pruning import nm_mask, semi_structured_support

    ok, why = semi_structured_support("cuda")
    if not ok:
        print(f"  2:4 sparse rows skipped: {why}")
        return [{"kind": "sparse_2_4", "skipped": why}]
    rows = []
    for K, N in shapes:
        w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
        w = w * nm_mask(w.abs().float(), "2:4").to(w.dtype)
        errors: list[str] = []
        try:
            ws = torch.sparse.to_sparse_semi_structured(w)
        except Exception as e:  # noqa: BLE001
            rows.append({"kind": "sparse_2_4", "K": K, "N": N, "skipped": f"{type(e).__name__}: {e}"})
            continue
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ms_ = {"sparse_2_4": _try(lambda: F.linear(x, ws), M, "sparse", errors),
                   "dense_mm": _try(lambda: F.linear(x, w), M, "dense", errors)}
            sp, de = ms_["sparse_2_4"], ms_["dense_mm"]
            nbytes = 2 * (N * K // 2 + M * (K + N)) + N * K // 8          # values + 2-bit indices + x + y
            rows.append({"kind": "sparse_2_4", "K": K, "N": N, "M": M, "ms": ms_,
                         "speedup_vs_dense": de / sp if sp and de else None,
                         "gbps": nbytes / sp * 1e-6 if sp else None,
                         "pct_copy": 100 * nbytes / sp * 1e-6 / copy_gbps if sp else None, "errors": errors})
            print(f"  2:4      K={K:5d} N={N:5d} M={M:5d} " + "  ".join(
                f"{k} {v:.4f}" if v else f"{k} -" for k, v in ms_.items()) + (f"  errors: {errors}" if errors else ""))
    return rows


def _f(v, fmt="{:.4f}"):
    return fmt.format(v) if v is not None else "-"


def to_markdown(result: dict) -> str:
    lines = [f"# Compressed linears on {result['gpu']}", "",
             f"torch {result['torch']}, triton {result['triton']}, {result['date']}. Measured in the same run: copy "
             f"{result['copy_gbps']:.0f} GB/s, bf16 mm {result['mm_tflops']:.0f} TFLOP/s. bf16; medians in ms.", "",
             "| K | N | rank | M | fused ms | two mm ms | compile ms | dense mm ms | vs dense | vs two mm | GB/s | % copy "
             "| TFLOP/s | config |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] != "low_rank":
            continue
        m = r["ms"]
        lines.append(f"| {r['K']} | {r['N']} | {r['rank']} | {r['M']} | {_f(m['ours_fused'])} | {_f(m['two_mm'])} | "
                     f"{_f(m['compile'])} | {_f(m['dense_mm'])} | {_f(r['speedup_vs_dense'], '{:.2f}x')} | "
                     f"{_f(r['speedup_vs_two_mm'], '{:.2f}x')} | {_f(r['gbps'], '{:.0f}')} | "
                     f"{_f(r['pct_copy'], '{:.0f}%')} | {_f(r['tflops'], '{:.1f}')} | {r['config']} |")
    lines += ["", "| K | N | M | 2:4 sparse ms | dense mm ms | vs dense | GB/s | % copy |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] == "sparse_2_4" and "skipped" in r:
            lines.append(f"| {r.get('K', '-')} | {r.get('N', '-')} | - | skipped: {r['skipped']} | | | | |")
        elif r["kind"] == "sparse_2_4":
            m = r["ms"]
            lines.append(f"| {r['K']} | {r['N']} | {r['M']} | {_f(m['sparse_2_4'])} | {_f(m['dense_mm'])} | "
                         f"{_f(r['speedup_vs_dense'], '{:.2f}x')} | {_f(r['gbps'], '{:.0f}')} | {_f(r['pct_copy'], '{:.0f}%')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("speedup_vs_dense")]
    series = sorted({(r["kind"], r["K"], r["N"], r.get("rank")) for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind, K, N, rank in series:
        rs = [r for r in rows if (r["kind"], r["K"], r["N"], r.get("rank")) == (kind, K, N, rank)]
        label = f"{'low-rank r=' + str(rank) if kind == 'low_rank' else '2:4'} K={K} N={N}"
        ax.plot([str(r["M"]) for r in rs], [r["speedup_vs_dense"] for r in rs], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("M (rows)")
    ax.set_ylabel("speed-up over dense bf16 F.linear")
    ax.set_title(f"Compressed linears ({result['gpu']})")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(out_dir, quick: bool) -> int:
    if not torch.cuda.is_available():
        print("No CUDA device: Triton-interpreter timings are not performance figures; nothing written.")
        return 0
    from llama_triton import bench

    copy_gbps, mm_tflops = bench.measure_copy_bandwidth(), bench.measure_matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s, bf16 mm {mm_tflops:.0f} TFLOP/s")
    shapes = SHAPES[:2] if quick else SHAPES
    ms = [1, 16, 1024] if quick else M_DECODE + M_PREFILL
    rows = low_rank_rows(shapes, RANKS, ms, copy_gbps, mm_tflops) + sparse_rows(shapes, ms, copy_gbps)
    result = {**bench.environment(), "copy_gbps": copy_gbps, "mm_tflops": mm_tflops, "rows": rows}
    bench.write_results(result, "compress", to_markdown(result), out_dir, plot)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output directory (default benchmarks/results/<gpu>)")
    p.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16, 1024}")
    args = p.parse_args(argv)
    return run(args.out, args.quick)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
