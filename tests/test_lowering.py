"""Every kernel the registry's ops launch compiles for an H100 (sm_90) with Triton's bundled ptxas, on a
machine without a GPU (tests/lowering_check.py). The interpreter cannot see GPU-only compile errors."""
import pytest
import torch

import lowering_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled and run by the other tests")
def test_every_registry_kernel_lowers_to_sm90():
    r, _ = lowering_check.registry_check()  # one run per session, shared with tests/test_static_gates.py
    assert r.returncode == 0 and "LOWERING OK" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]
