"""Launch interception: run real launchers, compile each kernel they launch for a target, launch nothing.

While a `capture()` is active, ``JITFunction.run`` and ``Autotuner.run`` are replaced: every kernel launch
binds its arguments the way Triton does (ints equal to 1 become constants; pointers and ints divisible by
16 get ``tt.divisibility``, the alignment that vectorised loads depend on), compiles for the target with
Triton's bundled ptxas and records one `KernelRow`. An autotuned kernel is compiled once per config left
by its early prune ("all"), for its first one ("first"), or for the config its autotuner already chose
on this machine ("chosen": benchmarks on a GPU). Output tensors stay uninitialised: nothing is computed.
"""
from __future__ import annotations

import contextlib
import inspect as _pyinspect
from dataclasses import dataclass, field

from .facts import compile_and_read
from .targets import Target, get_target, occupancy

OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_PTR_TYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32", "float64": "*fp64", "int8": "*i8",
              "uint8": "*u8", "int16": "*i16", "int32": "*i32", "int64": "*i64", "bool": "*i1"}


@dataclass
class KernelRow:
    """One kernel at one config, as compiled for `arch` (static facts; nothing here is measured)."""
    kernel: str                      # the @triton.jit function's name
    arch: str                        # "sm_90", "sm_80" or "local"
    config: str                      # the autotune config (or the kernel's block constexprs), one line
    num_warps: int
    num_stages: int
    registers: int                   # per thread (ptxas)
    spill_stores: int                # bytes of spill stores (ptxas); 0 = no spills
    spill_loads: int                 # bytes of spill loads (ptxas)
    shared: int                      # bytes of shared memory per CTA
    fits_shared: bool                # shared <= the target's per-CTA maximum (else it cannot launch)
    ctas_per_sm: int                 # occupancy: resident CTAs per SM on the target
    warps_per_sm: int
    occupancy_limit: str             # what limits ctas_per_sm: registers | shared | warps | ctas
    dot: str                         # how tl.dot lowered: wgmma | mma.sync | fma | none ("+" when mixed)
    tma: bool                        # TMA loads/stores (cp.async.bulk.tensor / UTMALDG)
    cp_async: bool                   # cp.async global->shared copies
    cp_async_depth: int              # pipeline depth: shared-memory buffers the copies rotate through (0: no cp.async)
    load_bits_max: int               # widest / narrowest global load (ld.global, cp.async), bits; 0: none
    load_bits_min: int
    store_bits_max: int              # widest / narrowest global store, bits; 0: none
    store_bits_min: int
    widths_from: str                 # "ptx" or "sass"
    load_widths: dict = field(default_factory=dict)   # {"128": n, "32": m}: static count of loads per width
    store_widths: dict = field(default_factory=dict)  # same for stores
    grid: tuple = (1, 1, 1)
    ctas: int = 1                    # CTAs in the grid
    sms: int = 0                     # the target's SM count
    waves: float = 0.0               # ctas / (ctas_per_sm * sms)
    op: str = ""                     # registry op (inspect_ops) or "" (capture / inspect_code)
    shape: str = ""                  # the op's shape label
    dtype: str = ""
    mode: str = ""                   # "fwd" or "bwd" (inspect_ops)
    autotuned: bool = False
    chosen: bool | None = None       # configs="chosen": True for the autotuner's pick; None: not known
    stack: int = 0                   # stack frame bytes (ptxas)
    dot_instr: str = ""              # the MMA instructions, e.g. wgmma.m64n128k16.f32.bf16.bf16
    smem_buffers: str = ""           # multi-buffered shared tiles (TTGIR), e.g. "3x128x64xbf16,3x64x128xbf16"
    constexprs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    hash: str = ""

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelRow":
        return cls(**{**d, "grid": tuple(d.get("grid", (1, 1, 1)))})


