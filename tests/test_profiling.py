"""llama_triton.profiling.count_kernels on callables whose launches and syncs are known."""
import torch

from llama_triton import profiling
from llama_triton.kernels._checks import cpu_value_check


def _count(fn, *args, **kw):
    return profiling.count_kernels(fn, *args, **kw)[1]


def test_aten_kernels_views_and_allocations():
    x = torch.randn(4, 6)
    c = _count(lambda t: (t.view(6, 4).t() * 2 + 1).sum(0), x)       # mul, add, sum; view and t are free
    assert (c.aten, c.triton, c.syncs) == (3, 0, 0), c.names
    c = _count(lambda t: torch.empty_like(t).copy_(t).reshape(-1)[2:], x)
    assert (c.aten, c.syncs) == (1, 0), c.names                      # the copy only
    assert c.names == {"aten:copy_": 1}


def test_host_syncs():
    x = torch.randn(4, 6)
    mask = torch.tensor([True, False, True, True])
    cases = [(lambda: x.sum().item(), 1, 1), (lambda: int(x.max()), 1, 1), (lambda: bool((x > 0).all()), 2, 1),
             (lambda: x.tolist(), 0, 1), (lambda: x[mask], 0, 1), (lambda: mask.nonzero(), 0, 1),
             (lambda: x[torch.tensor([0, 2])], 1, 0), (lambda: [int(t) for t in x.aminmax()], 1, 2)]
    for fn, aten, syncs in cases:
        c = _count(fn)
        assert (c.aten, c.syncs) == (aten, syncs), c.names


def test_triton_launches_and_custom_ops():
    """A custom op (llama_triton::*) is not an ATen kernel: its Triton launch is what counts."""
    from llama_triton import rms_norm

    x, w = torch.randn(3, 32), torch.ones(32)
    y, c = profiling.count_kernels(rms_norm, x, w, 1e-6)
    assert y.shape == (3, 32)
    assert (c.triton, c.aten, c.syncs, c.launches) == (1, 0, 0, 1), c.names
    assert c.names == {"triton:_rms_norm_fwd_kernel": 1}
    _, c = profiling.count_kernels(rms_norm, x, w, 1e-6, residual=x)    # fused add: still one launch
    assert (c.triton, c.aten) == (1, 0)


def test_scopes_and_cpu_value_checks():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    x = torch.randn(2, 8)

    def fn(t):
        y = net(t)
        with cpu_value_check():                                     # CPU-only: reported apart
            assert int(y.abs().max()) >= 0
        return y + 1

    _, c = profiling.count_kernels(fn, x, scopes={"first": net[0], "last": net[2]})
    assert (c.scopes["first"].aten, c.scopes["last"].aten) == (1, 1)   # mm; addmm
    assert (c.aten, c.syncs, c.checks) == (4, 0, 3), c.names          # mm, relu, addmm, add | abs, max, sync
    rest = c.outside_scopes()
    assert rest.aten == 2 and rest.names == {"aten:relu": 1, "aten:add": 1, "check:abs": 1, "check:max": 1,
                                             "check:_local_scalar_dense": 1}
    assert torch.Tensor.tolist is not None and profiling.count_kernels(lambda: 1)[0] == 1  # patches undone


def test_cli_profile_count(capsys):
    from llama_triton import cli

    assert cli.main(["profile", "--preset", "tiny", "--layers", "1", "--count", "--prompt-len", "2"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert {"layer", "fixed", "total"} <= set(rows), out
    assert int(rows["total"][1]) == int(rows["layer"][2]) + int(rows["fixed"][1]), out   # launches add up
    assert rows["total"][4] == "0", out                                                   # no host sync
