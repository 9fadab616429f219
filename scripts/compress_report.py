"""The compression quality report (issue 18): train the tiny model on CPU, compress it every way
llama_triton.compress knows, and write held-out perplexity vs weight bytes to
benchmarks/results/cpu-quality/quality.{json,md,png}.

    .venv/bin/python scripts/compress_report.py [--model DIR] [--steps 400] [--out DIR]

Without --model it trains the tiny preset (the demo model's shape: 2 layers, hidden 64, byte tokenizer) for
--steps AdamW steps on the text of Python's own pydoc_data.topics (ships with Python: nothing downloaded),
with the PyTorch reference backend (LLAMA_TRITON_BACKEND=torch: the Triton interpreter would only be slower;
the kernels have their own parity tests). The last 10% of the text is held out for perplexity.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("LLAMA_TRITON_BACKEND", "torch")   # before llama_triton is imported

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_triton.compress import calibration, report  # noqa: E402
from llama_triton.model import LlamaConfig, LlamaForCausalLM  # noqa: E402
from llama_triton.tokenizer import ByteTokenizer  # noqa: E402


def corpus_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """(train ids, held-out ids): pydoc_data.topics, byte-tokenised, split 90/10 by position."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = torch.tensor(ByteTokenizer().encode(text), dtype=torch.long)
    cut = int(0.9 * ids.numel())
    return ids[:cut], ids[cut:]


def train_tiny(train_ids: torch.Tensor, steps: int, seed: int = 0, batch: int = 16, seq_len: int = 128,
               lr: float = 3e-3) -> LlamaForCausalLM:
    """AdamW with linear warm-up and cosine decay on random windows of the training ids."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.preset("tiny")).init_weights(seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, train_ids.numel() - seq_len, (batch,), generator=g)
        x = torch.stack([train_ids[s:s + seq_len] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a trained HF-format model directory (default: train the tiny preset here)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--heldout-tokens", type=int, default=24576, help="held-out tokens scored (from the last 10%%)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-quality"))
    p.add_argument("--save-model", help="also save the trained model here (HF format; reuse it with --model)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    train_ids, heldout = corpus_ids()
    heldout = heldout[:args.heldout_tokens]
    t0 = time.perf_counter()
    if args.model:
        model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        source = f"model {args.model}"
    else:
        print(f"training the tiny preset for {args.steps} steps on pydoc_data.topics ({train_ids.numel()} tokens)")
        model = train_tiny(train_ids, args.steps)
        if args.save_model:
            model.save_pretrained(args.save_model)
        source = (f"tiny preset trained here: {args.steps} AdamW steps, batch 16 x 128 bytes, lr 3e-3 cosine, "
                  f"seed 0, on pydoc_data.topics (Python {sys.version.split()[0]}) minus the last 10%")
    batches = calibration.token_batches(train_ids, n_samples=32, seq_len=128, batch_size=8, seed=1)
    print("compressing and scoring:")
    rows = report.quality_report(model, heldout, batches)
    meta = {"model": source,
            "held-out": f"{heldout.numel()} byte tokens from the last 10% of the text, windows of 256, stride 128",
            "calibration": "32 windows of 128 tokens from the training split (Wanda, activation-aware SVD)",
            "bytes": "fp16 values (2 bytes) + real integer sizes; pruned layers in a bitmask / N:M index format "
                     "(llama_triton/compress/report.py); lm_head (tied or not) and embeddings count as model bytes",
            "backend": "LLAMA_TRITON_BACKEND=torch on CPU (numerics of the reference ops)",
            "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1)}
    report.write(rows, args.out, meta)
    print(report.markdown(rows))
    print(f"wrote {args.out}/quality.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
