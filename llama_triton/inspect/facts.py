"""Compile one Triton kernel for a target and read what the compiler made of it.

Sources, all produced on a CPU machine by Triton's own tool chain:
  * ptxas -v (Triton's bundled ptxas): registers/thread, spill store/load bytes, stack frame;
  * the PTX: how `tl.dot` lowered (wgmma / mma.sync), TMA (cp.async.bulk.tensor), cp.async, global
    load/store widths (ld/st.global vector widths, cp.async copy sizes); the TTGIR: the pipeline depth
    (buffers of the multi-buffered shared-memory tiles);
  * the SASS (Triton's bundled cuobjdump, when present and asked for): LDG/STG/LDGSTS widths.
Kernel metadata gives shared memory, num_warps and num_stages.

ptxas's log is only written when Triton compiles (not on a Triton cache hit), so the parsed facts are
kept next to Triton's cache (``<cache>/llama_triton_inspect/<kernel hash>.json``) and ptxas is re-run on
the PTX only when neither is available.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

FACTS_VERSION = 3  # bump when a parser changes: old sidecar files are then ignored

_VEC = re.compile(r"^v(\d)$")
_BITS = re.compile(r"^[bsuf](8|16|32|64|128)$")
_LDST = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)+)")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_BUFFERS = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<((\d+)x\d+x\d+x[^,>]+)")
_WGMMA = re.compile(r"\bwgmma\.mma_async\S*\.(m\d+n\d+k\d+)\.(\w+)\.(\w+)")
_MMA = re.compile(r"\bmma\.sync\S*\.(m\d+n\d+k\d+)")


def _width(modifiers: str) -> int | None:
    """Bits moved by one ld/st.global with these dot-separated modifiers (`.v4.b32` -> 128)."""
    vec, bits = 1, None
    for m in modifiers.strip(".").split("."):
        if _VEC.match(m):
            vec = int(m[1:])
        elif _BITS.match(m):
            bits = int(_BITS.match(m).group(1))
    return vec * bits if bits else None


def _histogram(widths) -> dict:
    """{bits: static instruction count}, widest first (JSON keys are strings)."""
    return {str(w): widths.count(w) for w in sorted(set(widths), reverse=True)}


def ptx_facts(ptx: str, ttir: str = "", ttgir: str = "") -> dict:
    """Facts read from a kernel's PTX, TTIR (a `tt.dot` with no MMA instruction lowered to FMAs) and TTGIR
    (the multi-buffered shared-memory tiles that cp.async/TMA copies rotate through: `3x128x64xbf16` is a
    3-deep pipeline, 2 tiles in flight while one is computed on)."""
    loads, stores = [], []
    for kind, mods in _LDST.findall(ptx):
        w = _width(mods)
        if w:
            (loads if kind == "ld" else stores).append(w)
    cp_sizes = [8 * int(n, 0) for n in _CP_ASYNC.findall(ptx)]
    buffers = _BUFFERS.findall(ttgir)
    dots = []
    if _WGMMA.search(ptx):
        dots.append("wgmma")
    if _MMA.search(ptx):
        dots.append("mma.sync")
    if not dots and "tt.dot" in ttir:
        dots.append("fma")
    instr = sorted({f"wgmma.{m}.{a}.{b}" for m, a, b in _WGMMA.findall(ptx)} | {f"mma.{m}" for m in _MMA.findall(ptx)})
    all_loads = loads + cp_sizes
    return {
        "load_widths": _histogram(all_loads), "store_widths": _histogram(stores),
        "dot": "+".join(dots) or "none",
        "dot_instr": ",".join(instr),
        "tma": "cp.async.bulk.tensor" in ptx,
        "cp_async": bool(cp_sizes),
        "cp_async_depth": max((int(n) for _, n in buffers), default=1) if cp_sizes else 0,
        "smem_buffers": ",".join(b for b, _ in buffers),
        "load_bits_max": max(all_loads, default=0), "load_bits_min": min(all_loads, default=0),
        "store_bits_max": max(stores, default=0), "store_bits_min": min(stores, default=0),
    }


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_facts(log: str) -> dict:
    """registers, spill_stores, spill_loads, stack (bytes) from a `ptxas -v` log of one kernel."""
    regs, spill = _REGS.search(log), _SPILL.search(log)
    if not regs or not spill:
        raise ValueError(f"not a ptxas -v log of a kernel: {log[:300]!r}")
    stack, st, ld = (int(x) for x in spill.groups())
    return {"registers": int(regs.group(1)), "spill_stores": st, "spill_loads": ld, "stack": stack}


_SASS_MEM = re.compile(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)")
_SASS_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def sass_facts(sass: str) -> dict:
    """Global load/store widths from SASS (LDG/LDGSTS loads, STG stores; 32 bits without a width suffix)."""
    loads, stores = [], []
    for op, mods in _SASS_MEM.findall(sass):
        w = next((_SASS_WIDTH[m] for m in mods.strip(".").split(".") if m in _SASS_WIDTH), 32)
        (stores if op == "STG" else loads).append(w)
    return {"load_widths": _histogram(loads), "store_widths": _histogram(stores),
            "load_bits_max": max(loads, default=0), "load_bits_min": min(loads, default=0),
            "store_bits_max": max(stores, default=0), "store_bits_min": min(stores, default=0),
            "tma": "UTMALDG" in sass or "UTMASTG" in sass, "wgmma_sass": "HGMMA" in sass}


# --------------------------------------------------------------------------------- the tools Triton ships
def _tool(name: str) -> str | None:
    """Path of Triton's bundled NVIDIA tool `name` (ptxas, cuobjdump, nvdisasm), or None."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
    except Exception:
        import triton

        path = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    return path if path and os.path.exists(path) else None


