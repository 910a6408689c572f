"""The exercise checker behind ``course check N`` and the notebooks' Ha cells.

Cross-cutting (imports nothing from the steps). Each step's Ha exercises live in
``exercises/stepNN.py`` (the learner's file: stubs that raise
``NotImplementedError``) and ``solutions/stepNN.py`` (the reference). One test
file, ``tests/exercises/test_stepNN.py``, checks either of them: every test is
marked with the exercise it belongs to (``@pytest.mark.exercise("name")``).

:func:`check` runs those tests in a fresh Python process (so the learner's
latest edits are always the ones checked), then prints one line per exercise:

* ``passed``      — every test of that exercise passed;
* ``failed``      — with what was expected, what came back, and a hint;
* ``not started`` — the function still raises ``NotImplementedError``;
* ``not run``     — the run was stopped (time limit) before reaching it.

It never raises for a failing exercise, so a notebook keeps running. A check that runs
past 30 s (an endless loop) fails naming its line and the exercise's other checks are
skipped; a loop, ``sys.exit()`` or ``os._exit()`` at the top level of the file is reported
as such.

What it protects, and what not: the learner's code runs in a separate process whose
working directory is an empty temporary folder, so relative-path writes and deletes land
there and vanish. It is **not a sandbox**: the code has the learner's own rights, and
absolute paths, the home folder, the network and other processes are within its reach.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .checks import boolean, describe, finite_number, integer
from .paths import course_root

__all__ = ["ExerciseResult", "CheckReport", "check", "run_checks", "exercise_file",
           "PASSED", "FAILED", "NOT_STARTED", "NOT_RUN"]

PASSED, FAILED, NOT_STARTED, NOT_RUN = "passed", "failed", "not started", "not run"


@dataclass
class ExerciseResult:
    name: str
    status: str  # passed | failed | not started | not run
    checks: int = 0
    passed_checks: int = 0
    message: str = ""
    skipped_checks: int = 0  # skipped after an earlier check of this exercise timed out
    unrun_checks: int = 0    # never reached (the whole run was stopped)
    note: str = ""


@dataclass(repr=False)
class CheckReport:
    step: int
    target: Path
    exercises: list[ExerciseResult] = field(default_factory=list)
    error: str = ""

    @property
    def all_passed(self) -> bool:
        return not self.error and bool(self.exercises) and all(e.status == PASSED for e in self.exercises)

    @property
    def counts(self) -> dict[str, int]:
        out = {PASSED: 0, FAILED: 0, NOT_STARTED: 0, NOT_RUN: 0}
        for e in self.exercises:
            out[e.status] += 1
        return out

    def format(self) -> str:
        lines = [f"Step {self.step} exercises — checking {self.target}"]
        if self.error:
            lines.append(f"  could not run the checks: {self.error}")
            return "\n".join(lines)
        width = max((len(e.name) for e in self.exercises), default=10)
        marks = {PASSED: "✔", FAILED: "✘", NOT_STARTED: "·", NOT_RUN: "?"}
        for e in self.exercises:
            line = f"  {marks[e.status]} {e.name:<{width}}  {e.status}"
            hint = f"stuck? `course hint {self.step} {e.name}` gives a hint"
            if e.status == NOT_STARTED:
                line += f" ({hint})"
            elif e.status == PASSED:
                line += f" ({e.checks} check{'s' if e.checks != 1 else ''})"
            elif e.status == FAILED:
                skipped = f", {e.skipped_checks} skipped" if e.skipped_checks else ""
                line += f" ({e.passed_checks} of {e.checks} checks pass{skipped})"
            elif e.status == NOT_RUN and e.message:
                line = f"  {marks[e.status]} {e.name:<{width}}  {e.message}"
            lines.append(line)
            if e.status == FAILED and e.message:
                lines.extend("      " + m for m in e.message.splitlines())
            if e.skipped_checks and e.status == FAILED:
                lines.append(f"      ({e.skipped_checks} more check{'s' if e.skipped_checks != 1 else ''} of this "
                             "exercise skipped after the time-out)")
            if e.note:
                lines.append(f"      ({e.note})")
            if e.status == FAILED:
                lines.append(f"      {hint}")
        lines.append(self._summary() + ".")
        return "\n".join(lines)

    def _summary(self) -> str:
        c = self.counts
        return (f"{c[PASSED]} of {len(self.exercises)} exercises passed"
                + (f", {c[NOT_STARTED]} not started" if c[NOT_STARTED] else "")
                + (f", {c[FAILED]} failing" if c[FAILED] else "")
                + (f", {c[NOT_RUN]} not run" if c[NOT_RUN] else ""))

    def __repr__(self) -> str:
        # one line: check() has already printed the full report, and a notebook shows this again
        state = f"could not run: {self.error.splitlines()[0]}" if self.error else self._summary()
        return f"<CheckReport step {self.step}: {state}>"


def _root(root: str | os.PathLike | None) -> Path:
    """The course folder: ``root`` (a str or path, ``~`` expanded), else :func:`course_lib.paths.course_root`."""
    if root is None:
        return course_root()
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be the course folder (a str or Path) or None, got {describe(root)}")
    return Path(root).expanduser()


def exercise_file(step: int, solutions: bool = False, root: str | os.PathLike | None = None) -> Path:
    """Path of step ``step``'s exercise file (or its solution).

    Raises:
        TypeError: ``step`` is not an integer, ``solutions`` not ``True``/``False``, ``root`` not a path.
        ValueError: ``step`` is not 1-9.
    """
    step = _validate_step(step)
    solutions = boolean("solutions", solutions)
    return _root(root) / ("solutions" if solutions else "exercises") / f"step{step:02d}.py"


def _test_file(step: int, root: Path) -> Path:
    return root / "tests" / "exercises" / f"test_step{int(step):02d}.py"


def _validate_step(step: int) -> int:
    step = integer("step", step, minimum=1, hint=" (a step number 1-9)")
    if step > 9:
        raise ValueError(f"step must be between 1 and 9, got {step}")
    return step


def _read_events(path: Path) -> list[dict]:
    """The plugin's JSON lines; a last line cut off by a kill is dropped."""
    events = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return events


