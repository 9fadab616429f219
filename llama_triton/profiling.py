"""`llama-triton profile`: torch.profiler over a prefill and a few decode steps, a table of time per kernel
(ours vs everything else) and a Chrome trace (open in chrome://tracing or https://ui.perfetto.dev)."""
from __future__ import annotations

import importlib
import pkgutil
import time

import torch


def our_kernel_names() -> set[str]:
    """Names of every @triton.jit function in llama_triton.kernels (what CUDA kernel events are called)."""
    from triton.runtime.jit import JITFunction

    from . import kernels

    try:                                                # TRITON_INTERPRET=1 makes @triton.jit return these
        from triton.runtime.interpreter import InterpretedFunction
        jit_types = (JITFunction, InterpretedFunction)
    except ImportError:
        jit_types = (JITFunction,)

    names = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        try:
            mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        except Exception:  # a kernel file that fails to import must not break profiling of the others
            continue
        for obj in vars(mod).values():
            for _ in range(4):                          # Autotuner / Heuristics wrap a JITFunction in .fn
                if isinstance(obj, jit_types) or not hasattr(obj, "fn"):
                    break
                obj = obj.fn
            if isinstance(obj, jit_types):
                names.add(obj.fn.__name__)
    return names


def is_ours(name: str, ours: set[str]) -> bool:
    return name.startswith("llama_triton::") or name in ours or any(name.startswith(n + "_") for n in ours)


def run(model, batch: int = 1, prompt_len: int = 128, decode_steps: int = 8, trace: str = "profile_trace.json",
        rows: int = 25, out=print) -> dict:
    """Profile one prefill of (batch, prompt_len) random tokens + `decode_steps` cached decode steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device = model.device
    cuda = device.type == "cuda"
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    caches = model.make_caches(batch, prompt_len + decode_steps + 1)

    def work():
        for c in caches:
            c.reset()
        with record_function("prefill"):
            logits = model(ids, caches=caches, fresh_cache=True, logits_to_keep=1).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(decode_steps):
            with record_function("decode_step"):
                tok = model(tok, caches=caches).logits[:, -1].argmax(-1, keepdim=True)
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        work()                                              # warm-up: compile / autotune outside the trace
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with profile(activities=activities, record_shapes=False) as prof:
            work()
        wall = time.perf_counter() - t0
    prof.export_chrome_trace(trace)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    out(events.table(sort_by=key, row_limit=rows))
    ours_names = our_kernel_names()
    total = {"ours": 0.0, "others": 0.0}
    for e in events:
        if e.key in ("prefill", "decode_step") or e.key.startswith("ProfilerStep"):
            continue
        t = getattr(e, key, 0.0) or 0.0
        if cuda and getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CPU"):
            continue                                        # on a GPU count kernel (device) time only
        total["ours" if is_ours(e.key, ours_names) else "others"] += t
    all_t = max(total["ours"] + total["others"], 1e-9)
    out(f"{'device' if cuda else 'cpu'} self time: ours {total['ours'] / 1e3:.2f} ms "
        f"({100 * total['ours'] / all_t:.0f}%), "
        f"others {total['others'] / 1e3:.2f} ms; wall {wall * 1e3:.1f} ms for prefill {batch}x{prompt_len} + "
        f"{decode_steps} decode steps")
    out(f"Chrome trace written to {trace}")
    return {"trace": trace, "wall_s": wall, **total}
