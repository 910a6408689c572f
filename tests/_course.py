"""A fake course folder with one notebook, for tests of `course run` (no real notebook is executed)."""

from __future__ import annotations

from pathlib import Path

import nbformat


def fake_course(tmp_path, cells) -> Path:
    root = tmp_path / "course"
    for sub in ("notebooks", "exercises"):
        (root / sub).mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nbformat.write(nb, root / "notebooks" / "07_demo.ipynb")
    return root


def one_error_line(stderr: str) -> str:
    """``stderr`` of a refused ``course`` command: one ``error: ...`` line, no traceback."""
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    assert "Traceback" not in stderr
    return stderr
