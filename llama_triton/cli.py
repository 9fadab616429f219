"""The `llama-triton` command: verify, bench, demo.

Triton's CPU interpreter must be switched on before triton is imported, so this module imports torch only
at the top and everything that defines kernels inside the subcommands, after `_select_runtime()`.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _select_runtime() -> str:
    """Use CUDA when present; otherwise run the kernels in Triton's interpreter. Returns the device."""
    if torch.cuda.is_available():
        return "cuda"
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("warning: triton was imported before the interpreter could be enabled", file=sys.stderr)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return "cpu"


def cmd_verify(args) -> int:
    """Every registry op against its reference on this device: a table, exit 1 on any failure."""
    device = _select_runtime()
    from . import backend, registry, testing

    print(backend.describe())
    dtypes = [DTYPE_NAMES[d] for d in args.dtype] if args.dtype else (
        [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else []))
    specs = [registry.get(args.op)] if args.op else registry.REGISTRY
    header = f"{'op':22s} {'shape':28s} {'dtype':9s} {'tensor':9s} {'max abs err':>12s} {'max rel err':>12s} {'bound':>10s}  pass"
    print(header)
    print("-" * len(header))
    failures = 0
    for spec in specs:
        for shape in spec.test_shapes:
            for dtype in dtypes:
                for c in testing.parity(spec, shape, dtype, device):
                    failures += not c.ok
                    print(f"{spec.name:22s} {spec.label(shape):28s} {str(dtype)[6:]:9s} {c.name:9s} "
                          f"{c.max_abs:12.3e} {c.max_rel:12.3e} {c.bound:10.3e}  {'PASS' if c.ok else 'FAIL'}")
    print(f"\n{'all passed' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


def cmd_bench(args) -> int:
    _select_runtime()
    from . import bench

    return bench.run(op=args.op, out_dir=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-triton", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every op against the PyTorch reference on this device")
    v.add_argument("--op", help="only this registry op")
    v.add_argument("--dtype", action="append", choices=sorted(DTYPE_NAMES), help="repeatable; default by device")
    v.set_defaults(func=cmd_verify)
    b = sub.add_parser("bench", help="benchmark ops vs torch eager and torch.compile (GPU)")
    b.add_argument("--op", help="only this registry op")
    b.add_argument("--out", help="output directory (default benchmarks/results/<gpu>)")
    b.set_defaults(func=cmd_bench)
    d = sub.add_parser("demo", help="the main job (for now: verify every op)")
    d.add_argument("--op", help=argparse.SUPPRESS)
    d.add_argument("--dtype", action="append", choices=sorted(DTYPE_NAMES), help=argparse.SUPPRESS)
    d.set_defaults(func=cmd_verify)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
