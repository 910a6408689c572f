"""Step 5 — pretraining: the loss, perplexity, and a training loop that can stop and resume.

* :func:`calc_loss_batch` — mean cross-entropy of one ``(inputs, targets)`` batch.
* :func:`calc_loss_loader` — the average over a loader, or over its first ``num_batches``.
* :func:`perplexity` — ``exp(loss)``: the number of tokens the model is, in effect,
  choosing between at every position.
* :func:`evaluate` — train and validation loss on a few batches, in ``eval()`` mode.
* :func:`train_step` — one step: forward, loss, backward, optimizer step (skipped when the
  loss or a gradient is ``nan``/``inf``).
* :func:`train` — the loop: :func:`train_step` over the batches; every ``eval_freq`` steps
  the loss on both sets, every ``sample_freq`` steps a sample of text; a progress bar;
  optional checkpoints, from which an interrupted run resumes exactly.
* :class:`History` and :func:`plot_losses` — the losses against tokens seen, and the plot.

What the loop guarantees (exact resume, the batch order, evaluation that leaves the random
state alone, no non-finite checkpoint, Ctrl-C) is listed, with why, in CONTRIBUTING.md,
"What the training loop and checkpoints guarantee"; ``tests/test_training.py`` holds each to it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import NonFiniteError
from .checks import boolean, positive_int
from .config import DEFAULT_SEED, get_device

__all__ = [
    "calc_loss_batch",
    "calc_loss_loader",
    "perplexity",
    "evaluate",
    "History",
    "train",
    "train_step",
    "NonFiniteError",
    "plot_losses",
    "generate_sample",
]


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. GPTModel), got {type(model).__name__}")


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Mean cross-entropy of the model's next-token predictions on one batch.

    Args:
        input_batch: ``[batch, tokens]`` token ids.
        target_batch: ``[batch, tokens]`` the ids that follow each input position.
        model: maps ``[batch, tokens]`` ids to ``[batch, tokens, vocab]`` logits.
        device: where to compute; the batch is moved there. Default the model's device.

    Returns:
        a scalar tensor (with a graph, so ``loss.backward()`` works in training).

    Raises:
        TypeError: a batch that is not an integer tensor, or a model that is not a module.
        ValueError: inputs and targets of different shapes.
    """
    _check_model(model)
    for name, t in (("input_batch", input_batch), ("target_batch", target_batch)):
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of token ids [batch, tokens], got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if input_batch.shape != target_batch.shape:
        raise ValueError(f"input_batch {tuple(input_batch.shape)} and target_batch {tuple(target_batch.shape)} "
                         "must have the same shape [batch, tokens]")
    device = get_device(device) if device is not None else next(model.parameters()).device
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)                                   # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())  # mean over B*T tokens


def calc_loss_loader(data_loader, model: nn.Module, device: torch.device | str | None = None,
                     num_batches: int | None = None, loss_fn=None) -> float:
    """Average :func:`calc_loss_batch` (or ``loss_fn``) over the first ``num_batches`` batches of a loader.

    Runs under ``torch.no_grad()``; it does **not** change the model's mode, so call
    ``model.eval()`` first for a measurement without dropout (:func:`evaluate` does).

    Args:
        data_loader: yields ``(inputs, targets)`` pairs (e.g. from
            :func:`course_lib.text_data.create_dataloader`).
        model: the model.
        device: where to compute. Default the model's device.
        num_batches: how many batches to average; ``None`` means all of them. More than
            the loader holds is not an error: all of them are used.
        loss_fn: ``loss_fn(inputs, targets, model, device)`` → a scalar tensor. Default
            :func:`calc_loss_batch` (step 6 passes its classification loss).

    Returns:
        the mean loss as a float; ``nan`` for a loader with no batches.

    Raises:
        ValueError: ``num_batches`` is not a positive integer (or ``None``).
    """
    _check_model(model)
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"num_batches must be a positive integer or None (all batches), got {num_batches!r}")
    try:
        available = len(data_loader)
    except TypeError:
        available = None
    if available == 0:
        return float("nan")
    limit = available if num_batches is None else (num_batches if available is None else min(num_batches, available))
    total, count = 0.0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(data_loader):
            if limit is not None and i >= limit:
                break
            total += (loss_fn or calc_loss_batch)(x, y, model, device).item()
            count += 1
    return total / count if count else float("nan")


