"""Step 8 — learning-rate schedules: warmup, then cosine, linear or warmup-stable-decay.

Every schedule starts with a **linear warmup** from ``warmup_start_lr`` (step 0) to ``max_lr``
(step ``warmup_steps``): early updates of a freshly initialised model are large and noisy, and
Adam's second-moment estimates are not yet reliable, so a full learning rate at step 0 can
throw the model into a region it never recovers from. Then it decays to ``min_lr`` at
``total_steps`` and stays there::

    lr
    max_lr |      ___                 cosine:  min + (max - min) * 0.5 * (1 + cos(pi * t))
           |     /   ```--..          linear:  min + (max - min) * (1 - t)
           |    /           `-.       wsd:     max_lr until the last decay_steps, then linear
           |   /               `-.__  (t = fraction of the decay done, 0 -> 1)
    min_lr |  /                      `-----
           +--+-----------------------+------ step
           0  warmup_steps          total_steps

* :func:`lr_at` — warmup + cosine (GPT-2/GPT-3, nanoGPT).
* :func:`linear_lr_at` — warmup + linear decay.
* :func:`wsd_lr_at` — warmup, stable at ``max_lr``, linear decay over the last ``decay_steps``
  (MiniCPM, DeepSeek): the run can be extended or branched before the decay starts.
* :data:`SCHEDULES` — the three by name; :func:`lr_lambda` and :func:`scheduler` make any of
  them a ``torch.optim.lr_scheduler.LambdaLR``.

Unlike nanoGPT (``(it + 1) / (warmup + 1)``), step 0 here is exactly ``warmup_start_lr``; with
the default of 0 the first update does nothing, which is why recipes pass a small
``warmup_start_lr`` or count steps from 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .checks import finite_number, integer

__all__ = ["lr_at", "linear_lr_at", "wsd_lr_at", "SCHEDULES", "lr_lambda", "scheduler"]


def _rate(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number >= 0 (> 0 with ``positive``)."""
    return finite_number(name, value, minimum=0, positive=positive, strict=True)


def _check(step, max_lr, min_lr, warmup_steps, total_steps, warmup_start_lr):
    """Validate the arguments every schedule shares; returns them converted to int/float."""
    step = integer("step", step, minimum=0, hint=" (steps count from 0)")
    total_steps = integer("total_steps", total_steps, minimum=1)
    warmup_steps = integer("warmup_steps", warmup_steps, minimum=0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) is longer than the run (total_steps={total_steps}); "
                         "use fewer warmup steps (a few percent of the run is usual) or a longer run")
    max_lr = _rate("max_lr", max_lr, positive=True)
    min_lr = _rate("min_lr", min_lr)
    warmup_start_lr = _rate("warmup_start_lr", warmup_start_lr)
    if min_lr > max_lr:
        raise ValueError(f"min_lr ({min_lr:g}) is larger than max_lr ({max_lr:g}); the schedule decays from "
                         "max_lr down to min_lr (e.g. min_lr = max_lr / 10)")
    if warmup_start_lr > max_lr:
        raise ValueError(f"warmup_start_lr ({warmup_start_lr:g}) is larger than max_lr ({max_lr:g}); warmup "
                         "climbs from warmup_start_lr up to max_lr")
    return step, max_lr, min_lr, warmup_steps, total_steps, warmup_start_lr


def _warmup(step: int, max_lr: float, warmup_steps: int, warmup_start_lr: float) -> float:
    return warmup_start_lr + (max_lr - warmup_start_lr) * step / warmup_steps


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          warmup_start_lr: float = 0.0) -> float:
    """Learning rate at ``step`` for linear warmup then cosine decay.

    Args:
        step: the optimizer step, from 0.
        max_lr: the peak, reached at ``step == warmup_steps``.
        min_lr: the floor, reached at ``total_steps`` and kept after it (``0 <= min_lr <= max_lr``).
        warmup_steps: length of the warmup (0: start at ``max_lr``); at most ``total_steps``.
        total_steps: the step at which the decay ends.
        warmup_start_lr: the rate at step 0. Default 0.

    Returns:
        ``warmup_start_lr + (max_lr - warmup_start_lr) * step / warmup_steps`` during warmup,
        ``min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * t))`` with
        ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` during the decay, ``min_lr`` after.

    Raises:
        ValueError: a negative step, ``warmup_steps > total_steps``, ``min_lr > max_lr``,
            ``max_lr <= 0``, a negative or non-finite rate.
        TypeError: a step count that is not an integer, a rate that is not a number.
    """
    step, max_lr, min_lr, warmup_steps, total_steps, warmup_start_lr = _check(
        step, max_lr, min_lr, warmup_steps, total_steps, warmup_start_lr)
    if step < warmup_steps:
        return _warmup(step, max_lr, warmup_steps, warmup_start_lr)
    if step >= total_steps:
        return min_lr
    t = (step - warmup_steps) / (total_steps - warmup_steps)  # 0 -> 1 over the decay
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def linear_lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                 warmup_start_lr: float = 0.0) -> float:
    """Learning rate at ``step`` for linear warmup then linear decay to ``min_lr`` at ``total_steps``.

    Arguments, returns and errors as :func:`lr_at`; the decay is ``min_lr + (max_lr - min_lr) * (1 - t)``.
    """
    step, max_lr, min_lr, warmup_steps, total_steps, warmup_start_lr = _check(
        step, max_lr, min_lr, warmup_steps, total_steps, warmup_start_lr)
    if step < warmup_steps:
        return _warmup(step, max_lr, warmup_steps, warmup_start_lr)
    if step >= total_steps:
        return min_lr
    t = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * (1.0 - t)