def _validate_file(file: str | os.PathLike, step: int) -> Path:
    target = Path(file).expanduser().resolve()
    if target.is_dir():
        raise ValueError(f"file {str(target)!r} is a folder: give the exercise file itself "
                         f"(for example {target / f'step{step:02d}.py'})")
    if not target.is_file():
        raise ValueError(f"file {str(target)!r} does not exist: give the path of your exercise file "
                         f"(by default the checker reads exercises/step{step:02d}.py)")
    if target.suffix != ".py":
        raise ValueError(f"file {str(target)!r} is not a Python file: give your exercises' .py file")
    return target


def run_checks(step: int, *, solutions: bool = False, file: str | os.PathLike | None = None,
               root: str | os.PathLike | None = None, timeout: float = 300, test_timeout: float = 30) -> CheckReport:
    """Run step ``step``'s exercise tests against a file and collect one result per exercise.

    The tests run in a fresh Python process whose working directory is a new temporary
    folder (removed afterwards), so the learner's code sees its latest edits and a relative
    path it writes or deletes lands there. This is **not a sandbox**: the code runs with the
    learner's own rights, and absolute paths, the home folder, the network and other
    processes are within its reach, exactly as when the learner runs it in the notebook.

    Args:
        step: 1-9.
        solutions: check ``solutions/stepNN.py`` instead of ``exercises/stepNN.py``.
        file: check this file instead of either.
        root: the course folder (found automatically).
        timeout: seconds before the whole run is stopped (default 300). The results so far
            are kept; the exercises not reached read ``not run: time limit``.
        test_timeout: seconds before one check, or the import of the file, is stopped
            (default 30; POSIX only). The check fails naming the line it was running
            (usually a loop that never ends) and the exercise's other checks are skipped.

    Raises:
        ValueError: ``file`` is a folder, is missing or is not a ``.py`` file; ``step`` is not 1-9;
            ``timeout`` or ``test_timeout`` is not a finite number of seconds above 0.
        TypeError: ``step`` is not an integer (``True``, ``2.7``), ``solutions`` not ``True``/``False``,
            ``timeout`` or ``test_timeout`` not a number, ``root`` not a path.
    """
    step = _validate_step(step)
    solutions = boolean("solutions", solutions)
    timeout = finite_number("timeout", timeout, positive=True, strict=True, hint=" (seconds for the whole run)")
    test_timeout = finite_number("test_timeout", test_timeout, positive=True, strict=True,
                                 hint=" (seconds for one check)")
    root = _root(root)
    target = _validate_file(file, step) if file is not None else exercise_file(step, solutions, root)
    report = CheckReport(step, target)
    tests = _test_file(step, root)
    if not tests.is_file():
        report.error = f"step {step} has no exercise tests yet ({tests} is missing)"
        return report
    if not target.is_file():
        report.error = f"{target} does not exist"
        return report
    with tempfile.TemporaryDirectory(prefix="course-check-") as tmp, \
            tempfile.TemporaryDirectory(prefix="course-check-cwd-") as workdir:
        out = Path(tmp) / "report.jsonl"
        cmd = [sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
               "-p", "no:randomly", "-o", "addopts=", "--no-header", "--tb=no", f"--rootdir={root}",
               f"--exercise-file={target}", f"--exercise-report={out}", f"--exercise-timeout={test_timeout}"]
        # No third-party pytest plugins: the checks need none, and skipping their start-up halves the wait.
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        env.setdefault("COURSE_PROFILE", "tiny")
        timed_out = False
        try:
            proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out, proc = True, None
        events = _read_events(out)
    _collect(report, events, proc, timeout if timed_out else None)
    return report


