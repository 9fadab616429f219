"""Pure Triton kernels, one op family per module, installed as ``llama_triton.kernels``.

Each module holds ``@triton.jit`` kernels followed by plain Python launchers (validate -> allocate -> grid
-> launch). Modules import torch and triton only. Nothing is imported here, so that importing one family
does not compile or import the others.
"""
