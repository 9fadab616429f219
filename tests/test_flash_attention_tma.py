"""The Hopper flash attention forward (kernels/flash_attention_tma.py: TMA tensor descriptors).

Numerics: Triton's interpreter runs tensor descriptors, so the descriptor kernel itself runs here on CPU
(fp16; the interpreter computes bf16 dots wrongly) through the public op, with the selection forced on
(on a GPU it is chosen only on sm_90+): out, lse and the gradients (the backward is the portable one,
fed by this forward's out/lse) against the fp64 reference under the 2x rule. Static (sm_90, no GPU): every
autotune config at head_dim 128, bf16, causal, GQA 4 compiles to TMA loads and wgmma with no spills (head_dim
64 and fp16 were checked by hand when the configs were chosen: the compile costs ~7 s of CPU per config).
"""
import pytest
import torch

import lowering_check
from conftest import DEVICE
from llama_triton.kernels import flash_attention_tma as tma
from test_flash_attention import _qkv, check


@pytest.fixture
def forced(monkeypatch):
    """Select the descriptor forward for every input it supports; count its launches."""
    calls = []
    real = tma.launch_fwd

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tma, "use_for", tma.supports)
    monkeypatch.setattr(tma, "launch_fwd", spy)
    return calls


# (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal, window, softcap)
CASES = [
    (2, 17, 17, 4, 1, 32, True, (-1, -1), 0.0),     # batch > 1, GQA 4, ragged last block
    (1, 17, 45, 4, 2, 16, True, (-1, -1), 0.0),     # q_len < k_len: bottom-right causal
    (1, 45, 17, 2, 1, 16, True, (-1, -1), 0.0),     # q_len > k_len: empty rows (out 0, lse -inf)
    (1, 70, 70, 2, 1, 32, True, (16, -1), 0.0),     # sliding window + causal
    (1, 33, 20, 2, 2, 64, False, (-1, -1), 5.0),    # non-causal, softcap
]


@pytest.mark.parametrize("b,sq,sk,h,hk,d,causal,window,softcap", CASES)
def test_descriptor_forward_matches_reference(forced, b, sq, sk, h, hk, d, causal, window, softcap):
    torch.manual_seed(0)
    q, k, v = _qkv(b, sq, sk, h, hk, d, torch.float16)
    check(q, k, v, backward=sk == 17 and sq == 17, causal=causal, window_size=window, softcap=softcap)
    assert forced, "the descriptor forward did not run"


def test_descriptor_forward_varlen_and_hf_layout(forced):
    """Packed sequences (descriptor bounds = each sequence) and an HF (b, h, s, d) tensor read transposed."""
    torch.manual_seed(0)
    lens = [5, 19, 1]
    cu = torch.tensor([0, 5, 24, 25], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lens), 4, 32, dtype=torch.float16, device=DEVICE)
    k, v = (torch.randn(sum(lens), 1, 32, dtype=torch.float16, device=DEVICE) for _ in range(2))
    check(q, k, v, backward=False, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=19, max_seqlen_k=19)
    qh, kh, vh = (torch.randn(1, 2, 21, 32, dtype=torch.float16, device=DEVICE).transpose(1, 2) for _ in range(3))
    check(qh, kh, vh, backward=False, causal=True)
    assert len(forced) == 2


def test_unsupported_inputs_take_the_portable_path():
    q, k, v = _qkv(1, 8, 8, 2, 1, 80, torch.float16)              # head_dim 80: no power-of-2 box
    assert not tma.supports(q, k, v)
    q, k, v = _qkv(1, 8, 8, 2, 1, 32, torch.float32)              # fp32: the portable kernel (ieee dots)
    assert not tma.supports(q, k, v)
    q, k, v = _qkv(1, 8, 8, 2, 1, 32, torch.float16)
    assert tma.supports(q, k, v) and not tma.use_for(q, k, v)    # CPU tensors: never selected by itself
    assert not tma.supports(q[..., 1:17], k[..., :16], v[..., :16])  # base pointer not 16-byte aligned


_STATIC = """
import torch
from llama_triton.kernels import flash_attention as F, flash_attention_tma as T
T.use_for = T.supports                  # CPU tensors: the capture compiles instead of launching
d, dtype = 128, torch.bfloat16
q = torch.empty(1, 512, 32, d, dtype=dtype)
k, v = torch.empty(1, 512, 8, d, dtype=dtype), torch.empty(1, 512, 8, d, dtype=dtype)
F.attention_fwd(q, k, v, None, None, 512, 512, d ** -0.5, -1, 0)
rows = [r for r in L.capture.rows if r.kernel == "_attn_fwd_tma_kernel"]
for r in rows:
    print("ROW", r.config, f"w{r.num_warps} s{r.num_stages}", r.registers, r.spill_stores, r.spill_loads, r.tma,
          r.cp_async, r.dot, r.fits_shared)
print("NCONFIGS", len(T._configs()))
print("LOWERING OK", len(rows))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel is compiled and run by the tests above")
def test_descriptor_forward_static_sm90_tma_no_spills():
    """Static, sm_90 (Triton's bundled ptxas): TMA loads, wgmma, 0 spill bytes, fits an H100's shared memory."""
    out = lowering_check.run_snippet(_STATIC).splitlines()
    rows = [line.split()[1:] for line in out if line.startswith("ROW ")]
    n_configs = int(next(line.split()[1] for line in out if line.startswith("NCONFIGS ")))
    assert len(rows) == n_configs >= 6, rows                     # every config (none pruned at head_dim 128)
    bad = [r for r in rows if r[5:7] != ["0", "0"] or r[7] != "True" or r[8] != "False" or "wgmma" not in r[9]
           or r[10] != "True"]
    assert not bad, "config, warps, stages, registers, spill st/ld, tma, cp.async, dot, fits:\n" + "\n".join(map(str, bad))


def test_allocator_is_installed_only_where_none_is_set():
    """Device-side descriptors need triton.set_allocator: ours goes in when none is set, a user's stays."""
    from triton.runtime import _allocation

    saved = _allocation._allocator.get()
    try:
        _allocation._allocator.set(_allocation.NullAllocator())
        tma._ensure_allocator()
        assert _allocation._allocator.get() is tma._torch_alloc
        mine = lambda size, align, stream: None  # noqa: E731
        _allocation._allocator.set(mine)
        tma._ensure_allocator()
        assert _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.set(saved)
