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


# ------------------------------------------------------------------------------ launch and sync counting
# ATen ops that launch no kernel: allocations and metadata. Views are recognised by their schema (is_view).
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "lift_fresh_copy", "_unsafe_view", "set_", "resize_", "is_same_size", "sym_size",
              "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "dim", "is_contiguous",
              "_has_compatible_shallow_copy_type", "record_stream", "_nested_tensor_size"}
_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
_LABELS = {"triton": "triton", "aten": "aten", "syncs": "sync", "checks": "check"}


class KernelCount:
    """What a callable launched: ``triton`` kernel launches, ``aten`` kernels (non-view, non-allocation
    ATen ops: each one is a kernel launch on a GPU), ``syncs`` (host synchronisations: ``.item()``/``int()``/
    ``bool()`` of a tensor (``aten._local_scalar_dense``), ``.tolist()``, ``nonzero``, boolean indexing,
    device-to-host copies, ``torch.cuda.synchronize``) and ``checks`` (ops and syncs inside CPU-only value
    checks, ``kernels._checks.cpu_value_check``: they do not happen on a GPU, so they are kept apart).
    ``names`` counts each ``"triton:<kernel>"`` / ``"aten:<op>"`` / ``"sync:<op>"``; ``scopes`` holds one
    KernelCount per scope module given to count_kernels (events inside no scope count only in the total).
    """

    def __init__(self):
        from collections import Counter

        self.triton = self.aten = self.syncs = self.checks = 0
        self.names = Counter()
        self.scopes: dict[str, KernelCount] = {}

    @property
    def launches(self) -> int:
        """Kernel launches: Triton + ATen."""
        return self.triton + self.aten

    def _add(self, kind: str, name: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.names[f"{_LABELS[kind]}:{name}"] += 1

    def outside_scopes(self) -> "KernelCount":
        """The events in no scope (e.g. the fixed part of a decode step outside the decoder layers)."""
        rest = KernelCount()
        for kind in ("triton", "aten", "syncs", "checks"):
            setattr(rest, kind, getattr(self, kind) - sum(getattr(s, kind) for s in self.scopes.values()))
        rest.names = self.names.copy()
        for s in self.scopes.values():
            rest.names.subtract(s.names)
        rest.names = +rest.names
        return rest

    def as_dict(self) -> dict:
        return {"launches": self.launches, "triton": self.triton, "aten": self.aten, "syncs": self.syncs,
                "checks": self.checks}

    def __repr__(self) -> str:
        return (f"KernelCount(launches={self.launches}, triton={self.triton}, aten={self.aten}, "
                f"syncs={self.syncs}, checks={self.checks})")


def _is_sync(func, args, kwargs) -> bool:
    """Whether an ATen op makes the host wait for the device (or would on a GPU)."""
    tags = getattr(func, "tags", ())
    name = func._schema.name.split("::")[-1]
    if torch.Tag.data_dependent_output in tags:                        # _local_scalar_dense (item, int, bool)
        return True
    if name in _INDEX_OPS:                                             # boolean masks go through nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    if torch.Tag.dynamic_output_shape in tags:                         # nonzero, masked_select, unique, ...
        return True
    if name in ("_to_copy", "copy_", "_copy_from"):                    # device -> host, blocking
        src = args[1] if name == "copy_" else args[0]
        dst_cpu = (args[0].device.type == "cpu" if name == "copy_" else
                   str(kwargs.get("device", src.device if isinstance(src, torch.Tensor) else "cpu")).startswith("cpu"))
        return (isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst_cpu
                and not kwargs.get("non_blocking", False))
    return False


def _returns_tensor(func) -> bool:
    """Ops that return no tensor (promote_types, sym sizes, ...) compute nothing on the device."""
    return any("Tensor" in str(r.type) for r in func._schema.returns)


def _custom_op_impl(func):
    """The Python function behind a torch.library.custom_op (run under the counting mode), or None."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(func._schema.name)
    except Exception:  # a private API: without it, a custom op's inner ATen ops are simply not seen
        return None
    return getattr(opdef, "_init_fn", None)


def count_kernels(fn, *args, scopes: dict | None = None, **kwargs):
    """Run ``fn(*args, **kwargs)`` once and count its kernel launches and host syncs, on any device (CPU
    included: Triton's interpreter launches count like GPU launches, and every ATen op that is not a view or
    an allocation counts as the kernel it would be on a GPU).

    ``scopes``: optional ``{name: nn.Module}``; each event is also credited to the innermost scope module
    running when it happens (``result.scopes[name]``), e.g. ``{f"layer {i}": layer}`` for per-layer counts.
    Returns ``(fn's result, KernelCount)``. Run ``fn`` once before counting: a first call may autotune
    (many benchmark launches) or build caches. CUDA-graph replays and compiled graphs launch from C++ and are
    not seen; count the eager callable.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.jit import JITFunction

    from .kernels import _checks

    runners = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        runners.append(InterpretedFunction)
    except ImportError:
        pass
    total = KernelCount()
    stack: list[KernelCount] = []
    state = {"tolist": 0, "launch": 0}     # inside tolist / a Triton launch (the interpreter's own copies)

    def record(kind: str, name: str) -> None:
        if _checks.in_cpu_value_check():
            kind = "checks"
        total._add(kind, name)
        if stack:
            stack[-1]._add(kind, name)

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            ns, _, name = func._schema.name.partition("::")
            if ns == "llama_triton":         # our custom ops: not a kernel; what they run inside is counted
                impl = _custom_op_impl(func)
                if impl is not None:
                    with _Mode():
                        return impl(*args, **kwargs)
                return func(*args, **kwargs)
            if not (state["tolist"] or state["launch"]):
                if _is_sync(func, args, kwargs):
                    record("syncs", name)
                elif not func.is_view and name not in _NO_KERNEL and _returns_tensor(func):
                    record("aten", f"{name}" if ns == "aten" else f"{ns}.{name}")
            return func(*args, **kwargs)

    originals = {cls: cls.run for cls in runners}

    def counting_run(original):
        def run(self, *a, grid, warmup, **kw):
            if not warmup:
                record("triton", getattr(getattr(self, "fn", None), "__name__", "kernel"))
            state["launch"] += 1
            try:
                return original(self, *a, grid=grid, warmup=warmup, **kw)
            finally:
                state["launch"] -= 1
        return run

    orig_tolist, orig_sync = torch.Tensor.tolist, torch.cuda.synchronize

    def tolist(t):
        record("syncs", "tolist")
        state["tolist"] += 1
        try:
            return orig_tolist(t)
        finally:
            state["tolist"] -= 1

    def synchronize(*a, **kw):
        record("syncs", "cuda.synchronize")
        return orig_sync(*a, **kw)

    def enter(scope):
        def hook(module, inputs):
            stack.append(scope)
        return hook

    def leave(module, inputs, output):
        stack.pop()

    hooks = []
    for scope_name, module in (scopes or {}).items():
        total.scopes[scope_name] = KernelCount()
        hooks.append(module.register_forward_pre_hook(enter(total.scopes[scope_name])))
        hooks.append(module.register_forward_hook(leave))
    try:
        for cls in runners:
            cls.run = counting_run(originals[cls])
        torch.Tensor.tolist, torch.cuda.synchronize = tolist, synchronize
        with _Mode():
            result = fn(*args, **kwargs)
    finally:
        for cls in runners:
            cls.run = originals[cls]
        torch.Tensor.tolist, torch.cuda.synchronize = orig_tolist, orig_sync
        for h in hooks:
            h.remove()
    return result, total


def count_decode_step(model, batch: int = 1, prompt_len: int = 8) -> KernelCount:
    """Launches and syncs of one decode step of a llama_triton LlamaForCausalLM (what generate() runs per
    token, ``llama_triton.generate.DecodeStep``), after a prefill of `prompt_len` random tokens and one
    warm-up step; ``result.scopes["layer i"]`` per decoder layer, ``result.outside_scopes()`` the fixed
    part (embedding, final norm, lm_head, ...)."""
    from .generate import DecodeStep

    device = model.device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    caches = model.make_caches(batch, prompt_len + 4)
    with torch.no_grad():
        model(ids, caches=caches, fresh_cache=True, logits_to_keep=1)
        step = DecodeStep(model, caches)
        tok = ids[:, -1:].clone()
        step(tok)                                                      # warm-up (autotune, tables)
        layers = {f"layer {i}": layer for i, layer in enumerate(model.model.layers)}
        _, counts = count_kernels(step, tok, scopes=layers)
    return counts


def print_counts(counts: KernelCount, out=print) -> None:
    """A per-scope table of a KernelCount (launches = triton + aten; syncs; CPU-only checks)."""
    out(f"{'scope':12s} {'launches':>8s} {'triton':>7s} {'aten':>5s} {'syncs':>6s} {'checks':>7s}  kernels")
    rows = list(counts.scopes.items()) + [("fixed", counts.outside_scopes()), ("total", counts)]
    for name, c in rows:
        kernels = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in sorted(c.names.items()))
        out(f"{name:12s} {c.launches:8d} {c.triton:7d} {c.aten:5d} {c.syncs:6d} {c.checks:7d}  "
            f"{kernels if name != 'total' else ''}")
