"""Generic parity: every registered op, every CPU test shape, fp32/fp16 (+bf16 on GPU), forward and
backward, against the fp64 oracle under the 2x rule (llama_triton.testing)."""
import pytest

from conftest import DEVICE, DTYPES
from llama_triton import registry, testing

CASES = [(spec, shape) for spec in registry.REGISTRY for shape in spec.test_shapes]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec,shape", CASES, ids=[f"{s.name}[{s.label(sh)}]" for s, sh in CASES])
def test_parity(spec, shape, dtype):
    for c in testing.parity(spec, shape, dtype, DEVICE):
        assert c.ok, f"{spec.name} {shape} {dtype} {c.name}: err {c.max_abs:.3e} > bound {c.bound:.3e}"


def test_every_spec_is_complete():
    names = [s.name for s in registry.REGISTRY]
    assert len(names) == len(set(names)), "duplicate op names in the registry"
    for spec in registry.REGISTRY:
        assert spec.test_shapes and spec.bench_shapes, spec.name
        assert spec.bytes(spec.bench_shapes[0], __import__("torch").float16, "fwd") > 0, spec.name


def test_parity_detects_a_wrong_kernel():
    """The harness itself must be able to fail: a perturbed op does not pass."""
    spec = registry.get("rms_norm")
    import dataclasses
    bad = dataclasses.replace(spec, fn=lambda x, w: spec.fn(x, w) * 1.01)
    results = testing.parity(bad, {"rows": 4, "hidden": 64}, DTYPES[0], DEVICE, backward=False)
    assert not results[0].ok
