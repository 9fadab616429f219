"""Data parallelism on an existing engine (issue 16): 2 CPU processes under torchrun (gloo), DDP and FSDP2
(fully_shard per layer + root), the same global batch as 1 process: the same per-step losses and final weights
within fp32 tolerance (only the summation order differs). One torchrun launch runs both modes. The PyTorch
reference ops run everywhere here (LLAMA_TRITON_BACKEND=torch): the interpreter would make the subprocesses
slow, and what is tested is the parallel loop (the kernels are tested against the same reference elsewhere)."""
import json
import os
import subprocess
import sys

import torch

from _dist_train import config
from test_train import _corpus

HERE = os.path.dirname(__file__)


def test_ddp_and_fsdp2_on_two_processes_match_one(tmp_path, monkeypatch):
    from llama_triton.train import train

    data = _corpus(tmp_path / "c.jsonl")
    env = dict(os.environ, LLAMA_TRITON_BACKEND="torch", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(HERE, "_dist_train.py"), str(tmp_path), data, "2", "ddp", "fsdp"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")             # meanwhile: one process, global batch 4
    ref = train(config(data, str(tmp_path / "none"), 4, "none"))
    ref_weights = torch.load(tmp_path / "none" / "checkpoint.pt", weights_only=False)["model"]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    for mode in ("ddp", "fsdp"):
        losses = json.loads((tmp_path / mode / "losses.json").read_text())
        weights = torch.load(tmp_path / mode / "checkpoint.pt", weights_only=False)["model"]
        assert len(losses) == len(ref.losses) == 3
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref.losses), rtol=1e-5, atol=1e-6)
        assert weights.keys() == ref_weights.keys()
        for name, w in ref_weights.items():
            torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=1e-5, msg=f"{mode} {name}")
        assert (tmp_path / mode / "model" / "model.safetensors").exists()


def test_fsdp2_sharded_parameters_reach_our_kernels(tmp_path):
    """FSDP2 (one gloo process): the parameters are DTensors, unsharded around each block's forward and
    backward; our custom ops (Triton kernels in the interpreter, the fused loss on lm_head) see them and give
    the unsharded model's loss and gradients."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from llama_triton.model import LlamaConfig, LlamaForCausalLM

    from _dist_train import MODEL

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ref = LlamaForCausalLM(LlamaConfig(**{**MODEL, "num_hidden_layers": 1})).init_weights(seed=0).train()
        model = copy.deepcopy(ref)
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model.lm_head.weight, DTensor)
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
        loss = model(ids, labels=ids).loss
        loss.backward()
        want = ref(ids, labels=ids).loss
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7, msg=name)
    finally:
        dist.destroy_process_group()
