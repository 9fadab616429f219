"""torch.autocast rules for our public ops: the compute dtype is decided here, explicitly, per op.

Autocast does not know our custom ops, and it would otherwise reach the plain torch calls inside them (a
``torch.mm`` inside fused_linear_cross_entropy computing in fp16 into an fp32 buffer). So each public op
declares a rule (``backend.public_op(...)``); under autocast its inputs are cast by that rule, and the op
then runs with autocast disabled, exactly as it runs on tensors of those dtypes outside autocast:

* ``"lower"``: every floating-point tensor argument (fp64 excepted, as autocast does) is cast to the
  autocast dtype, like ``torch.mm``/``F.linear`` (matmul ops: flash_attention, rms_norm_matmul,
  fused_linear_cross_entropy, moe_experts), except those named in ``keep=(names)`` (FLCE's class weights
  ``ce_weight``, moe_experts' routing weights ``topk_weights``: scale factors, not matmul operands).
* ``promote=(names)``: those arguments are cast to the widest floating dtype among them, like torch's
  elementwise ops (rms_norm's x/residual, swiglu's gate/up, rope's q/k); others stay as given.
* ``like={"q": "k_cache"}``: q is cast to k_cache's dtype (decode_attention: a KV cache is never copied;
  quant_matmul: x to ``qweight.scales``' dtype, the dtype the quantized weight is dequantised to).
* ``"keep"``: nothing is cast (cross_entropy: its math is fp32 in the kernel; casting the (tokens, vocab)
  logits would copy them).

Outputs come back in the dtypes the op gives for those inputs; gradients flow back through the casts to the
original dtypes (autograd's ``.to``). A call with ``inplace=True`` is never cast (it must write its inputs).
"""
from __future__ import annotations

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda")


def enabled(t) -> bool:
    """Whether autocast is on for the device type of tensor `t`."""
    dev = getattr(getattr(t, "device", None), "type", None)
    return dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev)


def disabled(device_type: str):
    """A context in which autocast is off for `device_type` (the op's tensors' device: the only one whose
    autocast state its torch calls see). A plain torch.autocast, so torch.compile traces it."""
    return torch.autocast(device_type, enabled=False)


def _castable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def cast_arguments(bound, rule, device_type: str) -> None:
    """Cast the arguments of `bound` (inspect.BoundArguments) in place by `rule` (see the module docstring):
    ``"lower"``, ``("lower", kept names)``, ``"keep"``, ``("promote", names)`` or ``("like", {name: other})``."""
    args = bound.arguments
    if args.get("inplace") is True or rule == "keep":
        return
    kind, spec = rule if isinstance(rule, tuple) else (rule, ())
    if kind == "lower":
        dtype = torch.get_autocast_dtype(device_type)
        for name, value in args.items():
            if _castable(value) and name not in spec:
                args[name] = value.to(dtype)
        return
    if kind == "promote":
        present = [args[n] for n in spec if _castable(args.get(n))]
        if not present:
            return
        dtype = present[0].dtype
        for t in present[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        for n in spec:
            if _castable(args.get(n)):
                args[n] = args[n].to(dtype)
        return
    if kind == "like":
        for name, other in spec.items():
            ref = args.get(other.split(".")[0])
            for attr in other.split(".")[1:]:            # "qweight.scales": an attribute of an argument
                ref = getattr(ref, attr, None)
            if _castable(args.get(name)) and isinstance(ref, torch.Tensor) and ref.is_floating_point():
                args[name] = args[name].to(ref.dtype)
        return
    raise ValueError(f"unknown autocast rule {rule!r}")