def _ptxas_path(capability: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except (ImportError, TypeError, AttributeError):
        path = _tool("ptxas")
        if not path:
            raise RuntimeError("Triton's bundled ptxas was not found: cannot read registers and spills")
        return path


def run_ptxas(ptx: str, capability: int) -> str:
    """`ptxas -v` on `ptx` for sm_<capability> (Triton's own flags); returns the log."""
    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        r = subprocess.run([_ptxas_path(capability), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                            src, "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed: {r.stderr[-2000:]}")
    return r.stdout + r.stderr


def run_cuobjdump_sass(cubin: bytes) -> str | None:
    """SASS of a cubin via Triton's bundled cuobjdump (None when it is not shipped)."""
    tool = _tool("cuobjdump")
    if not tool:
        return None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        r = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


# -------------------------------------------------------------------------------------------- the cache
def _sidecar_dir() -> Path:
    try:
        from triton import knobs

        base = knobs.cache.dir
    except Exception:
        base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return Path(base) / "llama_triton_inspect"


def _load_sidecar(kernel_hash: str) -> dict:
    try:
        data = json.loads((_sidecar_dir() / f"{kernel_hash}.json").read_text())
        return data if data.get("version") == FACTS_VERSION else {}
    except (OSError, ValueError):
        return {}


def _store_sidecar(kernel_hash: str, data: dict) -> None:
    try:
        d = _sidecar_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{kernel_hash}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({**data, "version": FACTS_VERSION}))
        tmp.replace(d / f"{kernel_hash}.json")
    except OSError:
        pass  # a read-only cache costs a ptxas re-run next time, nothing else


@contextlib.contextmanager
def _ptxas_log():
    """Make Triton print ptxas's -v log (TRITON_DUMP_PTXAS_LOG) while compiling, and catch it."""
    old = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        if old is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = old


def compile_and_read(jit_fn, signature: dict, constexprs: dict, attrs: dict, options: dict, capability: int,
                     sass: bool = False) -> dict:
    """Compile `jit_fn` for sm_<capability> with Triton (ASTSource, as a GPU launch would) and return its
    facts: name, hash, shared, num_warps, num_stages, registers, spills, stack, the PTX facts and, with
    `sass`, load/store widths from the SASS (`widths_from` says which)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with _ptxas_log() as log:
        kernel = triton.compile(ASTSource(jit_fn, signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", capability, 32), options=options)
    md = kernel.metadata
    side = _load_sidecar(md.hash)
    if "ptxas" not in side:
        text = log.getvalue()
        side["ptxas"] = ptxas_facts(text if _REGS.search(text) else run_ptxas(kernel.asm["ptx"], capability))
        _store_sidecar(md.hash, side)
    facts = {"name": md.name, "hash": md.hash, "shared": md.shared, "num_warps": md.num_warps,
             "num_stages": md.num_stages, **side["ptxas"], **ptx_facts(kernel.asm["ptx"], kernel.asm.get("ttir", ""), kernel.asm.get("ttgir", "")),
             "widths_from": "ptx"}
    if sass:
        if "sass" not in side:
            text = run_cuobjdump_sass(kernel.asm["cubin"])
            if text is not None:
                side["sass"] = sass_facts(text)
                _store_sidecar(md.hash, side)
        if "sass" in side:
            s = side["sass"]
            facts.update({k: s[k] for k in ("load_bits_max", "load_bits_min", "store_bits_max", "store_bits_min",
                                            "load_widths", "store_widths")})
            facts["tma"] = facts["tma"] or s["tma"]
            facts["widths_from"] = "sass"
    return facts