def perplexity(loss: float | torch.Tensor) -> float:
    """``exp(loss)`` for a mean cross-entropy ``loss`` in nats.

    A model that spreads its probability evenly over ``n`` tokens has a loss of ``ln(n)``
    and a perplexity of ``n``; an untrained GPT-2-sized vocabulary model starts near
    ``ln(50257) ≈ 10.8``, perplexity ≈ 50,000.

    ``nan`` (no batches to average, or a diverged model) gives ``nan``, not ``inf``.

    Raises:
        TypeError: ``loss`` is not a number or a one-element tensor.
        ValueError: a negative loss.
    """
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        loss = loss.item()
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise TypeError(f"loss must be a number, got {type(loss).__name__}")
    if math.isnan(loss):
        return math.nan  # an undefined loss (an empty loader, a diverged model) has no perplexity
    if loss < 0:
        raise ValueError(f"a cross-entropy loss cannot be negative, got {loss}")
    return math.exp(loss) if loss < 709 else math.inf


# --------------------------------------------------------------------------- #
# Evaluation and samples
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def _rng_untouched(device: torch.device, loaders=()):
    """Run a block without changing the random state training will use next: the global
    generators, and the generators of ``loaders`` (iterating a shuffling loader draws from it)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    generators = {id(g): g for g in (getattr(ld, "generator", None) for ld in loaders) if g is not None}
    saved = {k: g.get_state() for k, g in generators.items()}
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for k, g in generators.items():
            g.set_state(saved[k])


def evaluate(model: nn.Module, train_loader, val_loader, device=None, eval_iter: int | None = 5,
             loss_fn=None) -> tuple[float, float]:
    """Train and validation loss over ``eval_iter`` batches each, in ``eval()`` mode.

    The model is put back in the mode it was in. Returns ``(train_loss, val_loss)``.
    ``loss_fn`` as in :func:`calc_loss_loader`.
    """
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter, loss_fn=loss_fn)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter, loss_fn=loss_fn)
    finally:
        model.train(was_training)
    return train_loss, val_loss


def generate_sample(model: nn.Module, tokenizer, start_context: str, max_new_tokens: int = 50,
                    **generate_kwargs) -> str:
    """Continue ``start_context`` with :func:`course_lib.inference.generate` (greedy by default)
    and return the decoded text, on one line."""
    from .generation import text_to_token_ids, token_ids_to_text
    from .inference import generate

    idx = text_to_token_ids(start_context, tokenizer)
    out = generate(model, idx, max_new_tokens, **generate_kwargs)
    return token_ids_to_text(out, tokenizer).replace("\n", " ")


# --------------------------------------------------------------------------- #
# History
# --------------------------------------------------------------------------- #
@dataclass
class History:
    """What :func:`train` measured. Lists of equal length, one entry per evaluation.

    Attributes:
        steps: the optimizer step of each evaluation (1-based: after that many steps).
        tokens_seen: input tokens processed by then.
        train_losses, val_losses: the two losses (``eval_iter`` batches each).
        samples: ``(step, text)`` pairs from the sample generations.
        lrs: the learning rate at each evaluation.
        step: steps taken in all; ``tokens``: input tokens seen in all.
        seconds: wall-clock time spent training (summed over resumed runs).
        skipped_steps: steps whose batch gave a ``nan``/``inf`` loss or gradient and so
            did not update the weights (``on_nonfinite="skip"``).
        interrupted: the run was stopped by Ctrl-C.
        metrics: what ``train(metrics=...)`` measured at each evaluation, by name (e.g. step 6's
            ``"train_accuracy"``), each a list as long as ``steps``.
    """

    steps: list[int] = field(default_factory=list)
    tokens_seen: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    samples: list[tuple[int, str]] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped_steps: int = 0
    interrupted: bool = False
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples"] = [[int(s), str(t)] for s, t in self.samples]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "History":
        d = dict(d)
        d["samples"] = [(int(s), str(t)) for s, t in d.get("samples", [])]
        return cls(**d)

    @property
    def best_val_loss(self) -> float:
        """The lowest validation loss measured (``nan`` if none)."""
        vals = [v for v in self.val_losses if not math.isnan(v)]
        return min(vals) if vals else float("nan")

    def _record(self, train_loss: float, val_loss: float, lr: float, metrics: dict[str, float] | None = None) -> None:
        self.steps.append(self.step)
        self.tokens_seen.append(self.tokens)
        self.train_losses.append(train_loss)
        self.val_losses.append(val_loss)
        self.lrs.append(lr)
        for name, value in (metrics or {}).items():
            self.metrics.setdefault(name, []).append(float(value))


# --------------------------------------------------------------------------- #
# The training loop
# --------------------------------------------------------------------------- #
def _seed_epoch(loader, seed: int, epoch: int) -> None:
    """Make the order of ``loader``'s batches in ``epoch`` a function of ``(seed, epoch)`` only."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, torch.utils.data.RandomSampler):
        return  # a sequential loader has one order already
    generator = loader.generator if loader.generator is not None else sampler.generator
    if generator is None:
        generator = torch.Generator()
    loader.generator = generator   # the DataLoader draws its workers' base seed from it
    sampler.generator = generator  # ... and the sampler its permutation
    generator.manual_seed(seed + epoch)


