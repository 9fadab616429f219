"""Every public op under torch.autocast (fp16 and bf16, CPU), forward and backward (issue 11).

Each op's rule (llama_triton.amp) is written out again here, independently: the op under autocast must
give exactly what it gives outside autocast on the inputs cast by that rule (outputs, their dtypes, and the
gradients that flow back through the casts to the original leaves). Small shapes: the interpreter is slow.
"""
import pytest
import torch

import llama_triton
from llama_triton import backend
from llama_triton.flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from llama_triton.ops.low_rank import low_rank_matmul
from llama_triton.quant import quantize_weight

F16, F32 = torch.float16, torch.float32


def _r(*shape, dtype=F32, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(shape, generator=g).to(dtype).requires_grad_(grad)


def _lower(dt):
    return lambda a: [t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in a]


def _promote(*idx):
    def cast(a, dt):
        wide = a[idx[0]].dtype
        for i in idx[1:]:
            wide = torch.promote_types(wide, a[i].dtype)
        return [t.to(wide) if i in idx else t for i, t in enumerate(a)]
    return cast


def _labels(n, v):
    return torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(n))


# name -> (fn, args maker, kwargs, cast(args, autocast_dtype) -> args as the rule casts them)
def _cases():
    qw = quantize_weight(torch.randn(8, 64, generator=torch.Generator().manual_seed(3)), bits=4, group_size=32)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    seqlens = torch.tensor([3, 8], dtype=torch.int32)
    lower = lambda a, dt: _lower(dt)(a)                                               # noqa: E731
    keep = lambda a, dt: list(a)                                                     # noqa: E731
    like_cache = lambda a, dt: [a[0].to(a[1].dtype)] + list(a[1:])                   # noqa: E731
    keep_routing = lambda a, dt: _lower(dt)(a[:4]) + [a[4]]                          # noqa: E731
    return {
        "flash_attention": (llama_triton.flash_attention, lambda: [_r(1, 5, 2, 16), _r(1, 5, 1, 16), _r(1, 5, 1, 16)],
                            {}, lower),
        "flash_attn_func": (flash_attn_func, lambda: [_r(1, 5, 2, 16), _r(1, 5, 1, 16), _r(1, 5, 1, 16)],
                            {"causal": True}, lower),
        "flash_attn_varlen_func": (flash_attn_varlen_func, lambda: [_r(5, 2, 16), _r(5, 1, 16), _r(5, 1, 16), cu, cu,
                                                                    3, 3], {}, lower),
        "flash_attn_with_kvcache": (flash_attn_with_kvcache, lambda: [_r(2, 1, 2, 16, dtype=F16, grad=False),
                                                                      _r(2, 8, 1, 16, grad=False),
                                                                      _r(2, 8, 1, 16, grad=False)],
                                    {"cache_seqlens": seqlens}, like_cache),
        "decode_attention": (llama_triton.decode_attention, lambda: [_r(2, 1, 2, 16, dtype=F16, grad=False),
                                                                     _r(2, 8, 1, 16, grad=False),
                                                                     _r(2, 8, 1, 16, grad=False), seqlens],
                             {}, like_cache),
        "decode_attention_with_kvcache": (   # issue 13: q and the new k/v take the caches' dtype
            llama_triton.decode_attention_with_kvcache,
            lambda: [_r(2, 1, 2, 16, dtype=F16, grad=False), _r(2, 8, 1, 16, grad=False), _r(2, 8, 1, 16, grad=False),
                     _r(2, 1, 1, 16, dtype=F16, grad=False), _r(2, 1, 1, 16, dtype=F16, grad=False, seed=1),
                     torch.tensor([3, 7], dtype=torch.int32)],
            {}, lambda a, dt: [a[0].to(a[1].dtype), a[1], a[2], a[3].to(a[1].dtype), a[4].to(a[2].dtype), a[5]]),
        "rms_norm": (llama_triton.rms_norm, lambda: [_r(3, 24, dtype=F16), _r(24), 1e-6, _r(3, 24)], {},
                     _promote(0, 3)),
        "apply_rotary_pos_emb": (llama_triton.apply_rotary_pos_emb,
                                 lambda: [_r(1, 2, 3, 8, dtype=F16), _r(1, 1, 3, 8), _r(3, 8, grad=False),
                                          _r(3, 8, grad=False, seed=1)], {}, _promote(0, 1)),
        "swiglu": (llama_triton.swiglu, lambda: [_r(3, 20, dtype=F16), _r(3, 20)], {}, _promote(0, 1)),
        "cross_entropy": (llama_triton.cross_entropy, lambda: [_r(4, 10), _labels(4, 10)], {}, keep),
        "fused_linear_cross_entropy": (llama_triton.fused_linear_cross_entropy,
                                       lambda: [_r(8, 16), _r(32, 16), _labels(8, 32)], {}, lower),
        "fused_linear_cross_entropy[bias, ce_weight]": (
            llama_triton.fused_linear_cross_entropy,
            lambda: [_r(8, 16), _r(32, 16), _labels(8, 32), -100, "mean", None, _r(32),
                     torch.rand(32, generator=torch.Generator().manual_seed(7))],
            {}, lambda a, dt: _lower(dt)(a[:7]) + [a[7]]),                    # class weights stay fp32
        "rms_norm_matmul": (llama_triton.rms_norm_matmul, lambda: [_r(3, 16), _r(16), _r(8, 16)], {}, lower),
        "moe_experts[I=12]": (llama_triton.moe_experts, lambda: [_r(3, 16), _r(4, 24, 16), _r(4, 16, 12),
                                                                 torch.tensor([[0, 2], [1, 2], [3, 0]]),
                                                                 torch.rand(3, 2, generator=torch.Generator()
                                                                            .manual_seed(5)).requires_grad_()],
                              {}, keep_routing),                       # routing weights stay fp32 (as in HF)
        "low_rank_matmul": (low_rank_matmul, lambda: [_r(3, 16), _r(4, 16), _r(8, 4)], {}, lower),
        "quant_matmul": (llama_triton.quant_matmul, lambda: [_r(2, 64, dtype=F16), qw], {},
                         lambda a, dt: [a[0].to(a[1].scales.dtype), a[1]]),
        "moe_experts": (llama_triton.moe_experts, lambda: [_r(3, 16), _r(4, 16, 16), _r(4, 16, 8),      # issue 17
                                                           torch.tensor([[0, 1], [1, 3], [2, 0]]), _r(3, 2)], {},
                        keep_routing),
    }


