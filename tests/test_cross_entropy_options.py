"""Cross-entropy / fused linear cross-entropy options that Liger users rely on: label_smoothing and class
weight against F.cross_entropy, z-loss (lse_square_scale, return_z_loss) and logit softcap against the
reference under the 2x rule (fp32 and fp16), the FLCE bias, Liger-style modules, and bad option values."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from llama_triton import reference, testing
from llama_triton.layers import CrossEntropyLoss, FusedLinearCrossEntropyLoss
from llama_triton.ops.cross_entropy import cross_entropy, fused_linear_cross_entropy

V, N, H = 70, 11, 16


def _labels(n=N, vocab=V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, (n,), generator=gen)
    y[torch.rand(n, generator=gen) < 0.3] = -100
    return y.to(DEVICE)


def _grads(out, leaves, seed=5):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, leaves, g)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{"label_smoothing": 0.1}, {"weight": True}, {"label_smoothing": 0.2, "weight": True}])
def test_matches_torch_cross_entropy(opts, reduction):
    """label_smoothing and class weight: ours == F.cross_entropy (fp32), loss and gradient; the FLCE too."""
    torch.manual_seed(0)
    kw = dict(opts)
    if kw.get("weight"):
        kw["weight"] = torch.rand(V, device=DEVICE) + 0.1
    y = _labels()
    x = 3 * torch.randn(N, V, device=DEVICE)
    (ours_x,), (ref_x,) = _leaves(x), _leaves(x)
    ours, ref = cross_entropy(ours_x, y, reduction=reduction, **kw), F.cross_entropy(ref_x, y, reduction=reduction, **kw)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grads(ours, [ours_x]), _grads(ref, [ref_x]))
    # fused linear: class weight is `ce_weight` there (its `weight` is the lm_head weight), plus a bias
    h, w, b = torch.randn(N, H, device=DEVICE), torch.randn(V, H, device=DEVICE) * 0.5, torch.randn(V, device=DEVICE)
    fkw = {("ce_weight" if k == "weight" else k): v for k, v in kw.items()}
    oh, ow, ob = _leaves(h, w, b)
    rh, rw, rb = _leaves(h, w, b)
    ours = fused_linear_cross_entropy(oh, ow, y, reduction=reduction, bias=ob, **fkw)
    ref = F.cross_entropy(F.linear(rh, rw, rb), y, reduction=reduction, **kw)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grads(ours, [oh, ow, ob]), _grads(ref, [rh, rw, rb]))


def _check(fn, ref_fn, args, n_grad, **kw):
    """Ours vs the reference in the input dtype vs the fp64 oracle (2x rule): loss, z-loss, grads."""
    res = []
    for f, a in ((fn, args), (ref_fn, args), (ref_fn, testing.to_oracle(args))):
        leaves = _leaves(*a[:n_grad])
        loss, z = f(*leaves, *a[n_grad:], return_z_loss=True, **kw)
        assert not z.requires_grad                          # the z-loss is for logging: its gradient is in loss
        res.append((loss.detach(), z) + _grads(loss, leaves))
    for i, (o, l, h) in enumerate(zip(*res)):
        assert o.shape == l.shape and o.dtype == l.dtype, (i, o.shape, l.shape, o.dtype, l.dtype)
        testing.assert_close(f"{fn.__name__}[{i}] {kw}", o, l, h)
    return res[0]


OPTS = [
    {"lse_square_scale": 1e-2},
    {"softcap": 5.0},
    {"lse_square_scale": 1e-3, "softcap": 8.0, "label_smoothing": 0.1, "weight": True},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: "+".join(o))
def test_z_loss_softcap_vs_reference(opts, reduction, dtype):
    torch.manual_seed(0)
    kw = dict(opts, reduction=reduction)
    weight = torch.rand(V, device=DEVICE) + 0.1 if kw.pop("weight", False) else None
    y = _labels()
    x = (4 * torch.randn(N, V, device=DEVICE)).to(dtype)
    _check(cross_entropy, reference.cross_entropy, (x, y), 1, weight=weight, **kw)
    h = torch.randn(N, H, device=DEVICE).to(dtype)
    w = (torch.randn(V, H, device=DEVICE) * 0.5).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype)
    _check(lambda h, w, b, y, **k: fused_linear_cross_entropy(h, w, y, bias=b, **k),
           lambda h, w, b, y, **k: reference.fused_linear_cross_entropy(h, w, y, bias=b, **k),
           (h, w, b, y), 3, ce_weight=weight, **kw)


def test_z_loss_value_and_default():
    """z = lse_square_scale * logsumexp(logits)**2 per non-ignored token (mean over them); 0 by default."""
    x = torch.randn(N, V, device=DEVICE)
    y = _labels()
    loss, z = cross_entropy(x, y, lse_square_scale=0.5, return_z_loss=True)
    valid = y != -100
    expected = 0.5 * torch.logsumexp(x[valid], -1).pow(2).mean()
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(loss, F.cross_entropy(x, y) + expected)
    _, z0 = cross_entropy(x, y, return_z_loss=True)
    assert z0.item() == 0.0


def test_softcap_is_tanh_cap():
    x = 20 * torch.randn(N, V, device=DEVICE)
    y = _labels()
    torch.testing.assert_close(cross_entropy(x, y, softcap=7.0), F.cross_entropy(7.0 * torch.tanh(x / 7.0), y))


def test_liger_style_modules():
    """FusedLinearCrossEntropyLoss takes Liger's (lin_weight, _input, target, bias=None) order and options."""
    torch.manual_seed(0)
    h, w, b, y = torch.randn(2, 5, H), torch.randn(V, H), torch.randn(V), _labels(10).view(2, 5)
    cw = torch.rand(V) + 0.1
    flce = FusedLinearCrossEntropyLoss(ce_weight=cw, ignore_index=-100, lse_square_scale=1e-3, label_smoothing=0.1,
                                       reduction="sum", softcap=9.0, return_z_loss=True)
    loss, z = flce(w, h, y, b)
    exp_loss, exp_z = reference.fused_linear_cross_entropy(h, w, y, bias=b, ce_weight=cw, lse_square_scale=1e-3,
                                                           label_smoothing=0.1, reduction="sum", softcap=9.0,
                                                           return_z_loss=True)
    torch.testing.assert_close((loss, z), (exp_loss, exp_z))
    ce = CrossEntropyLoss(weight=cw, label_smoothing=0.1)
    logits = torch.randn(10, V)
    torch.testing.assert_close(ce(logits, y.view(-1)), F.cross_entropy(logits, y.view(-1), weight=cw,
                                                                        label_smoothing=0.1))
    assert FusedLinearCrossEntropyLoss()(w, h, y).shape == ()


