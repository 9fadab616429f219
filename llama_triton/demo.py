"""`llama-triton demo`: the embedded tiny model (the tiny preset trained with llama_triton.train on Python's
pydoc_data help topics, byte tokenizer: llama_triton.embedded) run through the Triton kernels (Triton's
interpreter on a CPU): a per-op parity table against the PyTorch reference, a whole-model check against an
fp64 reference run, then text generation with tokens/s. It prints the model's held-out perplexity from its
training run. ``random_weights=True`` (or a package installed without its data) uses deterministic random
weights instead, which generate gibberish.

A ~125k-parameter byte-level model trained for minutes on a CPU writes pydoc-flavoured English with many
real words, not fluent prose.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from . import backend, reference, testing
from .config import LlamaConfig
from .layers import RotaryEmbedding, SwiGLUMLP
from .model import LlamaForCausalLM
from .ops.decode_attention import decode_attention
from .ops.flash_attention import flash_attention
from .ops.rms_norm import rms_norm
from .ops.rope import apply_rotary_pos_emb
from .tokenizer import ByteTokenizer


class Progress:
    """A one-line progress bar on stderr: Progress("decode", total)(done)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.t0 = label, total, time.perf_counter()
        self.stream = stream or sys.stderr

    def __call__(self, done: int, extra: str = "") -> None:
        if not (self.stream.isatty() or done >= self.total):   # redirected output: the final line only
            return
        width = 30
        filled = int(width * done / max(self.total, 1))
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        end = "\n" if done >= self.total else ""
        start = "\r" if self.stream.isatty() else ""
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"{start}  {self.label:8s} [{bar}] {done}/{self.total} {rate:6.2f}/s {extra}{end}")
        self.stream.flush()


def _impl(device) -> str:
    """What the ops run on tensors of `device`: the Triton kernels, or (fallback) the PyTorch reference."""
    if not backend.use_triton(torch.empty(0, device=device)):
        return "torch-reference"
    return "triton-interp" if device.type == "cpu" else "triton"


def op_checks(config, device, dtype, on_row=None) -> list[tuple]:
    """(op, implementation, shape, max abs err, bound, ok) for each op the model uses, on the model's shapes,
    under the 2x rule against an fp64 oracle (llama_triton.testing.compare). on_row(row) as each finishes."""
    g = torch.Generator().manual_seed(0)
    b, s, hid, d = 2, 16, config.hidden_size, config.head_dim
    h, hkv = config.num_attention_heads, config.num_key_value_heads

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    rows = []

    def check(label, shape, fn, ref_fn, args):
        ours = testing.as_tuple(fn(*args))
        low = testing.as_tuple(ref_fn(*args))
        hi = testing.as_tuple(ref_fn(*testing.to_oracle(args)))
        cs = [testing.compare(label, o, l, r) for o, l, r in zip(ours, low, hi)]
        worst = max(cs, key=lambda c: c.max_abs / c.bound)
        rows.append((label, _impl(device), shape, worst.max_abs, worst.bound, all(c.ok for c in cs)))
        if on_row is not None:
            on_row(rows[-1])

    x, w = rnd(b * s, hid), (1 + 0.1 * rnd(hid))
    check("rms_norm", f"({b * s}, {hid})", lambda x, w: rms_norm(x, w, 1e-5),
          lambda x, w: reference.rms_norm(x, w, 1e-5), (x, w))
    check("add_rms_norm", f"({b * s}, {hid})", lambda x, r, w: rms_norm(x, w, 1e-5, r),
          lambda x, r, w: reference.rms_norm(x, w, 1e-5, r), (x, rnd(b * s, hid), w))
    q, k = rnd(b, h, s, d), rnd(b, hkv, s, d)
    pos = torch.arange(s, device=device)[None].expand(b, s)
    cos, sin = RotaryEmbedding(config, device=device)(q, pos)
    check("rotary", f"q ({b}, {h}, {s}, {d})", apply_rotary_pos_emb, reference.apply_rotary_pos_emb, (q, k, cos, sin))
    qf, kf, vf = rnd(b, s, h, d), rnd(b, s, hkv, d), rnd(b, s, hkv, d)
    check("flash_attention", f"({b}, {s}, {h}/{hkv}, {d})", lambda q, k, v: flash_attention(q, k, v, causal=True),
          lambda q, k, v: reference.attention(q, k, v, causal=True), (qf, kf, vf))
    kc, vc = rnd(b, 2 * s, hkv, d), rnd(b, 2 * s, hkv, d)
    lens = torch.tensor([s, 2 * s - 3], dtype=torch.int32, device=device)
    check("decode_attention", f"q ({b}, 1, {h}, {d}) cache {2 * s}", lambda q, k, v: decode_attention(q, k, v, lens),
          lambda q, k, v: reference.decode_attention(q, k, v, lens), (rnd(b, 1, h, d), kc, vc))
    mlp = SwiGLUMLP(config).to(device=device, dtype=dtype)
    wg, wu, wd = (getattr(mlp, n).weight.detach() for n in ("gate_proj", "up_proj", "down_proj"))

    def ref_mlp(x):                                   # HF LlamaMLP in x's precision
        return F.linear(F.silu(F.linear(x, wg.to(x.dtype))) * F.linear(x, wu.to(x.dtype)), wd.to(x.dtype))

    with torch.no_grad():
        check("swiglu_mlp", f"({b * s}, {hid}) -> {config.intermediate_size}", mlp, ref_mlp,
              (rnd(b * s, hid),))
    return rows


