"""SwiGLU specifics beyond the generic registry parity: PyTorch-exact numerics, leading shapes and strides,
the concatenated gate_up variant, the drop-in SwiGLUMLP vs transformers' LlamaMLP, opcheck, bad input."""
import pytest
import torch

from conftest import DEVICE, DTYPES
from llama_triton import layers, reference, testing
from llama_triton.ops import swiglu as swiglu_ops
from llama_triton.ops.swiglu import swiglu


@pytest.fixture(autouse=True)
def _deterministic_inputs():
    """Every test draws its random inputs from the same seed, whatever ran before it."""
    torch.manual_seed(0)


def _check(gate, up=None):
    """Forward and input grads of ours vs the low-precision reference vs the fp64 oracle."""
    args = (gate,) if up is None else (gate, up)
    res = []
    for a in (args, args, testing.to_oracle(args)):
        leaves = tuple(t.detach().clone().requires_grad_() for t in a)
        fn = swiglu if len(res) == 0 else reference.swiglu
        out = fn(*leaves)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
        res.append((out.detach(),) + torch.autograd.grad(out, leaves, g))
    (ours, low, hi) = res
    for name, o, l, h in zip(("out", "d0", "d1"), ours, low, hi):
        assert o.dtype == l.dtype and o.shape == l.shape, name
        testing.assert_close(name, o, l, h)
    return ours, low


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_bitwise_like_pytorch(dtype):
    """silu rounded to the dtype then the product: what HF's act_fn(gate) * up gives, to the last bit
    (up to the last fp32 ulp of exp, which rounding to fp16 hides)."""
    g = torch.randn(8, 300, dtype=dtype, device=DEVICE) * 4
    u = torch.randn(8, 300, dtype=dtype, device=DEVICE)
    ours, ref = swiglu(g, u), torch.nn.functional.silu(g) * u
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    else:
        assert (ours != ref).float().mean() < 0.002


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (2, 17, 33), (129, 5)])
def test_leading_shapes(shape, dtype):
    g = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    _check(g, torch.randn_like(g))
    _check(torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(dtype):
    gu = torch.randn(2, 9, 2 * 40, dtype=dtype, device=DEVICE)
    _check(gu[..., :40], gu[..., 40:])                       # halves of a fused projection: strided rows
    t = torch.randn(40, 2, 9, dtype=dtype, device=DEVICE).permute(1, 2, 0)   # last dim not contiguous
    _check(t, torch.randn_like(t))
    _check(torch.randn(2, 9, 160, dtype=dtype, device=DEVICE)[..., ::2])     # packed, strided last dim


def test_packed_equals_split():
    gu = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    gu2 = gu.detach().clone().requires_grad_()
    y1, y2 = swiglu(gu), swiglu(gu2[:, :32], gu2[:, 32:])
    assert torch.equal(y1, y2)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    assert torch.equal(gu.grad, gu2.grad)


def test_empty():
    assert swiglu(torch.randn(0, 8, device=DEVICE), torch.randn(0, 8, device=DEVICE)).shape == (0, 8)
    assert swiglu(torch.randn(3, 0, 8, device=DEVICE)).shape == (3, 0, 4)


def test_opcheck():
    g = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    u = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    torch.library.opcheck(swiglu_ops._swiglu_fwd, (g, u))
    torch.library.opcheck(swiglu_ops._swiglu_packed_fwd, (torch.randn(4, 18, device=DEVICE, requires_grad=True),))


def test_mlp_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    for bias in (False, True):
        cfg = LlamaConfig(hidden_size=48, intermediate_size=136, num_attention_heads=4, mlp_bias=bias)
        torch.manual_seed(0)
        hf = LlamaMLP(cfg).to(DEVICE)
        ours = layers.SwiGLUMLP.from_module(hf)
        assert ours.gate_proj is hf.gate_proj and ours.down_proj is hf.down_proj
        fresh = layers.SwiGLUMLP(cfg).to(DEVICE)
        fresh.load_state_dict(hf.state_dict())                  # same parameter names
        x = torch.randn(2, 7, 48, device=DEVICE, requires_grad=True)
        ref = hf(x)
        for m in (ours, fresh):
            y = m(x)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        gx, gw = torch.autograd.grad(ours(x).square().sum(), (x, hf.gate_proj.weight))
        rx, rw = torch.autograd.grad(ref.square().sum(), (x, hf.gate_proj.weight))
        torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


def test_mlp_rejects_other_activations():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="hidden_act"):
        layers.SwiGLUMLP(SimpleNamespace(hidden_size=8, intermediate_size=16, hidden_act="gelu"))
    with pytest.raises(TypeError, match="gate_proj"):
        layers.SwiGLUMLP.from_module(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "gate,up,exc,match",
    [
        (torch.randn(2, 8).long(), torch.randn(2, 8), TypeError, "gate has dtype int64"),
        (torch.randn(2, 8), torch.randn(2, 8).half(), TypeError, "up has dtype"),
        (torch.randn(2, 8), torch.randn(2, 7), ValueError, "up has shape"),
        (torch.randn(2, 7), None, ValueError, "gate_up's last dim must be even"),
        (torch.randn(2, 8).double(), None, TypeError, "gate_up has dtype float64"),
        (torch.randn(2, 8), torch.randn(2, 8, device="meta"), ValueError, "up is on meta"),
        ([1.0], None, TypeError, "gate_up must be a torch.Tensor"),
    ],
)
def test_bad_input(gate, up, exc, match):
    with pytest.raises(exc, match=match):
        swiglu(gate, up)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,inter", [(8192, 14336), (3, 11008), (1000, 4095)])
def test_gpu_large(rows, inter, dtype):
    g = torch.randn(rows, 2 * inter, dtype=dtype, device="cuda")
    _check(g[:, :inter], g[:, inter:])
    _check(g)
