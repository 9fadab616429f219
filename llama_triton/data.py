"""Training data: read, clean, tokenise, split, pack into fixed-length sequences with document boundaries.

    docs = read_documents("corpus/")                  # a text file, a directory of them, or a JSONL file
    data = PackedDataset.build(docs, tokenizer, seq_len=256, held_out=0.05, seed=0)
    loader = PackedLoader(data.train, batch_size=8, seed=0)
    batch = loader.next()                             # dict for model(**batch): see PackedLoader.collate

Cleaning: CRLF -> LF, tabs -> 4 spaces, trailing spaces stripped, runs of blank lines cut to one, leading and
trailing blank lines dropped; empty and duplicate documents dropped. Each document is ``tokenizer.encode``d
(with BOS) and gets EOS; the documents are concatenated and cut into ``seq_len`` rows; the boundaries of the
documents inside each row are kept, so that a batch carries ``cu_seqlens`` (varlen attention: no token
attends to another document) and ``position_ids`` that restart at 0 at each document (and at each row).
The held-out split is by documents (a seeded choice), or the last part of the token stream when there are
too few documents.
"""
from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass

import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def clean(text: str) -> str:
    """Normalise one document's whitespace (see the module doc); NFC unicode."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _read_jsonl(path: str, key: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(obj, str):
                docs.append(obj)
            elif isinstance(obj, dict) and isinstance(obj.get(key), str):
                docs.append(obj[key])
            else:
                raise ValueError(f"{path}:{n}: expected a JSON object with a string {key!r} field")
    return docs


PYDOC_TOPICS = "python:pydoc_data"


def pydoc_topics() -> list[str]:
    """The help topics that ship with Python (``pydoc_data.topics``, ~465k characters), one document each,
    in sorted topic order: a corpus every machine has."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def read_documents(path, text_key: str = "text") -> list[str]:
    """Raw documents from a text file (one document), a ``.jsonl`` file (one per line: an object's
    ``text_key`` field, or a string), a directory (every text/JSONL file under it, sorted), or
    ``"python:pydoc_data"`` (pydoc_topics())."""
    if path == PYDOC_TOPICS:
        return pydoc_topics()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data path {path!r} does not exist")
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.endswith(TEXT_SUFFIXES + (".jsonl",)))
        if not files:
            raise ValueError(f"data directory {path!r} has no {'/'.join(TEXT_SUFFIXES)}/.jsonl files")
        return [d for f in files for d in read_documents(f, text_key)]
    if path.endswith(".jsonl"):
        return _read_jsonl(path, text_key)
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def clean_documents(docs) -> list[str]:
    """clean() each document; drop empty ones and exact duplicates (first kept, order kept)."""
    out, seen = [], set()
    for d in docs:
        d = clean(d)
        if d and d not in seen:
            seen.add(d)
            out.append(d)
    return out


@dataclass
class PackedSplit:
    """Rows of packed tokens: ``ids (n_rows, seq_len)`` int64 and ``starts (n_rows, seq_len)`` bool, True
    where a document (or a row) begins."""
    ids: torch.Tensor
    starts: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def tokens(self) -> torch.Tensor:
        """The split's tokens as one 1-D stream (for llama_triton.evaluate.perplexity)."""
        return self.ids.reshape(-1)


def pack(token_docs, seq_len: int) -> PackedSplit:
    """Concatenate tokenised documents and cut the stream into rows of seq_len (the tail is dropped)."""
    stream, starts = [], []
    for toks in token_docs:
        stream.extend(toks)
        starts.extend([True] + [False] * (len(toks) - 1))
    n = len(stream) // seq_len
    ids = torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)
    st = torch.tensor(starts[:n * seq_len], dtype=torch.bool).view(n, seq_len)
    if n:
        st[:, 0] = True
    return PackedSplit(ids, st)