def _batches(loader, seed: int, epoch: int, start: int, num_epochs: int | None):
    """Yield ``(epoch, index, inputs, targets)`` from ``(epoch, start)`` on, reseeding each epoch.

    Batches before ``start`` (seen before a resume) are drawn, in the same order, but skipped.
    """
    while num_epochs is None or epoch < num_epochs:
        _seed_epoch(loader, seed, epoch)
        for i, (x, y) in enumerate(loader):
            if i >= start:
                yield epoch, i, x, y
        epoch, start = epoch + 1, 0


def _grad_norm(model: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               device=None, loss_fn=None) -> tuple[float, bool]:
    """One optimizer step on the batch ``(x, y)``, unless the loss or a gradient is ``nan``/``inf``.

    ``loss_fn(x, y, model, device)`` gives the loss; default :func:`calc_loss_batch`.

    Returns:
        ``(loss, stepped)``: the batch's loss as a float, and whether the optimizer stepped.
        With a non-finite loss or gradient the weights are left as they were.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = (loss_fn or calc_loss_batch)(x, y, model, device)
    value = loss.item()
    if not math.isfinite(value):
        return value, False
    loss.backward()
    if not bool(torch.isfinite(_grad_norm(model))):
        optimizer.zero_grad(set_to_none=True)
        return value, False
    optimizer.step()
    return value, True


@contextlib.contextmanager
def _graceful_interrupt():
    """While training, the first Ctrl-C asks the loop to stop after the current step
    (``flag["stop"]`` becomes ``True``); a second one interrupts at once (``KeyboardInterrupt``).
    Only the main thread receives signals; elsewhere Ctrl-C interrupts at once as usual."""
    flag = {"stop": False}
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:  # not the main thread, or a handler Python did not install: leave it alone
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _restore(path: Path, model, optimizer, device) -> tuple[History, int, int, int]:
    """Load a checkpoint written by :func:`train`: weights, optimizer, random state, history and
    position. Returns ``(history, epoch, batch_in_epoch, seed)``."""
    from .checkpoint import CheckpointError, _apply, _read

    payload = _read(path, device)
    extra = payload.get("extra") or {}
    missing = [k for k in ("history", "epoch", "batch_in_epoch", "seed") if k not in extra]
    if missing or payload.get("rng") is None or payload.get("optimizer") is None:
        lacks = (f"its training position ({', '.join(missing)})" if missing else
                 "the random state" if payload.get("rng") is None else "an optimizer state")
        raise CheckpointError(
            f"{path} was not written by train(): it lacks {lacks}, so the run cannot resume exactly. To go on "
            f"training from its weights, load them with course_lib.checkpoint.load_checkpoint({str(path)!r}, model) "
            "and call train() with another checkpoint_path (a new run)")
    _apply(path, payload, model, optimizer, restore_rng=True)
    return History.from_dict(extra["history"]), extra["epoch"], extra["batch_in_epoch"], extra["seed"]


def _save(path: Path, model, optimizer, history: History, epoch: int, batch_in_epoch: int, seed: int) -> None:
    from .checkpoint import save_checkpoint

    save_checkpoint(path, model, optimizer, step=history.step, overwrite=True,
                    extra={"history": history.to_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                           "seed": seed})


def _check_train_args(model, train_loader, optimizer, num_epochs, max_steps, eval_freq, eval_iter, sample_freq,
                      checkpoint_freq, on_nonfinite, seed) -> None:
    _check_model(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if num_epochs is None and max_steps is None:
        raise ValueError("give num_epochs (passes over the data) or max_steps (optimizer steps), or both")
    positive_int("num_epochs", num_epochs, allow_none=True)
    positive_int("max_steps", max_steps, allow_none=True)
    positive_int("eval_freq", eval_freq)
    positive_int("eval_iter", eval_iter, allow_none=True)
    positive_int("sample_freq", sample_freq, allow_none=True)
    positive_int("checkpoint_freq", checkpoint_freq, allow_none=True)
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' (stop the run with an error) or 'skip' (skip the step "
                         f"and count it), got {on_nonfinite!r}")
    if len(train_loader) == 0:
        raise ValueError("train_loader yields no batches; use more text, a smaller batch_size or drop_last=False")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")


def _measure(model, metrics) -> dict[str, float]:
    """``metrics(model)`` in ``eval()`` mode without gradients, the model's mode put back."""
    if metrics is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            measured = metrics(model)
    finally:
        model.train(was_training)
    if not isinstance(measured, dict):
        raise TypeError(f"metrics(model) must return a dict of name -> number, got {type(measured).__name__}")
    return {str(k): float(v) for k, v in measured.items()}


