"""MoE experts benchmark (GPU): ``llama_triton.moe_experts`` (grouped GEMMs over expert-sorted tokens) vs the
per-expert loop in eager PyTorch (transformers' ``MixtralExperts.forward``), that loop under ``torch.compile``,
and transformers' own ``"grouped_mm"`` (``torch._grouped_mm``) and ``"batched_mm"`` experts, in the same run.

    python benchmarks/bench_moe.py [--out DIR] [--quick] [--backward]

Expert shapes: Mixtral-8x7B (H 4096, I 14336, 8 experts, top-2) and Qwen3-30B-A3B (H 2048, I 768, 128 experts,
top-8), bf16, tokens 1..8192, Mixtral routing of random router logits. Reports ``triton.testing.do_bench``
medians (ms; ours at <= 16 tokens also under ``do_bench_cudagraph``, where launch overhead would dominate),
TFLOP/s (6 * tokens * top_k * H * I per forward) with % of a bf16 mm measured in the same run, and at small
token counts the weight bandwidth: bytes of the experts actually selected (3 * H * I each) per second and
% of the measured copy bandwidth. Issue-17 targets (Mixtral shapes, 8 experts top-2): >= 5x the eager loop,
>= 1.0x the compiled loop. ``--backward`` adds forward+backward times (ours, eager loop, grouped_mm).
Writes ``benchmarks/results/<gpu>/moe.{json,md,png}``. Without CUDA it prints that interpreter timings are
not performance figures and writes nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

MODELS = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
TOKENS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096, 8192]
QUICK_TOKENS = [1, 16, 1024, 8192]
BATCHED_MM_MAX_BYTES = 16 << 30      # batched_mm gathers one weight copy per (token, k) pair: skip beyond this


def eager_loop(x, gate_up_proj, down_proj, ids, weights):
    """transformers 5's eager experts loop (MixtralExperts.forward), verbatim in spirit."""
    out = torch.zeros_like(x)
    with torch.no_grad():
        mask = F.one_hot(ids, num_classes=gate_up_proj.shape[0]).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        slot, tok = torch.where(mask[e])
        gate, up = F.linear(x[tok], gate_up_proj[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down_proj[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out


def _hf_experts(gate_up_proj, down_proj):
    """A stand-in `self` for transformers' experts functions (the attributes they read)."""
    def apply_gate(gu):
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up
    return SimpleNamespace(gate_up_proj=gate_up_proj, down_proj=down_proj, num_experts=gate_up_proj.shape[0],
                           has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True,
                           has_post_expert_norm=False, _is_expert_parallel=False, act_fn=F.silu,
                           _apply_gate=apply_gate)


def _target(model: str, speedup_eager, speedup_compile):
    if not model.startswith("mixtral"):
        return "", None
    ok = speedup_eager is not None and speedup_eager >= 5 and (speedup_compile is None or speedup_compile >= 1.0)
    return ">=5x eager, >=1.0x compile", ok


def _try(fn, label):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  an optional comparison (unsupported, out of memory)
        print(f"    {label} failed: {type(e).__name__}: {str(e)[:120]}")
        torch.cuda.empty_cache()
        return None


def _fwd_bwd(fn, args, grad_idx):
    leaves = [a.detach().requires_grad_(i in grad_idx) if a.is_floating_point() else a for i, a in enumerate(args)]
    dy = torch.randn_like(leaves[0])

    def step():
        for i in grad_idx:
            leaves[i].grad = None
        fn(*leaves).backward(dy)
    return step


def run(out_dir: Path | None, quick: bool, backward: bool) -> int:
    if not torch.cuda.is_available():
        print("No CUDA device: Triton-interpreter timings are not performance figures; nothing written.")
        return 0
    import triton.testing
    from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward

    from llama_triton import bench
    from llama_triton.kernels.moe import chosen_configs
    from llama_triton.ops.moe import moe_experts, route

    copy_gbps, mm_tflops = bench.measure_copy_bandwidth(), bench.measure_matmul_tflops()
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s, bf16 mm {mm_tflops:.0f} TFLOP/s")
    compiled_loop = torch.compile(eager_loop)
    rows = []
    for model, (H, inter, E, k) in MODELS.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        gu = (torch.randn(E, 2 * inter, H, device="cuda", generator=gen) * H ** -0.5).to(torch.bfloat16)
        down = (torch.randn(E, H, inter, device="cuda", generator=gen) * inter ** -0.5).to(torch.bfloat16)
        hf_self = _hf_experts(gu, down)
        for T in (QUICK_TOKENS if quick else TOKENS):
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
            weights, ids = route(torch.randn(T, E, device="cuda", generator=gen), k)
            args = (x, gu, down, ids, weights)
            ms = {"ours": bench._do_bench(lambda: moe_experts(*args))}
            config = chosen_configs()
            if T <= 16:
                ms["ours_cudagraph"] = _try(lambda: triton.testing.do_bench_cudagraph(lambda: moe_experts(*args)),
                                            "cudagraph")
            ms["eager_loop"] = _try(lambda: bench._do_bench(lambda: eager_loop(*args)), "eager loop")
            ms["compiled_loop"] = _try(lambda: bench._do_bench(lambda: compiled_loop(*args)), "compiled loop")
            ms["hf_grouped_mm"] = _try(lambda: bench._do_bench(
                lambda: grouped_mm_experts_forward(hf_self, x, ids, weights)), "grouped_mm")
            if T * k * 3 * H * inter * 2 <= BATCHED_MM_MAX_BYTES:
                ms["hf_batched_mm"] = _try(lambda: bench._do_bench(
                    lambda: batched_mm_experts_forward(hf_self, x, ids, weights)), "batched_mm")
            if backward:
                grad_idx = (0, 1, 2, 4)
                ms["ours_fwd_bwd"] = _try(lambda: bench._do_bench(_fwd_bwd(moe_experts, args, grad_idx)), "ours bwd")
                ms["eager_loop_fwd_bwd"] = _try(lambda: bench._do_bench(_fwd_bwd(eager_loop, args, grad_idx)),
                                                "eager bwd")
                ms["hf_grouped_mm_fwd_bwd"] = _try(lambda: bench._do_bench(_fwd_bwd(
                    lambda x_, g_, d_, i_, w_: grouped_mm_experts_forward(_hf_experts(g_, d_), x_, i_, w_),
                    args, grad_idx)), "grouped_mm bwd")
            ms = {n: v for n, v in ms.items() if v is not None}
            best = min(ms["ours"], ms.get("ours_cudagraph", ms["ours"]))
            n_selected = int(torch.unique(ids).numel())                            # host sync: outside timing
            weight_gbps = n_selected * 3 * H * inter * 2 / best * 1e-6
            tflops = 6 * T * k * H * inter / best * 1e-9
            sp_eager = ms["eager_loop"] / ms["ours"] if "eager_loop" in ms else None
            sp_compile = ms["compiled_loop"] / ms["ours"] if "compiled_loop" in ms else None
            target, met = _target(model, sp_eager, sp_compile)
            row = {"model": model, "tokens": T, "hidden": H, "inter": inter, "experts": E, "top_k": k, "ms": ms,
                   "experts_selected": n_selected, "weight_gbps": weight_gbps, "pct_copy": 100 * weight_gbps / copy_gbps,
                   "tflops": tflops, "pct_mm": 100 * tflops / mm_tflops, "speedup_vs_eager": sp_eager,
                   "speedup_vs_compile": sp_compile, "config": config, "target": target, "target_met": met}
            rows.append(row)
            print(f"  {model:14s} T={T:5d} " + " ".join(f"{n} {v:.4f}" for n, v in ms.items())
                  + f"  {tflops:6.1f} TFLOP/s  {weight_gbps:6.0f} GB/s weights ({row['pct_copy']:.0f}% copy)  "
                  + f"{target} {'' if met is None else ('MET' if met else 'MISSED')}")
    result = {**bench.environment(), "copy_gbps": copy_gbps, "mm_tflops": mm_tflops, "rows": rows}
    bench.write_results(result, "moe", to_markdown(result), out_dir, plot)
    return 0


_COLUMNS = ["ours", "ours_cudagraph", "eager_loop", "compiled_loop", "hf_grouped_mm", "hf_batched_mm",
            "ours_fwd_bwd", "eager_loop_fwd_bwd", "hf_grouped_mm_fwd_bwd"]


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def to_markdown(result: dict) -> str:
    cols = [c for c in _COLUMNS if any(c in r["ms"] for r in result["rows"])]
    lines = [
        f"# MoE experts on {result['gpu']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, {result['date']}. Measured in the same run: copy "
        f"{result['copy_gbps']:.0f} GB/s, bf16 mm {result['mm_tflops']:.0f} TFLOP/s. bf16, Mixtral routing of random "
        "logits; `triton.testing.do_bench` medians (ms), `ours_cudagraph`: `do_bench_cudagraph`. Weight GB/s: the "
        "selected experts' 3*H*I weights per second (ours, the faster of plain and cudagraph at <= 16 tokens).",
        "",
        "| model | tokens | " + " | ".join(f"{c} ms" for c in cols)
        + " | vs eager | vs compile | TFLOP/s | % mm | weight GB/s | % copy | config | target |",
        "|---|---|" + "---|" * len(cols) + "---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        met = "" if r["target_met"] is None else (" met" if r["target_met"] else " MISSED")
        lines.append(
            f"| {r['model']} | {r['tokens']} | " + " | ".join(_fmt(r["ms"].get(c)) for c in cols)
            + f" | {_x(r['speedup_vs_eager'])} | {_x(r['speedup_vs_compile'])} | "
            f"{r['tflops']:.1f} | {r['pct_mm']:.0f}% | {r['weight_gbps']:.0f} | {r['pct_copy']:.0f}% | {r['config']} | "
            f"{r['target']}{met} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in result["rows"]})
    fig, axes = plt.subplots(len(models), 1, figsize=(8, 3.5 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        rs = [r for r in result["rows"] if r["model"] == model]
        for c in ("ours", "eager_loop", "compiled_loop", "hf_grouped_mm", "hf_batched_mm"):
            pts = [(r["tokens"], r["ms"][c]) for r in rs if c in r["ms"]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{model} experts, bf16 ({result['gpu']})")
        ax.set_xlabel("tokens")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output directory (default benchmarks/results/<gpu>)")
    p.add_argument("--quick", action="store_true", help=f"tokens in {QUICK_TOKENS}")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    args = p.parse_args(argv)
    return run(args.out, args.quick, args.backward)


if __name__ == "__main__":
    sys.exit(main())
