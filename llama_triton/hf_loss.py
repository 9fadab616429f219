"""The fused linear cross-entropy inside a transformers ``*ForCausalLM`` (what ``hf.patch(model)`` installs).

    hf.patch(model)                    # installs causal_lm_forward on the instance (loss=True, the default)
    model.train(); out = model(input_ids, labels=labels)     # out.loss fused, out.logits None (as Liger)
    out = model(input_ids, labels=labels, skip_logits=False)  # logits too (the stock path)

Liger-Kernel's rule: logits are skipped when the model is training and labels (or ``shift_labels``) are given,
unless ``skip_logits`` says otherwise; everything else (generation, evaluation, no labels) runs the stock
forward. Loss semantics are transformers' ``ForCausalLMLoss`` (llama_triton.loss): shift, ignore_index -100,
``num_items_in_batch`` from the Trainer for gradient accumulation.
"""
from __future__ import annotations

import types

from torch import nn

_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
_MARK = "_llama_triton_fused_loss"


def causal_lm_forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, skip_logits=None,
                      **kwargs):
    """Forward of a transformers Llama/Mistral/Qwen2 ForCausalLM with the fused loss (see the module doc)."""
    stock = type(self).forward
    if skip_logits is None:
        skip_logits = self.training and (labels is not None or kwargs.get("shift_labels") is not None)
    if not skip_logits:
        return stock(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .loss import causal_lm_loss

    loss_kw = {k: kwargs.pop(k) for k in _LOSS_KWARGS if k in kwargs}
    kwargs.pop("return_dict", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = outputs.last_hidden_state                                                  # (b, s, H)
    if isinstance(logits_to_keep, int) and logits_to_keep:
        hidden = hidden[:, -logits_to_keep:]
    elif not isinstance(logits_to_keep, int):
        hidden = hidden[:, logits_to_keep]
    if labels is not None and loss_kw.get("shift_labels") is None:
        from .loss import shift

        loss_kw["shift_labels"] = shift(labels, loss_kw.get("ignore_index", -100))[:, -hidden.shape[1]:]
    loss = causal_lm_loss(hidden, self.lm_head.weight, **loss_kw)
    extra = {k: getattr(outputs, k, None) for k in ("cache", "past_key_values", "hidden_states", "attentions")
             if k in CausalLMOutputWithPast.__dataclass_fields__}
    return CausalLMOutputWithPast(loss=loss, logits=None, **extra)


# Dense decoders whose forward is embed -> layers -> norm -> lm_head -> ForCausalLMLoss; MoE variants
# (Qwen2MoeForCausalLM, Mixtral...) add a router loss in their forward and keep the stock one.
FUSED_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def can_fuse(model: nn.Module) -> str | None:
    """None when ``model``'s loss can be fused, else why not."""
    if type(model).__name__ not in FUSED_CLASSES:
        return f"{type(model).__name__} is not one of {', '.join(FUSED_CLASSES)}"
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or not hasattr(model, "model"):
        return "not a *ForCausalLM with an nn.Linear lm_head"
    if head.bias is not None:
        return "lm_head has a bias"
    if getattr(model.config, "final_logit_softcapping", None):
        return "final_logit_softcapping"
    return None


def install(model: nn.Module) -> None:
    """Put causal_lm_forward on this instance (its class forward stays the stock one)."""
    model.forward = types.MethodType(causal_lm_forward, model)
    setattr(model, _MARK, True)


def uninstall(model: nn.Module) -> bool:
    """Remove what install() put on the instance. Returns whether there was something."""
    if not getattr(model, _MARK, False):
        return False
    del model.forward
    delattr(model, _MARK)
    return True
