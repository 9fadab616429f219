"""Plain-PyTorch versions of every op: the test oracle and the CPU fallback.

Each function computes its statistics in at least fp32 (fp64 in, fp64 math: the tests call these on
fp64 copies of the inputs to get the oracle) and follows Hugging Face ``transformers`` numerics, so that
running it in the input's low precision is "what plain PyTorch does" for the tolerance rule in DESIGN.md.
"""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types, fp64 for fp64: statistics never in less than fp32."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
             offset: float = 0.0, casting_mode: str = "llama"):
    """HF LlamaRMSNorm: y = (offset + weight) * (x * rsqrt(mean(x**2) + eps)).to(x.dtype), statistics in fp32.

    With `residual`, first s = residual + x (in x's dtype) and return (rms_norm(s), s).
    casting_mode (Liger-Kernel's): "llama" as above; "gemma" (HF GemmaRMSNorm, offset 1 there): everything
    in fp32, ``((x * rstd) * (offset + weight.float())).to(x.dtype)``; "none": no casts, all in x's dtype.
    """
    if residual is not None:
        summed = residual + x
        return rms_norm(summed, weight, eps, offset=offset, casting_mode=casting_mode), summed
    if casting_mode == "none":
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight)).to(x.dtype)
    h = x.to(_compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "gemma":
        return (h * (offset + weight.to(h.dtype))).to(x.dtype)
    return (offset + weight) * h.to(x.dtype)


# --------------------------------------------------------------------------------------------- attention
def attention_mask(seqlen_q: int, seqlen_k: int, causal: bool, window_size=(-1, -1), device=None) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) mask, True where query i may attend key j (flash-attn conventions).

    Query i sits at key position i + seqlen_k - seqlen_q (bottom-right alignment, flash-attn >= 2.1), so a
    chunk of new queries attends to all earlier keys. causal: j <= that position. window (left, right),
    -1 meaning unbounded: position - left <= j <= position + right (causal sets right = 0).
    """
    pos = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    left, right = window_size
    if causal:
        right = 0
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= pos + right
    if left >= 0:
        mask &= j >= pos - left
    return mask


def _attention_dense(q, k, v, causal, softmax_scale, window_size, softcap=0.0):
    """q (b, sq, h, d), k/v (b, sk, h_kv, d) -> out (b, sq, h, d) in q's dtype, lse (b, h, sq) fp32+."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    ct = _compute_dtype(q.dtype)
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    qf = q.to(ct).transpose(1, 2)                                              # (b, h, sq, d)
    kf = k.to(ct).transpose(1, 2).repeat_interleave(h // h_kv, dim=1)          # (b, h, sk, d)
    vf = v.to(ct).transpose(1, 2).repeat_interleave(h // h_kv, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale                               # (b, h, sq, sk)
    if softcap:                                                                # Gemma-2 soft-capping
        scores = softcap * torch.tanh(scores / softcap)
    mask = attention_mask(sq, sk, causal, window_size, device=q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                      # (b, h, sq), -inf if empty
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(ct).min))   # empty rows -> exp(-inf) = 0
    probs = torch.nan_to_num(probs, nan=0.0)
    out = (probs @ vf).transpose(1, 2)                                         # (b, sq, h, d)
    return out.to(q.dtype), lse


def attention(q, k, v, causal=True, softmax_scale=None, window_size=(-1, -1), cu_seqlens_q=None,
              cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, return_lse=False, softcap=0.0):
    """Softmax attention with flash-attn's interface and conventions (the oracle for flash/decode attention).

    Dense: q (b, sq, h, d), k/v (b, sk, h_kv, d) with h % h_kv == 0 (GQA: query head i uses kv head
    i // (h // h_kv)). Varlen: q (total_q, h, d), k/v (total_k, h_kv, d) with int32 cu_seqlens_q/k (n+1,).
    Returns out like q (q's dtype) and, with return_lse, lse (b, h, sq) / (h, total_q) in fp32 (fp64 for
    fp64 input). A query with no key to attend to gets out = 0 and lse = -inf. softcap > 0: the scaled
    scores become ``softcap * tanh(scores / softcap)`` before the mask and softmax (flash-attn's softcap).
    """
    if cu_seqlens_q is None:
        out, lse = _attention_dense(q, k, v, causal, softmax_scale, window_size, softcap)
        return (out, lse) if return_lse else out
    outs, lses = [], []
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        o, l = _attention_dense(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], causal, softmax_scale, window_size,
                                softcap)
        outs.append(o[0])
        lses.append(l[0])
    out, lse = torch.cat(outs, 0), torch.cat(lses, -1)
    return (out, lse) if return_lse else out


def decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, window_size=(-1, -1), cache_leftpad=None):
    """Attention of a few new queries over a KV cache (flash-attn's flash_attn_with_kvcache semantics).

    q (b, q_len, h, d); k_cache/v_cache (b, max_seqlen, h_kv, d); cache_seqlens int32 (b,): sequence i's
    cache holds cache_seqlens[i] valid entries, the last q_len of which are the new tokens' own keys. Query t
    (0-based) of sequence i attends causally to keys [0, cache_seqlens[i] - q_len + t] (bottom-right
    alignment), within the window if one is given; cache_leftpad (b,): keys before that slot are padding.
    -> out (b, q_len, h, d) in q's dtype.
    """
    outs = []
    for i in range(q.shape[0]):
        n = int(cache_seqlens[i])
        lo = min(max(int(cache_leftpad[i]), 0), n) if cache_leftpad is not None else 0
        outs.append(_attention_dense(q[i:i + 1], k_cache[i:i + 1, lo:n], v_cache[i:i + 1, lo:n], True,
                                     softmax_scale, window_size)[0])
    return torch.cat(outs, 0)


def decode_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                                  softmax_scale=None, window_size=(-1, -1)):
    """Rotate q and the new k (``rotary_cos/sin (n, d)`` tables gathered at positions cache_seqlens + t),
    write k/v into the caches in place at those rows, then decode_attention over cache_seqlens + q_len entries.
    cache_seqlens (lengths before the append) is not changed. -> out (b, q_len, h, d)."""
    b, q_len = q.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(q_len, device=q.device)              # (b, q_len)
    if rotary_cos is not None:
        cos, sin = rotary_cos[pos], rotary_sin[pos]                                          # (b, q_len, d)
        qf, kf = apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float(), unsqueeze_dim=2)
        q, k = qf.to(q.dtype), kf.to(k.dtype)
    rows = torch.arange(b, device=q.device)[:, None].expand(b, q_len)
    k_cache[rows, pos] = k.to(k_cache.dtype)
    v_cache[rows, pos] = v.to(v_cache.dtype)
    return decode_attention(q, k_cache, v_cache, cache_seqlens + q_len, softmax_scale, window_size)


# ------------------------------------------------------------------------------------ rotary embeddings
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF rotate_half: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """HF apply_rotary_pos_emb: q (b, h, s, d), k (b, h_kv, s, d) (unsqueeze_dim=1; 2 for (b, s, h, d)),
    cos/sin (b or 1, s, d) or (s, d) -> (q * cos + rotate_half(q) * sin, same for k), in promote(q, cos)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ------------------------------------------------------------------------------------------------ SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """HF LlamaMLP's activation: silu(gate) * up in the input dtype. With up=None, `gate` is the
    concatenated (..., 2I) gate_up tensor (first half gate, second half up)."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ---------------------------------------------------------------------------------------- cross-entropy
def cross_entropy(logits, labels, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                  lse_square_scale: float = 0.0, softcap=None, weight=None, return_z_loss: bool = False):
    """Token-level cross-entropy in fp32 math (fp64 for fp64 input), as HF's loss (logits.float()).

    logits (..., V), labels (...) integer; labels == ignore_index contribute 0. reduction "mean" divides by
    the number of non-ignored labels (0 when all are ignored, not NaN), "sum", or "none" (labels' shape).

    Options (F.cross_entropy's and Liger-Kernel's; per non-ignored token, x = logits in fp32):
        softcap c: x = c * tanh(x / c) first (Gemma-2 final-logit soft-capping).
        weight (V,): class weights w; ce = w[y] * (lse - x[y]); "mean" divides by sum(w[y]) over tokens.
        label_smoothing eps: ce = (1 - eps) * ce + eps / V * sum_c w[c] * (lse - x[c])  (F.cross_entropy).
        lse_square_scale s: z = s * lse**2 (PaLM's z-loss) is added to each token's loss; "mean" divides the
            z part by the token count (not by the weights). return_z_loss: also return z, reduced the same
            way (no gradient: it is already in the loss).
    """
    ct = _compute_dtype(logits.dtype)
    lf = logits.reshape(-1, logits.shape[-1]).to(ct)                                # (N, V)
    if softcap is not None:
        lf = softcap * torch.tanh(lf / softcap)
    lab = labels.reshape(-1)
    valid = lab != ignore_index
    safe = torch.where(valid, lab, 0).long()
    lse = torch.logsumexp(lf, dim=-1)                                               # (N,)
    w = weight.to(ct) if weight is not None else None
    picked = lf.gather(1, safe[:, None])[:, 0]
    w_y = w[safe] if w is not None else torch.ones_like(lse)
    ce = w_y * (lse - picked)
    if label_smoothing:
        per_class = lse[:, None] - lf                                               # (N, V)
        smooth = (per_class * w).sum(-1) if w is not None else per_class.sum(-1)
        ce = (1 - label_smoothing) * ce + label_smoothing / lf.shape[-1] * smooth
    zero = torch.zeros_like(lse)
    ce = torch.where(valid, ce, zero)
    z = torch.where(valid, lse_square_scale * lse * lse, zero)
    count = valid.sum().to(ct)
    if reduction == "none":
        loss, zr = (ce + z).reshape(labels.shape), z.reshape(labels.shape)
    elif reduction == "sum":
        loss, zr = ce.sum() + z.sum(), z.sum()
    else:
        denom = torch.where(valid, w_y, zero).sum()
        zr = z.sum() / count.clamp_min(1)
        loss = ce.sum() / torch.where(denom == 0, torch.ones_like(denom), denom) + zr
    return (loss, zr.detach()) if return_z_loss else loss


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, reduction: str = "mean",
                               bias=None, ce_weight=None, **options):
    """cross_entropy(hidden @ weight.T + bias, labels): hidden (..., H), weight (V, H), bias (V,) or None;
    logits in the input dtype. ``ce_weight``: the class weights (cross_entropy's ``weight``); ``options``:
    cross_entropy's label_smoothing, lse_square_scale, softcap, return_z_loss."""
    logits = hidden @ weight.T if bias is None else torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy(logits, labels, ignore_index, reduction, weight=ce_weight, **options)


