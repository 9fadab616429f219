"""Target GPUs for the inspector: datasheet limits (occupancy) and peaks (roofline estimates).

The occupancy rules are CUDA's (the occupancy calculator's): registers are allocated per warp in units of
256, shared memory per CTA plus 1 KiB reserved by the driver, at most 64 warps and 32 CTAs per SM on
sm_80/sm_90. The peaks are datasheet figures (dense tensor-core TFLOP/s, HBM GB/s): a roofline built on them
is an estimate, never a measurement (llama_triton.bench measures the roofline in the same run).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Target:
    name: str                    # "sm_90", "sm_80", or "local" (the GPU of this machine)
    capability: int              # 90, 80, ...
    gpu: str                     # the GPU the limits and peaks are of
    sms: int
    smem_per_block: int          # max dynamic shared memory one CTA may use (bytes)
    smem_per_sm: int             # shared memory of one SM (bytes)
    hbm_gbps: float | None       # datasheet memory bandwidth (None: unknown GPU)
    tflops: dict = field(default_factory=dict)  # dtype name -> datasheet dense tensor-core TFLOP/s
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    reg_alloc_unit: int = 256    # registers are allocated per warp in units of this many
    smem_reserved_per_cta: int = 1024


# float32 matmuls run as tf32 (Triton's default input precision), so fp32 gets the tf32 peak
TARGETS = {
    "sm_90": Target("sm_90", 90, "H100 SXM5", sms=132, smem_per_block=232448, smem_per_sm=233472, hbm_gbps=3350.0,
                    tflops={"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    "sm_80": Target("sm_80", 80, "A100 SXM4 80GB", sms=108, smem_per_block=166912, smem_per_sm=167936,
                    hbm_gbps=2039.0, tflops={"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
}
ARCHS = (*TARGETS, "local")

# datasheet peaks of GPUs that `--arch local` may find (first substring match of the device name wins)
_DATASHEETS = [
    ("H200", 4800.0, {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("H100 PCIe", 2000.0, {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100", 3350.0, {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("A100-SXM4-40GB", 1555.0, {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("A100", 2039.0, {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
]


def get_target(arch: str) -> Target:
    """The Target for "sm_90", "sm_80" or "local" (this machine's GPU; ValueError without one)."""
    if arch in TARGETS:
        return TARGETS[arch]
    if arch != "local":
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}; got {arch!r}")
    import torch

    if not torch.cuda.is_available():
        raise ValueError("arch 'local' needs a CUDA GPU and none is visible here; use --arch sm_90 or sm_80 "
                         "to inspect for a GPU this machine does not have")
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability()
    base = TARGETS.get(f"sm_{major}{minor}", TARGETS["sm_80"] if major < 9 else TARGETS["sm_90"])
    gbps, tflops = None, {}
    for key, bw, peaks in _DATASHEETS:
        if key.lower() in p.name.lower():
            gbps, tflops = bw, peaks
            break
    return replace(
        base, name="local", capability=10 * major + minor, gpu=p.name, sms=p.multi_processor_count,
        smem_per_block=getattr(p, "shared_memory_per_block_optin", base.smem_per_block),
        smem_per_sm=getattr(p, "shared_memory_per_multiprocessor", base.smem_per_sm),
        regs_per_sm=getattr(p, "regs_per_multiprocessor", base.regs_per_sm),
        max_warps_per_sm=getattr(p, "max_threads_per_multi_processor", 32 * base.max_warps_per_sm) // 32,
        hbm_gbps=gbps, tflops=tflops)


def occupancy(target: Target, registers: int, shared: int, num_warps: int) -> tuple[int, str]:
    """(CTAs per SM, what limits it: "registers" | "shared" | "warps" | "ctas") for one kernel config.
    0 CTAs when the kernel cannot launch on the target (too much shared memory or too many registers)."""
    if shared > target.smem_per_block:
        return 0, "shared"
    if registers > target.max_regs_per_thread:
        return 0, "registers"
    unit = target.reg_alloc_unit
    regs_per_warp = -(-max(registers, 1) * 32 // unit) * unit
    limits = {  # on a tie the hardware caps (warps, CTAs) are named: the kernel is at the SM's limit anyway
        "warps": target.max_warps_per_sm // num_warps,
        "ctas": target.max_ctas_per_sm,
        "registers": target.regs_per_sm // (regs_per_warp * num_warps),
        "shared": target.smem_per_sm // (shared + target.smem_reserved_per_cta),
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter
