"""The model shipped in the package: the tiny preset trained with llama_triton.train on Python's own
``pydoc_data`` help topics (byte tokenizer), stored as HF-format safetensors + config.json under
``llama_triton/assets/pydoc_tiny/`` with ``training.json`` (the command, steps, time, held-out perplexity).

    model = load_embedded()                   # LlamaForCausalLM, fp32, eval mode
    info = embedded_info()                    # dict from training.json, e.g. info["held_out_ppl"]

Reproduce it with the command in ``training.json`` (see the README's "Training" section).
"""
from __future__ import annotations

import json
import os

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "pydoc_tiny")


def available() -> bool:
    return os.path.exists(os.path.join(EMBEDDED_DIR, "model.safetensors"))


def embedded_info() -> dict:
    """training.json of the shipped model (empty dict if the assets are missing)."""
    path = os.path.join(EMBEDDED_DIR, "training.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def load_embedded(device=None, dtype=None):
    """The shipped trained model (FileNotFoundError if the package was installed without its data)."""
    import torch

    from .model import LlamaForCausalLM

    if not available():
        raise FileNotFoundError(f"the embedded model is missing from {EMBEDDED_DIR} (package data not installed)")
    return LlamaForCausalLM.from_pretrained(EMBEDDED_DIR, dtype=dtype or torch.float32, device=device).eval()
