"""Shared by the tokenizer tests: read a registered corpus, or skip when it is not staged."""

from __future__ import annotations

import pytest

from course_lib.data import DataFetchError, fetch


def corpus(name: str) -> str:
    """The text of the registered file ``name`` (skips the test if it cannot be fetched)."""
    try:
        return fetch(name, progress=False).read_text(encoding="utf-8")
    except DataFetchError as err:
        pytest.skip(f"{name} is not staged (set COURSE_DATA_MIRROR): {err}".splitlines()[0])
