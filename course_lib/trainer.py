"""Step 8 — the production trainer: one flat loop that runs on a CPU, a GPU or many GPUs.

Step 5's :func:`course_lib.training.train` is the teaching loop; this is the one a long run
uses, written after nanoGPT's ``train.py``: one :class:`TrainerConfig`, one flat loop in
:func:`train`, small helpers around it. Each optimizer step::

    lr = schedule(step)                                  # warmup, then cosine / linear / WSD
    for micro in range(grad_accum_steps):                # gradient accumulation
        x, y = loader.next_batch()                       # [B, T] token windows from the shards
        with autocast(bf16 | fp16):                      # mixed precision
            loss = cross_entropy(model(x), y) / grad_accum_steps
        loss.backward()                                  # DDP all-reduces on the last micro-step only
    norm = clip_grad_norm_(params, grad_clip)            # the pre-clip norm is logged
    optimizer.step(); optimizer.zero_grad()              # AdamW, decay on matrices only

and every few steps: a log line (loss, lr, gradient norm, tokens/s, MFU), a validation loss,
a checkpoint from which a killed run resumes exactly.

**One entry point, one process or many.** ``train(cfg)`` runs as it is, or under ``torchrun``
(``torchrun --standalone --nproc-per-node 8 -m course_lib.cli pretrain ...``; across machines
``--nnodes``/``--rdzv-endpoint``): it reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, starts
PyTorch's process group (NCCL on GPUs, gloo on CPUs), wraps the model in
``DistributedDataParallel`` (or shards it with FSDP2's ``fully_shard`` when ``cfg.fsdp``), and
lets rank 0 alone print and write files. The **global batch** of one optimizer step is
``batch_size x grad_accum_steps x world_size`` sequences of ``context_length`` tokens: with
more processes, lower ``grad_accum_steps`` to keep it (and the learning rate that suits it).

* :class:`TrainerConfig`, :func:`recipe` — the settings, and ready ones for tiny / cpu / gpu.
* :func:`param_groups`, :func:`configure_optimizer` — AdamW with weight decay on matrices only.
* :func:`evaluate` — the mean validation loss over the first batches of the val split.
* :func:`train` -> :class:`TrainResult` — the loop.
* :func:`read_log`, :func:`plot_log` — ``log.jsonl`` back, and its plot.

Files in ``out_dir`` (rank 0 only): ``config.json``, ``log.jsonl`` (one JSON object per log
step), ``checkpoint.pt`` (a :mod:`course_lib.checkpoint` file: ``model_from_checkpoint`` loads
the model from it).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .anatomy import flops_per_token
from .checkpoint import (CheckpointError, NonFiniteError, load_checkpoint, nonfinite_parameters, rng_state,
                         save_checkpoint, set_rng_state)
from .checks import boolean, finite_number, integer, non_negative_int, positive_int
from .config import DEFAULT_SEED, GPT_CONFIGS, GPTConfig, get_config, get_device
from .files import atomic_write, check_writable
from .mfu import mfu as model_flops_utilisation
from .mfu import peak_flops as device_peak_flops
from .model import GPTModel
from .schedules import SCHEDULES
from .training import _graceful_interrupt

__all__ = ["TrainerConfig", "TrainResult", "check_config", "recipe", "param_groups", "configure_optimizer",
           "evaluate", "train", "read_log", "plot_log", "DTYPES", "CHECKPOINT", "LOG", "CONFIG"]

#: Mixed-precision modes: the dtype autocast runs the matmuls in (``None``: plain fp32).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
#: File names inside ``out_dir``.
CHECKPOINT, LOG, CONFIG = "checkpoint.pt", "log.jsonl", "config.json"
_TAG = "course_lib.trainer/1"  # marks checkpoints written by train()


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
@dataclass
class TrainerConfig:
    """Everything one run needs. Change fields with ``cfg.replace(max_steps=500)``.

    Args:
        model: a preset of :data:`course_lib.config.GPT_CONFIGS` (``"gpt2-small"``), a
            :class:`~course_lib.config.GPTConfig`, or a dict of overrides on a preset:
            ``{"base": "gpt-tiny", "n_layers": 2}`` (``base`` defaults to ``"gpt2-small"``).
        tie_weights: share the token embedding and the output head, as GPT-2 does.
        data: a folder of shards (:mod:`course_lib.shards`), or a registered corpus name
            (``"tinystories-val"``, ``"the-verdict"``, ``"gutenberg"``), tokenized once into
            ``<data cache>/shards/<name>`` with :func:`~course_lib.shards.prepare_shards` (by rank 0
            while the others wait: tokenize a large corpus beforehand with ``course data shards``,
            and across machines put the shards on a file system every node sees).
        out_dir: where ``config.json``, ``log.jsonl`` and ``checkpoint.pt`` go.
        batch_size: sequences per micro-batch, per process.
        grad_accum_steps: micro-batches per optimizer step. Global batch =
            ``batch_size x grad_accum_steps x world_size`` sequences.
        context_length: tokens per sequence, and the model's context (its position table).
            ``None``: the model config's.
        shuffle: draw random windows (``True``); ``False`` reads the training split in order
            (rank ``r`` takes every ``world_size``-th batch), which makes the batches of a
            run of N processes the same tokens as those of one process with N times the
            accumulation.
        max_steps: optimizer steps in all (counting those before a resume).
        max_lr, min_lr, warmup_steps, schedule, decay_steps: the learning rate
            (:mod:`course_lib.schedules`): update ``k`` (1-based) uses
            ``SCHEDULES[schedule](k, max_lr=..., min_lr=..., warmup_steps=..., total_steps=max_steps)``,
            so the first update is not wasted at lr 0 and the last one uses ``min_lr``.
            ``decay_steps`` is for ``"wsd"`` (``None``: the last 20 % of the steps after warmup).
        weight_decay, betas, eps: AdamW's (decay on matrices only, see :func:`param_groups`).
        grad_clip: clip the global gradient norm to this; 0 = off (the norm is still logged).
        dtype: ``"bf16"`` (autocast, CPU and CUDA), ``"fp16"`` (autocast + gradient scaler,
            CUDA only) or ``"fp32"``. Weights and optimizer state stay fp32 in every mode.
        compile: ``torch.compile`` the model. tf32: allow TF32 matmuls on CUDA (Ampere+).
        fsdp: shard weights, gradients and optimizer state with FSDP2 (``fully_shard``)
            instead of replicating them with DDP (only under ``torchrun``).
        eval_every, eval_batches: validation every this many steps (and at the end), over
            this many batches per process.
        log_every: a log line every this many steps (and at the last step).
        checkpoint_every: a checkpoint every this many steps (and at the end).
        seed: model initialisation (the same on every rank), data and dropout (``seed + rank``).
        device: ``"cuda"``, ``"cpu"``, ... ``None``: :func:`course_lib.config.get_device`;
            under ``torchrun`` with CUDA, ``cuda:LOCAL_RANK``.
        peak_flops: the device's peak FLOP/s for MFU; ``None``: :func:`course_lib.mfu.peak_flops`.
    """

    model: str | dict | GPTConfig = "gpt2-small"
    tie_weights: bool = False
    data: str = "tinystories-val"
    out_dir: str = "runs/pretrain"
    batch_size: int = 8
    grad_accum_steps: int = 1
    context_length: int | None = None
    shuffle: bool = True
    max_steps: int = 1000
    max_lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_steps: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "fp32"
    compile: bool = False
    tf32: bool = True
    fsdp: bool = False
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 500
    seed: int = DEFAULT_SEED
    device: str | None = None
    peak_flops: float | None = None

    def replace(self, **changes: Any) -> "TrainerConfig":
        """A copy with some fields changed, e.g. ``recipe("cpu").replace(max_steps=50)``.

        ``replace(skip_none=True, **overrides)`` leaves out the overrides that are ``None`` (a
        command line's options that were not given).

        Raises:
            TypeError: a name that is not a field.
        """
        skip_none = changes.pop("skip_none", False)
        names = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in changes if k not in names]
        if unknown:
            raise TypeError(f"TrainerConfig has no field {unknown[0]!r}; the fields are {names}")
        if skip_none:
            changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (JSON and ``torch.load(weights_only=True)`` can read them back)."""
        d = dataclasses.asdict(self)
        if isinstance(self.model, GPTConfig):
            d["model"] = self.model.to_dict()
        d["betas"] = list(self.betas)
        d["out_dir"], d["data"] = str(self.out_dir), str(self.data)
        d["device"] = None if self.device is None else str(self.device)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainerConfig":
        """The config :meth:`to_dict` wrote (e.g. ``config.json``); keys that are not fields
        (``config.json``'s ``model_config``, ``world_size``, ...) are left out.

        Raises:
            TypeError: ``data`` is not a mapping (a dict).
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a dict of TrainerConfig fields (e.g. json.load of a config.json), got "
                            f"{type(data).__name__}")
        d = {k: v for k, v in dict(data).items() if k in {f.name for f in dataclasses.fields(cls)}}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def model_config(self) -> GPTConfig:
        """The :class:`~course_lib.config.GPTConfig` this run builds (``context_length`` applied).

        Raises:
            ValueError, TypeError: an unknown preset, a bad override (named).
        """
        m = self.model
        if isinstance(m, GPTConfig):
            base, overrides = m, {}
        elif isinstance(m, str):
            if m not in GPT_CONFIGS:
                raise ValueError(f"TrainerConfig.model {m!r} is not a preset; choose one of {sorted(GPT_CONFIGS)}, "
                                 "pass a GPTConfig, or a dict such as {'base': 'gpt-tiny', 'n_layers': 2}")
            base, overrides = get_config(m), {}
        elif isinstance(m, Mapping):
            overrides = dict(m)
            name = overrides.pop("base", "gpt2-small")
            if name not in GPT_CONFIGS:
                raise ValueError(f"TrainerConfig.model['base'] {name!r} is not a preset; choose one of "
                                 f"{sorted(GPT_CONFIGS)}")
            base = get_config(name)
        else:
            raise TypeError(f"TrainerConfig.model must be a preset name, a GPTConfig or a dict of overrides, "
                            f"got {type(m).__name__}")
        if self.context_length is not None:
            overrides["context_length"] = self.context_length
        try:
            return base.replace(**overrides) if overrides else base
        except (TypeError, ValueError) as err:
            raise type(err)(f"TrainerConfig.model: {err}") from None


def _real(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a ``float`` if it is a finite real number >= 0 (> 0 with ``positive``); NumPy's too."""
    return finite_number(f"TrainerConfig.{name}", value, minimum=0, positive=positive)


def check_config(cfg: TrainerConfig) -> TrainerConfig:
    """Check every field of ``cfg`` before anything is built or written.

    Returns:
        a copy of ``cfg`` with plain Python values (a ``numpy.int64`` becomes ``int``, a
        ``numpy.float32`` ``float``, ``betas`` a tuple), so that ``config.json`` can hold it.

    Raises:
        TypeError: ``cfg`` is not a :class:`TrainerConfig`; a flag that is not ``True``/``False``; a
            ``seed`` that is not an integer; a ``model`` of the wrong kind or a bad override.
        ValueError: a bad value, naming the field (``TrainerConfig.warmup_steps ...``) and the fix.
    """
    if not isinstance(cfg, TrainerConfig):
        raise TypeError(f"cfg must be a TrainerConfig (e.g. course_lib.trainer.recipe('tiny')), got "
                        f"{type(cfg).__name__}")
    clean: dict[str, Any] = {}
    for name in ("batch_size", "grad_accum_steps", "max_steps", "eval_every", "eval_batches", "log_every",
                 "checkpoint_every"):
        clean[name] = positive_int(f"TrainerConfig.{name}", getattr(cfg, name))
    clean["context_length"] = positive_int("TrainerConfig.context_length", cfg.context_length, allow_none=True)
    clean["warmup_steps"] = non_negative_int("TrainerConfig.warmup_steps", cfg.warmup_steps)
    if clean["warmup_steps"] > clean["max_steps"]:
        raise ValueError(f"TrainerConfig.warmup_steps ({cfg.warmup_steps}) is longer than the run "
                         f"(max_steps={cfg.max_steps}); use fewer warmup steps (a few percent of the run)")
    clean["max_lr"] = _real("max_lr", cfg.max_lr, positive=True)
    clean["min_lr"] = _real("min_lr", cfg.min_lr)
    if clean["min_lr"] > clean["max_lr"]:
        raise ValueError(f"TrainerConfig.min_lr ({cfg.min_lr:g}) is larger than max_lr ({cfg.max_lr:g}); the "
                         "schedule decays from max_lr down to min_lr (e.g. min_lr = max_lr / 10)")
    if not isinstance(cfg.schedule, str) or cfg.schedule not in SCHEDULES:
        raise ValueError(f"TrainerConfig.schedule must be one of {sorted(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.decay_steps is not None:
        clean["decay_steps"] = non_negative_int("TrainerConfig.decay_steps", cfg.decay_steps)
        if clean["decay_steps"] > clean["max_steps"] - clean["warmup_steps"]:
            raise ValueError(f"TrainerConfig.decay_steps ({cfg.decay_steps}) is longer than the steps after warmup "
                             f"({cfg.max_steps - cfg.warmup_steps})")
    clean["weight_decay"] = _real("weight_decay", cfg.weight_decay)
    if not (isinstance(cfg.betas, (tuple, list)) and len(cfg.betas) == 2
            and all(isinstance(b, numbers.Real) and not isinstance(b, (bool, np.bool_)) and 0 <= b < 1
                    for b in cfg.betas)):
        raise ValueError(f"TrainerConfig.betas must be two numbers in [0, 1), e.g. (0.9, 0.95), got {cfg.betas!r}")
    clean["betas"] = tuple(float(b) for b in cfg.betas)
    clean["eps"] = _real("eps", cfg.eps, positive=True)
    clean["grad_clip"] = _real("grad_clip", cfg.grad_clip)
    if not isinstance(cfg.dtype, str) or cfg.dtype not in DTYPES:
        raise ValueError(f"TrainerConfig.dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}")
    for name in ("tie_weights", "shuffle", "compile", "tf32", "fsdp"):
        clean[name] = boolean(f"TrainerConfig.{name}", getattr(cfg, name))
    clean["seed"] = integer("TrainerConfig.seed", cfg.seed)
    if not -2**63 <= clean["seed"] < 2**63:  # torch.manual_seed's range, with room for seed + rank
        raise ValueError(f"TrainerConfig.seed must be between -2**63 and 2**63 - 1 (torch.manual_seed's range), "
                         f"got {cfg.seed}; use a smaller seed such as 1234")
    if cfg.peak_flops is not None:
        clean["peak_flops"] = _real("peak_flops", cfg.peak_flops, positive=True)
    if not isinstance(cfg.data, (str, os.PathLike)) or not str(cfg.data).strip():
        raise ValueError(f"TrainerConfig.data must be a shard folder or a registered corpus name, got {cfg.data!r}")
    if not isinstance(cfg.out_dir, (str, os.PathLike)) or not str(cfg.out_dir).strip():
        raise ValueError(f"TrainerConfig.out_dir must be a folder path, got {cfg.out_dir!r}")
    built = cfg.replace(context_length=None).model_config()
    if isinstance(cfg.model, Mapping):  # the overrides as GPTConfig converted them (JSON-safe)
        clean["model"] = {k: (v if k == "base" else getattr(built, k)) for k, v in cfg.model.items()}
    checked = dataclasses.replace(cfg, **clean)
    checked.model_config()
    return checked


def recipe(profile: str) -> TrainerConfig:
    """A ready :class:`TrainerConfig` for a course profile.

    * ``"tiny"`` — a 2-layer, 64-wide GPT with a 32-token context, 30 steps on The Verdict:
      seconds on a CPU (the notebook and the tests).
    * ``"cpu"`` — ``gpt-cpu`` (4 layers, 256 wide) with a 128-token context on TinyStories'
      validation file (~0.2 M tokens), 150 steps of 2,048 tokens (~1.6 passes over it): about
      30 TFLOPs, about 10 minutes on two laptop cores (measured: ``benchmarks/README.md``, step 8).
    * ``"gpu"`` — GPT-2 small (124 M, tied head), 1,024-token context, bf16, ``torch.compile``;
      32 x 16 accumulation x 1,024 tokens = 524,288 tokens (~0.5 M, GPT-3's batch for this size)
      per step on one GPU, 400 steps = 210 M tokens of TinyStories' training file
      (``"tinystories-train"``), max_lr 6e-4 as GPT-3. Expected time and final loss: to be
      measured (from the FLOPs, 1.8e17: about 8 minutes of steps on one H100 at 40 % MFU, plus
      compilation and evaluations). With N GPUs pass ``grad_accum_steps=16 // N`` (``course pretrain
      --grad-accum-steps``) to keep the batch.

    Raises:
        ValueError: an unknown profile.
    """
    key = str(profile).strip().lower()
    if key == "tiny":
        return TrainerConfig(
            model={"base": "gpt-tiny", "n_layers": 2, "emb_dim": 64, "n_heads": 4, "drop_rate": 0.0},
            tie_weights=True, data="the-verdict", out_dir="runs/pretrain-tiny", batch_size=4, context_length=32,
            max_steps=30, max_lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_every=10, eval_batches=2, log_every=5,
            checkpoint_every=10)
    if key == "cpu":
        return TrainerConfig(
            model="gpt-cpu", data="tinystories-val", out_dir="runs/pretrain-cpu", batch_size=16,
            grad_accum_steps=1, context_length=128, max_steps=150, max_lr=1e-3, min_lr=1e-4, warmup_steps=15,
            eval_every=50, eval_batches=10, log_every=10, checkpoint_every=25)
    if key == "gpu":
        return TrainerConfig(
            model="gpt2-small", tie_weights=True, data="tinystories-train", out_dir="runs/pretrain-gpu",
            batch_size=32, grad_accum_steps=16, context_length=1024, max_steps=400, max_lr=6e-4, min_lr=6e-5,
            warmup_steps=20, dtype="bf16", compile=True, eval_every=100, eval_batches=20, log_every=10,
            checkpoint_every=100)
    raise ValueError(f"unknown profile {profile!r}; recipes exist for 'tiny', 'cpu' and 'gpu'")


# --------------------------------------------------------------------------- #
# The optimizer
# --------------------------------------------------------------------------- #
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two parameter groups: weight decay on the matrices of ``nn.Linear`` layers only.

    Decay pulls every weight toward 0 a little at each step. On a matrix that mixes features
    this is a useful regulariser (it keeps the weights small, the function smooth). Biases and
    norm gains are single numbers per feature: pulling a LayerNorm gain to 0 or a bias to 0
    only fights the shift and scale they exist to learn, and regularises nothing. Embedding
    rows are read only when their token occurs, so decay shrinks the rows of rare tokens
    toward 0 between uses. A tied head (``tie_weights=True``) *is* the token embedding, so it
    is not decayed either.

    Args:
        model: any module (a :class:`~course_lib.model.GPTModel`, also after ``fully_shard``).
        weight_decay: the decay of the first group.

    Returns:
        ``[{"params": [Linear weights], "weight_decay": weight_decay},
        {"params": [everything else], "weight_decay": 0.0}]``; every trainable parameter is in
        exactly one group (a shared tensor once).

    Raises:
        TypeError: ``model`` is not a module. ValueError: a negative ``weight_decay``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    weight_decay = finite_number("weight_decay", weight_decay, minimum=0, hint=" (typical: 0.1)")
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # a tied tensor is listed once
        if p.requires_grad:
            matrix = id(p) in linear and id(p) not in embedding and p.dim() >= 2
            (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


def configure_optimizer(model: nn.Module, cfg: TrainerConfig, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg``'s lr, betas, eps and decay; the fused CUDA
    kernel (one launch for all parameters) on a GPU, except with FSDP (sharded DTensors).

    Args:
        model: the module whose parameters it updates (on ``device``).
        cfg: gives ``max_lr`` (the starting lr; :func:`train` sets each step's), ``betas``, ``eps``,
            ``weight_decay`` and ``fsdp``.
        device: where the parameters live (``"cuda"`` turns on the fused kernel).

    Raises:
        ValueError, TypeError: a bad ``cfg`` (see :func:`check_config`: an infinite ``max_lr``, ...).
    """
    cfg = check_config(cfg)
    fused = get_device(device).type == "cuda" and not cfg.fsdp
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.max_lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, **({"fused": True} if fused else {}))


# --------------------------------------------------------------------------- #
# Processes: one, or many under torchrun
# --------------------------------------------------------------------------- #
@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    on: bool = False        # a process group is in use
    started: bool = False   # ... and train() started it (it stays up for later calls; see _distributed)

    @property
    def master(self) -> bool:
        return self.rank == 0


def _distributed(cfg: TrainerConfig) -> tuple[_Dist, torch.device]:
    """Join torchrun's processes if launched by it (``RANK``/``WORLD_SIZE`` set) or use a process
    group already started; pick this process's device."""
    import torch.distributed as dist

    try:
        wanted = get_device(cfg.device)
    except ValueError as err:
        raise ValueError(f"TrainerConfig.device: {err}") from None
    if dist.is_available() and dist.is_initialized():
        d = _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True, False)
    elif "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        d = _Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                  True, True)
    else:
        return _Dist(), wanted
    if wanted.type == "mps":
        raise ValueError("distributed training runs on CUDA (NCCL) or CPU (gloo), not MPS; pass device='cpu'")
    device = torch.device("cuda", d.local_rank) if wanted.type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if d.started:
        # Started once per process and left up, so that a second train() in the same processes
        # uses it: gloo cannot start a new group on torchrun's store after one was destroyed (it
        # reads the old group's addresses back and waits forever). Destroyed when Python exits.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(_end_group)
    return d, device


def _end_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _on_rank0(d: _Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its error on every rank
    (so that no rank waits forever for one that failed)."""
    result, error = None, None
    if d.master:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    if d.on:
        import torch.distributed as dist

        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def _all_ranks(d: _Dist, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not d.on:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def _shard_dir(data: str | os.PathLike, *, progress: bool = False, prepare: bool = True) -> Path:
    """A folder of shards: ``data`` itself, or the cache's tokenization of the corpus it names
    (tokenized now if it is not there yet, unless ``prepare=False``, which only checks the name)."""
    from . import data as registry
    from .shards import prepare_shards

    path = Path(data).expanduser()
    if path.is_dir():
        return path
    name = str(data)
    if name != "gutenberg" and name not in registry.REGISTRY:
        raise ValueError(f"TrainerConfig.data {name!r} is neither a folder of shards nor a registered corpus; pass "
                         "a folder written by `course data shards` (course_lib.shards.prepare_shards) or a name "
                         "from `course data list` (e.g. 'tinystories-val')")
    out = registry.default_cache_dir() / "shards" / name
    if prepare and not (out / "meta.json").is_file():  # tokenized once; without meta.json: interrupted
        prepare_shards(name, out, overwrite=True, progress=progress)
    return out


def _loaders(cfg: TrainerConfig, directory: Path, d: _Dist, device: torch.device, T: int):
    """The training loader, and the validation loader with as many batches on every rank (or ``None``
    when the val split is too small for one batch per rank)."""
    from .shards import ShardError, ShardLoader

    common = dict(context_length=T, rank=d.rank, world_size=d.world_size, seed=cfg.seed, device=device)
    train_loader = ShardLoader(directory, "train", batch_size=cfg.batch_size, sequential=not cfg.shuffle, **common)
    batch = cfg.batch_size
    while True:  # a small val split (The Verdict's) gets smaller batches rather than none
        try:
            val_loader = ShardLoader(directory, "val", batch_size=batch, sequential=True, **common)
            count = val_loader.num_batches
        except ShardError:                 # a damaged shard is an error, not a missing split
            raise
        except ValueError:
            val_loader, count = None, 0
        if count > 0 or batch == 1:
            break
        batch = max(1, batch // 2)
    counts = _all_ranks(d, count)
    if min(counts) == 0 and d.master:
        import warnings

        warnings.warn(f"no validation batch of {T} tokens fits in the 'val' shards of {directory} on every rank; "
                      "val_loss will be nan (hold out more data, or use a shorter context_length)", stacklevel=3)
    return train_loader, (val_loader if min(counts) > 0 else None), min(min(counts), cfg.eval_batches)


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    with autocast():
        logits = model(x)                                                   # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())       # mean over B*T tokens


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_batches: int, autocast: Callable = contextlib.nullcontext,
             device: torch.device | str | None = None) -> float:
    """Mean cross-entropy over the first ``num_batches`` batches of ``loader``, in ``eval()`` mode
    (the model's mode is put back afterwards).

    Args:
        model: maps ``x`` ``[B, T]`` to logits ``[B, T, V]``.
        loader: yields ``(x, y)``, both ``[B, T]`` (a sequential :class:`~course_lib.shards.ShardLoader`),
            or ``None`` (no batches).
        num_batches: how many batches to average (an integer >= 0).
        autocast: a context factory for the forward pass. Default: none (fp32).
        device: where the sum is kept. Default: the model's first parameter's.

    Returns:
        the mean of the batches' mean losses; under DDP the mean over every rank's batches
        (all-reduced; every rank must call it with the same ``num_batches``, FSDP's forward is
        collective). ``nan`` with no batches.

    Raises:
        ValueError: ``num_batches`` is not an integer >= 0.
    """
    import torch.distributed as dist

    num_batches = non_negative_int("num_batches", num_batches)
    was_training = model.training
    model.eval()
    try:
        device = get_device(device) if device is not None else next(model.parameters()).device
        exact = torch.float32 if torch.device(device).type == "mps" else torch.float64   # MPS has no float64
        total = torch.zeros(2, dtype=exact, device=device)                  # [loss sum, batches]
        for i, (x, y) in enumerate(loader if loader is not None and num_batches > 0 else ()):
            if i >= num_batches:
                break
            total[0] += _loss(model, x, y, autocast).to(exact)
            total[1] += 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
    finally:
        model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


# --------------------------------------------------------------------------- #
# Log and checkpoints
# --------------------------------------------------------------------------- #
def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        fh.flush()


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (a resumed run rewrites the steps after its checkpoint)."""
    if not path.exists():
        return
    kept = [r for r in read_log(path) if r.get("step", 0) <= step]
    atomic_write(path, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in kept).encode()), overwrite=True)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (or of the one in the run folder ``path``), in order.

    A last line cut short (a run killed while writing it) is left out.

    Raises:
        FileNotFoundError: no log there. ValueError: a damaged line before the last, or a line
            that is not a record (a JSON object with ``step``); a file that is not UTF-8.
        TypeError: ``path`` is not a path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a run folder or its log.jsonl (a str or Path), got {type(path).__name__}")
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LOG
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}; train() writes one into its out_dir")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); is it a log.jsonl that "
                         "train() wrote?") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({line[:60]!r}); the log is damaged") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}, line {i + 1}: not a record of a training step (a JSON object with 'step'), "
                             f"got {line[:60]!r}; is it a log.jsonl that train() wrote?")
        records.append(record)
    return records


def plot_log(log_or_path, ax=None):
    """Training loss (line) and validation loss (dots) against steps, from :func:`read_log`'s
    records or a path; the learning rate on a second axis. Returns the matplotlib ``Axes``."""
    import matplotlib.pyplot as plt

    log = read_log(log_or_path) if isinstance(log_or_path, (str, os.PathLike)) else list(log_or_path)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], label="training loss")
    val = [r for r in log if r.get("val_loss") is not None]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend(loc="upper right")
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in log], [r["lr"] for r in log], color="gray", alpha=0.4)
    lr_ax.set_ylabel("learning rate", color="gray")
    return ax


