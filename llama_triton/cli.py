"""The `llama-triton` command: verify, bench, demo, generate, eval, profile.

Triton's CPU interpreter must be switched on before triton is imported, so this module imports torch only
at the top and everything that defines kernels inside the subcommands, after `_select_runtime()`.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UserError(Exception):
    """A mistake in the command line (unknown op, missing file, bad preset): main prints one line, exits 2."""


def _check_op(name) -> None:
    """--op must name a registry op (call after _select_runtime: the registry imports triton)."""
    from . import registry

    names = [s.name for s in registry.REGISTRY]
    if name and name not in names:
        raise UserError(f"--op {name!r} is not a registered op; choose one of {', '.join(names)}")


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

    _check_op(args.op)
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

    _check_op(args.op)
    return bench.run(op=args.op, out_dir=args.out)


def cmd_inspect(args) -> int:
    """Static compiler facts per kernel and config for a target GPU (no GPU needed): llama_triton.inspect.
    Compiles real kernels, so it does not switch on the interpreter (under TRITON_INTERPRET=1 it uses a
    fresh process)."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from .inspect import main

    return main(op=args.op, shape=args.shape, dtype=args.dtype, arch=args.arch, json_path=args.json,
                backward=not args.no_backward)


# ---------------------------------------------------------------- model commands: demo, generate, eval, profile
def cmd_demo(args) -> int:
    """The main job: the embedded tiny model through the Triton kernels, parity table, generation."""
    _select_runtime()
    from . import demo

    return demo.run(prompt=args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed,
                    random_weights=args.random_weights)


def _load_model(args):
    """--model DIR (HF format) or --preset NAME (random weights), on CUDA when present, else CPU."""
    device = _select_runtime()
    from .model import LlamaConfig, LlamaForCausalLM

    from .checkpoint import CheckpointError

    dtype = DTYPE_NAMES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    if getattr(args, "model", None):
        if not os.path.isdir(args.model):
            raise UserError(f"--model {args.model}: no such directory")
        try:
            return LlamaForCausalLM.from_pretrained(args.model, dtype=dtype, device=device)
        except (CheckpointError, FileNotFoundError) as e:
            raise UserError("; ".join(str(e).splitlines())) from e
    overrides = {"num_hidden_layers": args.layers} if getattr(args, "layers", None) else {}
    try:
        config = LlamaConfig.preset(args.preset, **overrides)
    except ValueError as e:
        raise UserError(f"--preset: {e}") from e
    return LlamaForCausalLM.random(config, dtype=dtype, device=device)


def cmd_generate(args) -> int:
    _select_runtime()                         # before anything imports triton
    import time

    from .tokenizer import tokenizer_for_model

    model = _load_model(args)
    try:
        tok = tokenizer_for_model(args.model, model.config)
    except ValueError as e:
        raise UserError(str(e)) from e
    ids = torch.tensor([tok.encode(args.prompt)], device=model.device)
    print(args.prompt, end="", flush=True)
    printed = [ids.shape[1]]
    seq = ids[0].tolist()

    def stream(t):
        seq.append(int(t[0]))
        print(tok.decode(seq[printed[0]:]), end="", flush=True)
        printed[0] = len(seq)

    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, eos_token_id=tok.eos_token_id, streamer=stream)
    secs = time.perf_counter() - t0
    print(f"\n[{len(seq) - ids.shape[1]} tokens in {secs:.2f} s: {(len(seq) - ids.shape[1]) / secs:.2f} tokens/s]")
    return 0


def cmd_eval(args) -> int:
    _select_runtime()                         # before anything imports triton
    from .demo import Progress
    from .evaluate import perplexity
    from .tokenizer import tokenizer_for_model

    if not os.path.isfile(args.text):              # before the (slow) model load
        raise UserError(f"--text {args.text}: no such file")
    model = _load_model(args)
    try:
        tok = tokenizer_for_model(args.model, model.config)
    except ValueError as e:
        raise UserError(str(e)) from e
    with open(args.text, encoding="utf-8") as f:
        ids = tok.encode(f.read())
    bars = {}

    def progress(done, total):
        bars.setdefault("bar", Progress("windows", total))(done)

    res = perplexity(model, ids, max_length=args.max_length, stride=args.stride, progress=progress)
    print(f"perplexity {res.ppl:.4f} (nll {res.nll:.4f} nats/token) over {res.tokens} tokens, {res.windows} "
          f"windows of {args.max_length}; {res.tokens_per_s:.1f} tokens/s ({res.seconds:.2f} s)")
    return 0


def cmd_profile(args) -> int:
    _select_runtime()                         # before anything imports triton
    from . import profiling

    model = _load_model(args)
    if args.count:                            # launches and host syncs of one decode step, per layer
        profiling.print_counts(profiling.count_decode_step(model, batch=args.batch, prompt_len=args.prompt_len))
        return 0
    profiling.run(model, batch=args.batch, prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                  trace=args.trace)
    return 0


