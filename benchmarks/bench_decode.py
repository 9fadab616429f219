"""Decode attention benchmark (issue 5): split-K flash-decoding vs SDPA, torch eager and torch.compile.

    python benchmarks/bench_decode.py [--batch 1 8 64] [--contexts 1024 4096 8192 16384 32768] [--out DIR]

bf16, heads 32, heads_kv 8, head_dim 128, q_len 1 (one decode step). For each batch size one static cache
of ``max(contexts)`` entries is allocated (as a generate loop would) and every sequence is set to the
context length, so the kernel's split choice depends on the buffer size, not on the length, exactly as in
use. Every row, in the same run:

* ours: ``llama_triton.decode_attention`` on the cache (int32 cache_seqlens, no host sync);
* sdpa: ``F.scaled_dot_product_attention`` with q_len = 1 on views ``[:, :ctx]`` of the same cache
  (``enable_gqa=True``): the vendor path (flash / cuDNN / efficient, whichever torch picks);
* eager / compile: a plain-torch GQA decode (matmul, softmax, matmul in fp32) and its ``torch.compile``;
* flash_attn: ``flash_attn_with_kvcache`` when the flash-attn package is installed.

Reported: ``triton.testing.do_bench_cudagraph`` medians (ms: the kernels, not Python's launch overhead; plain
``do_bench`` for a call that cannot be captured), achieved GB/s on the K/V bytes of the valid prefix, the
percent of the device copy bandwidth measured in this run, and the speed-up over SDPA. Results go to
``benchmarks/results/<gpu>/decode_attention.{json,md,png}``. Without CUDA it says so and writes nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, HEADS_KV, HEAD_DIM = 32, 8, 128


def torch_decode(q, k, v):
    """Plain-torch GQA decode: q (b, 1, h, d), k/v (b, n, h_kv, d) -> (b, 1, h, d), fp32 math."""
    b, _, h, d = q.shape
    h_kv = k.shape[2]
    qf = q.float().view(b, h_kv, h // h_kv, d)                                # (b, h_kv, g, d)
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)             # (b, h_kv, n, d)
    p = torch.softmax(qf @ kf.transpose(-1, -2) * d ** -0.5, dim=-1)          # (b, h_kv, g, n)
    return (p @ vf).reshape(b, 1, h, d).to(q.dtype)


def sdpa_decode(q, k, v):
    """SDPA with q_len = 1 over (b, n, h_kv, d) cache views (transposed to (b, h_kv, n, d), not copied)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)
    return out.transpose(1, 2)


def bench_batch(batch, contexts, copy_gbps, do_bench, compile_torch=True):
    from llama_triton import decode_attention, reference
    from llama_triton.kernels.decode_attention import describe_config

    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
    max_seqlen = max(contexts)
    dt = torch.bfloat16
    k_cache = torch.randn(batch, max_seqlen, HEADS_KV, HEAD_DIM, dtype=dt, device="cuda")
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, dtype=dt, device="cuda")
    seqlens = torch.empty(batch, dtype=torch.int32, device="cuda")
    compiled = torch.compile(torch_decode, dynamic=False) if compile_torch else None
    rows = []
    for ctx in contexts:
        seqlens.fill_(ctx)
        k, v = k_cache[:, :ctx], v_cache[:, :ctx]
        ours = decode_attention(q, k_cache, v_cache, seqlens)
        ref = reference.decode_attention(q[:1], k_cache[:1], v_cache[:1], seqlens[:1])
        err = (ours[:1].float() - ref.float()).abs().max().item()
        impls = {"ours": lambda: decode_attention(q, k_cache, v_cache, seqlens), "sdpa": lambda: sdpa_decode(q, k, v),
                 "eager": lambda: torch_decode(q, k, v)}
        if compiled is not None:
            impls["compile"] = lambda: compiled(q, k, v)
        if flash_attn_with_kvcache is not None:
            impls["flash_attn"] = lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)
        ms = {}
        for name, fn in impls.items():
            try:
                ms[name] = do_bench(fn)
            except Exception as e:  # an optional comparison that cannot run here (e.g. out of memory)
                print(f"  {name} failed at batch={batch} ctx={ctx}: {type(e).__name__}: {e}")
        kv_bytes = 2 * batch * ctx * HEADS_KV * HEAD_DIM * k_cache.element_size()
        gbps = kv_bytes / ms["ours"] * 1e-6
        row = {"batch": batch, "context": ctx, "max_seqlen": max_seqlen, "ms": ms, "kv_bytes": kv_bytes,
               "gbps": gbps, "pct_copy": 100 * gbps / copy_gbps,
               "speedup_vs_sdpa": ms["sdpa"] / ms["ours"] if "sdpa" in ms else None,
               "max_abs_err_vs_reference": err,
               "config": describe_config(batch, 1, HEADS, HEADS_KV, HEAD_DIM, max_seqlen, torch.device("cuda"))}
        rows.append(row)
        others = " ".join(f"{n} {t:.4f}" for n, t in ms.items() if n != "ours")
        print(f"  b={batch:3d} ctx={ctx:6d} ours {ms['ours']:.4f} ms {gbps:6.0f} GB/s ({row['pct_copy']:5.1f}% copy) "
              f"x{row['speedup_vs_sdpa'] or float('nan'):.2f} vs sdpa | {others} | {row['config']}")
    del k_cache, v_cache
    torch.cuda.empty_cache()
    return rows