def wsd_lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
              decay_steps: int, warmup_start_lr: float = 0.0) -> float:
    """Learning rate at ``step`` for warmup-stable-decay (WSD).

    Warmup as :func:`lr_at`; ``max_lr`` from ``warmup_steps`` to ``total_steps - decay_steps``;
    then linear to ``min_lr`` at ``total_steps``; ``min_lr`` after.

    Args:
        decay_steps: length of the final decay, ``0 <= decay_steps <= total_steps - warmup_steps``
            (often 10-20 % of the run). Others as :func:`lr_at`.

    Raises:
        ValueError: as :func:`lr_at`, and ``decay_steps`` negative or longer than the steps left after warmup.
    """
    step, max_lr, min_lr, warmup_steps, total_steps, warmup_start_lr = _check(
        step, max_lr, min_lr, warmup_steps, total_steps, warmup_start_lr)
    decay_steps = integer("decay_steps", decay_steps, minimum=0)
    if decay_steps > total_steps - warmup_steps:
        raise ValueError(f"decay_steps ({decay_steps}) is longer than the steps left after warmup "
                         f"(total_steps - warmup_steps = {total_steps - warmup_steps}); shorten the decay or "
                         "the warmup")
    decay_start = total_steps - decay_steps
    if step < warmup_steps:
        return _warmup(step, max_lr, warmup_steps, warmup_start_lr)
    if step >= total_steps:
        return min_lr
    if step < decay_start:
        return max_lr
    t = (step - decay_start) / decay_steps  # decay_steps > 0 here: decay_start <= step < total_steps
    return min_lr + (max_lr - min_lr) * (1.0 - t)


#: The schedules by name (``TrainerConfig.schedule``).
SCHEDULES: dict[str, Callable[..., float]] = {"cosine": lr_at, "linear": linear_lr_at, "wsd": wsd_lr_at}


def _schedule(schedule: str) -> Callable[..., float]:
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(repr(s) for s in SCHEDULES)}, got {schedule!r}")
    return SCHEDULES[schedule]


def lr_lambda(schedule: str = "cosine", **kwargs) -> Callable[[int], float]:
    """The factor ``fn(step, **kwargs) / max_lr`` for ``torch.optim.lr_scheduler.LambdaLR``.

    ``LambdaLR`` multiplies each parameter group's initial lr by this factor, so a group whose
    lr is ``max_lr`` follows the schedule exactly (and other groups keep their ratio to it).

    Args:
        schedule: ``"cosine"``, ``"linear"`` or ``"wsd"`` (see :data:`SCHEDULES`).
        **kwargs: that schedule's keyword arguments (``max_lr``, ``min_lr``, ``warmup_steps``,
            ``total_steps``, ``warmup_start_lr``; ``decay_steps`` for ``"wsd"``).

    Returns:
        a plain function ``step -> float`` (a function, so ``LambdaLR.state_dict()`` does not store it).

    Raises:
        ValueError: unknown schedule, or bad arguments (checked now, not at the first step).
        TypeError: a missing or unknown keyword argument.
    """
    fn = _schedule(schedule)
    fn(0, **kwargs)  # validate the arguments once, here
    max_lr = float(kwargs["max_lr"])

    def factor(step: int) -> float:
        return fn(step, **kwargs) / max_lr

    return factor


def scheduler(optimizer: torch.optim.Optimizer, schedule: str = "cosine",
              **kwargs) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that sets the optimizer's lr to ``SCHEDULES[schedule](step, **kwargs)``.

    Every parameter group's ``lr`` (and ``initial_lr``) is set to ``max_lr`` first, so after
    ``n`` calls of ``.step()`` the lr is exactly the schedule's value at step ``n``. To keep
    different lrs per group, build ``LambdaLR(optimizer, lr_lambda(...))`` yourself. To resume,
    build it the same way, then load the optimizer's state (it holds the current lr) and the
    scheduler's (it holds the step).

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        schedule, **kwargs: as :func:`lr_lambda`.

    Raises:
        TypeError: ``optimizer`` is not a torch optimizer; as :func:`lr_lambda`.
        ValueError: as :func:`lr_lambda`.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (e.g. torch.optim.AdamW), got "
                        f"{type(optimizer).__name__}")
    factor = lr_lambda(schedule, **kwargs)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = float(kwargs["max_lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