def _save(run: "_Run", d: _Dist, cfg: TrainerConfig, raw_model: nn.Module, optimizer, scaler, loader,
          model_cfg: GPTConfig) -> None:
    """Every rank: gather random and data states (and FSDP's shards); rank 0 writes ``run.checkpoint``,
    atomically; then ``run.saved_step = run.step``.

    Raises:
        NonFiniteError: a weight is ``nan``/``inf`` (on any rank); the last good checkpoint is kept.
    """
    import torch.distributed as dist

    extra = {"format": _TAG, "step": run.step, "tokens": run.tokens, "train_loss": run.train_loss,
             "val_loss": run.val_loss, "world_size": d.world_size, "trainer": cfg.to_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "rngs": _all_ranks(d, rng_state()), "loaders": _all_ranks(d, loader.state_dict())}
    bad = len(nonfinite_parameters(raw_model)) if not cfg.fsdp else \
        sum(not bool(torch.isfinite(getattr(p, "to_local", lambda: p)()).all()) for p in raw_model.parameters())
    if d.on:
        flag = torch.tensor([float(bad)], device=next(raw_model.parameters()).device)
        dist.all_reduce(flag)
        bad = int(flag.item())
    if bad:
        raise NonFiniteError(f"step {run.step:,}: the weights became nan or inf, so the checkpoint was not "
                             f"written; the last good one is kept ({run.checkpoint}, step {run.saved_step}). Lower "
                             "max_lr and resume from it")
    if cfg.fsdp:  # gather the full weights and optimizer state on rank 0 (collective)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(raw_model, optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if d.master:
            full = GPTModel(model_cfg, tie_weights=cfg.tie_weights)
            full.load_state_dict(msd)
            save_checkpoint(run.checkpoint, full, None, step=run.step, extra={**extra, "fsdp_optimizer": osd},
                            overwrite=True)
    elif d.master:
        save_checkpoint(run.checkpoint, raw_model, optimizer, step=run.step, extra=extra, overwrite=True)
    if d.on:
        dist.barrier()
    run.saved_step = run.step


