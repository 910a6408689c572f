"""Argument checks shared by every step (cross-cutting: imports nothing from the steps).

Each returns the value it checked (converted to the plain Python type: a ``numpy.int64``
becomes ``int``, a ``numpy.bool_`` ``bool``) or raises an error that names the argument and
says what to pass instead, so a learner never meets a deep torch traceback for a wrong argument.

Two families, kept apart because the course's tests pin both:

* :func:`positive_int`, :func:`non_negative_int`, :func:`probability`: any bad value,
  whatever its type, is a ``ValueError`` (``strict=True`` makes a wrong *type* a ``TypeError``
  for :func:`probability`);
* :func:`integer`: a wrong type is a ``TypeError``, a value below ``minimum`` a ``ValueError``.

>>> positive_int("batch_size", 8)
8
>>> positive_int("batch_size", 0)
Traceback (most recent call last):
...
ValueError: batch_size must be a positive integer, got 0
>>> integer("stride", 0, minimum=1)
Traceback (most recent call last):
...
ValueError: stride must be at least 1, got 0
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["positive_int", "non_negative_int", "integer", "positive_float", "finite_number", "probability", "boolean",
           "describe"]


def describe(value: Any) -> str:
    """``"the str '0.1'"``: a value and its type, for error messages (long values cut at 40 characters)."""
    if value is None:
        return "None"
    text = repr(value)
    return f"the {type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _is_int(value: Any) -> bool:
    # numbers.Integral covers int and NumPy's integers; bool is an int in Python, but never a size.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _float(value: Any) -> float:
    """A real number as a float; ``inf`` for an int too large for one (``10**400``)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def positive_int(name: str, value: Any, *, allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` as an ``int`` if it is an integer >= 1 (or ``None`` with ``allow_none``).

    Raises:
        ValueError: anything else (booleans and floats included); ``hint`` is appended to the message.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{extra}, got {value!r}{hint}")
    return int(value)


def positive_float(name: str, value: Any, *, hint: str = "") -> float:
    """``value`` as a ``float`` if it is a finite real number > 0 (a learning rate, a scale).

    >>> positive_float("lr", 3e-4)
    0.0003

    Raises:
        ValueError: anything else (booleans, strings, 0, negatives, nan and inf included); ``hint``
            is appended to the message.
    """
    if not _is_real(value) or not math.isfinite(_float(value)) or value <= 0:
        raise ValueError(f"{name} must be a finite number above 0, got {describe(value)}{hint}")
    return float(value)


def finite_number(name: str, value: Any, *, minimum: float | None = None, positive: bool = False,
                  strict: bool = False, hint: str = "") -> float:
    """``value`` as a ``float`` if it is a finite real number (NumPy's too, never a ``bool``),
    at least ``minimum`` when given and above 0 with ``positive``.

    >>> finite_number("grad_clip", 1, minimum=0)
    1.0

    Args:
        minimum: the smallest value allowed. Default: no bound.
        positive: refuse 0 and below. Default ``False``.
        strict: a value that is not a real number is a ``TypeError`` ("must be a number").
            Default ``False``: a ``ValueError`` like the others.
        hint: appended to the message.

    Raises:
        ValueError: ``nan``, ``inf`` (an int too large for a float too), a value out of bounds;
            without ``strict``, anything that is not a real number.
        TypeError: with ``strict``, not a real number (a string, a ``bool``, ``None``).
    """
    bound = " > 0" if positive else f" >= {minimum:g}" if minimum is not None else ""
    if not _is_real(value):
        if strict:
            raise TypeError(f"{name} must be a number, got {describe(value)}{hint}")
        raise ValueError(f"{name} must be a finite number{bound}, got {describe(value)}{hint}")
    number = _float(value)
    if (not math.isfinite(number) or (minimum is not None and number < minimum)
            or (positive and number <= 0)):
        raise ValueError(f"{name} must be a finite number{bound}, got {describe(value)}{hint}")
    return number


def non_negative_int(name: str, value: Any, *, hint: str = "") -> int:
    """``value`` as an ``int`` if it is an integer >= 0.

    Raises:
        ValueError: anything else (booleans and floats included).
    """
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}{hint}")
    return int(value)


def integer(name: str, value: Any, *, minimum: int | None = None, allow_none: bool = False,
            hint: str = "") -> int | None:
    """``value`` as an ``int`` if it is an integer (and >= ``minimum`` when given).

    Args:
        minimum: the smallest value allowed. Default: no bound.
        allow_none: accept ``None`` (returned as is). Default ``False``.
        hint: appended to either message, e.g. ``" (use stride=max_length for no overlap)"``.

    Raises:
        TypeError: ``value`` is not an integer (a ``bool``, a ``float`` such as ``2.0``, a string).
        ValueError: ``value`` is below ``minimum``.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value):
        extra = " or None" if allow_none else ""
        raise TypeError(f"{name} must be an integer{extra}, got {describe(value)}{hint}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}{hint}")
    return int(value)


def probability(name: str, value: Any, *, upper_inclusive: bool = False, strict: bool = False,
                hint: str = "") -> float:
    """``value`` as a ``float`` if it is a real number in ``[0, 1)`` (``[0, 1]`` with ``upper_inclusive``).

    Args:
        upper_inclusive: allow 1. Default ``False``.
        strict: a value that is not a real number (a string, ``None``, a ``bool``) is a
            ``TypeError`` ("must be a number in [0, 1)"). Default ``False``: a ``ValueError``.
        hint: appended to the message.

    Raises:
        ValueError: a value outside the interval, ``nan``, or (without ``strict``) not a number.
        TypeError: with ``strict``, not a real number.
    """
    interval = "[0, 1]" if upper_inclusive else "[0, 1)"
    if not _is_real(value):
        if strict:
            raise TypeError(f"{name} must be a number in {interval}, got {describe(value)}{hint}")
        raise ValueError(f"{name} must be a probability in {interval}, got {value!r}{hint}")
    inside = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not inside:                                  # nan too: it compares False
        raise ValueError(f"{name} must be a probability in {interval}, got {value!r}{hint}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (or a ``numpy.bool_``), never a string such as ``"no"`` or ``0``/``1``.

    Raises:
        TypeError: anything else.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)
