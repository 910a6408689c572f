"""Fixtures for the exercise tests: ``ex`` is the module under test.

By default that is ``solutions/stepNN.py`` (so a plain ``pytest`` checks the reference
solutions); ``course check`` passes ``--exercise-file`` to check a learner's file instead.
"""

from __future__ import annotations

import importlib.util
import json
import sys
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


def _message(excinfo) -> str:
    if excinfo is None:
        return ""
    err = excinfo.value
    text = str(err) if isinstance(err, AssertionError) else f"{type(err).__name__}: {err}"
    # Keep our explanation, drop pytest's re-rendering of the assert expression.
    text = text.split("\nassert ")[0].strip()
    return text[:1500]


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
            "message": _message(excinfo),
        })


def pytest_sessionfinish(session):
    path = session.config.getoption("--exercise-report")
    if path:
        Path(path).write_text(json.dumps({
            "tests": _results,
            "import_error": next(iter(_import_errors.values()), ""),
        }, indent=1))