# ---------------------------------------------------------------------------------- RMSNorm + matmul
def rms_norm_matmul(x, norm_weight, weight, eps: float = 1e-6, residual=None):
    """Unfused HF numerics: rms_norm(x [+ residual], norm_weight) @ weight.T; x (..., K), weight (N, K).

    norm_weight=None means it was pre-folded into weight (weight * norm_weight): the norm has no weight.
    With residual returns (y, residual + x).
    """
    if norm_weight is None:
        norm_weight = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    if residual is not None:
        h, summed = rms_norm(x, norm_weight, eps, residual)
        return h @ weight.T, summed
    return rms_norm(x, norm_weight, eps) @ weight.T


# ------------------------------------------------------------------------------------ quantized matmul
def quant_matmul(x: torch.Tensor, qweight) -> torch.Tensor:
    """Weight-only quantized matmul: ``x (..., K) @ dequantize(qweight).T -> (..., N)`` in x's dtype, the
    weight dequantised to x's dtype first (plain PyTorch's W4A16 / W8A16: fp64 in gives the oracle)."""
    from .quant import dequantize

    return x @ dequantize(qweight, x.dtype).t()


# ------------------------------------------------------------------------------------ low-rank matmul
def low_rank_matmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two matmuls, ``(x @ a.T) @ b.T``: x (..., K), a (r, K), b (N, r) -> (..., N), the intermediate
    (..., r) rounded to x's dtype (plain PyTorch's low-rank linear; fp64 in gives the oracle)."""
    return (x @ a.t()) @ b.t()


# ------------------------------------------------------------------------------------ mixture of experts
def moe_experts(x, gate_up_proj, down_proj, topk_ids, topk_weights):
    """transformers 5's experts loop (``MixtralExperts.forward``): for each expert e, the rows routed to it
    get ``down_proj[e] @ (silu(gate) * up)`` with ``gate, up = (gate_up_proj[e] @ x).chunk(2)``, times their
    routing weight; the top-k contributions are summed per token in fp32 (fp64 for fp64 input).

    x (T, H); gate_up_proj (E, 2I, H); down_proj (E, H, I); topk_ids (T, top_k) int; topk_weights (T, top_k).
    -> (T, H) in x's dtype. The matmuls and SwiGLU run in x's dtype, as in transformers.
    """
    ct = _compute_dtype(x.dtype)
    out = torch.zeros(x.shape, dtype=ct, device=x.device)
    for e in range(gate_up_proj.shape[0]):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(x[tok], gate_up_proj[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down_proj[e])
        out = out.index_add(0, tok, y.to(ct) * topk_weights[tok, slot, None].to(ct))
    return out.to(x.dtype)


def moe_route(router_logits, top_k: int, renormalize: bool = True):
    """Mixtral / Qwen-MoE routing: softmax over the experts (fp32; fp64 for fp64 input), top-k
    (``torch.topk``), renormalised to sum 1 when ``renormalize``. -> (weights (T, top_k), ids (T, top_k) int64)."""
    probs = torch.softmax(router_logits.to(_compute_dtype(router_logits.dtype)), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None):
    """transformers' ``load_balancing_loss_func`` (Switch Transformer eq. 4-6) over a tuple of per-layer router
    logits ``(tokens, E)``: ``E * sum_e f_e * P_e`` with f_e the fraction of top-k assignments to expert e and
    P_e its mean router probability, both over all layers' tokens (padding excluded when ``attention_mask``
    (batch, seq) is given). fp32 scalar."""
    if isinstance(router_logits, torch.Tensor):
        router_logits = (router_logits,)
    dev = router_logits[0].device
    counts = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    probs_sum = torch.zeros(num_experts, dtype=torch.float32, device=dev)
    rows = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=dev, dtype=torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.to(dev).float(), dim=-1)
        _, sel = torch.topk(probs, top_k, dim=-1)
        if mask is None:
            counts = counts + torch.nn.functional.one_hot(sel.reshape(-1), num_experts).float().sum(0)
            probs_sum = probs_sum + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            counts = counts + torch.zeros(num_experts, dtype=torch.float32, device=dev).scatter_add_(
                0, sel.reshape(-1), mask.repeat_interleave(top_k))
            probs_sum = probs_sum + (probs * mask[:, None]).sum(0)
            rows = rows + mask.sum()
    return torch.sum((counts / rows) * (probs_sum / rows)) * num_experts
