"""Compile every kernel that the registry's ops launch for a Hopper GPU (sm_90), without a GPU.

Run as a script in a process WITHOUT TRITON_INTERPRET (so @triton.jit gives real JITFunctions). Each
OpSpec's forward (and backward, when it has gradient inputs) is called on CPU tensors in bf16 and fp16,
on a middle and on the largest of its test shapes; the backend is told that Triton can run, and every kernel launch is intercepted and compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` instead of being launched (the output
tensors stay uninitialised; nothing is checked numerically). Autotuned kernels are compiled for every
config in bf16 and for their first config in fp16. This catches what the interpreter cannot: GPU-only
type errors, unsupported ops, bad layouts, and kernels whose shared memory exceeds an H100's 227 KiB (fatal for a kernel that is not autotuned).

Prints one line per compiled kernel signature and `LOWERING OK <n>` at the end; exits 1 on any failure.
Usage: python tests/lowering_check.py [op_name ...]. Tests that compile kernel variants the registry does
not reach call `run_snippet(code)`: `code` runs in a fresh process after `install()`, as `L`.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import traceback
from pathlib import Path


import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

MAX_SHARED = 232448  # H100 max dynamic shared memory per block (bytes)
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")
PTR_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
             torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
             torch.bool: "*i1"}

compiled: dict = {}
autotuned_depth = 0
all_configs = True  # False: compile only each autotuned kernel's first config (second dtype pass)


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return PTR_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def fake_run(self, *args, grid=None, warmup=False, **kwargs):
    """Stand-in for JITFunction.run: bind the arguments, compile for sm_90, launch nothing."""
    options = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
    bound = inspect.signature(self.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, (name, value)) in enumerate(zip(self.params, bound.arguments.items())):
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if param.is_constexpr or value is None or (is_int and value == 1 and not param.do_not_specialize):
            signature[name] = "constexpr"  # Triton specialises an int argument equal to 1 into a constant
            constexprs[name] = value
            continue
        signature[name] = _arg_type(value)
        # Triton's alignment specialisation: pointers (and ints) divisible by 16 -> vectorised, pipelined loads
        aligned = value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor) else is_int and value % 16 == 0
        if aligned and not param.do_not_specialize and not param.do_not_specialize_on_alignment:
            attrs[(i,)] = [["tt.divisibility", 16]]
    key = (self.fn.__name__, tuple(signature.items()), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
           tuple(sorted(options.items())))
    if key in compiled:
        return compiled[key]
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = triton.compile(ASTSource(self, signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    shared = kernel.metadata.shared
    if shared > MAX_SHARED and not autotuned_depth:
        raise RuntimeError(f"{self.fn.__name__} needs {shared} bytes of shared memory > {MAX_SHARED} (H100)")
    compiled[key] = shared
    consts = ", ".join(f"{k}={v}" for k, v in constexprs.items() if v is not None)
    print(f"  compiled {self.fn.__name__}[{consts}] {options} shared={shared}"
          + (" (over the limit: fails to launch; the autotuner skips it)" if shared > MAX_SHARED else ""))
    return shared


def fake_autotune_run(self, *args, **kwargs):
    """Stand-in for Autotuner.run: apply the autotuner's early prune, then compile the kernel once per
    remaining config instead of benchmarking. Fails when the prune leaves nothing, or when every config
    needs more shared memory than an H100 has (the op could not launch at all)."""
    global autotuned_depth
    configs = self.configs
    if getattr(self, "early_config_prune", None):
        configs = self.early_config_prune(configs, {**dict(zip(self.arg_names, args)), **kwargs}, **kwargs)
    name = getattr(self.base_fn, "__name__", "kernel")
    if not configs:
        raise RuntimeError(f"{name}: the autotuner's early prune left no config for these arguments")
    chosen = configs if all_configs else configs[:1]
    autotuned_depth += 1
    try:
        shared = [self.fn.run(*args, **{**kwargs, **config.all_kwargs()}) for config in chosen]
    finally:
        autotuned_depth -= 1
    fits = [c for c, smem in zip(chosen, shared) if smem is None or smem <= MAX_SHARED]
    if all_configs and not fits:
        raise RuntimeError(f"{name}: every autotune config needs more shared memory than an H100 has: {shared}")
    self.best_config = (fits or chosen)[0]  # launchers may read the chosen config
    return None


def install() -> None:
    """Intercept every launch (compile for sm_90 instead) and let the backend send CPU tensors to Triton."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("lowering_check must run without TRITON_INTERPRET (kernels must be JITFunctions)")
    JITFunction.run = fake_run
    Autotuner.run = fake_autotune_run
    from llama_triton import backend

    backend.triton_can_run = lambda device: True  # pretend: every launch goes to fake_run


def run_snippet(code: str = "", args=(), timeout: int = 1500) -> str:
    """From a test (any process): run `code` in a fresh Python without the interpreter, after `install()`
    with this module imported as `L` (or, with no code, the whole registry check with `args` as op names).
    Skips when this Triton cannot compile for NVIDIA; fails with the output unless it prints LOWERING OK."""
    import pytest

    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton cannot compile for NVIDIA here: {e}")
    here = Path(__file__).resolve()
    prelude = f"import sys\nsys.path.insert(0, {str(here.parent)!r})\nimport lowering_check as L\nL.install()\n"
    cmd = [sys.executable, "-c", prelude + code] if code else [sys.executable, str(here), *args]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "LOWERING OK" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]
    return r.stdout


def main(names) -> int:
    install()
    from llama_triton import registry, testing

    specs = [registry.get(n) for n in names] if names else registry.REGISTRY
    global all_configs
    failures = 0
    for spec in specs:
        # a middle and the largest test shape: both paths of M-bucketed kernels, the biggest blocks
        shapes = [spec.test_shapes[min(2, len(spec.test_shapes) - 1)], spec.test_shapes[-1]]
        for shape, dtype in [(s, d) for i, s in enumerate(shapes) if s not in shapes[:i]
                             for d in (torch.bfloat16, torch.float16)]:
            all_configs = dtype == torch.bfloat16  # every autotune config once; fp16 reuses the first
            print(f"{spec.name} {spec.label(shape)} {dtype}")
            try:
                torch.manual_seed(0)
                args = spec.make_inputs(shape, dtype, "cpu")
                args = tuple(a.requires_grad_() if i in spec.grad_inputs else a for i, a in enumerate(args))
                outs = [o for o in testing.as_tuple(spec.fn(*args)) if o.requires_grad]
                if spec.grad_inputs and outs:
                    torch.autograd.grad(outs, [args[i] for i in spec.grad_inputs], [torch.ones_like(o) for o in outs],
                                        allow_unused=True)
            except Exception:
                failures += 1
                print(f"FAILED {spec.name} {dtype}:\n{traceback.format_exc()}")
    print(f"LOWERING {'OK' if not failures else 'FAILED'} {len(compiled)} kernels")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
