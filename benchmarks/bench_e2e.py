"""End-to-end benchmark (GPU, issue 8 section 4): our LlamaForCausalLM vs transformers eager and SDPA, same run.

    python benchmarks/bench_e2e.py [--models llama-3-8b,llama-3.2-1b] [--prompt-lens 2048,8192]
                                   [--decode-tokens 128] [--decode-mode graph|compile|eager] [--no-int4] [--out DIR]
    python benchmarks/bench_e2e.py --smoke      # CPU (Triton interpreter), tiny preset: exercises the code paths

Random bf16 weights of the real shapes (no downloads). Rows per model:
  * batch-1 decode tokens/s after a 512-token prompt: ours with the decode step captured in a CUDA graph
    (``--decode-mode graph``, default) or torch.compile(mode="reduce-overhead"), vs transformers eager and SDPA
    (``generate`` time minus its prefill); % of the weight-bandwidth limit (copy bandwidth measured in this run /
    weight bytes); ours int4 (RTN, group 128, ``llama_triton.quant.quantize_model``) the same way.
  * prefill tokens/s at each prompt length (one forward, logits of the last position), with TFLOP/s and % of
    a bf16 ``torch.mm`` measured in this run.
Goals (issue 8): decode >= 75% of the weight-bandwidth limit and >= 3x transformers eager; int4 >= 2x our bf16.
Anchors: gpt-fast / torchao, Llama-3.1-8B on an H100: 127 tok/s bf16, 241 tok/s int4.
Writes benchmarks/results/<gpu>/e2e.{json,md}. Without CUDA (and without --smoke) it says so and writes nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():                    # the CPU smoke run needs the interpreter before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llama_triton.generate import DecodeStep  # noqa: E402
from llama_triton.model import LlamaConfig, LlamaForCausalLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps: int = 3) -> float:
    """Median seconds of fn() over `reps` runs after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def weight_bytes(model) -> int:
    """Bytes read per decode step: every parameter and buffer of the layers and lm_head (embedding: 1 row)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "rotary_emb" in name:
            continue
        if name == "model.embed_tokens.weight" and not getattr(model.config, "tie_word_embeddings", False):
            total += t[0].numel() * t.element_size()
            continue
        total += t.numel() * t.element_size()
    return total


def copy_bandwidth(device) -> float:
    """GB/s of a 1 GiB device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    from llama_triton.bench import measure_copy_bandwidth

    return measure_copy_bandwidth()


def mm_tflops(device) -> float:
    if device.type != "cuda":
        return float("nan")
    from llama_triton.bench import measure_matmul_tflops

    return measure_matmul_tflops()


# ------------------------------------------------------------------------------------------------- ours
def ours_decode(model, prompt_len: int, n_tokens: int, mode: str) -> float:
    """Batch-1 decode tokens/s of our model after a `prompt_len` prefill, the step run per `mode`: "graph" (the
    library's CUDA-graph replay, generate()'s default on CUDA), "compile" (torch.compile reduce-overhead) or
    "eager"."""
    device = model.device
    caches = model.make_caches(1, prompt_len + n_tokens + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    step = DecodeStep(model, caches, compile=(mode == "compile"), cuda_graph=(mode == "graph" and device.type == "cuda"))

    def prefill():
        with torch.no_grad():
            model(ids, caches=caches, fresh_cache=True, logits_to_keep=1)
        caches[0].seqlens.fill_(prompt_len)                  # one seqlens for all layers

    def one():
        tok.copy_(step(tok).argmax(-1, keepdim=True))

    with torch.no_grad():
        prefill()
        for _ in range(3):                                    # warm-up: autotune / compile / graph capture
            one()
        prefill()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            one()
        _sync(device)
    return n_tokens / (time.perf_counter() - t0)


def ours_prefill(model, prompt_len: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=model.device)
    with torch.no_grad():
        secs = _time(lambda: model(ids, logits_to_keep=1), model.device)
    return prompt_len / secs


# ---------------------------------------------------------------------------------------- transformers
def hf_model(config: LlamaConfig, device, dtype):
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**config.to_hf_dict())
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="eager").eval()


def hf_prefill(model, prompt_len: int, device) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    with torch.no_grad():
        secs = _time(lambda: model(ids, use_cache=False, logits_to_keep=1), device)
    return prompt_len / secs


