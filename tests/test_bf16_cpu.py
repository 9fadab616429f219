"""bfloat16 on the CPU (issue 11): Triton's interpreter computes bf16 wrongly (``tl.dot`` by 1e8-1e10, and
the elementwise kernels' roundings too), so llama_triton.backend runs bf16 CPU tensors on the PyTorch
reference: right answers under the 2x rule, never a silent wrong one; forcing triton there raises."""
import pytest
import torch

from conftest import HAS_CUDA
from llama_triton import backend, cli, registry, testing

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="CPU (interpreter) behaviour")


@pytest.mark.parametrize("name", ["flash_attention", "decode_attention", "rms_norm_matmul", "quant_matmul_w4",
                                  "rms_norm", "swiglu_packed"])
def test_bf16_on_cpu_is_right(name):
    spec = registry.get(name)
    for c in testing.parity(spec, spec.test_shapes[-1], torch.bfloat16, "cpu"):
        assert c.ok, f"{name} {c.name}: max abs err {c.max_abs:.3e} > bound {c.bound:.3e}"


def test_forcing_triton_for_bf16_on_the_interpreter_raises(monkeypatch):
    x = torch.ones(2, 8, dtype=torch.bfloat16)
    assert not backend.use_triton(x) and backend.use_triton(x.float())
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="bfloat16"):
        backend.use_triton(x)


def test_verify_bfloat16_passes_on_cpu(capsys):
    assert cli.main(["verify", "--op", "flash_attention", "--dtype", "bfloat16"]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_from_pretrained_bf16_checkpoint_on_cpu(tmp_path):
    from llama_triton.model import LlamaForCausalLM

    model = LlamaForCausalLM("tiny").init_weights(seed=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)                 # the checkpoint's dtype: bf16
    assert loaded.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(ids).logits.double()
        want = model.float()(ids).logits.double()                       # the same (bf16-exact) weights in fp32
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.05