def _collect(report: CheckReport, events: list[dict], proc, timed_out_after: float | None) -> None:
    """Fill ``report`` from the plugin's events (see ``tests/exercises/conftest.py``)."""
    collected = next((e["collected"] for e in events if "collected" in e), None)
    import_error = next((e["import_error"] for e in events if "import_error" in e), "")
    finished = any(e.get("finished") for e in events)
    importing = any("importing" in e for e in events) and not any("imported" in e for e in events)
    if import_error:
        report.error = import_error
        return
    if collected is None:
        if timed_out_after is not None:
            report.error = f"the checks did not start within {timed_out_after:.0f} s"
        else:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            report.error = f"pytest did not produce a report (exit {proc.returncode}):\n{tail}"
        return
    if importing and (timed_out_after is not None or not finished):
        report.error = (f"your file exits when imported: the checker's process ended while importing "
                        f"{report.target.name}" if timed_out_after is None else
                        f"importing {report.target.name} did not finish within {timed_out_after:.0f} s")
        return
    # The check that was running when the process died or was stopped.
    started = {e["start"] for e in events if "start" in e}
    done = {e["test"]["name"] for e in events if "test" in e}
    cut_short = next(iter(started - done), None)
    if timed_out_after is not None:
        why = f"not run: time limit ({timed_out_after:.0f} s for the whole check)"
    elif not finished:
        why = f"not run: the checker's process ended early (exit {proc.returncode})"
    else:
        why = "not run"

    by_name: dict[str, ExerciseResult] = {}
    for t in collected:
        by_name.setdefault(t["exercise"], ExerciseResult(t["exercise"], NOT_RUN))
    for test in (e["test"] for e in events if "test" in e):
        res = by_name.setdefault(test["exercise"], ExerciseResult(test["exercise"], NOT_RUN))
        if res.status == NOT_RUN:
            res.status = PASSED
        res.checks += 1
        if test["outcome"] == "passed":
            res.passed_checks += 1
        elif test["outcome"] == "skipped":
            res.skipped_checks += 1
        elif test["not_implemented"]:
            if res.status == PASSED:
                res.status = NOT_STARTED
        else:
            res.status = FAILED
            if not res.message:
                res.message = f"[{test['name']}] {test['message']}".strip()
    for t in collected:
        if t["name"] not in done:
            res = by_name[t["exercise"]]
            res.checks += 1
            if t["name"] != cut_short or finished:
                res.unrun_checks += 1
            else:
                res.status = FAILED
                res.message = res.message or (
                    f"[{t['name']}] " + ("stopped by the time limit while running this check"
                                         if timed_out_after is not None else
                                         f"the checker's process ended during this check (exit {proc.returncode}): "
                                         "does your code call os._exit, or crash Python?"))
    for res in by_name.values():
        # Partly written: some checks fail with NotImplementedError, some pass.
        if res.status == NOT_STARTED and res.passed_checks:
            res.status = FAILED
            res.message = res.message or "part of it still raises NotImplementedError"
        if res.status == PASSED and res.unrun_checks:  # cannot count as passed
            res.status = NOT_RUN
            res.message = f"{why}; {res.passed_checks} of {res.checks} checks passed before that"
        elif res.status == NOT_RUN:
            res.message = why
        elif res.unrun_checks:
            res.note = f"{res.unrun_checks} check{'s' if res.unrun_checks != 1 else ''} {why}"
    report.exercises = list(by_name.values())


def check(step: int, *, solutions: bool = False, file: str | os.PathLike | None = None,
          quiet: bool = False, test_timeout: float = 30) -> CheckReport:
    """Check step ``step``'s exercises and print the report (the notebooks' Ha cell).

    Never raises for failing exercises; returns the :class:`CheckReport`. Arguments as for
    :func:`run_checks`; ``quiet=True`` prints nothing. A check of the learner's own
    ``exercises/stepNN.py`` (not ``solutions``, nor a ``file`` elsewhere) is recorded in the progress
    file (:func:`course_lib.progress.record_check`; a file problem is only a warning).

    Raises:
        ValueError: ``file`` is a folder, is missing or is not a ``.py`` file; ``step`` is not 1-9;
            ``test_timeout`` is not above 0 or not finite.
        TypeError: ``step`` is not an integer, ``solutions`` or ``quiet`` not ``True``/``False``,
            ``test_timeout`` not a number.
    """
    solutions, quiet = boolean("solutions", solutions), boolean("quiet", quiet)
    report = run_checks(step, solutions=solutions, file=file, test_timeout=test_timeout)
    if not quiet:
        print(report.format())
    if not solutions and report.target.resolve() == exercise_file(report.step).resolve():
        from .progress import record_check

        record_check(report)
    return report