def cmd_compress(args) -> int:
    """Prune or factorize (then optionally quantize) a model and write a compressed checkpoint (issue 18)."""
    device = _select_runtime()                # before anything imports triton
    from .compress.cli import run

    try:
        return run(args, device)
    except (ValueError, OSError) as e:            # bad options, missing or unwritable paths: one line, exit 2
        raise UserError(str(e).splitlines()[0]) from e


def cmd_train(args) -> int:
    """llama_triton.train: one line and exit 2 for a missing file, an empty corpus, a bad length."""
    _select_runtime()                         # before anything imports triton
    from . import train

    try:
        return train.run_cli(args)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e).splitlines()[0]) from e


def _model_args(p, preset: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="HF-format model directory (config.json + safetensors)")
    if preset:
        g.add_argument("--preset", help="named config with random weights (tiny, llama-3-8b, ...)")
        p.add_argument("--layers", type=int, help="override num_hidden_layers (smaller --preset models)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="default: bfloat16 on CUDA, float32 on CPU")


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
    i = sub.add_parser("inspect", help="what the compiler made of each kernel for sm_90/sm_80 (static, no GPU)")
    i.add_argument("--op", help="only this registry op")
    i.add_argument("--shape", default="model", help="model (default: Llama-3-8B dims, few tokens) | bench | all | "
                   "test | k=v,... (with --op)")
    i.add_argument("--dtype", default="bfloat16", help="bfloat16 (default) | float16 | float32")
    i.add_argument("--arch", default="sm_90", help="sm_90 (H100, default) | sm_80 (A100) | local (this GPU)")
    i.add_argument("--json", help="also write the rows and estimates to this JSON file")
    i.add_argument("--no-backward", action="store_true", help="forward kernels only")
    i.set_defaults(func=cmd_inspect)
    d = sub.add_parser("demo", help="the main job: tiny model through the kernels, parity table, generation")
    d.add_argument("--prompt", default="Once upon a time")
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--random-weights", action="store_true",
                   help="random weights (seed) instead of the embedded trained model")
    d.set_defaults(func=cmd_demo)
    g = sub.add_parser("generate", help="generate text from a HF-format model directory")
    _model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.set_defaults(func=cmd_generate)
    e = sub.add_parser("eval", help="perplexity of a text file (sliding window) and tokens/s")
    _model_args(e)
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--max-length", type=int, default=512, help="window length (tokens)")
    e.add_argument("--stride", type=int, help="window step (default max-length / 2)")
    e.set_defaults(func=cmd_eval)
    pr = sub.add_parser("profile", help="torch.profiler over prefill + decode: time per kernel, Chrome trace")
    _model_args(pr, preset=True)
    pr.add_argument("--batch", type=int, default=1)
    pr.add_argument("--prompt-len", type=int, default=128)
    pr.add_argument("--decode-steps", type=int, default=8)
    pr.add_argument("--trace", default="profile_trace.json", help="Chrome trace output path")
    pr.add_argument("--count", action="store_true", help="count kernel launches and host syncs of one decode step "
                    "per layer instead (any device)")
    pr.set_defaults(func=cmd_profile)
    c = sub.add_parser("compress", help="prune (magnitude/Wanda, N:M) or factorize (SVD/activation-aware SVD) a model")
    c.add_argument("--model", help="HF-format model directory (default: the embedded demo model)")
    c.add_argument("--seed", type=int, default=0, help="demo model weights seed")
    c.add_argument("--method", required=True, choices=["magnitude", "wanda", "svd", "asvd"])
    c.add_argument("--sparsity", type=float, help="unstructured pruning: fraction of zeros in [0, 1) (default 0.5)")
    c.add_argument("--pattern", help="N:M pruning instead, e.g. 2:4 or 4:8")
    c.add_argument("--ratio", type=float, help="low-rank: parameter ratio per layer in (0, 1] (default 0.5)")
    c.add_argument("--energy", type=float, help="low-rank: rank keeping this fraction of the spectrum's energy")
    c.add_argument("--rank", type=int, help="low-rank: one rank for every layer")
    c.add_argument("--calib", help="calibration text file (default: Python's pydoc_data.topics)")
    c.add_argument("--calib-samples", type=int, default=16)
    c.add_argument("--calib-len", type=int, default=64)
    c.add_argument("--quantize", type=int, choices=[4, 8], help="then RTN-quantize the dense linears")
    c.add_argument("--group-size", type=int, default=-1, help="quantization group size (-1: per channel)")
    c.add_argument("--out", required=True, help="output directory")
    c.set_defaults(func=cmd_compress)
    t = sub.add_parser("train", help="train a model: packed data, AdamW, checkpoints, held-out perplexity")
    from .train import add_arguments as train_arguments   # torch only (no triton)

    train_arguments(t)
    t.set_defaults(func=cmd_train)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:                  # the user's mistake: one line, no traceback
        print(f"llama-triton {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
