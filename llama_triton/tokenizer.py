"""Tokenizers: the embedded byte-level tokenizer of the demo model, and the HF tokenizer of a model directory.

    tok = load_tokenizer("model_dir")        # HF tokenizer when the directory has one, else ByteTokenizer
    ids = tok.encode("hello")                # list[int]
    text = tok.decode(ids)
"""
from __future__ import annotations

import os

_HF_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class ByteTokenizer:
    """UTF-8 bytes 0..255, then <bos>=256, <eos>=257, <pad>=258, <unk>=259 (vocab 260: the tiny preset)."""

    vocab_size = 260
    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 256, 257, 258, 259

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        data = bytearray()
        for i in ids:
            if 0 <= i < 256:
                data.append(i)
            elif not skip_special_tokens:
                data += {256: b"<bos>", 257: b"<eos>", 258: b"<pad>"}.get(i, b"<unk>")
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter with the ByteTokenizer interface over a transformers tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = len(tok)
        self.bos_token_id, self.eos_token_id = tok.bos_token_id, tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_bos)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(path=None):
    """The HF tokenizer in directory `path` when it has tokenizer files (needs transformers), else ByteTokenizer."""
    if path is not None and any(os.path.exists(os.path.join(path, f)) for f in _HF_FILES):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(path))
    return ByteTokenizer()


def tokenizer_for_model(path, config):
    """The tokenizer for the model in directory `path` with config `config`: its HF tokenizer when the
    directory has one; else the byte tokenizer, only when the model's vocabulary holds its 260 ids (ValueError
    otherwise: bytes would index past the embedding), with the model's own ``eos_token_id``."""
    tok = load_tokenizer(path)
    if not isinstance(tok, ByteTokenizer):
        return tok
    vocab = getattr(config, "vocab_size", 0)
    if vocab < ByteTokenizer.vocab_size:
        raise ValueError(f"{path}: no tokenizer files ({', '.join(_HF_FILES)}) and the model's vocab_size {vocab} "
                         f"is below the byte tokenizer's {ByteTokenizer.vocab_size} ids; add the model's tokenizer")
    eos = getattr(config, "eos_token_id", None)
    if eos is not None:
        tok.eos_token_id = eos
    return tok
