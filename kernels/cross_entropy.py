"""Cross-entropy over a large vocabulary, and fused linear cross-entropy (lm_head matmul + loss) that never
materialises the full ``(tokens, vocab)`` logits.

Kernel (Liger-Kernel's design): one program per token row. Pass 1 walks the vocab in ``BLOCK_V`` blocks
with an online max / sum-of-exp (fp32) to get ``lse``; ``loss = lse - logits[label]``. Pass 2 (when the
gradient is wanted) writes ``dlogits = (softmax - onehot(label)) * scale`` over the row, in the logits'
dtype, possibly in place over the logits (the fused linear path does that to its chunk buffer). A row whose
label is ``ignore_index`` gets loss 0 and a zero gradient. A label outside ``[0, V)`` (and not
ignore_index) gets loss NaN: the launchers' callers check labels on the host first (``check_labels``);
the NaN is the backstop where that check is skipped (under torch.compile), never a silent wrong loss.
Options (``CEOptions``; F.cross_entropy's and Liger-Kernel's): class weights, label smoothing, logit
softcap (``c * tanh(x / c)``) and the z-loss (``lse_square_scale * lse**2``, written per row to its own
buffer); the kernel docstring has the formulas. Each is a constexpr flag: the plain loss compiles as before.

Fused linear cross-entropy (``fused_linear_cross_entropy``): tokens in chunks of ``C`` rows; per chunk
``logits = h @ W.T (+ bias)`` (cuBLAS, input dtype, fp32 accumulation), the kernel turns them into ``dlogits`` in
place, then ``dh = dlogits @ W`` and ``dW += dlogits.T @ h``. Peak extra memory: one ``(C, V)`` chunk
plus the gradients; ``C`` is chosen so the chunk is about the size of ``hidden``. ``dW`` sums over chunks:
in an fp32 buffer by default (as accurate as the unfused reference; +2 bytes x V x H), or in the weight's
dtype on request (Liger's low-memory default; each chunk's partial sum is rounded to bf16/fp16).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, interpreting, num_warps_for

INT_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _softcap(x, cap):
    """cap * tanh(x / cap), tanh written with exp (no libdevice; +-inf -> +-cap)."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))


