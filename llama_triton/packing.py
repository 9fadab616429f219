"""Fused projections with Hugging Face parameter names: q/k/v (and gate/up) weights as row slices of one buffer.

gpt-fast fuses ``wq, wk, wv`` into one ``wqkv`` parameter (renaming it in the checkpoint). Here the
parameters keep their names and objects (``q_proj.weight`` stays a Parameter of ``q_proj``, so state_dicts,
``save_pretrained``, ``hf.patch`` weight sharing, optimizers and ``quantize_model`` see the usual modules):
``pack_linears_`` moves their data into one contiguous ``(sum(out_i), in)`` buffer and re-points each
parameter's ``.data`` at its row slice; ``packed_weight`` then returns the whole buffer as one view, so a
decode step runs one GEMM for q/k/v and one for gate/up. Quantized linears (``layers.QuantLinear``,
duck-typed here) are packed the same way: ``qweight (N, KP // PACK)`` row blocks of one buffer, ``scales``
/ ``zeros (G, N)`` column blocks of one ``(G, sum(N_i))`` buffer (the quant kernel takes their strides), so
the group runs as one quant GEMM. Anything that re-allocates parameters on its own
(``model.to(...)``, ``load_state_dict(assign=True)``) breaks the packing; ``packed_weight`` notices (pointer
check) and the layer falls back to one GEMM per projection until ``pack_linears_`` runs again
(``LlamaForCausalLM.make_caches`` does).
"""
from __future__ import annotations

import torch
from torch import nn

_FLAG = "_llama_triton_packed"      # set on the first linear of a packed group (trusted while compiling)


def _rows_follow(tensors) -> bool:
    """Whether contiguous `tensors` are consecutive row blocks of one storage, in order."""
    first = tensors[0]
    if not all(isinstance(t, torch.Tensor) and t.is_contiguous() and t.dtype == first.dtype
               and t.device == first.device and t.shape[1:] == first.shape[1:] for t in tensors):
        return False
    if first.device.type == "meta":
        return False
    base = first.untyped_storage().data_ptr()
    end = first.data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() != base or t.data_ptr() != end:
            return False
        end += t.numel() * t.element_size()
    return True


def _whole(tensors) -> torch.Tensor:
    """The (sum(rows), ...) view over consecutive row blocks (checked by _rows_follow)."""
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride())


def _cols_follow(tensors) -> bool:
    """Whether (G, N_i) tensors are consecutive column blocks of one (G, sum(N_i)) row-major buffer."""
    first = tensors[0]
    total = sum(t.shape[1] for t in tensors)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == first.shape[0] and t.dtype == first.dtype
               and t.device == first.device and t.stride() == (total, 1) for t in tensors) or first.device.type == "meta":
        return False
    base, end = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() != base or t.data_ptr() != end:
            return False
        end += t.shape[1] * t.element_size()
    return True


def _whole_cols(tensors) -> torch.Tensor:
    first = tensors[0]
    total = sum(t.shape[1] for t in tensors)
    return first.as_strided((first.shape[0], total), (total, 1))


def _is_quantized(m) -> bool:
    return all(hasattr(m, a) for a in ("qweight", "scales", "zeros", "perm", "bits", "group_size", "quantized_weight"))


def _is_packable(linears) -> bool:
    if len(linears) < 2 or len({m.bias is None for m in linears}) != 1:
        return False
    if all(type(m) is nn.Linear for m in linears):
        return len({(m.in_features, m.weight.dtype, m.weight.device) for m in linears}) == 1
    return (all(_is_quantized(m) and m.perm is None for m in linears) and len({type(m) for m in linears}) == 1
            and len({(m.in_features, m.bits, m.group_size, m.zeros is None, m.scales.dtype, m.qweight.device)
                     for m in linears}) == 1)


def _quant_groups(linears):
    """(buffer name, tensors, packed along rows?) of a quantized group."""
    out = [("qweight", [m.qweight for m in linears], True), ("scales", [m.scales for m in linears], False)]
    if linears[0].zeros is not None:
        out.append(("zeros", [m.zeros for m in linears], False))
    return out


