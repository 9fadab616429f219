"""llama-triton: hand-written Triton kernels for LLaMA-family models.

The top-level ``kernels/`` directory is installed as ``llama_triton.kernels`` (see DESIGN.md): there is no
top-level ``kernels`` module, because that name belongs to Hugging Face's ``kernels`` package.
"""
from setuptools import find_packages, setup

setup(
    name="llama-triton",
    version="0.1.0",
    description="Triton kernels and drop-in nn.Module layers for LLaMA-family models",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_triton", "llama_triton.*"]) + ["llama_triton.kernels"],
    package_dir={"llama_triton": "llama_triton", "llama_triton.kernels": "kernels"},
    # the demo's embedded trained model (llama_triton/embedded.py): config.json, model.safetensors, training.json
    package_data={"llama_triton": ["assets/*/*.json", "assets/*/*.safetensors"]},
    # torch is deliberately unpinned here: the set-up scripts install torch==2.13.0 (the local CPU wheel)
    # before this package, and a GPU image brings its own CUDA build.
    install_requires=["torch>=2.4", "triton>=3.4", "numpy", "einops", "safetensors"],
    extras_require={
        "hf": ["transformers>=5.0"],
        "test": ["pytest", "transformers>=5.0", "accelerate"],   # accelerate: transformers' Trainer (one test)
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["llama-triton=llama_triton.cli:main"]},
)