def _arg_type(value):
    import torch

    if isinstance(value, torch.Tensor):
        return _PTR_TYPES[str(value.dtype).replace("torch.", "")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _short(constexprs: dict) -> str:
    """The block-size-like constexprs (upper-case, int > 1) as 'BLOCK_M=128 BLOCK_N=64'."""
    return " ".join(f"{k}={v}" for k, v in constexprs.items()
                    if k.isupper() and isinstance(v, int) and not isinstance(v, bool) and v > 1)


class Capture:
    """Collects a KernelRow per distinct (context, kernel, config) launched while active. `configs` is
    "all" | "first" | "chosen" or a callable returning one (read at each autotuned launch). `strict`:
    raise like a failed launch would (a non-autotuned kernel over the shared-memory limit, an autotuned one
    with no config that fits). `on_compile(row)` is called once per newly compiled kernel."""

    def __init__(self, target: Target, configs="all", strict: bool = False, sass: bool = False, on_compile=None):
        self.target, self._configs, self.strict, self.sass, self.on_compile = target, configs, strict, sass, on_compile
        self.rows: list[KernelRow] = []
        self.compiled: dict = {}      # compile key -> facts
        self.context: dict = {}       # op / shape / dtype / mode stamped on new rows
        self._seen: set = set()
        self._autotune: list = []     # stack of (config, chosen) of the autotuned launch in progress

    @property
    def configs(self) -> str:
        mode = self._configs() if callable(self._configs) else self._configs
        if mode not in ("all", "first", "chosen"):
            raise ValueError(f"configs must be 'all', 'first' or 'chosen', got {mode!r}")
        return mode

    # ------------------------------------------------------------------------------ JITFunction.run
    def jit_run(self, fn, *args, grid=None, warmup=False, **kwargs):
        options = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
        bound = _pyinspect.signature(fn.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs, attrs = {}, {}, {}
        for i, (param, (name, value)) in enumerate(zip(fn.params, bound.arguments.items())):
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if param.is_constexpr or value is None or (is_int and value == 1 and not param.do_not_specialize):
                signature[name] = "constexpr"  # Triton specialises an int argument equal to 1 into a constant
                constexprs[name] = value
                continue
            signature[name] = _arg_type(value)
            # Triton's alignment specialisation: pointers (and ints) divisible by 16 -> vectorised loads
            aligned = value.data_ptr() % 16 == 0 if hasattr(value, "data_ptr") else is_int and value % 16 == 0
            if aligned and not param.do_not_specialize and not param.do_not_specialize_on_alignment:
                attrs[(i,)] = [["tt.divisibility", 16]]
        key = (fn.fn.__module__, fn.fn.__qualname__, tuple(signature.items()),
               tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(sorted(options.items())))
        new = key not in self.compiled
        if new:
            self.compiled[key] = compile_and_read(fn, signature, constexprs, attrs, options,
                                                  self.target.capability, sass=self.sass)
        facts = self.compiled[key]
        row = self._row(facts, constexprs, options, grid, bound.arguments)
        if self.strict and not row.fits_shared and not self._autotune:
            raise RuntimeError(f"{row.kernel} needs {row.shared} bytes of shared memory > {self.target.smem_per_block} "
                               f"({self.target.gpu})")
        seen = (tuple(sorted((k, str(v)) for k, v in self.context.items())), key)
        if seen not in self._seen:
            self._seen.add(seen)
            self.rows.append(row)
        if new and self.on_compile:
            self.on_compile(row)
        return row

    def _row(self, facts, constexprs, options, grid, arguments) -> KernelRow:
        t = self.target
        if callable(grid):
            grid = grid(dict(arguments))
        grid = tuple(int(g) for g in (tuple(grid) if grid is not None else (1,))) + (1, 1)
        grid = grid[:3]
        ctas = grid[0] * grid[1] * grid[2]
        per_sm, limit = occupancy(t, facts["registers"], facts["shared"], facts["num_warps"])
        # not autotuned: in "chosen" mode its one config is what runs
        config, chosen = self._autotune[-1] if self._autotune else (None, True if self.configs == "chosen" else None)
        if config is not None:
            desc = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
        else:
            desc = _short(constexprs)
        return KernelRow(
            kernel=facts["name"], arch=t.name, config=desc, num_warps=facts["num_warps"], num_stages=facts["num_stages"],
            registers=facts["registers"], spill_stores=facts["spill_stores"], spill_loads=facts["spill_loads"],
            shared=facts["shared"], fits_shared=facts["shared"] <= t.smem_per_block, ctas_per_sm=per_sm,
            warps_per_sm=per_sm * facts["num_warps"], occupancy_limit=limit, dot=facts["dot"], tma=facts["tma"],
            cp_async=facts["cp_async"], cp_async_depth=facts["cp_async_depth"],
            load_bits_max=facts["load_bits_max"], load_bits_min=facts["load_bits_min"],
            store_bits_max=facts["store_bits_max"], store_bits_min=facts["store_bits_min"],
            widths_from=facts["widths_from"], load_widths=facts["load_widths"],
            store_widths=facts["store_widths"], grid=grid, ctas=ctas, sms=t.sms,
            waves=round(ctas / (per_sm * t.sms), 3) if per_sm else 0.0,
            op=self.context.get("op", ""), shape=self.context.get("shape", ""), dtype=self.context.get("dtype", ""),
            mode=self.context.get("mode", ""), autotuned=config is not None, chosen=chosen, stack=facts["stack"],
            dot_instr=facts["dot_instr"], smem_buffers=facts["smem_buffers"], constexprs={k: v if isinstance(v, (int, float, bool, str)) or v is None
                                                      else str(v) for k, v in constexprs.items()},
            options=dict(options), hash=facts["hash"])

    # -------------------------------------------------------------------------------- Autotuner.run
    def autotune_run(self, tuner, *args, **kwargs):
        mode = self.configs
        configs = tuner.configs
        named = {**dict(zip(tuner.arg_names, args)), **kwargs}
        picked = None
        if mode == "chosen" and len(configs) > 1:
            picked = getattr(tuner, "cache", {}).get(_tuning_key(tuner, named))
        if len(configs) > 1 and getattr(tuner, "early_config_prune", None):
            configs = tuner.early_config_prune(configs, named, **kwargs)
        name = getattr(tuner.base_fn, "__name__", "kernel")
        if not configs:
            raise RuntimeError(f"{name}: the autotuner's early prune left no config for these arguments")
        if picked is not None:
            todo = [(picked, True)]
        else:
            todo = [(c, True if len(configs) == 1 else None) for c in (configs[:1] if mode == "first" else configs)]
        rows = []
        for config, chosen in todo:
            self._autotune.append((config, chosen))
            try:
                rows.append(tuner.fn.run(*args, **{**kwargs, **config.all_kwargs()}))
            finally:
                self._autotune.pop()
        fits = [c for (c, _), r in zip(todo, rows) if r is None or r.fits_shared]
        if self.strict and mode != "first" and not fits:
            raise RuntimeError(f"{name}: every autotune config needs more shared memory than the {self.target.gpu} "
                               f"has: {[r.shared for r in rows]}")
        tuner.best_config = (fits or [c for c, _ in todo])[0]  # launchers may read the chosen config
        return None


def _tuning_key(tuner, named: dict) -> tuple:
    """The key Autotuner.run files its choice under (its keys' values, then every tensor's dtype)."""
    args = {k: v for k, v in named.items() if k in tuner.arg_names}
    key = [args[k] for k in tuner.keys if k in args]
    key += [str(v.dtype) for v in args.values() if hasattr(v, "dtype")]
    return tuple(key)


_ACTIVE: list = []


def _target_paths(target: Target) -> list:
    """Launchers that pick a kernel by the device they run on see CPU tensors here: make them pick what the
    target would. Returns (module, name, saved) to restore. Today: flash attention's TMA forward on sm_90+."""
    import importlib

    patches = []
    if target.capability >= 90:
        try:
            tma = importlib.import_module("llama_triton.kernels.flash_attention_tma")
        except ImportError:
            tma = None
        if tma is not None and hasattr(tma, "use_for") and hasattr(tma, "supports") and tma.available():
            patches.append((tma, "use_for", tma.use_for))
            tma.use_for = tma.supports
    return patches


@contextlib.contextmanager
def capture(arch: str = "sm_90", configs="all", strict: bool = False, sass: bool = False, on_compile=None,
            target_paths: bool = True):
    """Within the block, kernel launches compile for `arch` (see the module docstring) and launch nothing;
    yields the Capture whose `.rows` fill up. Needs real JITFunctions: TRITON_INTERPRET must not be set
    when the kernels are defined (from pytest, use inspect_code / inspect_ops, which use a fresh process).
    CPU tensors are fine: the backend is told to send every op to Triton. `target_paths`: launchers that
    choose a kernel by the device choose what the target would run (the TMA flash forward on sm_90)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from .. import backend
    from ..kernels._checks import interpreting

    if interpreting():
        raise RuntimeError("inspect.capture needs real Triton kernels: TRITON_INTERPRET is set in this process "
                           "(use llama_triton.inspect.inspect_code or inspect_ops, which run a fresh process)")
    cap = Capture(get_target(arch), configs=configs, strict=strict, sass=sass, on_compile=on_compile)
    saved = (JITFunction.run, Autotuner.run, backend.triton_can_run, backend.use_triton)
    _ACTIVE.append(cap)
    JITFunction.run = lambda self, *a, **k: _ACTIVE[-1].jit_run(self, *a, **k)
    Autotuner.run = lambda self, *a, **k: _ACTIVE[-1].autotune_run(self, *a, **k)
    # every launch goes to the interceptor (CPU tensors of any dtype: bf16 included, which the interpreter
    # would compute wrongly and the backend therefore sends to the reference)
    backend.triton_can_run = lambda device: True
    backend.use_triton = lambda tensor: True
    patches = _target_paths(cap.target) if target_paths else []
    try:
        yield cap
    finally:
        for module, name, value in reversed(patches):
            setattr(module, name, value)
        _ACTIVE.pop()
        if not _ACTIVE:
            JITFunction.run, Autotuner.run, backend.triton_can_run, backend.use_triton = saved
