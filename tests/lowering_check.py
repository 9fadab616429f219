"""Compile every kernel that the registry's ops launch for a Hopper GPU (sm_90), without a GPU.

Run as a script in a process WITHOUT TRITON_INTERPRET (so @triton.jit gives real JITFunctions). Each
OpSpec's forward (and backward, when it has gradient inputs) is called on CPU tensors in bf16 and fp16,
on a middle and on the largest of its test shapes; the backend is told that Triton can run, and every kernel launch is intercepted and compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` instead of being launched (the output
tensors stay uninitialised; nothing is checked numerically). Autotuned kernels are compiled for every
config in bf16 and for their first config in fp16. This catches what the interpreter cannot: GPU-only
type errors, unsupported ops, bad layouts, and kernels whose shared memory exceeds an H100's 227 KiB (fatal for a kernel that is not autotuned).

Prints one line per compiled kernel signature and `LOWERING OK <n>` at the end; exits 1 on any failure.
Usage: python tests/lowering_check.py [--inspect-json PATH] [op_name ...] (with --inspect-json, also the
static inspection that tests/test_static_gates.py asserts on: `inspect_registry`). Tests that compile kernel variants the registry does
not reach call `run_snippet(code)`: `code` runs in a fresh process after `install()`, as `L`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

MAX_SHARED = 232448  # H100 max dynamic shared memory per block (bytes)

compiled: dict = {}  # compile key -> facts of every kernel compiled so far (the capture's, after install())
all_configs = True  # False: compile only each autotuned kernel's first config (second dtype pass)
_active = None
capture = None  # the llama_triton.inspect Capture after install(): .rows holds every compiled kernel's facts


def _print_compiled(row) -> None:
    consts = ", ".join(f"{k}={v}" for k, v in row.constexprs.items() if v is not None)
    print(f"  compiled {row.kernel}[{consts}] {row.options} shared={row.shared}"
          + (" (over the limit: fails to launch; the autotuner skips it)" if not row.fits_shared else ""))


def install() -> None:
    """Intercept every launch (compile for sm_90 instead, with llama_triton.inspect's capture: every autotune
    config the early prune leaves, Triton's argument specialisation) and let the backend send CPU tensors
    to Triton. Fails like a launch would: a kernel over the shared-memory limit, an autotuner with no config."""
    global compiled, capture
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("lowering_check must run without TRITON_INTERPRET (kernels must be JITFunctions)")
    from llama_triton.inspect import capture as _capture

    global _active
    # target_paths=False: the portable kernels compile too (the TMA forward has its own test)
    _active = _capture("sm_90", configs=lambda: "all" if all_configs else "first", strict=True,
                       on_compile=_print_compiled, target_paths=False)  # kept referenced: active from now on
    capture = _active.__enter__()
    compiled = capture.compiled


def _run(cmd_args, code: str = "", timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run this module as a script with `cmd_args` (or, with `code`, `code` after `install()` with this module
    imported as `L`) in a fresh Python without the interpreter. Skips when Triton cannot compile for NVIDIA."""
    import pytest

    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton cannot compile for NVIDIA here: {e}")
    here = Path(__file__).resolve()
    prelude = f"import sys\nsys.path.insert(0, {str(here.parent)!r})\nimport lowering_check as L\nL.install()\n"
    cmd = [sys.executable, "-c", prelude + code] if code else [sys.executable, str(here), *cmd_args]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def run_snippet(code: str = "", args=(), timeout: int = 1500) -> str:
    """From a test (any process): run `code` in a fresh Python without the interpreter, after `install()`
    with this module imported as `L` (or, with no code, the whole registry check with `args` as op names).
    Skips when this Triton cannot compile for NVIDIA; fails with the output unless it prints LOWERING OK."""
    r = _run(args, code, timeout)
    assert r.returncode == 0 and "LOWERING OK" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]
    return r.stdout


_registry_run = None


def registry_check():
    """The whole registry check plus the static inspection (inspect_registry), run once per test session and
    shared by tests/test_lowering.py and tests/test_static_gates.py: (process, {"rows": [KernelRow],
    "failures": {op: traceback}})."""
    global _registry_run
    if _registry_run is None:
        import tempfile

        from llama_triton.inspect import KernelRow

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "inspect.json")
            r = _run(["--inspect-json", path])
            data = {"rows": [], "failures": {"(all)": "the check did not write its JSON"}}
            if os.path.exists(path):
                with open(path) as f:
                    data = json.load(f)
                data["rows"] = [KernelRow.from_dict(row) for row in data["rows"]]
        _registry_run = (r, data)
    return _registry_run


def inspect_registry(path: str, specs) -> None:
    """The static gates' data: every op at llama_triton.inspect's "model" shapes (Llama-3-8B dimensions at
    a few tokens), bf16, forward and backward, every autotune config, compiled for sm_90; the rows and the
    ops that failed (with their traceback) go to `path` as JSON."""
    from dataclasses import asdict

    from llama_triton.inspect import inspect_ops

    rows, failures = [], {}
    for spec in specs:
        print(f"inspect {spec.name} (model shapes, bfloat16)")
        try:
            rows += inspect_ops(spec.name, shape="model", dtype="bfloat16", arch="sm_90", configs="all")
        except Exception:
            failures[spec.name] = traceback.format_exc()[-4000:]
            print(f"INSPECT FAILED {spec.name}:\n{failures[spec.name]}")
    with open(path, "w") as f:
        json.dump({"rows": [asdict(r) for r in rows], "failures": failures}, f)


def main(names, inspect_json=None) -> int:
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
    if inspect_json:
        inspect_registry(inspect_json, specs)
    return 1 if failures else 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    json_path = None
    if argv[:1] == ["--inspect-json"]:
        json_path, argv = argv[1], argv[2:]
    sys.exit(main(argv, json_path))