@pytest.mark.parametrize("bad,match", [({"label_smoothing": 1.5}, "label_smoothing"),
                                       ({"lse_square_scale": -1.0}, "lse_square_scale"),
                                       ({"softcap": 0.0}, "softcap"),
                                       ({"weight": torch.ones(V + 1)}, "weight"),
                                       ({"weight": torch.ones(V, dtype=torch.int64)}, "weight")])
def test_bad_options(bad, match):
    x, y = torch.randn(N, V, device=DEVICE), _labels()
    with pytest.raises((ValueError, TypeError), match=match):
        cross_entropy(x, y, **bad)
    fkw = {("ce_weight" if k == "weight" else k): v for k, v in bad.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_cross_entropy(torch.randn(N, H), torch.randn(V, H), y, **fkw)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(torch.randn(N, H), torch.randn(V, H), y, bias=torch.randn(V - 1))


def test_opcheck_and_compile_with_options():
    from llama_triton.ops import cross_entropy as ce_ops
    x = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 3, -100, 32, 7], device=DEVICE)
    cw = torch.rand(33, device=DEVICE) + 0.1
    torch.library.opcheck(ce_ops._cross_entropy_fwd, (x, y, -100, "mean", True, 0.1, 1e-2, 4.0, cw))
    h = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(33, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(33, device=DEVICE, requires_grad=True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")   # as tests/test_cross_entropy.py
    torch.library.opcheck(ce_ops._flce_fwd, (h, w, y, -100, "mean", True, True, None, b, True, 0.1, 1e-2, 4.0, cw),
                          test_utils=utils)
    torch.library.opcheck(ce_ops._flce_bwd, (h.detach(), w.detach(), y, torch.randn(5, device=DEVICE), -100, True,
                                             True, None, b.detach(), True, 0.1, 1e-2, 4.0, cw))
    kw = dict(label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0)

    def loss_fn(h, w, b, y):
        return fused_linear_cross_entropy(h, w, y, bias=b, ce_weight=cw, **kw) + cross_entropy(h @ w.t(), y, weight=cw, **kw)

    def ref_fn(h, w, b, y):
        return (reference.fused_linear_cross_entropy(h, w, y, bias=b, ce_weight=cw, **kw)
                + reference.cross_entropy(h @ w.t(), y, weight=cw, **kw))

    ours = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(h, w, b, y)
    ref = ref_fn(h, w, b, y)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, (h, w, b)), torch.autograd.grad(ref, (h, w, b)))
