"""Test-session settings shared by the unit tests, the exercise tests and the notebooks.

* Every run uses the ``tiny`` profile unless ``COURSE_TEST_PROFILE`` says otherwise, so a
  learner who exported ``COURSE_PROFILE=gpu`` does not start hour-long notebook runs.
* ``--exercise-file`` / ``--exercise-report`` are the options ``course check`` passes to the
  exercise tests (see ``course_lib/checker.py``).
* At the end, the time each notebook took is reported against its 60-second budget.
* Before the tests, the tiny base model that steps 6 onwards start from is pretrained (or read
  from its cache) once, when a test that needs it was collected: a learner pays that once, and
  it would otherwise be timed inside notebook 06.
* Tests and the notebook kernels they start use one CPU thread (``OMP_NUM_THREADS=1`` unless
  set): test machines are often shared, and torch's threads fighting over two busy cores
  made one training step 8x slower. ``OMP_NUM_THREADS=2 pytest`` measures a quiet machine.
* Property tests (hypothesis) draw new random examples on every local run (profile ``dev``)
  but the same examples on every CI run (profile ``ci``, chosen when the environment
  variable ``CI`` is set to anything but ``false``/``0``, as CI services do), so CI never
  fails on a new draw. ``HYPOTHESIS_PROFILE=ci`` or ``=dev`` chooses one by hand. A failure prints a
  ``@reproduce_failure`` blob: paste it above the test to replay the example.
* Progress (``course check``, the notebooks' Ri cells; see ``course_lib/progress.py``) is recorded in
  a temporary file of this test session (``COURSE_PROGRESS_FILE``), removed at the end, never in the
  learner's own record; notebook kernels and ``course`` subprocesses inherit it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ["COURSE_PROFILE"] = os.environ.get("COURSE_TEST_PROFILE", "tiny")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_MININTERVAL", "5")
os.environ.setdefault("OMP_NUM_THREADS", "1")
_PROGRESS_DIR = Path(tempfile.gettempdir()) / f"course-test-progress-{os.getpid()}"
os.environ["COURSE_PROGRESS_FILE"] = str(_PROGRESS_DIR / "progress.json")

NOTEBOOK_BUDGET_S = 60.0


def _hypothesis_profiles() -> None:
    try:
        from hypothesis import HealthCheck, settings
        from hypothesis.errors import InvalidArgument
    except ImportError:  # the dev extras are not installed: no property tests to set up
        return
    # Both from hypothesis's "default", not from whatever hypothesis loaded on import (it
    # loads its own "ci" profile when it sees CI variables).
    default = settings.get_profile("default")
    settings.register_profile("dev", default, print_blob=True)
    # Derandomized: the examples follow from each test's name, so every CI run draws the
    # same ones. No database (nothing to replay) and no timing checks (a loaded machine).
    settings.register_profile("ci", default, derandomize=True, print_blob=True, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow])
    in_ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    name = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if in_ci else "dev")
    try:
        settings.load_profile(name)
    except InvalidArgument:
        raise ValueError(f"HYPOTHESIS_PROFILE={name!r} is not a hypothesis profile: use 'ci' (the same "
                         f"examples every run) or 'dev' (new random examples)") from None


_hypothesis_profiles()

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


#: Notebooks and tests that start from the profile's base model (steps 6 onwards).
_NEEDS_BASE_MODEL = ("06_", "07_", "09_", "test_cli_classify", "test_cli_instruct")   # step 8 pretrains its own


def pytest_collection_finish(session):
    """Pretrain (or read) the tiny base model once, before the first test that needs it, so that
    the first notebook of step 6 or later is not timed with the one-off pretraining in it."""
    if os.environ["COURSE_PROFILE"] != "tiny" or not any(
            Path(str(item.path)).name.startswith(_NEEDS_BASE_MODEL) for item in session.items):
        return
    import time

    from course_lib.base_model import load_base_model

    started = time.perf_counter()
    load_base_model("tiny", verbose=False)
    session.config._course_base_model_s = time.perf_counter() - started


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
    tr.section(f"notebook times (tiny profile budget: {NOTEBOOK_BUDGET_S:.0f} s each)")
    warm = getattr(tr.config, "_course_base_model_s", None)
    if warm is not None:
        tr.write_line(f"(the tiny base model was made or read once before the tests, in {warm:.1f} s)")
    for name, seconds in sorted(_nb_times.items()):
        flag = "FAIL" if _nb_failed[name] else ("OK  " if seconds <= NOTEBOOK_BUDGET_S else "SLOW")
        failed = f"  ({_nb_failed[name]} cell(s) failed)" if _nb_failed[name] else ""
        tr.write_line(f"{flag} {name:<45} {seconds:7.1f} s{failed}")


def pytest_unconfigure(config):
    shutil.rmtree(_PROGRESS_DIR, ignore_errors=True)