def packed_weight(linears):
    """``(weight (sum(out_i), in), bias (sum(out_i),) or None)`` views over the packed buffer when the
    ``nn.Linear``s' parameters are packed (``pack_linears_``), else None. No copy, no kernel."""
    if not _is_packable(linears) or _is_quantized(linears[0]):
        return None
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears] if linears[0].bias is not None else None
    if torch.compiler.is_compiling():                    # no pointer checks in a traced graph: trust the flag
        if not getattr(linears[0], _FLAG, False):
            return None
    elif not (_rows_follow(weights) and (biases is None or _rows_follow(biases))):
        setattr(linears[0], _FLAG, False)                # un-packed (e.g. by model.to): a trace must not trust it
        return None
    return _whole(weights), (_whole(biases) if biases is not None else None)


def _quant_packed(linears):
    """{buffer name: whole view} when a quantized group is packed, else None."""
    groups = _quant_groups(linears)
    if torch.compiler.is_compiling():
        if not getattr(linears[0], _FLAG, False):
            return None
    elif not all((_rows_follow if rows else _cols_follow)(ts) for _, ts, rows in groups):
        setattr(linears[0], _FLAG, False)
        return None
    return {name: (_whole if rows else _whole_cols)(ts) for name, ts, rows in groups}


def fused_forward(linears):
    """A function ``x (..., in) -> (..., sum(out_i))`` running the packed group as one GEMM (``F.linear`` or
    one ``quant_matmul``), or None when the group is not packed. Outputs in the order of `linears`."""
    if not _is_packable(linears):
        return None
    if not _is_quantized(linears[0]):
        packed = packed_weight(linears)
        return None if packed is None else (lambda x: torch.nn.functional.linear(x, *packed))
    bufs = _quant_packed(linears)
    biases = [m.bias for m in linears] if linears[0].bias is not None else None
    if bufs is None or (biases is not None and not (torch.compiler.is_compiling() or _rows_follow(biases))):
        return None
    from .ops.quant_matmul import quant_matmul
    from .quant import QuantizedWeight

    m = linears[0]
    qw = QuantizedWeight(bufs["qweight"], bufs["scales"], bufs.get("zeros"), m.bits, m.group_size, None,
                         layout="repacked", in_features=m.in_features)
    bias = _whole(biases) if biases is not None else None

    def forward(x):
        y = quant_matmul(x, qw)
        return y + bias.to(y.dtype) if bias is not None else y
    return forward


@torch.no_grad()
def pack_linears_(linears) -> bool:
    """Move the weights (and biases) of ``nn.Linear``s with one in_features, dtype and device into one
    buffer each, in order, keeping every Parameter object (``.data`` re-pointed). Idempotent; returns
    whether the group is packed (False for other module types, e.g. quantized linears)."""
    linears = list(linears)
    if not _is_packable(linears):
        return False
    if _is_quantized(linears[0]):
        if _quant_packed(linears) is None:
            for name, ts, rows in _quant_groups(linears):
                buf = torch.cat([t.detach() for t in ts], 0 if rows else 1)
                offset = 0
                for m, t in zip(linears, ts):
                    n = t.shape[0 if rows else 1]
                    setattr(m, name, buf[offset:offset + n] if rows else buf[:, offset:offset + n])  # a buffer view
                    offset += n
        if linears[0].bias is not None and not _rows_follow([m.bias for m in linears]):
            _pack_params([m.bias for m in linears])
        setattr(linears[0], _FLAG, True)
        return True
    if packed_weight(linears) is None:
        for attr in ("weight", "bias"):
            params = [getattr(m, attr) for m in linears]
            if params[0] is None or _rows_follow(params):
                continue
            _pack_params(params)
    setattr(linears[0], _FLAG, True)
    return True


def _pack_params(params) -> None:
    buf = torch.cat([p.detach() for p in params], 0)
    offset = 0
    for p in params:
        n = p.shape[0]
        p.data = buf[offset:offset + n]                  # same Parameter, now a view of the buffer
        offset += n


def pack_model_(model: nn.Module) -> int:
    """``pack_linears_`` every attention's q/k/v_proj and every MLP's gate/up_proj in `model`; returns how
    many groups are packed (quantized or otherwise non-``nn.Linear`` projections are left as they are)."""
    n = 0
    for module in model.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            if all(isinstance(getattr(module, a, None), nn.Module) for a in names):
                n += pack_linears_([getattr(module, a) for a in names])
    return n