def _checkpoint_paths(checkpoint_path, keep_best: bool, resume: bool) -> tuple[Path | None, Path | None]:
    """The run's checkpoint and best-validation checkpoint, checked for writability; an existing
    file without ``resume`` is refused (a learner's checkpoint is never replaced by accident)."""
    from .checkpoint import check_writable

    if checkpoint_path is None:
        return None, None
    checkpoint_path = check_writable(checkpoint_path, "checkpoint_path")
    best_path = checkpoint_path.with_name(f"{checkpoint_path.stem}.best{checkpoint_path.suffix or '.pt'}") \
        if keep_best else None
    for existing in (checkpoint_path, best_path):
        if not resume and existing is not None and existing.exists():
            raise FileExistsError(f"a checkpoint already exists at {existing}; pass resume=True to continue that "
                                  "run, or give another checkpoint_path (or delete the file) to start a new one")
    return checkpoint_path, best_path


def _start(checkpoint_path: Path | None, resume: bool, model, optimizer, device, seed: int, verbose: bool
           ) -> tuple[History, int, int, int]:
    """Where the run starts: ``(history, epoch, batch_in_epoch, seed)`` of a new run, or the
    ones stored in the checkpoint being resumed."""
    if checkpoint_path is None or not resume or not checkpoint_path.exists():
        return History(), 0, 0, seed
    history, epoch, batch_in_epoch, seed = _restore(checkpoint_path, model, optimizer, device)
    if verbose:
        print(f"resumed from {checkpoint_path} at step {history.step:,} "
              f"(epoch {epoch + 1}, batch {batch_in_epoch}, {history.tokens:,} tokens seen)")
    return history, epoch, batch_in_epoch, seed