def _changed_settings(saved: dict[str, Any] | None, cfg: TrainerConfig) -> str:
    """``"max_lr 0.0006 -> 0.001, ..."``: the settings ``cfg`` changes from the checkpoint's (``saved``,
    as :meth:`TrainerConfig.to_dict`), leaving out where the run goes and how long it runs."""
    if not isinstance(saved, dict):
        return ""
    now = cfg.to_dict()
    keys = [k for k in now if k in saved and k not in ("out_dir", "max_steps") and saved[k] != now[k]]
    return ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in keys)


def _restore(run: "_Run", d: _Dist, cfg: TrainerConfig, raw_model, optimizer, scaler, loader) -> None:
    """Load the checkpoint ``run.checkpoint`` (written by :func:`train`) into this rank's model,
    optimizer, scaler, generators and data loader, and its counters into ``run``."""
    path = run.checkpoint
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        payload = load_checkpoint(path, None, map_location="cpu")
        extra = payload.get("extra") or {}
        if extra.get("format") != _TAG or "fsdp_optimizer" not in extra:
            raise CheckpointError(f"{path} was not written by course_lib.trainer.train with fsdp=True; resume it "
                                  "with the settings it was written with")
        ours = raw_model.cfg.to_dict()
        diffs = [k for k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")
                 if (payload.get("config") or {}).get(k) != ours[k]]
        if diffs:
            raise CheckpointError(f"{path} holds a model with other {', '.join(diffs)}; resume with its config")
        set_state_dict(raw_model, optimizer, model_state_dict=payload["model"],
                       optim_state_dict=extra["fsdp_optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        from .checkpoint import _apply, _read  # as step 5's train(): read once, check, then load

        payload = _read(path, "cpu")
        extra = payload.get("extra") or {}
        if extra.get("format") != _TAG:
            raise CheckpointError(f"{path} was not written by course_lib.trainer.train (it lacks the trainer's "
                                  "state: data position, per-rank random state), so it cannot be resumed exactly; "
                                  "load its weights with course_lib.checkpoint.load_checkpoint and start a new run "
                                  "in another out_dir")
        _apply(path, payload, raw_model, optimizer)  # checks the config and the optimizer's kind first
    if extra["world_size"] != d.world_size:
        raise ValueError(f"{path} was written by {extra['world_size']} process(es) and this run has {d.world_size}; "
                         "an exact resume needs the same number (torchrun --nproc-per-node), or start a new run "
                         "from its weights")
    set_rng_state(extra["rngs"][d.rank])
    loader.load_state_dict(extra["loaders"][d.rank])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    run.step, run.tokens, run.saved_step = extra["step"], extra["tokens"], extra["step"]
    run.saved_config = extra.get("trainer")
    run.train_loss, run.val_loss = extra["train_loss"], extra["val_loss"]


# --------------------------------------------------------------------------- #
# The result
# --------------------------------------------------------------------------- #
@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        steps: optimizer steps taken in all (a resumed run counts those before it).
        train_loss: the loss of the last step (mean over the global batch).
        val_loss: the last validation loss (``nan`` if none was measured).
        tokens: input tokens seen in all (every process's).
        tokens_per_s: mean throughput of this call, all processes together, leaving out the
            first logged interval (``torch.compile`` and warm-up) when there are more.
        mfu: mean model FLOPs utilisation of this call, on the same intervals.
        paths: ``{"checkpoint", "log", "config"}`` -> the files written.
        interrupted: stopped by Ctrl-C (after saving).
        seconds: wall-clock time of this call.
        model: the trained model (unwrapped; sharded under FSDP), in ``eval()`` mode.
    """

    steps: int
    train_loss: float
    val_loss: float
    tokens: int
    tokens_per_s: float
    mfu: float
    paths: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False
    seconds: float = 0.0
    model: nn.Module | None = field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------- #
# The run's state, its setup, and one step
# --------------------------------------------------------------------------- #
@dataclass
class _Run:
    """The run's counters: what a checkpoint stores and a resume restores."""

    checkpoint: Path
    step: int = 0                   # optimizer steps taken, counting those before a resume
    tokens: int = 0                 # input tokens seen, every process's
    train_loss: float = math.nan    # the last step's, mean over the global batch
    val_loss: float = math.nan      # the last evaluation's
    saved_step: int | None = None   # the step of the checkpoint on disk (None: none yet)
    saved_config: dict | None = None  # the trainer settings a resumed checkpoint was written with


@dataclass
class _Meter:
    """Tokens/s and MFU between log lines. The first interval holds ``torch.compile`` and
    warm-up, so the run's mean leaves it out when there are others."""

    flops_per_token: float
    peak: float                                # FLOP/s of all the processes together
    seconds: float = 0.0                       # the open interval
    tokens: int = 0
    first: tuple[float, int] | None = None     # (seconds, tokens) of the first closed interval
    timed_s: float = 0.0                       # ... and of all the later ones
    timed_tokens: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds, self.tokens = self.seconds + seconds, self.tokens + tokens

    def lap(self) -> float:
        """Close the open interval; its tokens/s (``nan`` if it took no time)."""
        tps = self.tokens / self.seconds if self.seconds > 0 else float("nan")
        if self.first is None:
            self.first = (self.seconds, self.tokens)
        else:
            self.timed_s, self.timed_tokens = self.timed_s + self.seconds, self.timed_tokens + self.tokens
        self.seconds, self.tokens = 0.0, 0
        return tps

    def mfu(self, tps: float) -> float:
        return model_flops_utilisation(tps, self.flops_per_token, self.peak) if math.isfinite(tps) else float("nan")

    def mean(self) -> tuple[float, float]:
        """``(tokens/s, MFU)`` over the closed intervals after the first (or the first alone)."""
        first_s, first_tokens = self.first or (0.0, 0)
        if self.timed_s > 0:
            tps = self.timed_tokens / self.timed_s
        else:
            tps = first_tokens / first_s if first_s > 0 else float("nan")
        return tps, self.mfu(tps)


def _precision(cfg: TrainerConfig, device: torch.device) -> tuple[Callable, Any]:
    """``(autocast, scaler)`` for ``cfg.dtype``: a context factory for the forward pass, and a
    gradient scaler (fp16 only, else ``None``). Turns on TF32 matmuls on CUDA if ``cfg.tf32``."""
    if cfg.dtype == "fp16" and device.type != "cuda":
        raise ValueError(f"TrainerConfig.dtype='fp16' needs a CUDA GPU (fp16 autocast with a gradient scaler); "
                         f"this run is on {device.type}: use dtype='bf16' or 'fp32'")
    if cfg.dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("TrainerConfig.dtype='bf16' is not supported by this GPU; use dtype='fp16'")
    if device.type == "cuda" and cfg.tf32:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores (Ampere and later)
    amp_dtype = DTYPES[cfg.dtype]
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype is not None \
        else contextlib.nullcontext
    return autocast, (torch.amp.GradScaler("cuda") if cfg.dtype == "fp16" else None)


def _prepare_run_dir(paths: dict[str, Path], resume: bool) -> bool:
    """Rank 0: refuse to start a new run over an existing one; check the checkpoint can be
    written. Returns whether a checkpoint is there (to resume)."""
    existing = [p for p in (paths["checkpoint"], paths["log"], paths["config"]) if p.exists()]
    if existing and not resume:      # config.json alone: a run that stopped before its first step, or not ours
        raise FileExistsError(
            f"{paths['checkpoint'].parent} already holds a run ({', '.join(p.name for p in existing)}); pass "
            "resume=True (course pretrain --resume) to continue it, or choose another out_dir (--out) for a new run")
    check_writable(paths["checkpoint"], "the checkpoint")
    return paths["checkpoint"].exists()


def _write_start(paths: dict[str, Path], cfg: TrainerConfig, model_cfg: GPTConfig, d: _Dist,
                 tokens_per_step: int, resume: bool, step: int) -> None:
    """Rank 0, before the first step: cut the log back to ``step`` when resuming (a killed run may
    have logged past its checkpoint) and write ``config.json``."""
    if resume:
        _truncate_log(paths["log"], step)
    config = {**cfg.to_dict(), "model_config": model_cfg.to_dict(), "world_size": d.world_size,
              "global_batch_tokens": tokens_per_step}
    atomic_write(paths["config"], lambda fh: fh.write((json.dumps(config, indent=2) + "\n").encode()), overwrite=True)


def _build_model(cfg: TrainerConfig, model_cfg: GPTConfig, d: _Dist, device: torch.device) -> GPTModel:
    """The GPT on ``device``; with ``cfg.fsdp``, each block and then the whole sharded over the processes."""
    model = GPTModel(model_cfg, tie_weights=cfg.tie_weights).to(device)
    if cfg.fsdp:
        if not d.on:
            raise ValueError("TrainerConfig.fsdp=True shards the model over processes: launch with torchrun "
                             "(--nproc-per-node 2 or more), or set fsdp=False")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (d.world_size,))
        for block in model.trf_blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _wrap(raw_model: nn.Module, cfg: TrainerConfig, d: _Dist, device: torch.device) -> nn.Module:
    """The module the loop calls: ``raw_model``, compiled if ``cfg.compile``, in DDP under torchrun
    (FSDP's model is already sharded)."""
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if d.on and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the causal masks are constant buffers: no broadcast before every forward
        quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{quiet: False})
    return model


def _peak_flops(cfg: TrainerConfig, device: torch.device, d: _Dist) -> float:
    """Peak FLOP/s of all the processes, at the precision the matmuls run in (MFU's denominator)."""
    dtype = cfg.dtype if cfg.dtype != "fp32" else ("tf32" if device.type == "cuda" and cfg.tf32 else "fp32")
    return device_peak_flops(device, dtype, override=cfg.peak_flops) * d.world_size


def _schedule(cfg: TrainerConfig) -> Callable[[int], float]:
    """``lr_at(k)``: the learning rate of update ``k`` (1-based) of ``cfg.max_steps``."""
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else (cfg.max_steps - cfg.warmup_steps) // 5
    return functools.partial(SCHEDULES[cfg.schedule], max_lr=cfg.max_lr, min_lr=cfg.min_lr,
                             warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                             **({"decay_steps": decay_steps} if cfg.schedule == "wsd" else {}))


def _printer(d: _Dist, progress: bool, verbose: bool) -> Callable[[str], None]:
    """``say(text)``: print on rank 0 when ``verbose`` (through tqdm while its bar is up)."""
    from tqdm.auto import tqdm

    if not (d.master and verbose):
        return lambda text: None
    return tqdm.write if progress else print


def _train_step(cfg: TrainerConfig, d: _Dist, run: _Run, model: nn.Module, raw_model: nn.Module, optimizer,
                scaler, autocast: Callable, loader, device: torch.device, interrupt: dict) -> tuple[float, float, bool]:
    """One optimizer step over ``cfg.grad_accum_steps`` micro-batches of ``loader``.

    Returns:
        ``(train_loss, grad_norm, stop)``, the same on every rank: the loss averaged over the
        global batch, the gradient norm before clipping, and whether any rank got a Ctrl-C.

    Raises:
        NonFiniteError: a ``nan``/``inf`` loss or gradient norm, before the update.
    """
    import torch.distributed as dist

    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum_steps):
        x, y = loader.next_batch()                       # [B, T], [B, T]
        last = micro == cfg.grad_accum_steps - 1
        if d.on and cfg.fsdp:
            raw_model.set_requires_gradient_sync(last)
        elif d.on:
            model.require_backward_grad_sync = last      # all-reduce on the last micro-step only
        loss = _loss(model, x, y, autocast) / cfg.grad_accum_steps
        loss_sum += loss.detach()
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)                       # clip the true gradients
    norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):                     # FSDP: a DTensor
        norm = norm.full_tensor()
    stats = torch.stack([loss_sum.float(), norm.float().to(device),
                         torch.tensor(float(interrupt["stop"]), device=device)])
    if d.on:                                             # global loss; every rank agrees to stop
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        stats[:2] /= d.world_size
    train_loss, grad_norm, stop = stats.tolist()
    if not math.isfinite(train_loss) or (scaler is None and not math.isfinite(grad_norm)):  # fp16: the scaler skips
        raise _diverged(f"the loss is {train_loss}" if not math.isfinite(train_loss)
                        else f"the gradient norm is {grad_norm}", run)
    if scaler is not None:
        scaler.step(optimizer)                           # skipped if the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return train_loss, grad_norm, stop > 0


