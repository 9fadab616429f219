"""Flash attention vs torch SDPA (its default backend, and forced to cuDNN), and flash-attn's flash_attn_func
when the flash-attn package is installed, forward and backward, in one run; on Hopper also our portable
forward (LLAMA_TRITON_FLASH_FWD=portable) next to the TMA one that "ours" selects.

    python benchmarks/bench_attention.py [--dtype bfloat16] [--head-dim 128] [--tokens 16384] [--heads 16]

Shapes: batch * seqlen = tokens, seqlen 512 .. 16k. TFLOP/s = 4 * b * h * s * s * d (halved for causal),
backward counted as 2.5x the forward. Each implementation gets its native layout (ours (b, s, h, d), SDPA
(b, h, s, d)). Results: benchmarks/results/<gpu>/attention.{json,md}. Without CUDA it only says so.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def _bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _sdpa_cudnn():
    """SDPA forced to the cuDNN backend (torch >= 2.3), or None where this torch has no such switch."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa
        backend = SDPBackend.CUDNN_ATTENTION
    except (ImportError, AttributeError):
        return None

    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=causal)
    return fn


def _flash_attn():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def _portable(fn):
    """fn with the portable forward forced (LLAMA_TRITON_FLASH_FWD=portable): the Hopper TMA path vs the
    pointer-load kernel in the same run (the backward is the same kernels either way)."""
    def run(*args):
        saved = os.environ.get("LLAMA_TRITON_FLASH_FWD")
        os.environ["LLAMA_TRITON_FLASH_FWD"] = "portable"
        try:
            return fn(*args)
        finally:
            if saved is None:
                del os.environ["LLAMA_TRITON_FLASH_FWD"]
            else:
                os.environ["LLAMA_TRITON_FLASH_FWD"] = saved
    return run


def _fwd_bwd(fn, args):
    args = [a.detach().requires_grad_() for a in args]
    fwd = lambda: fn(*args)  # noqa: E731
    out = fwd()
    dout = torch.randn_like(out)
    bwd = lambda: torch.autograd.grad(out, args, dout, retain_graph=True)  # noqa: E731
    return fwd, bwd


def run(dtype=torch.bfloat16, head_dim=128, tokens=16384, heads=16, seqlens=(512, 1024, 2048, 4096, 8192, 16384),
        out_dir: Path | None = None) -> list[dict]:
    from llama_triton import flash_attention
    from llama_triton.bench import gpu_slug
    from llama_triton.kernels.flash_attention import chosen_configs
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    cudnn, fa = _sdpa_cudnn(), _flash_attn()
    rows = []
    for causal in (True, False):
        for s in seqlens:
            b = max(tokens // s, 1)
            q, k, v = (torch.randn(b, s, heads, head_dim, dtype=dtype, device="cuda") for _ in range(3))
            impls = {
                "ours": (lambda q, k, v: flash_attention(q, k, v, causal=causal), (q, k, v)),
                "sdpa": (lambda q, k, v: sdpa(q, k, v, is_causal=causal),
                         tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))),
            }
            impls["ours_portable"] = (_portable(impls["ours"][0]), (q, k, v))   # = "ours" off Hopper
            if cudnn is not None:
                impls["sdpa_cudnn"] = (lambda q, k, v: cudnn(q, k, v, causal), impls["sdpa"][1])
            if fa is not None:                      # flash-attn's own layout is ours: (b, s, h, d)
                impls["flash_attn"] = (lambda q, k, v: fa(q, k, v, causal=causal), (q, k, v))
            flops = 4 * b * heads * s * s * head_dim / (2 if causal else 1)
            row = {"causal": causal, "batch": b, "seqlen": s, "heads": heads, "head_dim": head_dim,
                   "dtype": str(dtype).replace("torch.", ""), "ms": {}, "tflops": {}}
            for name, (fn, args) in impls.items():
                try:
                    fwd, bwd = _fwd_bwd(fn, args)
                except RuntimeError as e:                # e.g. cuDNN without a kernel for this shape/dtype
                    row.setdefault("skipped", {})[name] = str(e).splitlines()[0][:120]
                    continue
                for mode, f, mult in (("fwd", fwd, 1.0), ("bwd", bwd, 2.5)):
                    ms = _bench(f)
                    row["ms"][f"{name}_{mode}"] = ms
                    row["tflops"][f"{name}_{mode}"] = mult * flops / ms * 1e-9
            row["config"] = chosen_configs()
            rows.append(row)
            t = row["tflops"]
            print(f"{'causal' if causal else 'full  '} b={b:3d} s={s:6d}  fwd ours {t['ours_fwd']:6.1f} sdpa "
                  f"{t['sdpa_fwd']:6.1f} TFLOP/s ({t['ours_fwd'] / t['sdpa_fwd']:.2f}x)   bwd ours {t['ours_bwd']:6.1f} "
                  f"sdpa {t['sdpa_bwd']:6.1f} ({t['ours_bwd'] / t['sdpa_bwd']:.2f}x)   [{row['config']}]", flush=True)
            del q, k, v
    import triton

    out_dir = out_dir or Path(__file__).resolve().parent / "results" / gpu_slug()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    (out_dir / "attention.json").write_text(json.dumps(meta, indent=1))
    lines = [f"# Flash attention vs SDPA on {meta['gpu']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; TFLOP/s = 4bhs^2d (/2 causal), "
             "bwd 2.5x; `triton.testing.do_bench` medians.", "",
             "| causal | batch x seqlen | fwd ours | fwd sdpa | ratio | bwd ours | bwd sdpa | ratio | fwd / bwd "
             "sdpa cuDNN | fwd / bwd flash-attn | fwd ours portable | config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pair(t, name):
        return f"{t[name + '_fwd']:.1f} / {t[name + '_bwd']:.1f}" if name + "_fwd" in t else "n/a"
    for r in rows:
        t = r["tflops"]
        lines.append(f"| {r['causal']} | {r['batch']} x {r['seqlen']} | {t['ours_fwd']:.1f} | {t['sdpa_fwd']:.1f} | "
                     f"{t['ours_fwd'] / t['sdpa_fwd']:.2f}x | {t['ours_bwd']:.1f} | {t['sdpa_bwd']:.1f} | "
                     f"{t['ours_bwd'] / t['sdpa_bwd']:.2f}x | {pair(t, 'sdpa_cudnn')} | {pair(t, 'flash_attn')} | "
                     f"{t.get('ours_portable_fwd', float('nan')):.1f} | {r['config']} |")
    (out_dir / "attention.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'attention.md'}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: interpreter timings are not performance figures; nothing to benchmark.")
        return 0
    run(getattr(torch, a.dtype), a.head_dim, a.tokens, a.heads, tuple(a.seqlens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
