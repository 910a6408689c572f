"""Where the course lives on disk (cross-cutting: imports nothing from the steps).

The course is used from a checkout: ``notebooks/``, ``exercises/``, ``solutions/``
and ``tests/`` sit beside the ``course_lib`` package. :func:`course_root` finds
that folder so that ``course check`` and ``course run`` work from anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["course_root", "find_course_root"]

_MARKERS = ("notebooks", "exercises", "pyproject.toml")


def _looks_like_root(path: Path) -> bool:
    return all((path / m).exists() for m in _MARKERS)


def find_course_root() -> Path | None:
    """``$COURSE_ROOT``, else the checkout ``course_lib`` was imported from, else the
    nearest folder above the working directory that holds the course; ``None`` if none."""
    env = os.environ.get("COURSE_ROOT", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parent.parent
    if _looks_like_root(here):
        return here
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if _looks_like_root(candidate):
            return candidate
    return None


def course_root() -> Path:
    """Like :func:`find_course_root`, but a missing checkout is an error that says what to do."""
    root = find_course_root()
    if root is None:
        raise FileNotFoundError(
            "cannot find the course folder (the one with notebooks/, exercises/ and pyproject.toml). "
            "Run this from inside your clone of the course, or set COURSE_ROOT=/path/to/the/clone."
        )
    return root