CASES = _cases()


def _outs(o):
    return list(o) if isinstance(o, (tuple, list)) else [o]


def _run(fn, args, kwargs, autocast_dtype=None, cast=None, backward_in_autocast=False):
    """-> (outputs, grads of the leaves) for one call; `cast` applies the rule by hand (outside autocast)."""
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    call_args = cast(leaves, autocast_dtype) if cast else leaves
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if cast is None else torch.autocast("cpu", enabled=False)
    with ctx:
        outs = _outs(fn(*call_args, **kwargs))
        need = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = []
        if need and backward_in_autocast:
            grads = _grads(outs, need)
    if need and not backward_in_autocast:
        grads = _grads(outs, need)
    return [o.detach() for o in outs], grads


def _grads(outs, need):
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs if o.requires_grad)
    return list(torch.autograd.grad(loss, need, allow_unused=True))


def _assert_same(got, want, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"{what}[{i}]"
            continue
        assert g.dtype == w.dtype, f"{what}[{i}]: dtype {g.dtype} != {w.dtype}"
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{what}[{i}] differs")


def test_every_public_op_has_an_autocast_case():
    assert set(llama_triton.__all__) <= set(CASES), set(llama_triton.__all__) - set(CASES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_autocast_forward_backward(name, dtype):
    fn, make, kwargs, cast = CASES[name]
    args = make()
    got, got_g = _run(fn, args, kwargs, dtype)
    want, want_g = _run(fn, args, kwargs, dtype, cast=cast)
    _assert_same(got, want, f"{name} outputs")
    _assert_same(got_g, want_g, f"{name} grads")
    assert all(torch.isfinite(o.float()).all() for o in got)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_flce_autocast_weight_only_grad_and_backward_inside(reduction):
    """The issue's reproducer: fp16 autocast, grads needed (weight only too), reduction "none", and the
    backward run inside the autocast region as well."""
    fn = llama_triton.fused_linear_cross_entropy
    args = [_r(8, 16, grad=False), _r(32, 16), _labels(8, 32)]
    kw = {"reduction": reduction}
    want = _run(fn, args, kw, F16, cast=lambda a, dt: _lower(dt)(a))
    for inside in (False, True):
        got = _run(fn, args, kw, F16, backward_in_autocast=inside)
        _assert_same(got[0], want[0], "loss")
        _assert_same(got[1], want[1], "grads")


def test_public_ops_record_their_rule():
    assert backend.public_op  # the decorator every public op uses
    rules = {n: getattr(getattr(llama_triton, n), "autocast_rule", None) for n in llama_triton.__all__
             if n.startswith(("flash_attention", "rms_norm", "swiglu", "cross", "fused", "decode", "quant", "apply"))}
    assert all(r is not None for r in rules.values()), rules


def test_model_training_step_and_generate_under_autocast():
    """How the ops are used: our model's training step (forward in autocast, backward after) and generate
    (the KV cache keeps the model's dtype; the layer casts k/v to it explicitly)."""
    from llama_triton.model import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.preset("tiny", num_hidden_layers=1)).init_weights(seed=0)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - want.item()) < 1e-2 * want.item()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model.generate(ids[:, :3], max_new_tokens=2)
    assert out.shape == (1, 5) and int(out.max()) < 260


def test_autocast_rules_trace_under_torch_compile():
    """The rules (argument binding, casts, autocast off inside) compile as one graph (fullgraph=True)."""
    def f(x, w, r):
        y, s = llama_triton.rms_norm(x, w, 1e-6, r)
        q = y.view(1, 4, 2, 16)
        return llama_triton.flash_attention(q, q, q).sum() + s.sum()

    x, w, r = _r(4, 32, dtype=F16, grad=False), _r(32, grad=False), _r(4, 32, grad=False)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=F16):
        torch.testing.assert_close(compiled(x, w, r), f(x, w, r), rtol=0, atol=0)


def test_autocast_rule_applies_to_keyword_calls():
    """The rule keys on the op's first parameter, wherever the caller puts it: a keyword call whose first
    keyword is not a tensor (here `reduction`) must still be cast (it raised under autocast, issue 11's
    FLCE reproducer)."""
    fn = llama_triton.fused_linear_cross_entropy
    x, w, y = _r(8, 16, grad=False), _r(32, 16), _labels(8, 32)
    with torch.autocast("cpu", dtype=F16):
        want = fn(x, w, y, reduction="mean")
        got = fn(reduction="mean", labels=y, lm_head_weight=w, hidden=x)
    _assert_same([got], [want], "loss")
