"""What the exercise checks expect of a learner's return value, with a message that says what came back."""

from __future__ import annotations

import torch


def as_float(got, what: str) -> float:
    """``got`` as a float (a one-element tensor is accepted); else an assertion naming ``what`` and what came."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    assert isinstance(got, (int, float)) and not isinstance(got, bool), (
        f"{what}: expected a number (a Python float), got {type(got).__name__}: {got!r}")
    return float(got)


def as_tensor(got, shape, what: str) -> torch.Tensor:
    """``got`` if it is a tensor of ``shape``; else an assertion naming ``what`` and what came."""
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}"
    assert tuple(got.shape) == tuple(shape), f"{what}: expected shape {list(shape)}, got {list(got.shape)}"
    return got
