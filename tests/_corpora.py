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


def gpt2_tiktoken():
    """``tiktoken.get_encoding("gpt2")``, the independent reference, from tiktoken's own loader
    and cache (the mirror's ``tiktoken_cache`` when ``TIKTOKEN_CACHE_DIR`` is unset); skips the
    test when it cannot be loaded offline."""
    import os
    from pathlib import Path

    tiktoken = pytest.importorskip("tiktoken")
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        mirror = os.environ.get("COURSE_DATA_MIRROR", "")
        if mirror and (Path(mirror) / "tiktoken_cache").is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(Path(mirror) / "tiktoken_cache")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # offline with no cache
        pytest.skip(f"tiktoken cannot load gpt2 offline (set TIKTOKEN_CACHE_DIR to a folder holding "
                    f"its cached files, e.g. <mirror>/tiktoken_cache): {type(err).__name__}")


def verdict_shards(tmp_path_factory):
    """The Verdict written as token shards (``prepare_shards``) into a new temporary folder;
    skips the test when the corpus is not staged."""
    from course_lib.shards import prepare_shards

    out = tmp_path_factory.mktemp("verdict") / "shards"
    try:
        prepare_shards("the-verdict", out, workers=1, progress=False)
    except DataFetchError as err:
        pytest.skip(f"the-verdict is not staged (set COURSE_DATA_MIRROR): {err}".splitlines()[0])
    return out
