"""course_lib.checks: the argument checks every step shares."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from course_lib.checks import (boolean, describe, finite_number, integer, non_negative_int, positive_float, positive_int,
                               probability)


def re_repr(value) -> str:
    return re.escape(repr(value))


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(1)])
def test_positive_int_returns_a_plain_int(value):
    got = positive_int("n", value)
    assert got == value and type(got) is int


@pytest.mark.parametrize("value", [0, -1, 2.5, 3.0, True, False, "3", None, np.bool_(True)])
def test_positive_int_refuses_everything_else_with_a_value_error(value):
    with pytest.raises(ValueError, match=rf"^batch_size must be a positive integer, got {re_repr(value)}$"):
        positive_int("batch_size", value)


def test_positive_int_none_and_hint():
    assert positive_int("max_steps", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"^max_steps must be a positive integer or None, got 0; try 10$"):
        positive_int("max_steps", 0, allow_none=True, hint="; try 10")


def test_non_negative_int():
    assert non_negative_int("num_workers", 0) == 0 and type(non_negative_int("w", np.int16(2))) is int
    for bad in (-1, 1.0, True, "0"):
        with pytest.raises(ValueError, match="^num_workers must be an integer >= 0"):
            non_negative_int("num_workers", bad)


@pytest.mark.parametrize("value", [2.0, True, "3", None, np.bool_(False), [3]])
def test_integer_refuses_other_types_with_a_type_error(value):
    with pytest.raises(TypeError, match=r"^stride must be an integer, got "):
        integer("stride", value, minimum=1)


def test_integer_bounds_none_and_conversion():
    assert integer("seed", -5) == -5  # no bound by default
    got = integer("vocab_size", np.int64(300), minimum=257)
    assert got == 300 and type(got) is int
    with pytest.raises(ValueError, match=r"^stride must be at least 1, got 0 \(the step\)$"):
        integer("stride", 0, minimum=1, hint=" (the step)")
    assert integer("seed", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^seed must be an integer or None, got the str 'x'$"):
        integer("seed", "x", allow_none=True)


@pytest.mark.parametrize("value, inclusive", [(0, False), (0.5, False), (np.float32(0.25), False), (1, True)])
def test_probability_accepts_the_interval(value, inclusive):
    got = probability("p", value, upper_inclusive=inclusive)
    assert got == float(value) and type(got) is float


@pytest.mark.parametrize("value", [1.0, -0.1, math.nan, math.inf, True, "0.1", None, 10**400, -10**400])
def test_probability_refuses_the_rest(value):
    with pytest.raises(ValueError, match=r"^dropout must be a probability in \[0, 1\), got .*; use 0.0$"):
        probability("dropout", value, hint="; use 0.0")


def test_strict_probability_tells_a_wrong_type_from_a_wrong_value():
    for bad_type in ("0.1", None, True, np.bool_(True)):
        with pytest.raises(TypeError, match=r"^rate must be a number in \[0, 1\], got "):
            probability("rate", bad_type, strict=True, upper_inclusive=True)
    for bad_value in (math.nan, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"^rate must be a probability in \[0, 1\), got "):
            probability("rate", bad_value, strict=True)


def test_boolean():
    assert boolean("shuffle", True) is True and boolean("shuffle", np.bool_(False)) is False
    for bad in ("no", 0, 1, None):
        with pytest.raises(TypeError, match=rf"^shuffle must be True or False, got {re_repr(bad)}$"):
            boolean("shuffle", bad)


def test_describe_names_the_type_and_cuts_long_values():
    assert describe(None) == "None"
    assert describe("0.1") == "the str '0.1'"
    assert describe("x" * 100) == "the str '" + "x" * 39 + "..."


@pytest.mark.parametrize("value", [0, -1e-3, float("nan"), float("inf"), True, "3e-4", None, [1e-3], 10**400, -10**400])
def test_positive_float_refuses_what_is_not_a_finite_positive_number(value):
    with pytest.raises(ValueError, match=r"^lr must be a finite number above 0, got "):
        positive_float("lr", value)


def test_positive_float_returns_plain_floats():
    assert positive_float("lr", np.float32(0.5)) == 0.5 and type(positive_float("lr", 2)) is float


def test_finite_number_bounds_types_and_messages():
    assert finite_number("x", -2.5) == -2.5 and type(finite_number("x", np.float32(0.5))) is float
    assert finite_number("x", 0, minimum=0) == 0.0 and finite_number("x", np.int64(3), positive=True) == 3.0
    for value, kwargs, message in [
            (-0.1, dict(minimum=0), "x must be a finite number >= 0, got the float -0.1"),
            (0, dict(positive=True), "x must be a finite number > 0, got the int 0"),
            (1.5, dict(minimum=2), "x must be a finite number >= 2, got the float 1.5"),
            (math.nan, {}, "x must be a finite number, got the float nan"),
            (10**400, dict(minimum=0), "x must be a finite number >= 0, got the int 1000"),   # not float()'s OverflowError
            ("1", {}, "x must be a finite number, got the str '1'"),
            (True, {}, "x must be a finite number, got the bool True")]:
        with pytest.raises(ValueError) as err:
            finite_number("x", value, **kwargs)
        assert str(err.value).startswith(message), (value, str(err.value))
    for value in ("1", True, np.bool_(False), None):
        with pytest.raises(TypeError, match=r"^x must be a number, got .*; see the docs$"):
            finite_number("x", value, strict=True, hint="; see the docs")
    with pytest.raises(ValueError, match=r"^x must be a finite number, got the float inf; see the docs$"):
        finite_number("x", math.inf, strict=True, hint="; see the docs")
