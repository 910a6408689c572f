"""Fixtures for the exercise tests: ``ex`` is the module under test.

By default that is ``solutions/stepNN.py`` (so a plain ``pytest`` checks the reference
solutions); ``course check`` passes ``--exercise-file`` to check a learner's file instead.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import sys
import threading
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_results: list[dict] = []
_import_errors: dict[str, str] = {}


def _load(path: Path):
    name = f"_course_exercise_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ex(request):
    """The exercise module for this test file's step (``test_step01.py`` -> ``step01.py``)."""
    step = Path(request.module.__file__).stem.removeprefix("test_")
    given = request.config.getoption("--exercise-file")
    path = Path(given).resolve() if given else ROOT / "solutions" / f"{step}.py"
    try:
        return _load(path)
    except Exception as err:  # a learner's syntax error must read as such, not as a crash
        tb = traceback.format_exception_only(type(err), err)
        _import_errors[str(path)] = f"{path.name} could not be imported: {''.join(tb).strip()}"
        pytest.fail(_import_errors[str(path)], pytrace=False)


def _where_in_learner_file(excinfo, path: str | None) -> str:
    """' (your step01.py, line 12: `return x[i]`)' for the deepest frame in the checked file."""
    if not path:
        return ""
    for entry in reversed(excinfo.traceback):
        if str(entry.path) == path:
            try:
                code = str(entry.statement).strip().splitlines()[0]
            except Exception:  # noqa: BLE001 - the location alone is still useful
                code = ""
            return f" (in your {Path(path).name}, line {entry.lineno + 1}" + (f": `{code}`)" if code else ")")
    return ""


def _message(excinfo, checked_file: str | None = None) -> str:
    if excinfo is None:
        return ""
    err = excinfo.value
    if isinstance(err, AssertionError):
        text = str(err)
    elif type(err).__name__ == "Failed" and "DID NOT RAISE" in str(err):
        text = f"expected an error ({str(err).split('DID NOT RAISE')[-1].strip()}) for bad input, but nothing was raised"
    else:
        text = f"{type(err).__name__}: {err}{_where_in_learner_file(excinfo, checked_file)}"
    # Keep our explanation, drop pytest's re-rendering of the assert expression.
    text = text.split("\nassert ")[0].strip()
    return text[:1500]


def _checked_file(item) -> str | None:
    given = item.config.getoption("--exercise-file")
    step = Path(str(item.path)).stem.removeprefix("test_")
    path = Path(given).resolve() if given else ROOT / "solutions" / f"{step}.py"
    return str(path)


class ExerciseTimeout(Exception):
    """An exercise test ran past ``--exercise-timeout`` (usually a loop that never ends)."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """With ``--exercise-timeout``, interrupt a test that runs too long, so that one endless loop
    costs one failed check (with the line it was stuck on) instead of the whole report.
    POSIX only (a timer signal); elsewhere ``course check``'s overall timeout still applies."""
    seconds = item.config.getoption("--exercise-timeout")
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise ExerciseTimeout(f"still running after {seconds:g} s: is there a loop that never ends?")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and rep.failed):
        marker = item.get_closest_marker("exercise")
        exercise = marker.args[0] if marker else item.name.removeprefix("test_")
        excinfo = call.excinfo
        _results.append({
            "name": item.name,
            "exercise": exercise,
            "outcome": rep.outcome,
            "not_implemented": bool(excinfo is not None and excinfo.errisinstance(NotImplementedError)),
            "message": _message(excinfo, _checked_file(item)),
        })


def pytest_sessionfinish(session):
    path = session.config.getoption("--exercise-report")
    if path:
        Path(path).write_text(json.dumps({
            "tests": _results,
            "import_error": next(iter(_import_errors.values()), ""),
        }, indent=1))