def to_markdown(result: dict) -> str:
    lines = [
        f"# Decode attention on {result['gpu']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, {result['date']}. bf16, heads {HEADS}, heads_kv "
        f"{HEADS_KV}, head_dim {HEAD_DIM}, q_len 1; one static cache of max_seqlen = {result['max_seqlen']} per "
        f"batch size. Copy bandwidth measured in this run: {result['copy_gbps']:.0f} GB/s. Times: "
        "`triton.testing.do_bench_cudagraph` medians (ms); GB/s on the K/V bytes of the valid prefix.",
        "",
        "| batch | context | ours ms | sdpa ms | eager ms | compile ms | flash_attn ms | ours GB/s | % copy | vs sdpa | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda ms, n: f"{ms[n]:.4f}" if n in ms else "-"  # noqa: E731
    for r in result["rows"]:
        ms = r["ms"]
        lines.append(f"| {r['batch']} | {r['context']} | {fmt(ms, 'ours')} | {fmt(ms, 'sdpa')} | {fmt(ms, 'eager')} | "
                     f"{fmt(ms, 'compile')} | {fmt(ms, 'flash_attn')} | {r['gbps']:.0f} | {r['pct_copy']:.0f}% | "
                     f"{r['speedup_vs_sdpa']:.2f}x | {r['config']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rows = [r for r in result["rows"] if r["batch"] == b]
        ctx = [r["context"] for r in rows]
        for impl in ("ours", "sdpa", "compile", "flash_attn"):
            if all(impl in r["ms"] for r in rows):
                ax.plot(ctx, [r["kv_bytes"] / r["ms"][impl] * 1e-6 for r in rows], marker="o", label=impl)
        ax.axhline(result["copy_gbps"], ls="--", c="gray", label="copy bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("context")
        ax.set_ylabel("K/V GB/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"decode attention, bf16, h {HEADS}/{HEADS_KV}, d {HEAD_DIM} on {result['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    p.add_argument("--out", help="output directory (default benchmarks/results/<gpu>)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: the decode benchmark needs a GPU (interpreter timings are not performance "
              "figures); nothing written.")
        return 0
    from llama_triton.bench import _do_bench, _do_bench_graph, environment, measure_copy_bandwidth, write_results

    def do_bench(fn):                           # decode-sized calls: time the kernels from a CUDA graph
        try:
            return _do_bench_graph(fn)
        except Exception:                       # not capturable (e.g. a compiled fallback that syncs)
            return _do_bench(fn)

    copy_gbps = measure_copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s")
    rows = []
    for b in args.batch:
        rows += bench_batch(b, sorted(args.contexts), copy_gbps, do_bench, compile_torch=not args.no_compile)
    result = {**environment(), "copy_gbps": copy_gbps, "max_seqlen": max(args.contexts), "rows": rows}
    write_results(result, "decode_attention", to_markdown(result), args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
