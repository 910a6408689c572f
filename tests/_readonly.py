"""A read-only folder for tests, also when the tests run as root (CI containers often do).

Root ignores file permissions, so besides ``chmod 555`` the fixture makes the two calls
through which course_lib creates entries in a folder, ``tempfile.mkstemp`` and ``os.mkdir``,
fail with ``PermissionError`` under that folder, as a read-only mount would.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)`` makes ``folder`` (created if needed) read-only for the test; returns it."""
    made: list[Path] = []
    real_mkstemp, real_mkdir = tempfile.mkstemp, os.mkdir

    def inside(path) -> bool:
        p = Path(path).resolve()
        return any(p == f or f in p.parents for f in made)

    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and inside(dir):
            raise denied(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(Path(path).parent):
            raise denied(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "mkdir", mkdir)

    def make(folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder.resolve())
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)  # so that pytest can remove tmp_path
