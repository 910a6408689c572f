"""Test-session settings shared by the unit tests, the exercise tests and the notebooks.

* Every run uses the ``tiny`` profile unless ``COURSE_TEST_PROFILE`` says otherwise, so a
  learner who exported ``COURSE_PROFILE=gpu`` does not start hour-long notebook runs.
* ``--exercise-file`` / ``--exercise-report`` are the options ``course check`` passes to the
  exercise tests (see ``course_lib/checker.py``).
* At the end, the time each notebook took is reported against its two-minute budget.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

os.environ["COURSE_PROFILE"] = os.environ.get("COURSE_TEST_PROFILE", "tiny")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_MININTERVAL", "5")

NOTEBOOK_BUDGET_S = 120.0
_nb_times: dict[str, float] = defaultdict(float)
_nb_failed: dict[str, int] = defaultdict(int)


def pytest_addoption(parser):
    group = parser.getgroup("course exercises")
    group.addoption("--exercise-file", default=None,
                    help="check this exercise file instead of solutions/stepNN.py")
    group.addoption("--exercise-report", default=None,
                    help="write a JSON report of exercise results here (used by `course check`)")
    group.addoption("--exercise-timeout", default=None, type=float,
                    help="fail an exercise test that runs longer than this many seconds (POSIX only)")


def pytest_runtest_makereport(item, call):
    if call.when == "call" and str(item.path).endswith(".ipynb"):
        name = Path(str(item.path)).name
        _nb_times[name] += call.duration
        if call.excinfo is not None:
            _nb_failed[name] += 1


def pytest_terminal_summary(terminalreporter):
    if not _nb_times:
        return
    tr = terminalreporter
    tr.section("notebook times (tiny profile budget: 120 s each)")
    for name, seconds in sorted(_nb_times.items()):
        flag = "FAIL" if _nb_failed[name] else ("OK  " if seconds <= NOTEBOOK_BUDGET_S else "SLOW")
        failed = f"  ({_nb_failed[name]} cell(s) failed)" if _nb_failed[name] else ""
        tr.write_line(f"{flag} {name:<45} {seconds:7.1f} s{failed}")