@triton.jit
def _cross_entropy_kernel(
    X, LABELS, LOSS, DX, SCALE,                  # pointers
    CLASS_W, W_SUM, ZLOSS, ZSCALE,               # pointers (options; unused unless their flag is set)
    V,                                           # vocab size
    stride_x, stride_dx, stride_scale,           # row strides (the vocab dim is contiguous)
    ignore_index,
    label_smoothing, lse_square_scale, softcap,  # fp32 scalars
    HAS_SCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per token row, with x = softcap(logits) (or the logits), w the class weights (1 without), eps the
    label smoothing, s the z-loss scale:
        loss = (1 - eps) * w[y] * (lse - x[y]) + eps / V * sum_c w[c] * (lse - x[c])   -> LOSS
        z    = s * lse**2                                                            -> ZLOSS
        dx_c = scale * ((1 - eps) * w[y] * (p_c - [c == y]) + eps / V * (sum(w) * p_c - w[c]))
               + zscale * 2 * s * lse * p_c,   p = softmax(x);   times (1 - (x_c / cap)**2) with softcap.
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    X += row * stride_x
    DX += row * stride_dx
    offs = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        if HAS_Z:
            tl.store(ZLOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                tl.store(DX + cols, tl.zeros([BLOCK_V], dtype=DX.dtype.element_ty), mask=cols < V)
        return

    # pass 1: online log-sum-exp over the vocab (fp32); with smoothing also sum_c w[c] * x[c]
    m = float("-inf")
    d = 0.0
    wx = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x = tl.load(X + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            x = tl.where(mask, _softcap(x, softcap), float("-inf"))
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                wx += tl.sum(tl.where(mask, x, 0.0) * tl.load(CLASS_W + cols, mask=mask, other=0.0).to(tl.float32), axis=0)
            else:
                wx += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # all -inf so far: avoid exp(-inf - -inf) = NaN
        d = d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
    lse = m + tl.log(d)
    in_range = (label >= 0) & (label < V)
    x_label = tl.load(X + label, mask=in_range, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x_label = _softcap(x_label, softcap)
    w_label = 1.0
    w_sum = V * 1.0
    if HAS_WEIGHT:
        w_label = tl.load(CLASS_W + label, mask=in_range, other=0.0).to(tl.float32)
        w_sum = tl.load(W_SUM).to(tl.float32)
    loss = w_label * (lse - x_label)
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing / V * (w_sum * lse - wx)
    tl.store(LOSS + row, tl.where(in_range, loss, float("nan")))
    if HAS_Z:
        tl.store(ZLOSS + row, tl.where(in_range, lse_square_scale * lse * lse, float("nan")))

    # pass 2: dlogits (formula above), in the logits' dtype (may overwrite X)
    if COMPUTE_GRAD:
        scale = 1.0
        zscale = 1.0
        if HAS_SCALE:
            scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
            if HAS_Z:
                zscale = tl.load(ZSCALE + row * stride_scale).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(X + cols, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                x = tl.where(mask, _softcap(x, softcap), float("-inf"))
            p = tl.exp(x - lse)
            g = w_label * tl.where(cols == label, p - 1.0, p)
            if HAS_SMOOTHING:
                w_c = 1.0
                if HAS_WEIGHT:
                    w_c = tl.load(CLASS_W + cols, mask=mask, other=0.0).to(tl.float32)
                g = (1.0 - label_smoothing) * g + label_smoothing / V * (w_sum * p - w_c)
            g = g * scale
            if HAS_Z:
                g += (2.0 * lse_square_scale * zscale) * lse * p
            if HAS_SOFTCAP:
                t = tl.where(mask, x / softcap, 0.0)               # (masked lanes hold -inf)
                g = g * (1.0 - t * t)
            tl.store(DX + cols, g.to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------ checks
def check_labels_tensor(labels, lead_shape, name="labels"):
    check_tensor(name, labels, INT_DTYPES)
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(f"{name} has shape {tuple(labels.shape)} but must be {tuple(lead_shape)} (the leading dims "
                         "of the logits / hidden states)")


def check_reduction(reduction, ignore_index):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def check_ce_inputs(logits, labels, ignore_index=-100, reduction="mean"):
    """Validate cross_entropy's arguments (shapes, dtypes, devices); labels' values: check_labels."""
    check_tensor("logits", logits, FLOAT_DTYPES, min_ndim=1)
    check_labels_tensor(labels, logits.shape[:-1])
    check_same_device(logits=logits, labels=labels)
    if logits.shape[-1] < 1:
        raise ValueError("logits' last dim (the vocab size) must be >= 1")
    check_reduction(reduction, ignore_index)


def check_flce_inputs(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """Validate fused_linear_cross_entropy's arguments."""
    check_tensor("hidden", hidden, FLOAT_DTYPES, min_ndim=1)
    check_tensor("lm_head_weight", weight, FLOAT_DTYPES, ndim=2)
    check_labels_tensor(labels, hidden.shape[:-1])
    check_same_device(hidden=hidden, lm_head_weight=weight, labels=labels)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"lm_head_weight has dtype {weight.dtype} but hidden has {hidden.dtype}; they must match")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight has shape {tuple(weight.shape)} but hidden's last dim is "
                         f"{hidden.shape[-1]}: it must be (vocab, {hidden.shape[-1]})")
    if weight.shape[0] < 1:
        raise ValueError("lm_head_weight must have at least one row (the vocab size)")
    check_reduction(reduction, ignore_index)


class CEOptions(NamedTuple):
    """The loss options beyond plain cross-entropy (defaults: off). ``weight``: (V,) class weights."""
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: Optional[float] = None
    weight: Optional[torch.Tensor] = None

    @property
    def plain(self) -> bool:
        return not (self.label_smoothing or self.lse_square_scale or self.softcap is not None
                    or self.weight is not None)


def _float_option(name, value, lo=None, hi=None, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (positive and value <= 0):
        rng = "> 0" if positive else f"in [{lo}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name} must be {rng}, got {value!r}")
    return float(value)


def check_ce_options(vocab, device, label_smoothing=0.0, lse_square_scale=0.0, softcap=None, weight=None,
                     weight_name="weight") -> CEOptions:
    """Validate the options (ValueError/TypeError naming the argument) -> CEOptions."""
    ls = _float_option("label_smoothing", label_smoothing, 0.0, 1.0)
    zs = _float_option("lse_square_scale", lse_square_scale, 0.0)
    if softcap is not None:
        softcap = _float_option("softcap", softcap, positive=True)
    if weight is not None:
        check_tensor(weight_name, weight, FLOAT_DTYPES, ndim=1)
        if weight.shape[0] != vocab:
            raise ValueError(f"{weight_name} (class weights) has shape {tuple(weight.shape)}; it must be ({vocab},)")
        if weight.device != torch.device(device):
            raise ValueError(f"{weight_name} is on {weight.device} but the logits are on {device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{weight_name} (class weights) requires grad: no gradient flows to it; pass "
                             f"{weight_name}.detach()")
    return CEOptions(ls, zs, softcap, weight)


def check_labels(labels, vocab_size, ignore_index):
    """Host-side value check (one reduction and one device sync): every label is in [0, vocab) or is
    ignore_index; raises ValueError naming an offending value."""
    bad = ((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        raise ValueError(f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; got {value}")


# ------------------------------------------------------------------------------------------ launchers
def _block_v(V: int) -> int:
    """Vocab block: large on a GPU, small on the interpreter (keyed on the interpreter, not the tensor's
    device, so that tests/lowering_check.py compiles the GPU block sizes from CPU tensors)."""
    return min(triton.next_power_of_2(V), 4096 if interpreting() else 32768)


def cross_entropy_rows(logits, labels, ignore_index, compute_grad, scale=None, dlogits=None, opts=None,
                       z_scale=None, zlosses=None):
    """logits (N, V) with a contiguous last dim, labels (N,) int -> (losses (N,) fp32, dlogits (N, V) in the
    logits' dtype or None). ``scale``: fp32 tensor of 1 or N elements multiplying the gradient rows (1/n for
    a mean); ``dlogits`` may be ``logits`` itself (in place). ``opts`` (CEOptions): class weights, label
    smoothing, softcap, z-loss; with a z-loss, each row's z is written to ``zlosses`` (N,) fp32 (required)
    and its gradient scaled by ``z_scale`` (like ``scale``; default: ``scale``). ``losses`` hold the
    cross-entropy part only."""
    opts = opts or CEOptions()
    N, V = logits.shape
    losses = torch.empty((N,), dtype=torch.float32, device=logits.device)
    if compute_grad and dlogits is None:
        dlogits = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return losses, dlogits
    has_z = opts.lse_square_scale > 0
    if has_z and zlosses is None:
        raise ValueError("cross_entropy_rows: a z-loss (lse_square_scale > 0) needs the zlosses buffer")
    if scale is not None:
        scale = scale.reshape(-1).contiguous()             # the kernel reads element `row` (stride 1) when N > 1
        z_scale = scale if z_scale is None else z_scale.reshape(-1).expand(scale.numel()).contiguous()
    weight = opts.weight.contiguous() if opts.weight is not None else None
    w_sum = weight.sum(dtype=torch.float32).reshape(1) if weight is not None else None
    BLOCK_V = _block_v(V)
    _cross_entropy_kernel[(N,)](
        logits, labels, losses, dlogits if compute_grad else logits, scale if scale is not None else losses,
        weight if weight is not None else losses, w_sum if w_sum is not None else losses,
        zlosses if has_z else losses, z_scale if scale is not None else losses,
        V,
        logits.stride(0), dlogits.stride(0) if compute_grad else 0,
        (1 if scale.numel() > 1 else 0) if scale is not None else 0,
        ignore_index,
        opts.label_smoothing, opts.lse_square_scale, opts.softcap if opts.softcap is not None else 1.0,
        HAS_SCALE=scale is not None, COMPUTE_GRAD=bool(compute_grad), HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=opts.label_smoothing > 0, HAS_Z=has_z, HAS_SOFTCAP=opts.softcap is not None,
        BLOCK_V=BLOCK_V, num_warps=num_warps_for(BLOCK_V),
    )
    return losses, dlogits


def reduce_losses(losses, labels, ignore_index, reduction):
    """(N,) fp32 per-token losses -> the reduction; mean divides by the non-ignored count (0 if none)."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (labels != ignore_index).sum().clamp_min(1)


def mean_scale(labels, ignore_index):
    """1 / max(#non-ignored, 1) as an fp32 device tensor (no host sync)."""
    return 1.0 / (labels != ignore_index).sum().clamp_min(1).to(torch.float32)


def _weight_denominator(labels, ignore_index, weight):
    """sum of weight[label] over the non-ignored labels (F.cross_entropy's mean denominator), 1 if it is 0."""
    valid = labels != ignore_index
    w_y = weight.to(torch.float32)[torch.where(valid, labels, 0).long().clamp(0, weight.shape[0] - 1)]
    denom = torch.where(valid, w_y, torch.zeros_like(w_y)).sum()
    return torch.where(denom == 0, torch.ones_like(denom), denom)


def mean_scales(labels, ignore_index, opts):
    """(1 / cross-entropy denominator, 1 / z-loss denominator) of a "mean", fp32 (1,) device tensors: the
    count of non-ignored labels, or for the cross-entropy part with class weights the sum of their weights."""
    z = mean_scale(labels, ignore_index).reshape(1)
    if opts.weight is None:
        return z, z
    return (1.0 / _weight_denominator(labels, ignore_index, opts.weight)).reshape(1), z


def reduce_with_options(losses, zlosses, labels, ignore_index, reduction, opts):
    """Per-row cross-entropy (N,) and z-loss (N,) or None -> (loss, z-loss or None), reduced: "mean" divides
    the cross-entropy by mean_scales' denominators (weights) and the z-loss by the count."""
    if reduction == "none":
        return (losses if zlosses is None else losses + zlosses), zlosses
    if reduction == "sum":
        ce, z = losses.sum(), (zlosses.sum() if zlosses is not None else None)
        return (ce if z is None else ce + z), z
    ce_s, z_s = mean_scales(labels, ignore_index, opts)
    ce, z = losses.sum() * ce_s[0], (zlosses.sum() * z_s[0] if zlosses is not None else None)
    return (ce if z is None else ce + z), z


# Fewest tokens per chunk (when there are that many). Each chunk's weight-gradient GEMM reads and writes the
# whole (V, H) fp32 dW accumulator: 2*C*V*H flop over 8*V*H bytes = C/4 flop/byte, so chunks of ~256 tokens
# (what memory-matching gives at V = 128k) are memory-bound on an H100 (~300 flop/byte for bf16); 1024 tokens
# make it about compute-bound at the cost of one (1024, V) buffer (256 MiB at V = 128k, bf16).
MIN_CHUNK_TOKENS = 1024


def default_chunk_size(n_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: one (chunk, vocab) logits buffer about the size of (tokens, hidden), but at least
    ``MIN_CHUNK_TOKENS`` (or all the tokens, rounded up to a power of 2) for the weight gradient's throughput."""
    matched = triton.next_power_of_2(triton.cdiv(n_tokens, triton.cdiv(vocab, hidden)))
    return max(1, matched, min(MIN_CHUNK_TOKENS, triton.next_power_of_2(max(1, n_tokens))))


_ADDMM_OUT_DTYPE: dict = {}


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for half-precision a, b, accumulating in fp32 without rounding the product to
    the half dtype: cuBLAS's mixed-precision GEMM via ``torch.addmm(..., out_dtype=torch.float32)`` where
    this torch build has it for the device (feature-detected once per device type); otherwise an fp32
    matmul on the CPU, or on CUDA the product in the input dtype added in fp32 (rounds each chunk's product
    once; a (V, H) temporary)."""
    dev = acc.device.type
    if _ADDMM_OUT_DTYPE.get(dev, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE[dev] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[dev] = False
    if dev == "cpu":
        acc.addmm_(a.float(), b.float())
    else:
        acc.add_(torch.mm(a, b))


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, grad_hidden, grad_weight,
                               row_scale=None, chunk_size=None, accum_dtype=None, bias=None, grad_bias=False,
                               opts=None):
    """hidden (N, H), weight (V, H), labels (N,), bias (V,) or None
    -> (loss, dhidden or None, dweight or None, dbias or None, z-loss or None).

    The gradients are those of ``reduction`` (mean: / non-ignored count, or the class weights' sum), each
    row further multiplied by ``row_scale`` (N,) when given (the backward of reduction="none"). ``dweight``
    is a sum over token chunks, accumulated in ``accum_dtype``: fp32 by default (a (V, H) fp32 buffer, cast
    to the weight's dtype at the end), or the weight's own dtype (``accum_dtype=weight.dtype``: Liger's
    low-memory mode, each chunk's partial sum rounded to the half dtype; less accurate than the unfused
    reference). ``dbias`` sums in fp32. ``opts``: CEOptions (class weights, smoothing, softcap, z-loss).
    """
    opts = opts or CEOptions()
    N, H = hidden.shape
    V = weight.shape[0]
    losses = torch.empty((N,), dtype=torch.float32, device=hidden.device)
    zlosses = torch.empty((N,), dtype=torch.float32, device=hidden.device) if opts.lse_square_scale > 0 else None
    grad_bias = grad_bias and bias is not None
    compute_grad = grad_hidden or grad_weight or grad_bias
    dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else None
    accum_dtype = accum_dtype or torch.promote_types(weight.dtype, torch.float32)
    dw = torch.zeros(weight.shape, dtype=accum_dtype, device=weight.device) if grad_weight else None
    db = torch.zeros((V,), dtype=torch.float32, device=weight.device) if grad_bias else None
    fp32_acc = grad_weight and accum_dtype != weight.dtype
    scale = z_scale = None
    if compute_grad:
        if reduction == "mean":
            scale, z_scale = mean_scales(labels, ignore_index, opts)
        if row_scale is not None:
            row_scale = row_scale.reshape(-1).to(torch.float32).contiguous()   # (an expanded grad has stride 0)
            scale, z_scale = (row_scale, row_scale) if scale is None else (row_scale * scale, row_scale * z_scale)
    chunk = chunk_size or default_chunk_size(N, H, V)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h = hidden[start:end]
        if bias is None:
            logits = torch.mm(h, weight.t())                                   # (C, V) in the input dtype
        else:
            logits = torch.addmm(bias, h, weight.t())
        s = scale if scale is None or scale.numel() == 1 else scale[start:end]
        zs = z_scale if z_scale is None or z_scale.numel() == 1 else z_scale[start:end]
        losses[start:end] = cross_entropy_rows(logits, labels[start:end], ignore_index, compute_grad, s,
                                               dlogits=logits if compute_grad else None, opts=opts, z_scale=zs,
                                               zlosses=zlosses[start:end] if zlosses is not None else None)[0]
        if grad_hidden:
            torch.mm(logits, weight, out=dh[start:end])                        # (C, H)
        if fp32_acc:
            _addmm_fp32_(dw, logits.t(), h)                                    # (V, H) fp32
        elif grad_weight:
            dw.addmm_(logits.t(), h)                                           # (V, H) in the weight's dtype
        if grad_bias:
            db += logits.sum(0, dtype=torch.float32)                           # (V,) fp32
    if fp32_acc:
        dw = dw.to(weight.dtype)
    if grad_bias:
        db = db.to(bias.dtype)
    loss, z = reduce_with_options(losses, zlosses, labels, ignore_index, reduction, opts)
    return loss, dh, dw, db, z