def reference_forward(model, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The model's logits computed independently in plain PyTorch (llama_triton.reference ops + torch) in
    `dtype` (float64: the oracle). ids (b, s) -> (b, s, vocab)."""
    c = model.config
    p = {n: t.detach().to(dtype) for n, t in model.named_parameters()}
    b, s = ids.shape
    x = F.embedding(ids, p["model.embed_tokens.weight"])                                # (b, s, hidden)
    pos = torch.arange(s, device=ids.device)[None].expand(b, s)
    cos, sin = RotaryEmbedding(c, device=ids.device)(x, pos)                            # (b, s, head_dim)
    for i in range(c.num_hidden_layers):
        w = lambda n: p[f"model.layers.{i}.{n}"]                                        # noqa: E731
        h = reference.rms_norm(x, w("input_layernorm.weight"), c.rms_norm_eps)
        q = F.linear(h, w("self_attn.q_proj.weight")).view(b, s, -1, c.head_dim)        # (b, s, h, d)
        k = F.linear(h, w("self_attn.k_proj.weight")).view(b, s, -1, c.head_dim)        # (b, s, h_kv, d)
        v = F.linear(h, w("self_attn.v_proj.weight")).view(b, s, -1, c.head_dim)
        q, k = reference.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        a = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v, causal=True)   # (b, s, h, d)
        x = x + F.linear(a.reshape(b, s, -1), w("self_attn.o_proj.weight"))
        h = reference.rms_norm(x, w("post_attention_layernorm.weight"), c.rms_norm_eps)
        x = x + F.linear(F.silu(F.linear(h, w("mlp.gate_proj.weight"))) * F.linear(h, w("mlp.up_proj.weight")),
                         w("mlp.down_proj.weight"))
    x = reference.rms_norm(x, p["model.norm.weight"], c.rms_norm_eps)
    return F.linear(x, p.get("lm_head.weight", p["model.embed_tokens.weight"]))


def model_check(model, ids) -> tuple[float, float, bool]:
    """Our model (Triton kernels) vs an independent plain-PyTorch forward of the same weights, in the
    model's dtype and in fp64 (the oracle). Returns (our max abs logit err, PyTorch's, ok by the 2x rule)."""
    with torch.no_grad():
        ours = model(ids).logits
        low = reference_forward(model, ids, model.dtype)
        hi = reference_forward(model, ids, torch.float64)
    c = testing.compare("logits", ours, low, hi)
    return c.max_abs, c.torch_abs, c.ok


def run(prompt: str = "Once upon a time", max_new_tokens: int = 24, seed: int = 0, temperature: float = 0.8,
        out=None, random_weights: bool = False) -> int:
    out = out or sys.stdout
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    print(backend.describe(), file=out)
    from . import embedded

    if random_weights or not embedded.available():
        config = LlamaConfig.preset("tiny")
        model = LlamaForCausalLM(config).init_weights(seed=seed).to(device).eval()
        weights = f"random weights seed {seed}"
    else:
        model = embedded.load_embedded(device=device)
        config, info = model.config, embedded.embedded_info()
        weights = (f"trained on Python's pydoc_data topics, {info.get('steps')} steps, held-out perplexity "
                   f"{info.get('held_out_ppl', float('nan')):.3f}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: tiny preset ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, vocab {config.vocab_size}, "
          f"{n_params / 1e3:.0f}k parameters, {weights}), {str(dtype)[6:]} on {device}", file=out)

    print("\nper-op parity vs llama_triton.reference (model shapes; fp64 oracle, 2x rule):", file=out)
    header = f"{'op':18s} {'runs':14s} {'shape':28s} {'max abs err':>12s} {'bound':>10s}  pass"
    print(header + "\n" + "-" * len(header), file=out)

    def show(row):
        label, impl, shape, err, bound, ok = row
        print(f"{label:18s} {impl:14s} {shape:28s} {err:12.3e} {bound:10.3e}  {'PASS' if ok else 'FAIL'}", file=out,
              flush=True)

    rows = op_checks(config, device, dtype, on_row=show)
    failures = sum(not r[-1] for r in rows)
    if rows and rows[0][1] == "torch-reference":
        print("note: Triton cannot run here, so every op fell back to the PyTorch reference (see backend line)",
              file=out)

    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode(prompt)], device=device)
    err, ref_err, ok = model_check(model, ids)
    failures += not ok
    print(f"\nwhole model, {ids.shape[1]} tokens: max |logit err| {err:.3e} vs fp64 reference "
          f"(PyTorch fp32: {ref_err:.3e})  {'PASS' if ok else 'FAIL'}", file=out)

    print(f"\ngenerating {max_new_tokens} tokens after {prompt!r} (greedy, then sampled at T={temperature}):", file=out)
    texts = {}
    for label, temp in (("greedy", 0.0), ("sampled", temperature)):
        bar = Progress(label, max_new_tokens)
        count = [0]

        def stream(t, count=count, bar=bar):
            count[0] += 1
            bar(count[0])

        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids[:, :1], max_new_tokens=1)                       # warm-up (kernel compile)
            t1 = time.perf_counter()
            res = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temp, top_k=50,
                                 generator=torch.Generator(device=device).manual_seed(seed), streamer=stream)
        secs = time.perf_counter() - t1
        texts[label] = (tok.decode(res[0, ids.shape[1]:]), max_new_tokens / secs, time.perf_counter() - t0)
    for label, (text, tps, _) in texts.items():
        print(f"  {label:8s} {tps:7.2f} tokens/s  {prompt!r} + {text!r}", file=out)
    if device.type == "cpu":
        print("  (Triton interpreter on CPU: tokens/s here are not performance figures)", file=out)
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) FAILED'} in "
          f"{time.perf_counter() - t_start:.1f} s", file=out)
    return 1 if failures else 0
