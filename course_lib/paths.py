"""Where the course lives on disk (cross-cutting: imports nothing from the steps).

The course is used from a checkout: ``notebooks/``, ``exercises/``, ``solutions/``
and ``tests/`` sit beside the ``course_lib`` package. :func:`course_root` finds
that folder so that ``course check`` and ``course run`` work from anywhere.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["course_root", "find_course_root", "writable_problem"]

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
    if root is not None and not root.is_dir():     # $COURSE_ROOT names no folder
        raise FileNotFoundError(f"COURSE_ROOT={os.environ.get('COURSE_ROOT', '').strip()} is not a folder; set it to "
                                "your clone of the course (the folder with notebooks/), or unset it")
    if root is None:
        raise FileNotFoundError(
            "cannot find the course folder (the one with notebooks/, exercises/ and pyproject.toml). "
            "Run this from inside your clone of the course, or set COURSE_ROOT=/path/to/the/clone."
        )
    return root


def writable_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written in ``folder``, or ``None`` when they can.

    ``folder`` need not exist yet: then its nearest existing parent must accept a new
    entry. Writability is tested by creating (and removing) a small temporary file, so
    read-only mounts, permissions and full quotas are all caught.

    Returns:
        ``None``, or a short reason to put after the folder's name: ``"is a file, not a
        folder"``, ``"cannot be created: /x is a file"``, ``"is read-only (Permission denied)"``.
    """
    target = Path(folder).expanduser()
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return "is a file, not a folder" if existing == target else f"cannot be created: {existing} is a file"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test.")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return (f"is read-only ({reason})" if existing == target
                else f"cannot be created: {existing} is read-only ({reason})")
    os.close(fd)
    os.unlink(probe)
    return None