def _diverged(what: str, run: _Run) -> NonFiniteError:
    where = f"the last good checkpoint is {run.checkpoint} (step {run.saved_step:,})" \
        if run.saved_step is not None else "no checkpoint was written"
    return NonFiniteError(f"{what} at step {run.step + 1:,}: training diverged and stopped before that update; "
                          f"{where}. Lower max_lr, lengthen the warmup or keep grad_clip, then resume "
                          "(resume=True, course pretrain --resume) or start again")


def _log_step(path: Path, d: _Dist, run: _Run, lr: float, grad_norm: float, meter: _Meter, evaluated: bool,
              bar, say: Callable[[str], None]) -> None:
    """One ``log.jsonl`` record (rank 0), the bar's postfix, and a printed line after an evaluation."""
    tps = meter.lap()
    record = {"step": run.step, "loss": run.train_loss, "lr": lr, "grad_norm": grad_norm, "tokens": run.tokens,
              "tokens_per_s": tps, "mfu": meter.mfu(tps)}
    if evaluated:
        record["val_loss"] = run.val_loss
        say(f"step {run.step:>6,} | loss {run.train_loss:.4f} | val loss {run.val_loss:.4f} | lr {lr:.2e} | "
            f"{tps:,.0f} tokens/s | MFU {record['mfu']:.1%}")
    if d.master:
        _append_log(path, record)
    bar.set_postfix(loss=f"{run.train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}", mfu=f"{record['mfu']:.1%}")


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #
def train(cfg: TrainerConfig, *, resume: bool = False, progress: bool = True, verbose: bool = True,
          callback: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Pretrain a GPT as ``cfg`` says; as one process, or as each of ``torchrun``'s processes.

    Args:
        cfg: the run's :class:`TrainerConfig` (e.g. ``recipe("tiny").replace(out_dir="runs/a")``).
        resume: continue the run in ``cfg.out_dir`` from its checkpoint: weights, optimizer,
            step, every rank's random state and data position; the log keeps its lines up to
            the checkpoint's step, and the run then goes on exactly as if never stopped (on a
            CPU: the same losses). Without a checkpoint there, a new run starts.
        progress: a ``tqdm`` bar (rank 0) with loss, lr, tokens/s and MFU.
        verbose: print evaluations and a last summary line (rank 0).
        callback: ``callback(state)`` on every rank after each step (after its log line, evaluation
            and checkpoint), with ``state`` = ``{"step", "loss", "lr", "grad_norm", "model",
            "optimizer"}``; an exception raised in it stops the run at once, as a kill would.

    Returns:
        a :class:`TrainResult`. Ctrl-C (first press) finishes the step, saves and returns one
        (``interrupted=True``); a second press stops at once, keeping the last checkpoint.

    Raises:
        ValueError, TypeError: a bad config (see :func:`check_config`), ``resume``, ``progress`` or
            ``verbose`` not ``True``/``False``; a device this machine lacks; ``dtype="fp16"`` without
            CUDA; data that is neither shards nor a registered corpus, or too short for one window.
        FileExistsError: ``out_dir`` holds a run (checkpoint, log or ``config.json``) and ``resume`` is
            ``False``.
        NotADirectoryError, PermissionError: ``out_dir`` is a file, or cannot be written (checked
            before the model is built).
        course_lib.checkpoint.NonFiniteError: a ``nan``/``inf`` loss or gradient, naming the step;
            raised before that update, and the last good checkpoint is kept.
        course_lib.checkpoint.CheckpointError, CheckpointMismatchError: a checkpoint that cannot be resumed.
    """
    from tqdm.auto import tqdm

    cfg = check_config(cfg)                              # plain Python values from here on
    for name, flag in (("resume", resume), ("progress", progress), ("verbose", verbose)):
        boolean(name, flag)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function of one argument, got {type(callback).__name__}")
    model_cfg = cfg.model_config()
    T = model_cfg.context_length
    started = time.perf_counter()
    d, device = _distributed(cfg)
    out_dir = Path(cfg.out_dir).expanduser()
    made_out_dir = d.master and not out_dir.exists()      # a run that fails in its setup leaves no empty folder
    paths = {"checkpoint": out_dir / CHECKPOINT, "log": out_dir / LOG, "config": out_dir / CONFIG}
    run, meter, bar, raw_model, interrupted = _Run(paths["checkpoint"]), None, None, None, False
    had_config, finished = paths["config"].exists(), False
    try:
        # ---- set up: precision, the run folder, model, optimizer, data, and a resume's state ----
        autocast, scaler = _precision(cfg, device)
        _on_rank0(d, lambda: _shard_dir(cfg.data, prepare=False))  # a bad name: refused before out_dir is made
        have_checkpoint = _on_rank0(d, lambda: _prepare_run_dir(paths, resume))  # never over another run
        shard_dir = _on_rank0(d, lambda: _shard_dir(cfg.data, progress=progress and verbose))
        torch.manual_seed(cfg.seed)                      # the same initial weights on every rank
        raw_model = _build_model(cfg, model_cfg, d, device)
        optimizer = configure_optimizer(raw_model, cfg, device)
        train_loader, val_loader, eval_batches = _loaders(cfg, shard_dir, d, device, T)
        torch.manual_seed(cfg.seed + d.rank)             # dropout differs between ranks
        if resume and have_checkpoint:
            _restore(run, d, cfg, raw_model, optimizer, scaler, train_loader)
        model = _wrap(raw_model, cfg, d, device)         # compiled; DDP under torchrun
        tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * d.world_size * T  # the global batch
        _on_rank0(d, lambda: _write_start(paths, cfg, model_cfg, d, tokens_per_step, resume, run.step))
        meter = _Meter(flops_per_token(model_cfg, training=True), _peak_flops(cfg, device, d))
        lr_at, say = _schedule(cfg), _printer(d, progress, verbose)
        bar = tqdm(total=cfg.max_steps, initial=min(run.step, cfg.max_steps), desc="pretraining", unit="step",
                   disable=not (progress and d.master), dynamic_ncols=True)
        if run.step > 0:
            say(f"resumed {paths['checkpoint']} at step {run.step:,} ({run.tokens:,} tokens seen)")
            changed = _changed_settings(run.saved_config, cfg)
            if changed:
                say(f"note: resumed with other settings than the run was saved with ({changed}); from here on it "
                    "is not the run it would have been unstopped")
            if run.step >= cfg.max_steps:
                say(f"note: the checkpoint is at step {run.step:,} and max_steps is {cfg.max_steps:,}: nothing to "
                    "train; raise max_steps (course pretrain --max-steps) to train on")
        model.train()

        # ---- the loop -------------------------------------------------------------------------
        with _graceful_interrupt() as interrupt:
            while run.step < cfg.max_steps:
                lr = lr_at(run.step + 1)                 # update step+1 (1-based) of max_steps
                for group in optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                run.train_loss, grad_norm, stop = _train_step(cfg, d, run, model, raw_model, optimizer, scaler,
                                                              autocast, train_loader, device, interrupt)
                run.step, run.tokens = run.step + 1, run.tokens + tokens_per_step
                meter.add(time.perf_counter() - t0, tokens_per_step)

                # -- evaluate, log, checkpoint (every few steps, at the last, and on Ctrl-C) --------
                last = run.step == cfg.max_steps
                evaluated = run.step % cfg.eval_every == 0 or last
                if evaluated:
                    run.val_loss = evaluate(model if cfg.fsdp else raw_model, val_loader, eval_batches, autocast,
                                            device)
                if run.step % cfg.log_every == 0 or evaluated or last or stop:
                    _log_step(paths["log"], d, run, lr, grad_norm, meter, evaluated, bar, say)
                bar.update(1)
                if run.step % cfg.checkpoint_every == 0 or last or stop:
                    _save(run, d, cfg, raw_model, optimizer, scaler, train_loader, model_cfg)
                if callback is not None:
                    callback({"step": run.step, "loss": run.train_loss, "lr": lr, "grad_norm": grad_norm,
                              "model": raw_model, "optimizer": optimizer})
                if stop:
                    interrupted = True
                    say(f"interrupted: stopped after step {run.step:,} and saved {paths['checkpoint']}")
                    break
        finished = True
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, keep the last complete checkpoint
        interrupted = True
        if d.master and verbose:
            print(f"interrupted at once after step {run.step:,}; the last checkpoint is kept")
    finally:
        if bar is not None:
            bar.close()
        if d.master and not finished and not interrupted and not had_config \
                and not paths["log"].exists() and not paths["checkpoint"].exists():
            with contextlib.suppress(OSError):          # failed before its first step: no run to resume here
                paths["config"].unlink(missing_ok=True)
        if made_out_dir:
            with contextlib.suppress(OSError):          # removes the folder only if nothing was written in it
                out_dir.rmdir()
    tokens_per_s, mfu = meter.mean() if meter is not None else (float("nan"), float("nan"))
    if raw_model is not None:
        raw_model.eval()
    seconds = time.perf_counter() - started
    if d.master and verbose:
        print(f"pretraining: {run.step:,}/{cfg.max_steps:,} steps, {run.tokens:,} tokens, train loss "
              f"{run.train_loss:.4f}, val loss {run.val_loss:.4f}, {tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%}, "
              f"{seconds:.1f} s" + (" (interrupted)" if interrupted else ""))
    return TrainResult(run.step, run.train_loss, run.val_loss, run.tokens, tokens_per_s, mfu, paths, interrupted,
                       seconds, raw_model)
