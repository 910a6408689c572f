"""Fixtures for the exercise tests: ``ex`` is the module under test.

By default that is ``solutions/stepNN.py`` (so a plain ``pytest`` checks the reference
solutions); ``course check`` passes ``--exercise-file`` to check a learner's file instead.

With ``--exercise-report`` this plugin writes one JSON object per line as the run goes
(``collected``, ``start``, ``test``, ``import_error``, ``finished``), so ``course check``
keeps every result even when it has to stop the run. With ``--exercise-timeout`` a check,
and the import of the learner's file, is interrupted after that many seconds (POSIX only);
the exercise's remaining checks are then skipped for the same reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_MAIN_PID = os.getpid()
_import_errors: dict[str, str] = {}
_timed_out: dict[str, str] = {}  # exercise -> why its remaining checks are skipped


class ExerciseTimeout(BaseException):
    """A check ran past ``--exercise-timeout`` (usually a loop that never ends).

    A ``BaseException``, so a learner's ``except Exception:`` inside the loop cannot swallow it."""


# --------------------------------------------------------------------------- #
# The incremental report
# --------------------------------------------------------------------------- #
def _emit(config, **event) -> None:
    path = config.getoption("--exercise-report")
    if path:
        with open(path, "a", encoding="utf-8") as fh:  # one short line per write: a kill loses at most it
            fh.write(json.dumps(event) + "\n")


def _exercise_of(item) -> str:
    marker = item.get_closest_marker("exercise")
    return marker.args[0] if marker else item.name.removeprefix("test_")


def pytest_collection_finish(session):
    _emit(session.config, collected=[{"name": i.name, "exercise": _exercise_of(i)} for i in session.items])


def pytest_sessionfinish(session):
    _emit(session.config, finished=True)


# --------------------------------------------------------------------------- #
# Guards: a time limit, and exits that would end the checker's process
# --------------------------------------------------------------------------- #
def _timeout_of(config) -> float | None:
    seconds = config.getoption("--exercise-timeout")
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return None
    return seconds


@contextmanager
def _guarded(seconds: float | None):
    """Raise :class:`ExerciseTimeout` after ``seconds`` (and every second after, in case the
    learner's code catches it), and turn ``os._exit`` in this process into ``SystemExit``."""
    real_exit = os._exit

    def _exit(code):
        if os.getpid() != _MAIN_PID:  # a forked child (a DataLoader worker) must really exit
            real_exit(code)
        raise SystemExit(code)

    def _raise(signum, frame):
        raise ExerciseTimeout(f"still running after {seconds:g} s: is there a loop that never ends?")

    os._exit = _exit
    previous = signal.signal(signal.SIGALRM, _raise) if seconds else None
    if seconds:
        signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        if seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        os._exit = real_exit


def _learner_line(tb, path: Path) -> str:
    """'line 12: `while True:`' for the deepest frame of ``tb`` in ``path`` ('' if none)."""
    frames = [f for f in traceback.extract_tb(tb) if Path(f.filename) == path]
    if not frames:
        return ""
    f = frames[-1]
    return f"line {f.lineno}" + (f": `{f.line.strip()}`" if f.line and f.line.strip() else "")


def _load(path: Path, seconds: float | None):
    name = f"_course_exercise_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    with _guarded(seconds):
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ex(request):
    """The exercise module for this test file's step (``test_step01.py`` -> ``step01.py``)."""
    step = Path(request.module.__file__).stem.removeprefix("test_")
    given = request.config.getoption("--exercise-file")
    path = Path(given).resolve() if given else ROOT / "solutions" / f"{step}.py"
    _emit(request.config, importing=str(path))
    try:
        module = _load(path, _timeout_of(request.config))
    except SystemExit as err:
        where = _learner_line(err.__traceback__, path)
        message = (f"your file exits when imported ({where or 'sys.exit or os._exit'}): nothing can be checked. "
                   f"Remove that call, or put script code under `if __name__ == \"__main__\":`")
    except ExerciseTimeout as err:
        where = _learner_line(err.__traceback__, path)
        message = (f"importing {path.name} was {err}" + (f" (at {where})" if where else "")
                   + ". Code at the top level of the file runs on import: move it into a function")
    except Exception as err:  # a learner's syntax error must read as such, not as a crash
        tb = traceback.format_exception_only(type(err), err)
        message = f"{path.name} could not be imported: {''.join(tb).strip()}"
    else:
        _emit(request.config, imported=str(path))
        return module
    _import_errors[str(path)] = message
    _emit(request.config, import_error=message)
    pytest.fail(message, pytrace=False)


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
    elif isinstance(err, ExerciseTimeout):
        text = f"stopped: {err}{_where_in_learner_file(excinfo, checked_file)}"
    elif isinstance(err, SystemExit):
        text = (f"your code exits the process (sys.exit or os._exit){_where_in_learner_file(excinfo, checked_file)}: "
                "return a value or raise an error instead")
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


def pytest_runtest_setup(item):
    reason = _timed_out.get(_exercise_of(item))
    if reason:
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Run one check under :func:`_guarded`, so that one endless loop costs one failed check
    (naming the line it was stuck on) and the exercise's other checks are skipped."""
    _emit(item.config, start=item.name)
    with _guarded(_timeout_of(item.config)):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        exercise = _exercise_of(item)
        excinfo = call.excinfo
        if rep.skipped:
            message = _timed_out.get(exercise, "skipped")
        else:
            message = _message(excinfo, _checked_file(item))
        if excinfo is not None and excinfo.errisinstance(ExerciseTimeout) and exercise not in _timed_out:
            _timed_out[exercise] = f"skipped: an earlier check of {exercise} was {excinfo.value}"
        _emit(item.config, test={
            "name": item.name,
            "exercise": exercise,
            "outcome": rep.outcome,
            "not_implemented": bool(excinfo is not None and excinfo.errisinstance(NotImplementedError)),
            "timed_out": bool(excinfo is not None and excinfo.errisinstance(ExerciseTimeout)),
            "message": message,
        })
