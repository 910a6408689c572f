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
* ``not started`` — the function still raises ``NotImplementedError``.

It never raises for a failing exercise, so a notebook keeps running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .paths import course_root

__all__ = ["ExerciseResult", "CheckReport", "check", "run_checks", "exercise_file"]

PASSED, FAILED, NOT_STARTED = "passed", "failed", "not started"


@dataclass
class ExerciseResult:
    name: str
    status: str  # passed | failed | not started
    checks: int = 0
    passed_checks: int = 0
    message: str = ""


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
        out = {PASSED: 0, FAILED: 0, NOT_STARTED: 0}
        for e in self.exercises:
            out[e.status] += 1
        return out

    def format(self) -> str:
        lines = [f"Step {self.step} exercises — checking {self.target}"]
        if self.error:
            lines.append(f"  could not run the checks: {self.error}")
            return "\n".join(lines)
        width = max((len(e.name) for e in self.exercises), default=10)
        marks = {PASSED: "✔", FAILED: "✘", NOT_STARTED: "·"}
        for e in self.exercises:
            line = f"  {marks[e.status]} {e.name:<{width}}  {e.status}"
            if e.status == PASSED:
                line += f" ({e.checks} check{'s' if e.checks != 1 else ''})"
            elif e.status == FAILED:
                line += f" ({e.passed_checks} of {e.checks} checks pass)"
            lines.append(line)
            if e.status == FAILED and e.message:
                lines.extend("      " + m for m in e.message.splitlines())
        lines.append(self._summary() + ".")
        return "\n".join(lines)

    def _summary(self) -> str:
        c = self.counts
        return (f"{c[PASSED]} of {len(self.exercises)} exercises passed"
                + (f", {c[NOT_STARTED]} not started" if c[NOT_STARTED] else "")
                + (f", {c[FAILED]} failing" if c[FAILED] else ""))

    def __repr__(self) -> str:
        # one line: check() has already printed the full report, and a notebook shows this again
        state = f"could not run: {self.error.splitlines()[0]}" if self.error else self._summary()
        return f"<CheckReport step {self.step}: {state}>"


def exercise_file(step: int, solutions: bool = False, root: Path | None = None) -> Path:
    """Path of step ``step``'s exercise file (or its solution)."""
    root = course_root() if root is None else root
    return root / ("solutions" if solutions else "exercises") / f"step{int(step):02d}.py"


def _test_file(step: int, root: Path) -> Path:
    return root / "tests" / "exercises" / f"test_step{int(step):02d}.py"


def _validate_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        try:
            step = int(step)
        except (TypeError, ValueError):
            raise TypeError(f"step must be a step number 1-9, got {step!r}") from None
    if not 1 <= step <= 9:
        raise ValueError(f"step must be between 1 and 9, got {step}")
    return step


def run_checks(step: int, *, solutions: bool = False, file: str | os.PathLike | None = None,
               root: Path | None = None, timeout: float = 300, test_timeout: float = 30) -> CheckReport:
    """Run step ``step``'s exercise tests against a file and collect one result per exercise.

    Args:
        step: 1-9.
        solutions: check ``solutions/stepNN.py`` instead of ``exercises/stepNN.py``.
        file: check this file instead of either.
        root: the course folder (found automatically).
        timeout: seconds before the whole check run is abandoned.
        test_timeout: seconds before one check is stopped and reported as failed (the line
            it was running is named: usually a loop that never ends). POSIX only.
    """
    step = _validate_step(step)
    root = course_root() if root is None else Path(root)
    target = Path(file).resolve() if file is not None else exercise_file(step, solutions, root)
    report = CheckReport(step, target)
    tests = _test_file(step, root)
    if not tests.is_file():
        report.error = f"step {step} has no exercise tests yet ({tests} is missing)"
        return report
    if not target.is_file():
        report.error = f"{target} does not exist"
        return report
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
               "-p", "no:randomly", "-o", "addopts=", "--no-header", "--tb=no",
               f"--exercise-file={target}", f"--exercise-report={out}", f"--exercise-timeout={test_timeout}"]
        # No third-party pytest plugins: the checks need none, and skipping their start-up halves the wait.
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        env.setdefault("COURSE_PROFILE", "tiny")
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            report.error = f"the checks took longer than {timeout:.0f} s (an infinite loop?)"
            return report
        if not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            report.error = f"pytest did not produce a report (exit {proc.returncode}):\n{tail}"
            return report
        raw = json.loads(out.read_text())
    if raw.get("import_error"):
        report.error = raw["import_error"]
        return report
    by_name: dict[str, ExerciseResult] = {}
    for test in raw["tests"]:
        res = by_name.setdefault(test["exercise"], ExerciseResult(test["exercise"], PASSED))
        res.checks += 1
        if test["outcome"] == "passed":
            res.passed_checks += 1
        elif test["not_implemented"]:
            if res.status == PASSED:
                res.status = NOT_STARTED
        else:
            res.status = FAILED
            if not res.message:
                res.message = f"[{test['name']}] {test['message']}".strip()
    for res in by_name.values():
        # Partly written: some checks fail with NotImplementedError, some pass.
        if res.status == NOT_STARTED and res.passed_checks:
            res.status = FAILED
            res.message = res.message or "part of it still raises NotImplementedError"
    report.exercises = list(by_name.values())
    return report


def check(step: int, *, solutions: bool = False, file: str | os.PathLike | None = None,
          quiet: bool = False) -> CheckReport:
    """Check step ``step``'s exercises and print the report (the notebooks' Ha cell).

    Never raises for failing exercises; returns the :class:`CheckReport`.
    """
    report = run_checks(step, solutions=solutions, file=file)
    if not quiet:
        print(report.format())
    return report
