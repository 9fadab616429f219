"""Training loop for llama_triton's LlamaForCausalLM (``llama-triton train``).

    cfg = TrainConfig(data="corpus.jsonl", out_dir="run", preset="tiny", seq_len=256, batch_size=8, steps=500)
    result = train(cfg)                       # result.losses, result.eval, result.held_out_ppl
    torchrun --nproc-per-node 2 -m llama_triton.cli train ... --distributed fsdp

What one optimizer step does: ``grad_accum`` micro-batches of packed sequences (llama_triton.data: varlen
attention per document), each loss the fused linear cross-entropy summed over its scored tokens and divided
by the scored tokens of the whole step (all micro-batches, all ranks: transformers' ``num_items_in_batch``),
so that accumulation and data parallelism give the gradient of one big batch; gradient clipping; AdamW
(torch's fused kernel on CUDA, foreach on the CPU; no weight decay on norms and biases); linear warmup then
cosine decay to ``min_lr_ratio * lr``. On CUDA the forward runs under bf16 autocast over fp32 (master)
weights; on the CPU everything is fp32. ``activation_checkpointing`` recomputes each decoder layer in the
backward. ``distributed``: "ddp" (DistributedDataParallel) or "fsdp" (FSDP2, ``fully_shard`` per layer and
the root) under torchrun; torch does all communication. Periodic evaluation: held-out perplexity
(llama_triton.evaluate.perplexity). Checkpoints (``out_dir/checkpoint.pt``) hold the model, optimizer,
scheduler, step, RNG states and data position: ``resume=True`` continues exactly (bit-identical on the CPU).
At the end: the model in HF format (``out_dir/model``), ``metrics.jsonl``, ``summary.json`` and
``loss_curve.png``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from .data import PackedDataset, PackedLoader, read_documents


@dataclass
class TrainConfig:
    data: str                                  # text file, directory or .jsonl
    out_dir: str
    preset: str | None = "tiny"                # model: a named config with random init ...
    model_dir: str | None = None               # ... or a HF-format directory to continue training
    model_overrides: dict = field(default_factory=dict)   # LlamaConfig fields over the preset
    tokenizer: str | None = None               # HF tokenizer directory; None: the byte tokenizer
    seq_len: int = 256
    batch_size: int = 8                        # sequences per micro-batch per rank
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 0                        # 0: only at the end
    eval_tokens: int = 16384                   # held-out tokens scored per evaluation (0: all)
    save_every: int = 0                        # 0: only at the end
    held_out: float = 0.05
    seed: int = 0
    precision: str = "auto"                    # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: bool = False
    distributed: str = "none"                  # none | ddp | fsdp
    compile: bool = False                      # torch.compile the model (backend "inductor"; see compile_backend)
    compile_backend: str | None = None
    resume: bool = False
    stop_after: int = 0                        # end this run after this many steps (0: at steps); resume later
    progress: bool = True
    plot: bool = True                          # loss_curve.png at the end (matplotlib)
    device: str | None = None

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.distributed not in ("none", "ddp", "fsdp"):
            raise ValueError(f"distributed must be 'none', 'ddp' or 'fsdp', got {self.distributed!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if (self.preset is None) == (self.model_dir is None):
            raise ValueError("give exactly one of preset and model_dir")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class TrainResult:
    losses: list                     # per optimizer step: mean loss over the step's scored tokens
    eval: list                       # (step, held-out nll, ppl)
    held_out_ppl: float | None
    steps: int
    seconds: float
    tokens: int
    model: torch.nn.Module


# ------------------------------------------------------------------------------------------------ pieces
def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup over `warmup` steps, then
    cosine from 1 to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms, biases). fused on CUDA, foreach elsewhere."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kw)


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing: each decoder layer's activations are recomputed in the backward."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def _autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GiB"
    try:
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f}MiB rss"
    except ImportError:                        # not on this OS
        return "n/a"


def build_model(cfg: TrainConfig, device: torch.device):
    from .model import LlamaConfig, LlamaForCausalLM

    if cfg.model_dir:
        return LlamaForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32, device=device)
    config = LlamaConfig.preset(cfg.preset, **cfg.model_overrides)
    return LlamaForCausalLM(config).init_weights(seed=cfg.seed).to(device)


def load_data(cfg: TrainConfig, tokenizer, max_positions: int, vocab_size: int) -> PackedDataset:
    if cfg.seq_len > max_positions:
        raise ValueError(f"seq_len {cfg.seq_len} is above the model's max_position_embeddings ({max_positions})")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{vocab_size}")
    return PackedDataset.build(read_documents(cfg.data), tokenizer, cfg.seq_len, cfg.held_out, cfg.seed)


class _Dist:
    """torchrun's environment (RANK / WORLD_SIZE / LOCAL_RANK) and the process group."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        self.owns_group = False
        if mode == "none":
            if self.world > 1:
                raise ValueError("WORLD_SIZE > 1 (torchrun) needs distributed='ddp' or 'fsdp'")
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True
        self.world, self.rank = dist.get_world_size(), dist.get_rank()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.mode != "none":
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def wrap(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """DDP or FSDP2 (fully_shard each decoder layer, then the whole model); unchanged for 'none'."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        import torch.distributed as dist

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _inner(model):
    return getattr(model, "module", model)


# ------------------------------------------------------------------------------------------- checkpoint
def save_checkpoint(path: str, model, optimizer, scheduler, step: int, loader: PackedLoader, history: dict,
                    rank: int = 0) -> None:
    """Full (unsharded) state: model, optimizer, scheduler, step, RNG, data position (rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    state = {"model": msd, "optimizer": osd, "scheduler": scheduler.state_dict(), "step": step,
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
             "data": loader.state_dict(), "history": history}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, model, optimizer, scheduler, loader: PackedLoader) -> tuple[int, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(path, map_location="cpu", weights_only=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    loader.load_state_dict(state["data"])
    return state["step"], state["history"]


# ------------------------------------------------------------------------------------------------- loop
def evaluate(model, held_out, seq_len: int, max_tokens: int = 0) -> tuple[float, float]:
    """(nll, ppl) of the held-out tokens: llama_triton.evaluate.perplexity with windows of seq_len."""
    from .evaluate import perplexity

    ids = held_out.tokens
    if max_tokens:
        ids = ids[:max_tokens]
    was = model.training
    model.eval()
    try:
        res = perplexity(model, ids, max_length=seq_len)
    finally:
        model.train(was)
    return res.nll, res.ppl


def plot_losses(path: str, losses: list, evals: list) -> bool:
    """Loss curve PNG (matplotlib, optional). Returns whether it was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, label="train loss", lw=1)
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="held-out nll")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def train(cfg: TrainConfig, model=None, tokenizer=None, log=None) -> TrainResult:
    """Run cfg.steps optimizer steps (continuing from out_dir/checkpoint.pt with cfg.resume). ``model``: use
    this LlamaForCausalLM instead of building one (fp32, on its device)."""
    from .tokenizer import load_tokenizer

    cfg.validate()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist = _Dist(cfg.distributed, device)
    rank0 = dist.rank == 0
    log = log or (lambda msg: print(msg, file=sys.stderr) if rank0 else None)
    try:
        tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
        torch.manual_seed(cfg.seed)
        model = model if model is not None else build_model(cfg, device)
        data = load_data(cfg, tokenizer, model.config.max_position_embeddings, model.config.vocab_size)
        loader = PackedLoader(data.train, cfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world)
        log(f"data: {data.n_docs} documents, {data.n_tokens} tokens; {len(data.train)} train / "
            f"{len(data.held_out)} held-out sequences of {cfg.seq_len}")
        from . import backend

        if device.type == "cpu" and backend.use_triton(torch.empty(0)):
            log("note: the kernels run in Triton's CPU interpreter (slow); LLAMA_TRITON_BACKEND=torch trains "
                "with the PyTorch reference ops")
        base = model
        if cfg.activation_checkpointing:
            checkpoint_layers(base)
        model = wrap(base, cfg.distributed, device)
        base.train()
        optimizer = make_optimizer(model, cfg, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_lambda, warmup=cfg.warmup_steps, total=cfg.steps,
                                         min_ratio=cfg.min_lr_ratio))
        fwd = torch.compile(model, backend=cfg.compile_backend or "inductor") if cfg.compile else model
        os.makedirs(cfg.out_dir, exist_ok=True)
        ckpt = os.path.join(cfg.out_dir, "checkpoint.pt")
        history = {"losses": [], "eval": [], "tokens": 0, "seconds": 0.0}
        step = 0
        if cfg.resume:
            if not os.path.exists(ckpt):
                raise FileNotFoundError(f"resume: no checkpoint at {ckpt}")
            step, history = load_checkpoint(ckpt, model, optimizer, scheduler, loader)
            log(f"resumed from {ckpt} at step {step}")
        bar = None
        if cfg.progress and rank0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc="train", file=sys.stderr, dynamic_ncols=True)
        t_start = time.perf_counter()
        end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
        while step < end:
            t0 = time.perf_counter()
            batches = [loader.next() for _ in range(cfg.grad_accum)]
            n_items = dist.all_sum(torch.tensor(sum(int((b["shift_labels"] != -100).sum()) for b in batches),
                                                dtype=torch.float32, device=device))
            loss_sum = torch.zeros((), device=device)
            for i, b in enumerate(batches):
                b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
                sync = contextlib.nullcontext()
                if cfg.distributed == "ddp" and i < len(batches) - 1:
                    sync = model.no_sync()                     # all-reduce once per optimizer step
                elif cfg.distributed == "fsdp":
                    model.set_requires_gradient_sync(i == len(batches) - 1)
                with sync:
                    with _autocast(device, cfg.precision):
                        loss = fwd(**b, num_items_in_batch=n_items).loss        # sum / all scored tokens
                    (loss * dist.world).backward()             # DDP/FSDP average over ranks: undo it
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_loss = float(dist.all_sum(loss_sum))
            tokens = cfg.seq_len * cfg.batch_size * cfg.grad_accum * dist.world
            secs = time.perf_counter() - t0
            history["losses"].append(step_loss)
            history["tokens"] += tokens
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / secs:.0f}", mem=_memory(device),
                                lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
                bar.update(1)
            if rank0:
                with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                                        "grad_norm": None if grad_norm is None else float(grad_norm),
                                        "tokens_per_s": tokens / secs}) + "\n")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and len(data.held_out):
                nll, ppl = evaluate(base, data.held_out, cfg.seq_len, cfg.eval_tokens)
                history["eval"].append((step, nll, ppl))
                log(f"step {step}: held-out nll {nll:.4f}, perplexity {ppl:.3f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                history["seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                save_checkpoint(ckpt, model, optimizer, scheduler, step, loader, history, dist.rank)
        if bar is not None:
            bar.close()
        history["seconds"] += time.perf_counter() - t_start
        ppl = None
        if len(data.held_out):
            nll, ppl = evaluate(base, data.held_out, cfg.seq_len, cfg.eval_tokens)
            if not history["eval"] or history["eval"][-1][0] != step:
                history["eval"].append((step, nll, ppl))
            log(f"step {step}: held-out nll {nll:.4f}, perplexity {ppl:.3f}")
        save_checkpoint(ckpt, model, optimizer, scheduler, step, loader, history, dist.rank)
        if rank0:
            _finish(cfg, base, model, history, ppl, log)
        return TrainResult(history["losses"], history["eval"], ppl, step, history["seconds"], history["tokens"],
                           base)
    finally:
        dist.close()


def _finish(cfg, base, model, history, ppl, log) -> None:
    if cfg.distributed == "fsdp":          # the sharded model cannot save itself: a plain copy of the full state
        from .model import LlamaForCausalLM

        full = LlamaForCausalLM(base.config)
        full.load_state_dict(torch.load(os.path.join(cfg.out_dir, "checkpoint.pt"), map_location="cpu",
                                        weights_only=False)["model"])
        full.save_pretrained(os.path.join(cfg.out_dir, "model"))
    else:
        _inner(model).save_pretrained(os.path.join(cfg.out_dir, "model"))
    summary = {"steps": len(history["losses"]), "tokens": history["tokens"], "seconds": round(history["seconds"], 1),
               "final_loss": history["losses"][-1] if history["losses"] else None, "held_out_ppl": ppl,
               "eval": history["eval"], "config": dataclasses.asdict(cfg)}
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if cfg.plot and plot_losses(os.path.join(cfg.out_dir, "loss_curve.png"), history["losses"], history["eval"]):
        log(f"loss curve: {os.path.join(cfg.out_dir, 'loss_curve.png')}")


# ---------------------------------------------------------------------------------------------- the CLI
def add_arguments(p) -> None:
    """`llama-triton train` options (cli.py adds the subcommand)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="model config with random init (default: tiny)")
    g.add_argument("--model", dest="model_dir", help="HF-format model directory to continue training")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="LlamaConfig override for --preset, repeatable (e.g. --set hidden_size=128)")
    p.add_argument("--data", required=True, help="text file, directory, .jsonl, or python:pydoc_data")
    p.add_argument("--out", dest="out_dir", required=True, help="output directory (checkpoint, model, plots)")
    p.add_argument("--tokenizer", help="HF tokenizer directory (default: the byte tokenizer)")
    defaults = TrainConfig(data="", out_dir="")
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "warmup_steps", "eval_every", "eval_tokens",
                 "save_every", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "held_out"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--distributed", choices=["none", "ddp", "fsdp"], default="none",
                   help="under torchrun: DDP or FSDP2")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="no loss_curve.png")


def _parse_overrides(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_cli(args) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["preset"] = None if args.model_dir else (args.preset or "tiny")
    kw["model_overrides"] = _parse_overrides(args.set)
    res = train(TrainConfig(**kw))
    if int(os.environ.get("RANK", "0")) == 0:
        ppl = "n/a" if res.held_out_ppl is None else f"{res.held_out_ppl:.3f}"
        print(f"trained {res.steps} steps, {res.tokens} tokens in {res.seconds:.1f} s; final loss "
              f"{res.losses[-1]:.4f}; held-out perplexity {ppl}; outputs in {args.out_dir}")
    return 0
