"""Mixture-of-experts experts op (grouped SwiGLU experts) as torch.library custom ops over kernels/moe.py:
autograd, fake impls, dispatch; plus the routing functions (plain PyTorch, differentiable) and the
load-balancing auxiliary loss.

    logits = hidden @ router_weight.T                                # (T, E)
    weights, ids = route(logits, top_k, renormalize=True)            # Mixtral; Qwen: renormalize=norm_topk_prob
    out = moe_experts(hidden, gate_up_proj, down_proj, ids, weights) # (T, H)
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend, reference
from ..kernels import moe as K


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("llama_triton::moe_experts_fwd", mutates_args=())
def _moe_fwd(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, topk_ids: Tensor, topk_weights: Tensor,
             save: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return K.moe_experts_fwd(x, gate_up_proj, down_proj, topk_ids, topk_weights, save)


@_moe_fwd.register_fake
def _(x, gate_up_proj, down_proj, topk_ids, topk_weights, save):
    T, H = x.shape
    E, two_i, _ = gate_up_proj.shape
    S = T * topk_ids.shape[1]
    bm = K.block_m(S, E)
    n_blocks = K._num_blocks(S, E, bm)
    i32 = torch.int32
    return (x.new_empty((T, H)), x.new_empty((n_blocks * bm,), dtype=i32), x.new_empty((n_blocks,), dtype=i32),
            x.new_empty((E + 1,), dtype=i32), x.new_empty((1,), dtype=i32),
            x.new_empty((S if save else 0, two_i)), x.new_empty((S, two_i // 2)))


@torch.library.custom_op("llama_triton::moe_experts_bwd", mutates_args=())
def _moe_bwd(dout: Tensor, x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, topk_ids: Tensor,
             topk_weights: Tensor, sorted_ids: Tensor, block_expert: Tensor, seg: Tensor, npost: Tensor, gu: Tensor,
             h1: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return K.moe_experts_bwd(dout, x, gate_up_proj, down_proj, topk_ids, topk_weights, sorted_ids, block_expert,
                             seg, npost, gu, h1)


@_moe_bwd.register_fake
def _(dout, x, gate_up_proj, down_proj, topk_ids, topk_weights, sorted_ids, block_expert, seg, npost, gu, h1):
    return (x.new_empty(x.shape), gate_up_proj.new_empty(gate_up_proj.shape), down_proj.new_empty(down_proj.shape),
            topk_weights.new_empty(topk_weights.shape))


def _setup(ctx, inputs, output):
    x, gate_up_proj, down_proj, topk_ids, topk_weights, save = inputs
    _, sorted_ids, block_expert, seg, npost, gu, h1 = output
    ctx.save_for_backward(x, gate_up_proj, down_proj, topk_ids, topk_weights, sorted_ids, block_expert, seg, npost,
                          gu, h1)
    ctx.saved = save


def _backward(ctx, dout, *unused):
    if not ctx.saved:
        raise RuntimeError("moe_experts: the forward ran without saving its activations for the backward "
                           "(gradient mode was off or no input required grad)")
    dx, dwgu, dwd, dtw = _moe_bwd(dout, *ctx.saved_tensors)
    return dx, dwgu, dwd, None, dtw, None


_moe_fwd.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("llama_triton::moe_route", mutates_args=())
def _moe_route(router_logits: Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return K.moe_route(router_logits, top_k, renormalize, out_dtype)


@_moe_route.register_fake
def _(router_logits, top_k, renormalize, out_dtype):
    T = router_logits.shape[0]
    return router_logits.new_empty((T, top_k), dtype=out_dtype), router_logits.new_empty((T, top_k), dtype=torch.int64)


def _route_reference(router_logits, ids, renormalize, out_dtype):
    """The routing weights of given expert ids, differentiable: softmax (fp32), gather, renormalise."""
    w = torch.softmax(router_logits, dim=-1, dtype=torch.float32).gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(out_dtype)


def _setup_route(ctx, inputs, output):
    router_logits, _, renormalize, out_dtype = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.renormalize, ctx.out_dtype = renormalize, out_dtype


def _backward_route(ctx, dw, _):
    """d logits through softmax -> gather -> renormalise, by autograd of the plain-PyTorch formula (the
    selection itself is piecewise constant)."""
    logits, ids = ctx.saved_tensors
    # the kernel's ids are always in range; the clamp keeps this torch code in bounds where kernels are
    # compiled but not run (tests/lowering_check.py leaves the outputs uninitialised)
    ids = ids.clamp(0, logits.shape[-1] - 1)
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_()
        (dl,) = torch.autograd.grad(_route_reference(leaf, ids, ctx.renormalize, ctx.out_dtype), leaf, dw)
    return dl, None, None, None


_moe_route.register_autograd(_backward_route, setup_context=_setup_route)


# ------------------------------------------------------------------------------------------ public API
# a matmul op: under autocast x and the expert weights go to the autocast dtype; the routing weights keep
# theirs (they scale the fp32 GEMM2 accumulator, as transformers multiplies by them outside the matmul)
@backend.public_op("lower", keep=("topk_weights",))
def moe_experts(x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, topk_ids: Tensor, topk_weights: Tensor) -> Tensor:
    """The experts of a sparse MoE block (transformers 5's ``MixtralExperts`` / ``Qwen3MoeExperts`` forward):
    ``out[t] = sum_k topk_weights[t, k] * down_proj[e] @ (silu(gate) * up)``, ``gate, up =
    (gate_up_proj[e] @ x[t]).chunk(2)``, ``e = topk_ids[t, k]``.

    Args:
        x: ``(..., H)`` fp32/fp16/bf16 hidden states (flattened to T tokens).
        gate_up_proj: ``(E, 2I, H)`` in x's dtype (gate rows, then up rows), any strides.
        down_proj: ``(E, H, I)`` in x's dtype.
        topk_ids: ``(T, top_k)`` int32/int64 expert ids, ``top_k <= E``.
        topk_weights: ``(T, top_k)`` routing weights, any float dtype (fp32 for Mixtral, x's dtype for Qwen).

    Returns:
        ``(..., H)`` in x's dtype. One grouped GEMM launch per projection for all experts (tokens sorted by
        expert on the device, no host sync), SwiGLU and the routing weight fused into their epilogues, the
        top-k sum in a fixed order (deterministic). Differentiable in x, both expert weights and
        topk_weights (so the router logits get gradients through the routing's autograd).
    """
    K.check_tensor("x", x, K.FLOAT_DTYPES, min_ndim=1)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    K.check_inputs(x2, gate_up_proj, down_proj, topk_ids, topk_weights)
    if not backend.use_triton(x2):
        return reference.moe_experts(x2, gate_up_proj, down_proj, topk_ids, topk_weights).view(shape)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up_proj, down_proj, topk_weights))
    return _moe_fwd(x2, gate_up_proj, down_proj, topk_ids, topk_weights, save)[0].view(shape)


@backend.public_op("keep")     # routing math is fp32 inside (softmax, top-k)
def route(router_logits: Tensor, top_k: int, renormalize: bool = True, dtype: torch.dtype | None = None):
    """Softmax over all experts (fp32), top-k, optionally renormalised to sum 1 (Mixtral: always;
    Qwen2/3-MoE: when ``norm_topk_prob``). router_logits ``(T, E)`` -> ``(topk_weights (T, top_k),
    topk_ids (T, top_k) int64)``, ids in decreasing probability (ties: lower id first); the weights in fp32
    unless ``dtype`` is given (Qwen casts them to the logits' dtype). One Triton launch where the backend
    runs Triton, else plain PyTorch (``torch.topk``). Differentiable in the logits."""
    K.check_route(router_logits, top_k)
    if backend.use_triton(router_logits):        # softmax + top-k + renormalise in one launch
        return _moe_route(router_logits, top_k, renormalize, torch.float32 if dtype is None else dtype)
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights if dtype is None else weights.to(dtype)), ids


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask: Tensor | None = None) -> Tensor:
    """transformers' ``load_balancing_loss_func`` (Switch Transformer): router_logits is a tuple of per-layer
    ``(tokens, E)`` logits (or one tensor). Multiply by ``router_aux_loss_coef`` and add to the LM loss."""
    return reference.moe_load_balancing_loss(router_logits, num_experts, top_k, attention_mask)
