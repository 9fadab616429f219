"""Test set-up: without a GPU, run the Triton kernels in Triton's interpreter.

TRITON_INTERPRET must be set before `triton` is first imported (`@triton.jit` reads it when a kernel is
defined), so it is set here at import time of conftest, before any test module imports llama_triton.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
# bf16 tl.dot is wrong in the interpreter: bf16 is tested on the GPU only
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