@dataclass
class PackedDataset:
    train: PackedSplit
    held_out: PackedSplit
    n_docs: int
    n_tokens: int

    @classmethod
    def build(cls, docs, tokenizer, seq_len: int, held_out: float = 0.05, seed: int = 0) -> "PackedDataset":
        """Clean, tokenise (BOS + tokens + EOS), split (``held_out`` fraction of documents) and pack."""
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
        if not 0.0 <= held_out < 1.0:
            raise ValueError(f"held_out must be in [0, 1), got {held_out}")
        docs = clean_documents(docs)
        if not docs:
            raise ValueError("the corpus is empty (no non-empty documents after cleaning)")
        eos = getattr(tokenizer, "eos_token_id", None)
        toks = [tokenizer.encode(d) + ([eos] if eos is not None else []) for d in docs]
        n_tokens = sum(map(len, toks))
        n_held = round(held_out * len(toks))
        if held_out and n_held >= 1 and len(toks) - n_held >= 1:
            perm = torch.randperm(len(toks), generator=torch.Generator().manual_seed(seed)).tolist()
            held_idx = set(perm[:n_held])
            train_docs = [t for i, t in enumerate(toks) if i not in held_idx]
            held_docs = [t for i, t in enumerate(toks) if i in held_idx]
        else:                                      # too few documents: the last part of the stream
            flat = [x for t in toks for x in t]
            cut = len(flat) - round(held_out * len(flat))
            train_docs, held_docs = [flat[:cut]], ([flat[cut:]] if cut < len(flat) else [])
        train = pack(train_docs, seq_len)
        if len(train) == 0:
            raise ValueError(f"the corpus has {n_tokens} tokens: too few for one training sequence of "
                             f"seq_len={seq_len}")
        held = pack(held_docs, seq_len) if held_docs else PackedSplit(train.ids[:0], train.starts[:0])
        if held_out and len(held) == 0 and held_docs:           # held-out text shorter than one row
            flat = [x for t in held_docs for x in t]
            held = PackedSplit(torch.tensor(flat)[None], torch.zeros(1, len(flat), dtype=torch.bool))
            held.starts[0, 0] = True
        return cls(train, held, len(docs), n_tokens)


def collate(ids: torch.Tensor, starts: torch.Tensor) -> dict:
    """Rows (b, s) and their document starts -> the model's keyword arguments for a packed batch:
    ``input_ids``, ``shift_labels`` (next token; -100 where the next token starts another document or the
    row ends), ``position_ids`` (restart at each document), ``cu_seqlens`` int32 (n_docs + 1,) over the
    flattened b*s tokens, ``max_seqlen`` (int)."""
    b, s = ids.shape
    flat_starts = starts.reshape(-1).clone()
    flat_starts[::s] = True                                                   # every row starts a segment
    begin = flat_starts.nonzero().squeeze(1)                                  # (n_docs,)
    cu = torch.cat([begin, torch.tensor([b * s])]).to(torch.int32)
    lens = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(len(lens)), lens.long())       # (b*s,) segment of each token
    pos = torch.arange(b * s) - begin[seg]
    nxt = torch.full((b * s,), -100, dtype=torch.long)
    nxt[:-1] = ids.reshape(-1)[1:]
    nxt[:-1][flat_starts[1:]] = -100                                          # next token is another doc / row
    return dict(input_ids=ids, shift_labels=nxt.view(b, s), position_ids=pos.view(b, s), cu_seqlens=cu,
                max_seqlen=int(lens.max()))


class PackedLoader:
    """Endless shuffled batches of a PackedSplit, deterministic in (seed, position): each epoch is a
    permutation drawn from ``seed + epoch``; ``state_dict()`` / ``load_state_dict()`` save and restore the
    position exactly. ``rank``/``world_size``: each rank takes its rows of every global batch."""

    def __init__(self, split: PackedSplit, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(split) < batch_size * world_size:
            raise ValueError(f"the training split has {len(split)} sequences, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks): lower batch_size or seq_len")
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._perm = None

    def _order(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(len(self.split), generator=g)
        return self._perm

    def next(self) -> dict:
        gb = self.batch_size * self.world_size
        if self.index + gb > len(self.split):
            self.epoch, self.index, self._perm = self.epoch + 1, 0, None
        rows = self._order()[self.index:self.index + gb][self.rank::self.world_size]
        self.index += gb
        return collate(self.split.ids[rows], self.split.starts[rows])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self.seed, self._perm = state["epoch"], state["index"], state["seed"], None
