"""Model compression beyond quantization (model surgery, above the layers in the import order):

  * ``pruning``: magnitude and Wanda scores, unstructured and N:M (2:4, 4:8) masks applied in place,
    per-layer sparsity report, 2:4 linears -> PyTorch semi-structured sparse tensors on a supporting GPU;
  * ``low_rank``: truncated SVD and activation-aware (SVD-LLM whitened) SVD into ``layers.LowRankLinear``;
  * ``calibration``: input statistics recorded with forward hooks, block by block, hooks removed after;
  * ``checkpoint``: save / load compressed models; ``report``: sizes and the quality table and plot;
  * ``cli``: ``llama-triton compress``.
"""
from .calibration import token_batches
from .checkpoint import load_compressed, save_compressed
from .low_rank import factorize_model
from .pruning import prune_model, sparsity_report, to_semi_structured

__all__ = ["factorize_model", "load_compressed", "prune_model", "save_compressed", "sparsity_report",
           "to_semi_structured", "token_batches"]
