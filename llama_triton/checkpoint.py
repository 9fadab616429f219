"""Load and save Hugging Face-format checkpoints: config.json + model.safetensors, or shards listed in
model.safetensors.index.json.

Loading builds the model on the meta device, allocates it once on the target device/dtype, then copies one
tensor at a time from the memory-mapped safetensors files (safe_open), so an 8B model never exists twice.
Missing, unexpected or mis-shaped tensors raise one CheckpointError listing all of them.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# tensors some HF checkpoints carry that are derived, not learned (old LLaMA-2 exports)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_tensor(filename: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(filename, framework="pt", device="cpu") as f:
        return f.get_tensor(name)


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded into the model: a file that cannot be read (named), or tensors that do
    not match it (the message lists every problem, naming file and tensor)."""


@contextlib.contextmanager
def _safe_open(filename: str, **kwargs):
    """safetensors' safe_open, its errors (a truncated, empty or corrupt file: safetensors checks the header
    and the file size on opening) as a CheckpointError naming the file."""
    from safetensors import safe_open

    try:
        handle = safe_open(filename, framework="pt", **kwargs)
        f = handle.__enter__()
    except Exception as e:       # safetensors_rust.SafetensorError, OSError, ...: say which file
        raise CheckpointError(f"{filename}: cannot read the safetensors file ({type(e).__name__}: {e}); "
                              "it may be truncated or corrupt: download or save it again") from e
    try:
        yield f
    finally:
        handle.__exit__(None, None, None)


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def checkpoint_files(path) -> dict[str, str]:
    """tensor name -> safetensors file path for the checkpoint directory `path` (single file or sharded)."""
    path = os.fspath(path)
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from e
        missing = sorted({fn for fn in weight_map.values() if not os.path.exists(os.path.join(path, fn))})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return {name: os.path.join(path, fn) for name, fn in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if os.path.exists(single):
        with _safe_open(single) as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path!r}")


def expected_tensors(model) -> dict[str, tuple]:
    """name -> shape of every tensor the checkpoint must provide (tied lm_head excluded, buffers excluded)."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}   # tied weights appear once
    return shapes


def load_pretrained(path, dtype=None, device=None, strict: bool = True):
    """A LlamaForCausalLM from HF-format directory `path`, its weights in `dtype` (default: the checkpoint's
    own dtype) on `device` (default cpu)."""
    from .config import LlamaConfig
    from .model import LlamaForCausalLM

    try:
        config = LlamaConfig.from_hf_config(path)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        where = os.path.join(os.fspath(path), CONFIG) if os.path.isdir(path) else os.fspath(path)
        raise CheckpointError(f"{where}: not a valid model config ({type(e).__name__}: {e})") from e
    dtype = _parse_dtype(dtype)
    device = torch.device(device or "cpu")
    files = checkpoint_files(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = expected_tensors(model)

    # check every name and shape before allocating anything
    ckpt_shapes, ckpt_dtypes = {}, {}
    by_file: dict[str, list[str]] = {}
    for name, fn in files.items():
        by_file.setdefault(fn, []).append(name)
    for fn, names in by_file.items():
        with _safe_open(fn) as f:
            for name in names:
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                sl = f.get_slice(name)
                ckpt_shapes[name] = tuple(sl.get_shape())
                ckpt_dtypes[name] = sl.get_dtype()
    from .moe import build_fused, fused_shape, legacy_expert_plan   # issue 17: per-expert hub layout -> fused
    fused = legacy_expert_plan(ckpt_shapes)
    ckpt_shapes.update({new: fused_shape(entry, ckpt_shapes) for new, entry in fused.items()})
    for entry in fused.values():
        for names in entry:
            for n in names:
                ckpt_shapes.pop(n, None)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = sorted(set(expected) - set(ckpt_shapes))
    unexpected = sorted(n for n in set(ckpt_shapes) - set(expected) if not (tied and n == "lm_head.weight"))
    mis_shaped = sorted(f"{n}: checkpoint {ckpt_shapes[n]} vs model {expected[n]}"
                        for n in set(expected) & set(ckpt_shapes) if ckpt_shapes[n] != expected[n])
    float_params = {n for n, p in model.named_parameters() if p.is_floating_point()}
    mis_typed = sorted(f"{n} ({files[n]}): {ckpt_dtypes[n]}, the parameter is floating point"
                       for n in float_params & set(ckpt_dtypes) if not ckpt_dtypes[n].startswith(("F", "BF")))
    if mis_typed:                # an integer tensor would load silently (copy_ converts): never allowed
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} has integer tensors for float parameters: "
                              + ", ".join(mis_typed))
    if mis_shaped and not strict:  # never copy_ (which broadcasts) a tensor of another shape, strict or not
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: mis-shaped tensors: " + ", ".join(mis_shaped))
    if strict and (missing or unexpected or mis_shaped):
        lines = [f"checkpoint {os.fspath(path)!r} does not match {config.model_type} config:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if items:
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items))
        raise CheckpointError("\n".join(lines))

    if dtype is None:
        dtype = _DTYPES.get(config.torch_dtype or "", None) or _DTYPES.get(
            {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(next(iter(ckpt_dtypes.values()), ""), ""),
            torch.float32)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()                                          # to_empty un-ties shared parameters
    params = dict(model.named_parameters())
    with torch.no_grad():
        for fn, names in by_file.items():
            with _safe_open(fn, device="cpu") as f:
                for name in names:
                    if name in params:
                        params[name].copy_(f.get_tensor(name))   # one tensor at a time
        for new, entry in fused.items():                             # issue 17: stacked expert tensors
            params[new].copy_(build_fused(entry, lambda n: _read_tensor(files[n], n)))
        if missing:                                                  # strict=False: HF's init rule, not to_empty's garbage
            from .model import _init_parameters

            gen = torch.Generator(device="cpu").manual_seed(0)
            absent = set(missing)
            _init_parameters(_Only(model, absent), lambda p: p.copy_(torch.randn(p.shape, generator=gen) * 0.02))
    model.model.reset_rotary(device)
    return model.eval()


class _Only:
    """A view of a module's named_parameters restricted to `names` (for the init rule of missing tensors)."""

    def __init__(self, module, names):
        self.module, self.names = module, names

    def named_parameters(self):
        return ((n, p) for n, p in self.module.named_parameters() if n in self.names)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy when it is a slice of a bigger buffer (llama_triton.packing's fused q/k/v, gate/up):
    safetensors refuses tensors that share memory."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_pretrained(model, path, max_shard_size: int | None = None) -> None:
    """Write config.json and model.safetensors, or shards of at most `max_shard_size` bytes + the index."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {n: _own_storage(p.detach().contiguous().cpu()) for n, p in model.named_parameters()}  # tied: once
    if not max_shard_size:
        save_file(tensors, os.path.join(path, SINGLE), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_size:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fn), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fn
            total += t.numel() * t.element_size()
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