def hf_decode(model, prompt_len: int, n_tokens: int, device) -> float:
    """HF generate (its default dynamic cache) for n_tokens, minus the time of its prefill."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        t_gen = _time(lambda: model.generate(ids, max_new_tokens=n_tokens, min_new_tokens=n_tokens, **kw), device, 1)
        t_pre = _time(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw), device, 1)
    return (n_tokens - 1) / max(t_gen - t_pre, 1e-9)


# ------------------------------------------------------------------------------------------------ driver
def bench_model(name: str, args, device, dtype, copy_gbps: float, mm: float) -> list[dict]:
    config = LlamaConfig.preset(name, **({"num_hidden_layers": args.layers} if args.layers else {}))
    rows = []
    model = LlamaForCausalLM.random(config, dtype=dtype, device=device)
    wbytes = weight_bytes(model)
    limit = copy_gbps * 1e9 / wbytes if copy_gbps == copy_gbps else float("nan")   # tok/s bound (nan on CPU)
    n_params = sum(p.numel() for p in model.parameters())

    def add(kind, impl, length, tps, note=""):
        row = {"model": name, "kind": kind, "impl": impl, "tokens": length, "tokens_per_s": round(tps, 2)}
        if kind == "decode":
            row["pct_weight_bw_limit"] = round(100 * tps / limit, 1) if limit == limit else None
        else:
            flops = 2 * n_params * length + 2 * config.num_hidden_layers * config.num_attention_heads * \
                config.head_dim * length * length                       # causal attention ~ half of 4*s^2*h*d
            row["tflops"] = round(flops / (length / tps) * 1e-12, 1)
            row["pct_mm_roofline"] = round(100 * row["tflops"] / mm, 1) if mm == mm else None
        row["note"] = note
        rows.append(row)
        print(f"  {name:14s} {kind:7s} {impl:22s} {length:6d} tok  {tps:10.1f} tok/s  "
              f"{row.get('pct_weight_bw_limit', row.get('pct_mm_roofline'))}%", flush=True)

    print(f"{name}: {n_params / 1e9:.2f}B params, {wbytes / 1e9:.2f} GB read per decode step, "
          f"weight-bandwidth limit {limit:.1f} tok/s", flush=True)
    dt = str(dtype)[6:].replace("bfloat", "bf").replace("float", "fp")
    add("decode", f"ours {dt} ({args.decode_mode})", args.decode_tokens,
        ours_decode(model, args.decode_prompt, args.decode_tokens, args.decode_mode))
    for length in args.prompt_lens:
        add("prefill", f"ours {dt}", length, ours_prefill(model, length))
    if not args.no_int4:
        from llama_triton.quant import quantize_model

        quantize_model(model, bits=4, group_size=args.group_size)
        gc.collect()
        q_limit_bytes = weight_bytes(model)
        add("decode", f"ours int4 g{args.group_size} ({args.decode_mode})", args.decode_tokens,
            ours_decode(model, args.decode_prompt, args.decode_tokens, args.decode_mode),
            note=f"{q_limit_bytes / 1e9:.2f} GB/step")
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.no_hf:
        hf = hf_model(config, device, dtype)
        for attn in ("eager", "sdpa"):
            hf.set_attn_implementation(attn)
            add("decode", f"transformers {attn}", args.decode_tokens,
                hf_decode(hf, args.decode_prompt, args.decode_tokens, device))
            for length in args.prompt_lens:
                try:
                    add("prefill", f"transformers {attn}", length, hf_prefill(hf, length, device))
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append({"model": name, "kind": "prefill", "impl": f"transformers {attn}", "tokens": length,
                                 "tokens_per_s": None, "note": "out of memory"})
        del hf
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def to_markdown(result: dict) -> str:
    lines = [f"# End-to-end: {result['device']} ({result['dtype']})", "",
             f"copy bandwidth {result['copy_gbps']:.0f} GB/s, bf16 mm {result['mm_tflops']:.0f} TFLOP/s (this run); "
             f"decode after a {result['decode_prompt']}-token prompt, batch 1", "",
             "| model | kind | impl | tokens | tok/s | % roofline | note |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pct = r.get("pct_weight_bw_limit", r.get("pct_mm_roofline"))
        lines.append(f"| {r['model']} | {r['kind']} | {r['impl']} | {r['tokens']} | {r['tokens_per_s']} | "
                     f"{pct if pct is not None else ''} | {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama-3-8b,llama-3.2-1b")
    p.add_argument("--prompt-lens", default="2048,8192")
    p.add_argument("--decode-prompt", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-mode", choices=("graph", "compile", "eager"), default="graph")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (quick runs)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    p.add_argument("--no-int4", action="store_true")
    p.add_argument("--group-size", type=int, default=128, help="int4 quantization group size")
    p.add_argument("--out", help="output directory (default benchmarks/results/<gpu>)")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny preset, short lengths, nothing written")
    args = p.parse_args(argv)
    args.prompt_lens = [int(x) for x in args.prompt_lens.split(",") if x]
    cuda = torch.cuda.is_available()
    if args.smoke:
        args.models, args.prompt_lens, args.decode_prompt, args.decode_tokens = "tiny", [16], 8, 4
        args.group_size = 16
        args.decode_mode = "eager" if not cuda else args.decode_mode
    elif not cuda:
        print("bench_e2e: no CUDA device. Interpreter timings are not performance figures; nothing written "
              "(use --smoke to exercise the code paths on the tiny preset).")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    copy_gbps, mm = copy_bandwidth(device), mm_tflops(device)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args, device, dtype, copy_gbps, mm)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (interpreter smoke)", "dtype": str(dtype)[6:],
              "torch": torch.__version__, "copy_gbps": copy_gbps, "mm_tflops": mm,
              "decode_prompt": args.decode_prompt, "rows": rows}
    md = to_markdown(result)
    print(md)
    if args.smoke or not cuda:
        return 0
    from llama_triton.bench import gpu_slug

    out = Path(args.out) if args.out else RESULTS / gpu_slug()
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(result, indent=2))
    (out / "e2e.md").write_text(md)
    print(f"wrote {out / 'e2e.json'} and {out / 'e2e.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
