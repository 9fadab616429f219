"""Backend dispatch: the one place that decides whether an op runs its Triton kernel or the PyTorch reference.

Rules (DESIGN.md):
  * CUDA tensors                                   -> Triton kernels
  * CPU tensors with TRITON_INTERPRET=1            -> the same Triton kernels, in Triton's interpreter
    (the variable must be set before `triton` is first imported: `@triton.jit` reads it at decoration time)
  * anything else                                  -> llama_triton.reference
  * bfloat16 CPU tensors                           -> llama_triton.reference: the interpreter computes bf16
    wrongly (``tl.dot`` by orders of magnitude, elementwise roundings past the 2x rule), so it never runs
    there; bf16 kernels are checked on a GPU
  * LLAMA_TRITON_BACKEND=torch|triton forces a choice; forcing triton where it cannot run raises.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch

from . import amp
from .kernels._checks import interpreting as interpreter_enabled  # the one definition (kernels need it too)

_CHOICES = ("auto", "torch", "triton")


def forced_backend() -> str:
    """The value of LLAMA_TRITON_BACKEND ('auto' when unset); raises on an unknown value."""
    choice = os.environ.get("LLAMA_TRITON_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"LLAMA_TRITON_BACKEND must be one of {_CHOICES}, got {choice!r}")
    return choice


def triton_can_run(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device` in this process."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def use_triton(tensor: torch.Tensor) -> bool:
    """Decide the backend for an op whose main input is `tensor` (True: Triton kernel, False: reference)."""
    choice = forced_backend()
    if choice == "torch":
        return False
    can_run = triton_can_run(tensor.device)
    if choice == "triton" and not can_run:
        raise RuntimeError(
            f"LLAMA_TRITON_BACKEND=triton but Triton cannot run on device {tensor.device}: use CUDA tensors, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU interpreter"
        )
    if can_run and tensor.device.type == "cpu" and tensor.dtype == torch.bfloat16:
        if choice == "triton":
            raise RuntimeError("LLAMA_TRITON_BACKEND=triton but Triton's CPU interpreter computes bfloat16 wrongly; "
                               "use float16/float32 on the CPU, CUDA tensors, or LLAMA_TRITON_BACKEND=auto (the "
                               "PyTorch reference for bfloat16 CPU tensors)")
        return False
    return can_run


def device_guard(tensor):
    """The one CUDA device guard: launches inside run on `tensor`'s GPU, not the current device (a model
    split over GPUs, ``device_map="auto"``). A no-op for other devices and while torch.compile traces
    (Inductor guards its own graphs). Every public op enters it (``public_op``); autograd runs backward
    passes on their tensors' device already."""
    if getattr(getattr(tensor, "device", None), "type", None) != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def public_op(autocast: str = "keep", promote=None, like=None, keep=()):
    """Decorator for every public op: the device guard (on the first argument's device) and the op's
    torch.autocast rule (llama_triton.amp): ``autocast="lower"`` (but not the arguments named in ``keep``)
    or ``"keep"``, ``promote=(names)``, ``like={name: other}``. Outside autocast the op runs unchanged."""
    rule = (("promote", tuple(promote)) if promote else ("like", dict(like)) if like
            else ("lower", tuple(keep)) if autocast == "lower" else autocast)

    def deco(fn):
        sig = inspect.signature(fn)
        first_name = next(iter(sig.parameters))       # the op's main tensor, also when passed by keyword

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            first = args[0] if args else kwargs.get(first_name)
            with device_guard(first):
                if not amp.enabled(first):
                    return fn(*args, **kwargs)
                bound = sig.bind(*args, **kwargs)
                amp.cast_arguments(bound, rule, first.device.type)
                with amp.disabled(first.device.type):
                    return fn(*bound.args, **bound.kwargs)

        wrapper.autocast_rule = rule
        return wrapper

    return deco


def describe() -> str:
    """One line saying which backend CPU and CUDA tensors get, for CLI output."""
    choice = forced_backend()
    cpu = ("torch reference" if choice == "torch" or not triton_can_run(torch.device("cpu"))
           else "triton (interpreter; bfloat16 -> torch reference)")
    gpu = "torch reference" if choice == "torch" else "triton"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return f"backend: LLAMA_TRITON_BACKEND={choice}; cpu tensors -> {cpu}; cuda tensors -> {gpu} ({cuda})"
