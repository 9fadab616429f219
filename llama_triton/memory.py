"""Peak memory of a function call, on CUDA or on the CPU.

    peak = peak_bytes(lambda: model(ids, labels=ids).loss.backward(), device)

CUDA: ``torch.cuda.max_memory_allocated`` (reset before the call) minus what was allocated before. CPU (torch
keeps no allocator statistics there): the process's peak resident set size (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) minus the resident size before the call: every page touched during the call,
custom ops' temporaries and the Triton interpreter's arrays included (glibc is told to mmap every allocation of
>= 64 KiB, returned to the OS on free, so the figure follows live tensor memory; small allocations blur it by
a few MiB).
Whole-process: run nothing else concurrently in the process. (torch.profiler's memory timeline was tried
first: under the Triton interpreter it recorded tens of GB of events.)
"""
from __future__ import annotations

import os

import torch


def peak_bytes(fn, device="cpu") -> int:
    """Peak bytes of tensor memory allocated on `device` during ``fn()`` above what was live before."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        raise ValueError(f"peak_bytes supports cpu and cuda devices, got {device}")
    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("peak_bytes on the CPU needs Linux's /proc/self/clear_refs and VmHWM")
    _libc_fixed_mmap_threshold()
    with open("/proc/self/clear_refs", "w") as f:          # reset the peak resident set size to the current
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - base)


_LIBC = []


def _libc_fixed_mmap_threshold() -> None:
    """glibc: serve allocations >= 64 KiB by mmap (returned to the OS on free) with a fixed threshold (by
    default it grows after each free, and freed tensors then stay resident), and trim the heap now."""
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt(-3, 64 * 1024)                       # M_MMAP_THRESHOLD
            _LIBC.append(libc)
        except (OSError, AttributeError):                    # not glibc: RSS then over-counts reuse less well
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0].malloc_trim(0)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024           # reported in kB
    raise RuntimeError(f"/proc/self/status has no {key}")
