"""torch.compile of the training step (issue 16): the model's forward with labels (fused linear cross-entropy,
flash attention, RMSNorm, RoPE, SwiGLU custom ops) traced in one graph (fullgraph=True: no graph breaks) and
its backward equal eager. CPU: the aot_eager backend (AOT autograd over the ops' fake impls; the kernels run
in the interpreter); GPU: inductor, bf16 autocast over fp32 weights."""
import pytest
import torch

from llama_triton.model import LlamaConfig, LlamaForCausalLM

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def _step(model, fn, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = fn(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _check(device, backend, autocast_dtype=None, rtol=1e-5, atol=1e-6, s=16):
    torch._dynamo.reset()
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).init_weights(seed=0).to(device).train()
    ids = torch.randint(0, 256, (2, s), generator=torch.Generator().manual_seed(0)).to(device)
    labels = ids.clone()
    labels[0, :4] = -100
    ctx = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device, enabled=False)
    with ctx:
        eager_loss, eager_grads = _step(model, model, ids, labels)
        loss, grads = _step(model, torch.compile(model, backend=backend, fullgraph=True), ids, labels)
    torch.testing.assert_close(loss, eager_loss, rtol=rtol, atol=atol)
    for n, g in eager_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=rtol, atol=atol, msg=n)


def test_compiled_train_step_cpu_aot_eager():
    _check("cpu", "aot_eager")


@pytest.mark.gpu
def test_compiled_train_step_gpu_inductor_bf16():
    _check("cuda", "inductor", torch.bfloat16, rtol=2e-2, atol=2e-3, s=256)
