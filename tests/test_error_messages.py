"""Small error-message fixes (issue 11): a tensor eps is named by type and shape (not printed whole),
"1 dimension" (not "1 dimensions"), KVCache.update refuses a k/v of another dtype than the cache (no silent
cast), and rope's error for flash-layout input names unsqueeze_dim."""
import pytest
import torch

import llama_triton
from llama_triton.layers import KVCache


def test_tensor_eps_is_not_printed_whole():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match=r"eps must be a non-negative float, got a Tensor of shape \(1000,\)") as e:
        llama_triton.rms_norm(x, w, eps=torch.full((1000,), 1e-6))
    assert len(str(e.value)) < 200


def test_one_dimension_grammar():
    with pytest.raises(ValueError, match=r"weight must have 1 dimension, got") as e:
        llama_triton.rms_norm(torch.randn(2, 8), torch.ones(2, 8))
    assert "1 dimensions" not in str(e.value)


def test_kv_cache_update_refuses_another_dtype():
    cache = KVCache(1, 8, 2, 16, dtype=torch.float32)
    k = torch.randn(1, 1, 2, 16, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"k has dtype torch.float16 but the cache holds torch.float32"):
        cache.update(torch.zeros(1, 1, dtype=torch.int64), k, k)
    assert int(cache.seqlens[0]) == 0


def test_rope_flash_layout_error_names_unsqueeze_dim():
    q, k = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 2, 16)          # (b, s, h, d): flash-attn layout
    cos = sin = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match="unsqueeze_dim=2"):
        llama_triton.apply_rotary_pos_emb(q, k, cos, sin)
    qe, ke = llama_triton.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    assert qe.shape == q.shape and ke.shape == k.shape


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), True])
def test_non_finite_or_bool_eps_is_refused(eps):
    """eps=nan gave an all-NaN output silently (nan < 0 is False); inf gave zeros; a bool is no float."""
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="eps must be a non-negative"):
        llama_triton.rms_norm(x, w, eps=eps)
