"""``llama-triton compress``: prune or factorize a model (the embedded demo model or an HF-format directory),
optionally quantize it, print the per-layer report and the sizes, and write a compressed checkpoint
(``checkpoint.save_compressed``; load it with ``llama_triton.compress.load_compressed``)."""
from __future__ import annotations

import time

import torch

from .. import backend
from ..tokenizer import ByteTokenizer, tokenizer_for_model
from . import calibration, low_rank, pruning, report
from .checkpoint import save_compressed

PRUNE, FACTOR = ("magnitude", "wanda"), ("svd", "asvd")


class UsageError(ValueError):
    """A bad combination of command-line options (printed as one line by the CLI)."""


def _calibration_text(path) -> str:
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    from pydoc_data.topics import topics     # ships with Python: nothing to download

    return "\n\n".join(topics[k] for k in sorted(topics))


def _load(args, device):
    from ..model import LlamaConfig, LlamaForCausalLM

    if args.model:
        model = LlamaForCausalLM.from_pretrained(args.model, device=device)
        return model, tokenizer_for_model(args.model, model.config), args.model
    from .. import embedded

    if embedded.available():     # the trained demo model shipped in the package (byte tokenizer)
        return (embedded.load_embedded(device=device), ByteTokenizer(),
                "embedded demo model (llama_triton/assets/pydoc_tiny)")
    model = LlamaForCausalLM(LlamaConfig.preset("tiny")).init_weights(seed=args.seed).to(device).eval()
    return model, ByteTokenizer(), f"demo model (tiny preset, random weights seed {args.seed}: package data missing)"


def _check(args) -> None:
    if args.method in PRUNE:
        if args.ratio is not None or args.energy is not None or args.rank is not None:
            raise UsageError(f"--method {args.method} prunes: use --sparsity or --pattern, not --ratio/--energy/--rank")
        if args.pattern is not None:
            pruning.parse_pattern(args.pattern)
        else:
            pruning.check_sparsity(0.5 if args.sparsity is None else args.sparsity)
    else:
        if args.sparsity is not None or args.pattern is not None:
            raise UsageError(f"--method {args.method} factorizes: use --ratio, --energy or --rank, not --sparsity/--pattern")
        if sum(v is not None for v in (args.ratio, args.energy, args.rank)) > 1:
            raise UsageError("give one of --ratio, --energy, --rank")


def run(args, device: str) -> int:
    """Run the command; raises UsageError / ValueError for bad options (the CLI prints one line)."""
    _check(args)
    t0 = time.perf_counter()
    print(backend.describe())
    model, tok, source = _load(args, device)
    print(f"model: {source}")
    before_lin, before = report.model_size(model)
    batches = None
    if args.method in ("wanda", "asvd"):
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos and args.calib_len > max_pos:
            raise UsageError(f"--calib-len {args.calib_len} is longer than the model's max_position_embeddings "
                             f"{max_pos}")
        ids = tok.encode(_calibration_text(args.calib))
        batches = calibration.token_batches(ids, args.calib_samples, args.calib_len, batch_size=4, device=model.device)
        print(f"calibration: {args.calib_samples} windows of {args.calib_len} tokens from "
              f"{args.calib or 'pydoc_data.topics'}")
    info = {"method": args.method, "source": source}
    sparse = None
    if args.method in PRUNE:
        sparsity = 0.5 if args.sparsity is None and args.pattern is None else args.sparsity
        rep = pruning.prune_model(model, args.method, sparsity=sparsity, pattern=args.pattern, calibration=batches)
        print(pruning.format_report(rep))
        sparse = args.pattern or "unstructured"
        info.update(sparsity=sparsity, pattern=args.pattern,
                    layers_sparsity={r.name: r.sparsity for r in rep})
    else:
        ratio = 0.5 if args.ratio is None and args.energy is None and args.rank is None else args.ratio
        rep = low_rank.factorize_model(model, args.method, rank=args.rank, ratio=ratio, energy=args.energy,
                                       calibration=batches)
        print(low_rank.format_report(rep))
        info.update(ratio=ratio, energy=args.energy, rank=args.rank,
                    ranks={r.name: r.rank for r in rep})
    if args.quantize:
        from ..quant import quantize_model

        quantize_model(model, bits=args.quantize, group_size=args.group_size)
        info.update(quantize_bits=args.quantize, group_size=args.group_size)
        sparse = None
    after_lin, after = report.model_size(model, sparse)
    print(f"linear layers: {before_lin.bytes:,} -> {after_lin.bytes:,} bytes ({100 * after_lin.bytes / before_lin.bytes:.1f}%); "
          f"whole model {before.bytes:,} -> {after.bytes:,} bytes ({100 * after.bytes / before.bytes:.1f}%) "
          "(fp16 values, compact sparse formats: llama_triton/compress/report.py)")
    with torch.no_grad():
        prompt = torch.tensor([tok.encode("def ")], device=model.device)
        out = model.generate(prompt, max_new_tokens=8)
    print(f"generate check: {tok.decode(out[0, prompt.shape[1]:])!r}")
    save_compressed(model, args.out, info)
    print(f"wrote {args.out} (config.json, model.safetensors, compression.json) in {time.perf_counter() - t0:.1f} s")
    return 0
