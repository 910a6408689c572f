"""Training speed: ``course_lib.trainer.train`` against a loop written after nanoGPT's ``train.py``.

Both sides train the same ``course_lib.model.GPTModel`` (the profile's recipe: model, batch,
gradient accumulation, context, learning rates) on the same token shards, in the same process,
dtype and thread count, from the same initial weights, for ``--warmup`` untimed steps and then
``--steps`` timed ones:

* ``ours``      — :func:`course_lib.trainer.train`, as ``course pretrain`` runs it (``ShardLoader``
  batches, AdamW with its decay groups, schedule, clipping, accumulation, the loss all-reduce
  and non-finite check of every step). Its log, evaluation and checkpoint happen only after the
  last timed step; the time is the wall clock from the end of step ``warmup`` to the end of step
  ``warmup + steps`` (the trainer's ``callback``), progress bar off.
* ``nanoGPT loop`` — :func:`nanogpt_loop` below, written from nanoGPT's published recipe
  (karpathy/nanoGPT ``train.py``; not its code): a ``np.memmap`` of ``uint16`` tokens opened
  again for every batch, ``torch.randint`` window starts, ``torch.stack`` of the slices; AdamW
  with decay on every parameter of two or more dimensions (nanoGPT's rule); ``get_lr`` linear
  warmup + cosine; ``grad_accum`` micro-steps with the next batch fetched while the backward of
  the current one is queued; a ``GradScaler`` enabled for fp16 only; ``clip_grad_norm_``;
  ``zero_grad(set_to_none=True)``. The autocast context is ``nullcontext()`` for fp32; for
  bf16 both sides autocast (nanoGPT itself never autocasts on a CPU: then the dtypes would differ).

The two take turns, in an order that alternates from one repeat to the next; the table gives the
best and the median tokens/s of each, and "ours / nanoGPT" as the ratio of the bests and the
median over repeats of the ratio within a repeat (robust to a load that comes and goes).
Target (issue 14): ours / nanoGPT >= 1.0x on a CPU.

    python benchmarks/bench_trainer.py                              # cpu profile: gpt-cpu, 16 x 128 tokens a step
    python benchmarks/bench_trainer.py --profile tiny --steps 30 --repeats 5
    python benchmarks/bench_trainer.py --batch-size 4 --grad-accum 1 --steps 5   # shorter steps, same model
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from course_lib import data
from course_lib.model import GPTModel
from course_lib.shards import HEADER_BYTES, prepare_shards, shard_files
from course_lib.trainer import TrainerConfig, recipe, train


def shard_folder(name: str) -> Path:
    """The token shards of ``name`` (a shard folder, or a registered corpus tokenized once into the
    data cache, where ``course pretrain`` keeps them too)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    out = data.default_cache_dir() / "shards" / name
    if not (out / "meta.json").is_file():
        prepare_shards(name, out, overwrite=True, progress=False)
    return out


