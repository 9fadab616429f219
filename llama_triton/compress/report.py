"""Sizes of compressed models and the quality report: held-out perplexity against weight bytes.

Sizes count what each format must store, at 2 bytes per floating-point value (fp16/bf16, how these models
are deployed) and the real size of integer tensors:
  * dense linear: ``N K`` values;
  * unstructured-pruned linear: the non-zeros plus a 1-bit-per-weight mask (a bitmask format; dense storage
    of a pruned weight saves nothing);
  * N:M-pruned linear: ``N/M`` of the values plus ``ceil(log2 M)`` index bits per kept value (2:4: 2 bits,
    PyTorch's semi-structured layout: 56.25% of the dense fp16 bytes);
  * LowRankLinear: ``r (N + K)`` values; QuantLinear: its packed codes, scales and zero points as its
    state_dict (the checkpoint) holds them.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..layers import LowRankLinear, QuantLinear
from . import calibration as calib
from .pruning import parse_pattern

FLOAT_BYTES = 2


@dataclass
class Size:
    params: int        # stored weights (non-zeros for pruned layers; r (N + K) for low-rank; N K for quantized)
    bytes: int         # storage bytes (module docstring)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * (FLOAT_BYTES if t.is_floating_point() else t.element_size())


def linear_size(module: nn.Module, sparse=None) -> Size:
    """Size of one linear-like module; `sparse` is None (dense), "unstructured" or an "N:M" pattern."""
    bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    if isinstance(module, QuantLinear):   # as stored (its state_dict: GPTQ layout, not the padded in-memory one)
        return Size(module.in_features * module.out_features + bias,
                    sum(_tensor_bytes(t) for t in module.state_dict().values()))
    if isinstance(module, LowRankLinear):
        n = module.weight_a.numel() + module.weight_b.numel() + bias
        return Size(n, n * FLOAT_BYTES)
    w = module.weight
    nnz = int((w != 0).sum())
    if sparse is None:
        return Size(w.numel() + bias, (w.numel() + bias) * FLOAT_BYTES)
    if sparse == "unstructured":
        return Size(nnz + bias, (nnz + bias) * FLOAT_BYTES + math.ceil(w.numel() / 8))
    n, m = parse_pattern(sparse)
    kept = w.numel() * n // m
    return Size(kept + bias, (kept + bias) * FLOAT_BYTES + math.ceil(kept * math.ceil(math.log2(m)) / 8))


def model_size(model: nn.Module, sparse=None, skip=("lm_head",)) -> tuple[Size, Size]:
    """(the compressible linear layers' size, the whole model's size). Linears named in `skip` (lm_head,
    tied to the embedding in small models) count as dense, with the rest of the model. Tensors are those
    of the state_dict (non-persistent buffers such as rotary tables excluded), tied weights once."""
    lin_params = lin_bytes = 0
    prefixes = []
    for name, m in model.named_modules():
        if name and not calib._skipped(name, skip) and isinstance(m, (QuantLinear, LowRankLinear, nn.Linear)):
            s = linear_size(m, sparse if type(m) is nn.Linear else None)
            lin_params, lin_bytes = lin_params + s.params, lin_bytes + s.bytes
            prefixes.append(name + ".")
    persistent = set(model.state_dict(keep_vars=True))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}   # tied parameters once
    rest = [t for n, t in tensors.items() if n in persistent and not n.startswith(tuple(prefixes))]
    return (Size(lin_params, lin_bytes),
            Size(lin_params + sum(t.numel() for t in rest), lin_bytes + sum(_tensor_bytes(t) for t in rest)))


# ------------------------------------------------------------------------------------------ the report
@dataclass
class Row:
    method: str
    level: str
    linear_params: int
    linear_bytes: int
    model_bytes: int
    ppl: float
    linear_bytes_pct: float = 0.0
    model_bytes_pct: float = 0.0


def default_configs() -> list[dict]:
    """The methods and levels of the committed report (``compress_one`` keywords)."""
    cfgs = [{"method": "dense", "level": "-"}]
    for method in ("magnitude", "wanda"):
        cfgs += [{"method": method, "level": f"{s:.0%}", "sparsity": s} for s in (0.5, 0.7)]
        cfgs += [{"method": method, "level": p, "pattern": p} for p in ("2:4", "4:8")]
    for method in ("svd", "asvd"):
        cfgs += [{"method": method, "level": f"ratio {r}", "ratio": r} for r in (0.75, 0.5, 0.3)]
    cfgs += [{"method": "rtn", "level": "int8", "bits": 8, "group_size": -1},
             {"method": "rtn", "level": "int4 g16", "bits": 4, "group_size": 16},
             {"method": "wanda+rtn", "level": "2:4 + int4 g16", "pattern": "2:4", "bits": 4, "group_size": 16}]
    return cfgs


def compress_one(model: nn.Module, cfg: dict, batches) -> tuple[nn.Module, object]:
    """A compressed deep copy of `model` for one report config, and its sparse format for ``model_size``."""
    from ..quant import quantize_model
    from .low_rank import factorize_model
    from .pruning import prune_model

    m = copy.deepcopy(model)
    method = cfg["method"]
    base = method.split("+")[0]
    sparse = None
    if base in ("magnitude", "wanda"):
        prune_model(m, base, sparsity=cfg.get("sparsity"), pattern=cfg.get("pattern"), calibration=batches)
        sparse = cfg.get("pattern") or "unstructured"
    elif base in ("svd", "asvd"):
        factorize_model(m, base, ratio=cfg.get("ratio"), energy=cfg.get("energy"), calibration=batches)
    if "bits" in cfg:
        quantize_model(m, bits=cfg["bits"], group_size=cfg["group_size"])
        sparse = None      # the int codes are stored densely: pruning's zeros do not shrink them
    return m, sparse


def quality_report(model: nn.Module, heldout_ids, batches, configs=None, max_length: int = 256,
                   progress=print) -> list[Row]:
    """Perplexity of `heldout_ids` (``llama_triton.evaluate.perplexity``) and sizes for each config."""
    from ..evaluate import perplexity

    rows = []
    for cfg in configs or default_configs():
        m, sparse = compress_one(model, cfg, batches)
        lin, whole = model_size(m, sparse)
        ppl = perplexity(m, heldout_ids, max_length=max_length).ppl
        rows.append(Row(cfg["method"], cfg["level"], lin.params, lin.bytes, whole.bytes, ppl))
        if progress:
            progress(f"  {cfg['method']:10s} {cfg['level']:18s} ppl {ppl:8.3f}  linear bytes {lin.bytes}")
    dense = rows[0]
    for r in rows:
        r.linear_bytes_pct = 100 * r.linear_bytes / dense.linear_bytes
        r.model_bytes_pct = 100 * r.model_bytes / dense.model_bytes
    return rows


def markdown(rows: list[Row]) -> str:
    dense = rows[0].ppl
    out = ["| method | level | params (linears) | bytes (linears) | % of dense | % of model bytes | held-out ppl | vs dense |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.method} | {r.level} | {r.linear_params:,} | {r.linear_bytes:,} | {r.linear_bytes_pct:.1f}% | "
                   f"{r.model_bytes_pct:.1f}% | {r.ppl:.3f} | {100 * (r.ppl / dense - 1):+.1f}% |")
    return "\n".join(out)


def plot(rows: list[Row], path) -> None:
    """Perplexity against linear-layer bytes (% of dense), one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[Row]] = {}
    for r in rows[1:]:
        key = r.method if "+" in r.method or r.method in ("svd", "asvd", "rtn") else \
            f"{r.method} {'N:M' if ':' in r.level else 'unstructured'}"
        series.setdefault(key, []).append(r)
    for key, rs in series.items():
        rs = sorted(rs, key=lambda r: r.linear_bytes_pct)
        ax.plot([r.linear_bytes_pct for r in rs], [r.ppl for r in rs], "o-", label=key)
        for r in rs:
            ax.annotate(r.level, (r.linear_bytes_pct, r.ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(rows[0].ppl, color="k", ls="--", lw=1, label=f"dense ({rows[0].ppl:.2f})")
    ax.set_xlabel("linear-layer weight bytes, % of dense fp16")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title("Compression of the tiny model: perplexity vs bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(rows: list[Row], out_dir, meta: dict) -> None:
    """quality.json, quality.md and quality.png under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    head = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (out / "quality.md").write_text(f"# Compression quality (tiny model, CPU)\n\n{head}\n\n{markdown(rows)}\n")
    plot(rows, out / "quality.png")
