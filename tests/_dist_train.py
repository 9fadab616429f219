"""Run by tests/test_distributed.py under torchrun: train() once per mode given (ddp, fsdp; "none" without
torchrun) in one process group; rank 0 writes OUT/<mode>/losses.json (weights: OUT/<mode>/checkpoint.pt)."""
import json
import os
import sys

import torch.distributed as dist

from llama_triton.train import TrainConfig

MODEL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def config(data, out_dir, batch, mode):
    return TrainConfig(data=data, out_dir=out_dir, preset="tiny", model_overrides=MODEL, seq_len=16, batch_size=batch,
                       grad_accum=2, steps=3, warmup_steps=1, lr=3e-3, eval_tokens=32, progress=False, plot=False,
                       held_out=0.2, distributed=mode)


if __name__ == "__main__":
    from llama_triton.train import train

    out, data, batch, modes = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    for mode in modes:
        res = train(config(data, os.path.join(out, mode), batch, mode))
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.path.join(out, mode, "losses.json"), "w") as f:
                json.dump(res.losses, f)
    if dist.is_initialized():
        dist.destroy_process_group()