def _diverged(what: str, history: History, epoch: int, batch: int, checkpoint_path, saved_step,
              step: int | None = None) -> NonFiniteError:
    where = f"the last good checkpoint is {checkpoint_path} (step {saved_step})" if saved_step is not None \
        else "no checkpoint was saved"
    err = NonFiniteError(f"{what} at step {step or history.step:,} (epoch {epoch + 1}, batch {batch + 1}): training "
                         f"diverged and stopped; {where}, and nothing non-finite was saved. Lower the learning rate "
                         "(or add warm-up or gradient clipping) and resume or start again, or pass "
                         "on_nonfinite='skip' to skip batches with a nan/inf loss or gradient")
    err.history = history
    return err


def train(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer,
          device: torch.device | str | None = None, *, num_epochs: int | None = None,
          max_steps: int | None = None, eval_freq: int = 50, eval_iter: int | None = 5,
          start_context: str | None = None, tokenizer=None, sample_freq: int | None = None,
          sample_tokens: int = 40, checkpoint_path: str | os.PathLike | None = None,
          checkpoint_freq: int | None = None, resume: bool = False, keep_best: bool = True,
          on_nonfinite: str = "raise", seed: int = DEFAULT_SEED, max_seconds: float | None = None,
          loss_fn=None, metrics=None, progress: bool = True, verbose: bool = True) -> History:
    """Train ``model`` on ``train_loader``, evaluating on ``val_loader`` as it goes.

    One step (:func:`train_step`): ``zero_grad`` → :func:`calc_loss_batch` → ``backward`` →
    ``optimizer.step``. Every ``eval_freq`` steps both losses are measured on ``eval_iter``
    batches (in ``eval()`` mode); every ``sample_freq`` steps the model continues
    ``start_context`` greedily and the text is printed.

    Args:
        model, optimizer: the model (already on ``device``) and its optimizer.
        train_loader, val_loader: loaders of ``(inputs, targets)`` batches.
        device: where batches go. Default the model's device.
        num_epochs: passes over ``train_loader``. At least one of ``num_epochs`` and
            ``max_steps`` must be given; with both, training stops at whichever comes first.
        max_steps: total steps (counting those before a resume).
        eval_freq: evaluate every this many steps. Default 50.
        eval_iter: batches per evaluation, per loader (``None``: all). Default 5.
        start_context, tokenizer: the prompt for the sample generations and the tokenizer
            that encodes it (default GPT-2's); no samples if ``start_context`` is ``None``.
        sample_freq: steps between samples. Default ``eval_freq``.
        sample_tokens: tokens per sample. Default 40.
        checkpoint_path: save a checkpoint here (atomically) every ``checkpoint_freq`` steps
            and when the run stops (interrupted included). Checked for writability before
            the first step. Default ``None``: no checkpoints.
        checkpoint_freq: steps between checkpoints. Default ``eval_freq``.
        resume: continue from ``checkpoint_path`` if it exists (weights, optimizer, random
            state, history and position in the data). Without ``resume`` an existing file
            at ``checkpoint_path`` (or its ``.best`` companion) is an error, never overwritten.
        keep_best: with ``checkpoint_path``, also keep the checkpoint of the lowest validation
            loss so far beside it, as ``<name>.best.pt``. Default ``True``.
        on_nonfinite: what a ``nan``/``inf`` loss or gradient does. ``"raise"`` (default):
            stop with :class:`~course_lib.checkpoint.NonFiniteError` naming the step, before
            the bad update, with the history so far as ``err.history``. ``"skip"``: leave
            the weights as they were for that batch and count it in ``History.skipped_steps``.
            Either way a checkpoint never receives non-finite weights.
        seed: seeds the batch order (``seed + epoch``). Stored in the checkpoint, which wins
            on resume.
        max_seconds: stop (after the current step) once training has taken this long.
            Default ``None``.
        loss_fn: ``loss_fn(inputs, targets, model, device)`` → a scalar tensor, for training
            and evaluation. Default :func:`calc_loss_batch` (next-token cross-entropy).
        metrics: ``metrics(model)`` → ``{name: float}``, called at each evaluation (in ``eval()``
            mode, without gradients, leaving the random state alone) and kept in
            ``History.metrics``. Default ``None``.
        progress: show a ``tqdm`` progress bar, sized to the steps planned, and a line with
            the steps, tokens and seconds at the end. verbose: print evaluations and samples.

    Returns:
        a :class:`History` (also stored in the checkpoint). Ctrl-C returns it too: the first
        press stops after the current step and saves the checkpoint (``History.interrupted``
        is then ``True``); a second press stops at once, without saving a half-done step.
        The model is left in ``eval()`` mode however the run ends.

    Raises:
        ValueError: neither ``num_epochs`` nor ``max_steps``; a non-positive count; an empty
            ``train_loader``; an unknown ``on_nonfinite``.
        TypeError: ``resume``, ``keep_best``, ``progress`` or ``verbose`` not ``True``/``False``.
        FileExistsError: ``checkpoint_path`` exists and ``resume`` is ``False``.
        IsADirectoryError, NotADirectoryError, PermissionError: ``checkpoint_path`` cannot
            be written (checked before training starts).
        course_lib.checkpoint.NonFiniteError: the run diverged (``on_nonfinite="raise"``, or
            the weights themselves became non-finite).
        course_lib.checkpoint.CheckpointError, CheckpointMismatchError: the checkpoint to
            resume is damaged, was not written by ``train``, or does not fit the model or
            optimizer (another kind of optimizer included).
    """
    from tqdm.auto import tqdm

    from .checkpoint import nonfinite_parameters

    _check_train_args(model, train_loader, optimizer, num_epochs, max_steps, eval_freq, eval_iter, sample_freq,
                      checkpoint_freq, on_nonfinite, seed)
    for name, flag in (("resume", resume), ("keep_best", keep_best), ("progress", progress), ("verbose", verbose)):
        boolean(name, flag)          # "no" is truthy: resume="no" would resume
    for name, fn in (("loss_fn", loss_fn), ("metrics", metrics)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function (or None for the default), got {type(fn).__name__}")
    device = get_device(device) if device is not None else next(model.parameters()).device   # "gpu": named
    sample_freq, checkpoint_freq = sample_freq or eval_freq, checkpoint_freq or eval_freq
    checkpoint_path, best_path = _checkpoint_paths(checkpoint_path, keep_best, resume)
    history, epoch, batch_in_epoch, seed = _start(checkpoint_path, resume, model, optimizer, device, seed, verbose)
    steps_per_epoch = len(train_loader)
    if batch_in_epoch >= steps_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    total = min(x for x in (max_steps, num_epochs and num_epochs * steps_per_epoch) if x)

    def say(text: str) -> None:
        if verbose:
            tqdm.write(text) if progress else print(text)

    def save(path: Path) -> None:
        history.seconds = seconds_before + time.perf_counter() - started
        try:
            _save(path, model, optimizer, history, epoch, batch_in_epoch, seed)
        except NonFiniteError:  # an update overflowed without a nan loss or gradient (yet)
            raise _diverged("the weights became nan or inf", history, epoch, i, checkpoint_path, saved_step) from None

    def evaluate_and_record() -> None:
        best_before = history.best_val_loss
        with _rng_untouched(device, (train_loader, val_loader)):
            tr, va = evaluate(model, train_loader, val_loader, device, eval_iter, loss_fn)
            measured = _measure(model, metrics)
        history._record(tr, va, optimizer.param_groups[0]["lr"], measured)
        bar.set_postfix(train=f"{tr:.3f}", val=f"{va:.3f}")
        say(f"step {history.step:>6,} | tokens {history.tokens:>10,} | train loss {tr:.3f} | val loss {va:.3f}"
            + "".join(f" | {name} {value:.3f}" for name, value in measured.items()))
        if best_path is not None and math.isfinite(va) and not va >= best_before:
            save(best_path)

    started, seconds_before = time.perf_counter(), history.seconds
    saved_step = history.step if checkpoint_path is not None and checkpoint_path.exists() else None
    last_eval_step = history.steps[-1] if history.steps else None
    i = batch_in_epoch - 1
    bar = tqdm(total=total, initial=min(history.step, total), desc="training", unit="step", disable=not progress,
               dynamic_ncols=True)
    model.train()
    try:
        with _graceful_interrupt() as interrupt:
            batches = _batches(train_loader, seed, epoch, batch_in_epoch, num_epochs) if history.step < total else ()
            for epoch, i, x, y in batches:
                loss, stepped = train_step(model, optimizer, x, y, device, loss_fn)
                if not stepped:
                    what = f"the loss is {loss}" if not math.isfinite(loss) else "a gradient is nan or inf"
                    if on_nonfinite == "raise" or nonfinite_parameters(model):
                        what = what if on_nonfinite == "raise" else "the weights are nan or inf"
                        raise _diverged(what, history, epoch, i, checkpoint_path, saved_step, step=history.step + 1)
                    history.skipped_steps += 1
                    say(f"step {history.step + 1:,}: {what}; skipped ({history.skipped_steps} so far)")
                history.step += 1
                history.tokens += x.numel()
                batch_in_epoch = i + 1  # (epoch, batch_in_epoch): where a resumed run picks up
                bar.update(1)
                if history.step % eval_freq == 0:
                    evaluate_and_record()
                    last_eval_step = history.step
                if start_context is not None and history.step % sample_freq == 0:
                    with _rng_untouched(device):
                        history.samples.append((history.step, generate_sample(model, tokenizer, start_context,
                                                                              sample_tokens)))
                    say(f"  sample: {history.samples[-1][1]}")
                out_of_time = max_seconds is not None and time.perf_counter() - started >= max_seconds
                stop = history.step >= total or out_of_time or interrupt["stop"]
                if checkpoint_path is not None and (history.step % checkpoint_freq == 0 or stop):
                    save(checkpoint_path)
                    saved_step = history.step
                if stop:
                    break
            if interrupt["stop"]:
                history.interrupted = True
                say(f"interrupted: stopped after step {history.step:,}"
                    + (f"; saved {checkpoint_path}" if checkpoint_path is not None else ""))
            if last_eval_step != history.step and history.step > 0:
                evaluate_and_record()  # a last measurement, after the final checkpoint (see the module docstring)
    except KeyboardInterrupt:  # the second Ctrl-C: stop now; the step may be half done, so nothing is saved
        history.interrupted = True
        say(f"interrupted at once after step {history.step:,}; the history so far is returned"
            + (f", and the last checkpoint ({checkpoint_path}, step {saved_step}) is kept" if saved_step else ""))
    finally:
        if bar.total != bar.n:
            bar.total = bar.n  # a run that stopped early shows the steps it took, not the steps planned
            bar.refresh()
        bar.close()
        history.seconds = seconds_before + time.perf_counter() - started
        model.eval()
    if progress:  # a saved notebook keeps only a widget's first text ("0/N"): say where the run ended
        print(f"training: {history.step:,}/{total:,} steps, {history.tokens:,} tokens, "
              f"{time.perf_counter() - started:.1f} s" + (" (interrupted)" if history.interrupted else ""))
    return history


# --------------------------------------------------------------------------- #
# Plot
# --------------------------------------------------------------------------- #
def plot_losses(history: History, ax=None, title: str | None = None):
    """Train and validation loss against tokens seen (bottom axis) and steps (top axis).

    Returns the matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt

    if not isinstance(history, History):
        raise TypeError(f"history must be the History returned by train(), got {type(history).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history.tokens_seen, history.train_losses, label="training loss")
    ax.plot(history.tokens_seen, history.val_losses, linestyle="--", label="validation loss")
    if history.val_losses:
        best = min(range(len(history.val_losses)), key=lambda i: history.val_losses[i])
        ax.scatter([history.tokens_seen[best]], [history.val_losses[best]], color="C1", zorder=3,
                   label=f"best val loss {history.val_losses[best]:.3f}")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "Loss during training")
    ax.legend()
    if history.steps and history.tokens_seen[-1] > 0:
        per_step = history.tokens_seen[-1] / max(history.steps[-1], 1)
        top = ax.secondary_xaxis("top", functions=(lambda t: t / per_step, lambda s: s * per_step))
        top.set_xlabel("steps")
    return ax
