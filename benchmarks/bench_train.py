"""Training benchmark (GPU, issue 16): tokens/s and peak memory of one training step (forward + backward +
AdamW step, bf16 autocast over fp32 master weights) for our LlamaForCausalLM vs transformers eager, SDPA and
a patched transformers model (hf.patch: our layers + the fused loss), in the same run; then the largest
batch x seq that fits for an 8B-shaped model with the fused loss vs transformers SDPA.

    python benchmarks/bench_train.py [--model llama-3.2-1b] [--seq 4096] [--batch 1] [--steps 5]
                                     [--fit-model llama-3-8b] [--no-fit] [--out DIR]
    python benchmarks/bench_train.py --smoke        # CPU (Triton interpreter), tiny preset: exercises the code

Random weights of the real shapes (no downloads). Goals (issue 16): ours >= 1.3x the tokens/s of transformers
(the better of eager and SDPA) and <= 0.6x its peak memory. Writes benchmarks/results/<gpu>/train.{json,md}.
Without CUDA (and without --smoke) it says so and writes nothing.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

if not torch.cuda.is_available():                    # the CPU smoke run needs the interpreter before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _ours(cfg, device):
    from llama_triton.model import LlamaForCausalLM

    return LlamaForCausalLM.random(cfg, dtype=torch.float32, device=device).train()


def _hf(cfg, device, attn, patched=False):
    import transformers

    from llama_triton import hf

    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = attn
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn).float().train()
    model.config.use_cache = False
    if patched:
        hf.patch(model)
    return model


def _step_fn(model, ids, device, hf_style):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda",
                            foreach=device.type != "cuda" or None)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with amp:
            out = model(input_ids=ids, labels=ids) if hf_style else model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()
    return step


def measure(name, build, ids, device, steps, hf_style) -> dict:
    """tokens/s (median step time over `steps` after 2 warm-up steps) and peak memory of a step."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model = build()
        step = _step_fn(model, ids, device, hf_style)
        for _ in range(2):
            step()
        times = []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss = step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        times.sort()
        sec = times[len(times) // 2]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        row = {"impl": name, "tokens_per_s": ids.numel() / sec, "step_ms": sec * 1e3, "peak_gib": peak,
               "loss": float(loss)}
    except torch.OutOfMemoryError:
        row = {"impl": name, "tokens_per_s": None, "step_ms": None, "peak_gib": None, "loss": None, "oom": True}
    del model
    return row


def largest_fit(build, device, seq, hf_style, max_batch=64) -> int:
    """Largest batch (doubling, then bisecting) whose training step at `seq` fits in memory (0: none)."""
    model = build()
    step = None

    def fits(b):
        nonlocal step
        gc.collect()
        torch.cuda.empty_cache()
        ids = torch.randint(0, model.config.vocab_size, (b, seq), device=device)
        try:
            _step_fn(model, ids, device, hf_style)()
            return True
        except torch.OutOfMemoryError:
            return False
    lo, hi = 0, 1
    while hi <= max_batch and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    del model
    return lo


def to_markdown(result) -> str:
    lines = [f"# Training step ({result['model']}, batch {result['batch']} x seq {result['seq']}, bf16 autocast, "
             f"fp32 weights, AdamW)", "", f"{result['env']}", "",
             "| impl | tokens/s | step ms | peak GiB | vs best transformers tok/s | vs its peak |", "|---|---|---|---|---|---|"]
    base = [r for r in result["rows"] if r["impl"].startswith("transformers") and r["tokens_per_s"]]
    best = max(base, key=lambda r: r["tokens_per_s"]) if base else None
    for r in result["rows"]:
        if not r["tokens_per_s"]:
            lines.append(f"| {r['impl']} | OOM | | | | |")
            continue
        rel = f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}x" if best else ""
        mem = f"{r['peak_gib'] / best['peak_gib']:.2f}x" if best and r["peak_gib"] else ""
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        lines.append(f"| {r['impl']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | {peak} | {rel} | {mem} |")
    if result.get("fit"):
        lines += ["", f"Largest batch at seq {result['seq']} that trains ({result['fit']['model']}): "
                  + ", ".join(f"{k} {v}" for k, v in result["fit"]["batch"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--fit-model", default="llama-3-8b")
    p.add_argument("--no-fit", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    from llama_triton.config import LlamaConfig

    if args.smoke:
        cfg, device = LlamaConfig.preset("tiny", num_hidden_layers=1), torch.device("cpu")
        args.seq, args.batch, args.steps, args.no_fit = 16, 1, 1, True
    elif not torch.cuda.is_available():
        print("bench_train: needs a CUDA GPU (or --smoke); nothing written")
        return 0
    else:
        cfg, device = LlamaConfig.preset(args.model), torch.device("cuda")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    impls = [("ours", lambda: _ours(cfg, device), False),
             ("transformers eager", lambda: _hf(cfg, device, "eager"), True),
             ("transformers sdpa", lambda: _hf(cfg, device, "sdpa"), True),
             ("transformers patched", lambda: _hf(cfg, device, "sdpa", patched=True), True)]
    rows = []
    for name, build, hf_style in impls:
        rows.append(measure(name, build, ids, device, args.steps, hf_style))
        print(rows[-1], flush=True)
    env = {"device": "cpu (smoke)"} if args.smoke else __import__("llama_triton.bench", fromlist=["x"]).environment()
    result = {"model": args.model if not args.smoke else "tiny", "seq": args.seq, "batch": args.batch, "rows": rows,
              "env": env}
    if not args.no_fit:
        fcfg = LlamaConfig.preset(args.fit_model)
        result["fit"] = {"model": args.fit_model, "batch": {
            "ours (fused loss)": largest_fit(lambda: _ours(fcfg, device), device, args.seq, False),
            "transformers sdpa": largest_fit(lambda: _hf(fcfg, device, "sdpa"), device, args.seq, True)}}
    md = to_markdown(result)
    print(md)
    if args.smoke:
        return 0
    from llama_triton.bench import write_results

    write_results(result, "train", md, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
