"""A patched transformers model's decode step: decode_attention over HF's cache (no flash attention at
q_len 1), unpad / left-padding bookkeeping once per forward, 0 host syncs per decoder layer."""
import pytest
import torch

from _hf_tiny import hf_model
from llama_triton import hf, profiling


def _decode_step_counts(layers: int, padded: bool):
    model = hf_model("gqa", num_hidden_layers=layers)
    hf.patch(model)
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :2] = 0                                                      # left padding, as HF generate
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(2):                                                # a warm-up step, then the count
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            scopes = {f"layer {i}": layer for i, layer in enumerate(model.model.layers)}
            _, counts = profiling.count_kernels(model, tok, attention_mask=mask, past_key_values=past,
                                                use_cache=True, scopes=scopes)
    return counts


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_patched_decode_step_has_no_host_sync_per_layer(padded):
    c1, c2 = _decode_step_counts(1, padded), _decode_step_counts(2, padded)
    assert c2.syncs - c1.syncs == 0 and c2.scopes["layer 1"].syncs == 0, (c1.names, c2.names)   # per layer: none
    assert c2.syncs <= 2, c2.names          # per forward: transformers' own mask check + the left-padding check
    layer = c2.scopes["layer 1"].names
    assert layer["triton:_decode_split_kernel"] == 1 and not any("flash" in k for k in layer), layer
    assert c2.launches - c1.launches == c2.scopes["layer 1"].launches <= 16, layer
