"""The trained model shipped in the package (issue 16): it loads from the package data, is the tiny preset,
records how it was trained, and really is trained: its perplexity on held-out pydoc text (the training run's
seeded document split) is near the recorded figure and far below a random model's (~vocab size)."""
import os

from llama_triton import embedded
from llama_triton.config import LlamaConfig


def test_shipped_model_is_the_trained_tiny_preset(monkeypatch):
    from llama_triton.data import PYDOC_TOPICS, PackedDataset, read_documents
    from llama_triton.evaluate import perplexity
    from llama_triton.tokenizer import ByteTokenizer

    assert embedded.available(), embedded.EMBEDDED_DIR
    info = embedded.embedded_info()
    for key in ("command", "steps", "seconds", "held_out_ppl", "tokens", "config"):
        assert key in info, key
    size = sum(os.path.getsize(os.path.join(embedded.EMBEDDED_DIR, f)) for f in os.listdir(embedded.EMBEDDED_DIR))
    assert size < 4 << 20
    model = embedded.load_embedded()
    tiny = LlamaConfig.preset("tiny")
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (
        tiny.hidden_size, tiny.num_hidden_layers, tiny.vocab_size)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")            # PyTorch reference ops: speed
    cfg = info["config"]
    data = PackedDataset.build(read_documents(PYDOC_TOPICS), ByteTokenizer(), cfg["seq_len"], cfg["held_out"],
                               cfg["seed"])
    res = perplexity(model, data.held_out.tokens[:512], max_length=cfg["seq_len"])
    assert res.ppl < 1.5 * info["held_out_ppl"] and res.ppl < 20, (res.ppl, info["held_out_ppl"])
