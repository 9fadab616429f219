"""Text generation for llama_triton.model.LlamaForCausalLM: prefill, then one token at a time over static
KV caches (fixed shapes, no host sync inside a step, so the decode step can be captured by CUDA graphs or
torch.compile on a GPU).

    ids = generate(model, input_ids, max_new_tokens=32)                                   # greedy
    ids = generate(model, input_ids, 32, temperature=0.8, top_k=50, top_p=0.95, eos_token_id=2,
                   attention_mask=mask, streamer=lambda tok: print(tok))                 # sampled, batched
"""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens from logits (b, vocab): greedy when temperature <= 0, else temperature / top-k / top-p
    (nucleus) sampling. -> (b,) int64. No host synchronisation (exponential-race sampling, as gpt-fast)."""
    if not temperature or temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[:, -1:]   # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs >= top_p             # keep the smallest prefix with mass >= top_p (HF)
        drop[:, 0] = False                                   # and always the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


def _right_align(input_ids, attention_mask):
    """Move each row's valid tokens (mask 1) to the front, keeping their order -> (ids, lengths int64 (b,))."""
    mask = attention_mask.to(torch.bool)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices                 # valid first
    return input_ids.gather(1, order), mask.sum(1)


class DecodeStep:
    """One decode step over static caches: tokens (b, 1), positions (b, 1) int64 -> logits (b, vocab) fp32.

    With ``compile=True`` the step goes through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on a GPU).
    With ``cuda_graph=True`` (CUDA tensors) the positions-free step is captured once in a CUDA graph on its
    first call (after a warm-up run on a side stream, the caches' lengths restored) and replayed: one
    ``graph.replay()`` per token instead of ~10 launches per layer from Python. The returned logits are the
    graph's static output buffer (overwritten by the next call).
    """

    def __init__(self, model, caches, compile: bool = False, cuda_graph: bool = False):
        from .packing import pack_model_

        pack_model_(model)              # a traced / captured step uses the packed q/k/v, gate/up as they are now
        self.model, self.caches = model, caches
        self.fn = torch.compile(self._step, mode="reduce-overhead", dynamic=False) if compile else self._step
        self.cuda_graph = cuda_graph and not compile
        self._graph = None

    def _capture(self, tokens):
        """Warm up (autotune) on a side stream, then capture the step reading a static token buffer."""
        seqlens = self.caches[0].seqlens
        saved = seqlens.clone()
        self._tokens = tokens.clone()
        side = torch.cuda.Stream(device=tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            self._step(self._tokens)
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        seqlens.copy_(saved)
        self._graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self._graph):
                self._logits = self._step(self._tokens)
        except RuntimeError as e:                    # a step that syncs the host (e.g. "dynamic" rope) cannot
            import warnings                          # be captured: run it eagerly instead

            warnings.warn(f"DecodeStep: CUDA graph capture failed ({str(e).splitlines()[0]}); running eagerly")
            self.cuda_graph, self._graph = False, None
        seqlens.copy_(saved)                         # capture does not run kernels; the copy keeps it explicit

    def _step(self, tokens, positions=None):
        return self.model(tokens, position_ids=positions, caches=self.caches).logits[:, -1].float()

    def __call__(self, tokens, positions=None):
        """positions None (the decode path): each row's next position is its cache length, which the step
        advances; given, the tokens are written at those positions (the general path, more launches)."""
        if self.cuda_graph and positions is None and tokens.is_cuda:
            if self._graph is None:
                self._capture(tokens)
            if self._graph is None:
                return self.fn(tokens, positions)
            self._tokens.copy_(tokens)
            self._graph.replay()
            return self._logits
        return self.fn(tokens, positions)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | list | None = None,
             attention_mask: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None,
             streamer=None, pad_token_id: int | None = None, generator: torch.Generator | None = None,
             compile: bool = False, cuda_graph: bool | None = None, eos_check_every: int = 8) -> torch.Tensor:
    """Generate `max_new_tokens` tokens after each prompt.

    Args:
        input_ids: (b, L) int64 prompts. Prompts of different lengths: pass ``attention_mask`` (b, L) with 0 at
            padding (left or right padding, as HF tokenizers produce) or ``prompt_lengths`` (b,) for
            right-padded rows. Each sequence keeps its own length in the cache (ragged cache_seqlens): no
            padding token is ever attended to.
        temperature / top_k / top_p: 0 temperature = greedy; otherwise sampling (``generator`` for seeding).
        eos_token_id: an id or a list of ids; a finished row gets ``pad_token_id`` (default: the first eos)
            afterwards; generation stops when every row has finished.
        streamer: called with each step's tokens (b,) int64 (or an object with HF's put()/end()).
        compile: capture the decode step with torch.compile(mode="reduce-overhead") (GPU).
        cuda_graph: replay the decode step from a CUDA graph (default: on for CUDA tensors unless compile).
        eos_check_every: with eos_token_id, the host looks at "every row finished?" every this many tokens
            (one sync per check; the tokens are the same, finished rows keep getting pad).

    Returns:
        (b, L + max_new_tokens) int64: ``input_ids`` as given, followed by the new tokens.
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise TypeError(f"input_ids must be a (batch, seq) int64 tensor, got {tuple(input_ids.shape)} "
                        f"{input_ids.dtype}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b, L = input_ids.shape
    device = input_ids.device
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"{tuple(input_ids.shape)}")
        ids, lengths = _right_align(input_ids, attention_mask.to(device))
    elif prompt_lengths is not None:
        ids, lengths = input_ids, torch.as_tensor(prompt_lengths, device=device).long()
        if lengths.shape != (b,) or bool((lengths > L).any()):
            raise ValueError(f"prompt_lengths must be (batch,) values <= {L}, got {prompt_lengths}")
    else:
        ids, lengths = input_ids, torch.full((b,), L, device=device, dtype=torch.long)
    if bool((lengths < 1).any()):
        raise ValueError("every prompt needs at least one token (attention_mask / prompt_lengths has a 0 row)")
    if max_new_tokens == 0:
        return input_ids.clone()
    eos = None if eos_token_id is None else torch.as_tensor(eos_token_id, device=device).reshape(-1)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos is not None else 0)

    caches = model.make_caches(b, L + max_new_tokens, device=device)
    hidden = model.model(ids, caches=caches, fresh_cache=True)                        # (b, L, hidden): prefill
    for c in caches:                                                                  # ragged lengths
        c.seqlens.copy_(lengths.to(torch.int32))
    last = hidden.gather(1, (lengths - 1)[:, None, None].expand(b, 1, hidden.shape[-1]))   # (b, 1, hidden)
    logits = model.lm_head(last)[:, -1].float()                                       # (b, vocab)

    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and not compile
    step = DecodeStep(model, caches, compile=compile, cuda_graph=cuda_graph)
    out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        raw = sample(logits, temperature, top_k, top_p, generator)                    # (b,) fed back
        tok = raw
        if eos is not None:                                # finished rows show pad (their raw token is ignored)
            tok = torch.where(finished, torch.full_like(raw, pad), raw)
            finished |= torch.isin(tok, eos)
        out[:, t] = tok
        if streamer is not None:
            streamer.put(tok) if hasattr(streamer, "put") else streamer(tok)
        if t == max_new_tokens - 1:
            break
        if eos is not None and (t + 1) % max(1, eos_check_every) == 0 and bool(finished.all()):
            break
        logits = step(raw[:, None])                       # positions: the caches' lengths, advanced by the step
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    return torch.cat([input_ids, out], 1)
