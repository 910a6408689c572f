"""Execute a step's notebook headless for a profile (``course run N``).

Cross-cutting (imports nothing from the steps). What an instructor runs on the GPU box
before class: the notebook is executed top to bottom with ``COURSE_PROFILE`` set, an
executed copy is written **outside** ``notebooks/`` (default ``runs/<profile>/``), and the
time spent in each section (the notebook's ``##`` headings) is printed, each as it finishes.
"""

from __future__ import annotations

import numbers
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from .checks import positive_int
from .files import atomic_write
from .paths import course_root, writable_problem

__all__ = ["find_notebook", "run_notebook", "section_times", "RunResult"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def find_notebook(step: int, root: Path | None = None) -> Path:
    """The notebook of step ``step`` (``notebooks/NN_*.ipynb``).

    Raises:
        ValueError: no such step, or its notebook does not exist yet.
    """
    root = course_root() if root is None else Path(root)
    if isinstance(step, str) and step.strip().isdigit():      # "3" from a command line
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):   # 2.7 was step 2, True step 1
        raise ValueError(f"step must be a number 1-9, got {step!r}")
    step = int(step)
    matches = sorted((root / "notebooks").glob(f"{step:02d}_*.ipynb"))
    if not matches:
        have = sorted(p.name for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        raise ValueError(f"there is no notebook for step {step}; available: {', '.join(have) or 'none'}")
    return matches[0]


def _duration(cell) -> float:
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not start or not end:
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return max(0.0, (parse(end) - parse(start)).total_seconds())


def _heading(cell, first: bool) -> str | None:
    """The section a markdown cell opens (a ``##`` heading; a ``#`` one except in the first section).
    A cell with several headings opens the last: the cells after it belong to that one."""
    if cell.cell_type != "markdown":
        return None
    name = None
    for line in cell.source.splitlines():
        if line.startswith("## ") or (line.startswith("# ") and not first):
            name = line.lstrip("#").strip()
    return name


def section_times(nb) -> list[tuple[str, float]]:
    """``[(section heading, seconds)]`` for an executed notebook, split at ``#``/``##`` headings.

    ``seconds`` is ``None`` for a section none of whose cells ran (after a failure)."""
    sections: list[list] = [["(setup)", None, False]]  # name, seconds (None: nothing ran), has code
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            name = _heading(cell, first=len(sections) == 1)
            if name is not None:
                sections.append([name, None, False])
        elif cell.cell_type == "code":
            sections[-1][2] = True
            if cell.get("metadata", {}).get("execution"):
                sections[-1][1] = (sections[-1][1] or 0.0) + _duration(cell)
    return [(name, seconds) for name, seconds, has_code in sections if has_code]


class _SectionClock:
    """Times sections live from nbclient's ``on_cell_start`` / ``on_cell_executed`` hooks and
    reports each one (``report(name, seconds)``) when the next section starts, or at :meth:`finish`."""

    def __init__(self, report: Callable[[str, float], None]):
        self.report = report
        self.name, self.first, self.seconds, self.has_code = "(setup)", True, 0.0, False
        self.cell_start: float | None = None

    def _close_cell(self) -> None:
        if self.cell_start is not None:
            self.seconds += time.perf_counter() - self.cell_start
            self.cell_start = None

    def on_cell_executed(self, **_) -> None:
        self._close_cell()

    def on_cell_start(self, cell, cell_index=None, **_) -> None:
        self._close_cell()
        name = _heading(cell, self.first)
        if name is not None:
            self.finish()
            self.name, self.first, self.seconds, self.has_code = name, False, 0.0, False
        elif cell.cell_type == "code" and cell.source.strip():
            self.has_code, self.cell_start = True, time.perf_counter()

    def finish(self) -> None:
        self._close_cell()
        if self.has_code:
            self.report(self.name, self.seconds)
            self.has_code = False


def _check_out_dir(out_dir: Path) -> None:
    problem = writable_problem(out_dir)
    if problem is not None:
        raise ValueError(f"the output folder {out_dir} (--out / out_dir) {problem}: give a folder you can write "
                         "for the executed copy, or leave it out to use runs/<profile>/")


@dataclass
class RunResult:
    notebook: Path
    output: Path
    profile: str
    seconds: float
    sections: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""

    def format(self) -> str:
        lines = [f"{self.notebook.name} [{self.profile} profile] -> {self.output}"]
        width = max((len(n) for n, _ in self.sections), default=10)
        for name, seconds in self.sections:
            lines.append(f"  {name:<{width}}  " + (f"{seconds:8.1f} s" if seconds is not None else "  not run"))
        lines.append(f"  {'total':<{width}}  {self.seconds:8.1f} s" + ("  FAILED" if self.error else ""))
        if self.error:
            lines.append(self.error)
        return "\n".join(lines)


def run_notebook(step: int, profile: str = "cpu", out_dir: str | os.PathLike | None = None,
                 timeout_per_cell: int | None = None, root: Path | None = None,
                 device: str | None = None,
                 on_section: Callable[[str, float], None] | None = None) -> RunResult:
    """Execute step ``step``'s notebook with ``COURSE_PROFILE=profile`` and save the executed copy.

    Args:
        step: 1-9.
        profile: ``tiny``, ``cpu`` or ``gpu``.
        out_dir: where the executed copy goes; default ``runs/<profile>/`` in the course folder.
        timeout_per_cell: seconds before a single cell is abandoned (default: no limit).
        device: sets ``COURSE_DEVICE`` for the run.
        on_section: called as ``on_section(heading, seconds)`` as each section with code
            finishes (the last one too, even after a failure); default: nothing.

    The executed copy is written atomically. When a cell fails, the copy goes to
    ``NN_name.FAILED.ipynb`` (the error is visible in it) and the last good copy is kept.

    Raises:
        ValueError: an unknown profile or step, ``out_dir`` empty, inside ``notebooks/``, or
            one that cannot be written (a file, read-only), ``timeout_per_cell`` not a positive
            integer; checked before running (and before the environment is changed).
        TypeError: ``device`` not a str, ``on_section`` not callable.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    if profile not in ("tiny", "cpu", "gpu"):
        raise ValueError(f"unknown profile {profile!r}; valid profiles are: tiny, cpu, gpu")
    if device is not None and (not isinstance(device, str) or not device.strip()):
        raise TypeError(f"device must be a device name such as 'cpu' or 'cuda' (a str) or None, got {device!r}")
    if timeout_per_cell is not None:
        positive_int("timeout_per_cell", timeout_per_cell, hint=" (seconds, or None for no limit)")
    if on_section is not None and not callable(on_section):
        raise TypeError(f"on_section must be a function of (heading, seconds) or None, got "
                        f"{type(on_section).__name__}")
    if out_dir is not None and (not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip()):
        raise ValueError(f"out_dir is {out_dir!r}; give a folder for the executed copy, or None for runs/<profile>/")
    root = course_root() if root is None else Path(root)
    source = find_notebook(step, root)
    out_dir = Path(out_dir).expanduser() if out_dir is not None else root / "runs" / profile
    output = out_dir / source.name
    if output.resolve().parent == (root / "notebooks").resolve():
        raise ValueError("out_dir must not be notebooks/: executed copies never overwrite the course's notebooks")
    _check_out_dir(out_dir)  # before a run of minutes, not after it
    out_dir.mkdir(parents=True, exist_ok=True)

    nb = nbformat.read(source, as_version=4)
    saved = {k: os.environ.get(k) for k in ("COURSE_PROFILE", "COURSE_DEVICE")}
    os.environ["COURSE_PROFILE"] = profile
    if device:
        os.environ["COURSE_DEVICE"] = device
    client = NotebookClient(nb, timeout=timeout_per_cell, kernel_name="python3",
                            resources={"metadata": {"path": str(source.parent)}}, record_timing=True,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    clock = _SectionClock(on_section) if on_section is not None else None
    if clock is not None:
        client.on_cell_start, client.on_cell_executed = clock.on_cell_start, clock.on_cell_executed
    error = ""
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        text = _ANSI.sub("", str(err)).strip()
        error = text.splitlines()[-1] if text else repr(err)
    finally:
        if clock is not None:
            clock.finish()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - start
    failed_copy = output.with_name(output.stem + ".FAILED.ipynb")
    if error:
        # Keep the last good executed copy: a failed run goes beside it, never over it.
        output = failed_copy
    else:
        failed_copy.unlink(missing_ok=True)  # an old failure is no longer news
    text = nbformat.writes(nb)
    text += "" if text.endswith("\n") else "\n"  # as nbformat.write ends a file
    atomic_write(output, lambda fh: fh.write(text.encode("utf-8")), overwrite=True)
    return RunResult(source, output, profile, seconds, section_times(nb), error)