# --------------------------------------------------------------------------- #
# The comparison loop, after nanoGPT's train.py
# --------------------------------------------------------------------------- #
def nanogpt_loop(cfg: TrainerConfig, shard: Path, steps: int, warmup: int, device: str = "cpu") -> tuple[float, float]:
    """Train ``cfg``'s model for ``warmup + steps`` iterations the nanoGPT way.

    Returns:
        ``(seconds of the last `steps` iterations, loss of the last micro-batch)``.
    """
    model_cfg = cfg.model_config()
    B, T, accum = cfg.batch_size, model_cfg.context_length, cfg.grad_accum_steps
    total_iters = warmup + steps

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = np.memmap(shard, dtype=np.uint16, mode="r", offset=HEADER_BYTES)  # reopened per batch
        starts = torch.randint(len(tokens) - T, (B,))
        x = torch.stack([torch.from_numpy(tokens[i:i + T].astype(np.int64)) for i in starts.tolist()])
        y = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + T].astype(np.int64)) for i in starts.tolist()])
        if device.startswith("cuda"):
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def get_lr(it: int) -> float:  # linear warmup, cosine decay to min_lr, then min_lr
        if it < cfg.warmup_steps:
            return cfg.max_lr * (it + 1) / (cfg.warmup_steps + 1)
        if it > total_iters:
            return cfg.min_lr
        progress = (it - cfg.warmup_steps) / max(1, total_iters - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)

    torch.manual_seed(cfg.seed)
    model = GPTModel(model_cfg, tie_weights=cfg.tie_weights).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW(groups, lr=cfg.max_lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  **({"fused": True} if fused else {}))
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    ctx = contextlib.nullcontext() if amp is None else torch.autocast(device_type=device_type, dtype=amp)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "fp16")

    model.train()
    x, y = get_batch()
    start = time.perf_counter()
    for it in range(total_iters):
        if it == warmup:
            start = time.perf_counter()
        lr = get_lr(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(accum):
            with ctx:
                logits = model(x)                                                     # [B, T, V]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) / accum
            x, y = get_batch()                                                        # the next batch
            scaler.scale(loss).backward()
        if cfg.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss.item() * accum


# --------------------------------------------------------------------------- #
# Ours
# --------------------------------------------------------------------------- #
def trainer_run(cfg: TrainerConfig, folder: Path, steps: int, warmup: int) -> tuple[float, float]:
    """``course_lib.trainer.train`` for ``warmup + steps + 1`` steps; the time of the ``steps`` after
    ``warmup`` (the last step, with the run's only log, evaluation and checkpoint, is not timed)."""
    total = warmup + steps + 1
    marks: dict[int, float] = {}

    def mark(state: dict) -> None:
        marks[state["step"]] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        run = cfg.replace(data=str(folder), out_dir=out, max_steps=total, log_every=total, eval_every=total,
                          eval_batches=1, checkpoint_every=total)
        result = train(run, progress=False, verbose=False, callback=mark)
    return marks[warmup + steps] - marks[warmup], result.train_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=("tiny", "cpu"), help="the recipe (default cpu)")
    parser.add_argument("--data", help="a shard folder or registered corpus (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contestant (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="autocast dtype (default fp32)")
    parser.add_argument("--batch-size", type=int, help="override the recipe's micro-batch")
    parser.add_argument("--grad-accum", type=int, help="override the recipe's gradient accumulation")
    args = parser.parse_args()
    if min(args.steps, args.repeats) < 1 or args.warmup < 1:
        raise SystemExit("--steps, --repeats and --warmup must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = recipe(args.profile).replace(dtype=args.dtype, device="cpu", compile=False, skip_none=True,
                                       batch_size=args.batch_size, grad_accum_steps=args.grad_accum)
    cfg = cfg.replace(warmup_steps=min(cfg.warmup_steps, args.warmup + args.steps))
    folder = shard_folder(args.data or cfg.data)
    shards = shard_files(folder, "train")
    m = cfg.model_config()
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * m.context_length
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.dtype}; profile {args.profile}: "
          f"{m.n_layers} layers x {m.emb_dim}, context {m.context_length}, {cfg.batch_size} x {cfg.grad_accum_steps} "
          f"sequences = {tokens_per_step:,} tokens per step; {args.warmup} warm-up + {args.steps} timed steps per "
          f"run, {args.repeats} repeats; data {folder} ({len(shards)} train shard(s); the nanoGPT loop reads "
          f"{shards[0].name})")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    contestants = {"ours": lambda: trainer_run(cfg, folder, args.steps, args.warmup),
                   "nanoGPT loop": lambda: nanogpt_loop(cfg, shards[0], args.steps, args.warmup)}
    speeds: dict[str, list[float]] = {k: [] for k in contestants}
    losses: dict[str, list[float]] = {k: [] for k in contestants}
    order = list(contestants)
    for r in range(args.repeats):
        for key in (order if r % 2 == 0 else order[::-1]):
            seconds, loss = contestants[key]()
            speeds[key].append(args.steps * tokens_per_step / seconds)
            losses[key].append(loss)
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {speeds[k][-1]:,.0f} tokens/s" for k in order), flush=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    ours, ref = speeds["ours"], speeds["nanoGPT loop"]
    ratios = [a / b for a, b in zip(ours, ref)]
    print("\n| loop | tokens/s (best) | tokens/s (median) | last loss |\n|---|---:|---:|---:|")
    for key in order:
        print(f"| {key} | {max(speeds[key]):,.0f} | {statistics.median(speeds[key]):,.0f} | {losses[key][-1]:.3f} |")
    print(f"\nours / nanoGPT loop: {max(ours) / max(ref):.2f}x (best / best), {statistics.median(ratios):.2f}x "
          f"(median of the per-repeat ratios: {', '.join(f'{x:.2f}x' for x in ratios)}); target >= 1.0x")
    print(f"load average (1 min) before and after: {load_before:.2f}, {load_after:.2f} on {os.cpu_count()} CPUs "
          "(other jobs on a shared machine slow the runs down)")


if __name__ == "__main__":
    main()
