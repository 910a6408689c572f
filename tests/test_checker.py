"""The exercise checker against learner files that loop, exit or touch files.

The checks run on a small synthetic step (no torch: each run starts in about a second) in a
copy of the course's test plumbing, so that nothing a test learner does can reach this checkout.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest

from course_lib.checker import FAILED, PASSED, check, run_checks

ROOT = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="per-check timeout is POSIX only")

TESTS = '''
import pytest

@pytest.mark.exercise("add")
def test_add(ex):
    assert ex.add(1, 2) == 3, "add(1, 2) should be 3"

@pytest.mark.exercise("loop_a")
@pytest.mark.parametrize("i", range(3))
def test_loop_a(ex, i):
    assert ex.loop_a(i) == i

@pytest.mark.exercise("loop_b")
@pytest.mark.parametrize("i", range(3))
def test_loop_b(ex, i):
    assert ex.loop_b(i) == i

@pytest.mark.exercise("last")
def test_last(ex):
    assert ex.last() == "ok"
'''

GOOD = '''
def add(a, b):
    return a + b

def loop_a(i):
    return i

def loop_b(i):
    return i

def last():
    return "ok"
'''

LOOP = "def {name}(i):\n    while True:\n        try:\n            pass\n        except Exception:\n            pass\n"


@pytest.fixture
def course(tmp_path):
    """A course folder with the real checker plumbing and the synthetic step 7."""
    root = tmp_path / "course"
    (root / "tests" / "exercises").mkdir(parents=True)
    (root / "notebooks").mkdir()
    (root / "exercises").mkdir()
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\nmarkers = ["exercise(name): x"]\n')
    shutil.copy(ROOT / "conftest.py", root / "conftest.py")
    shutil.copy(ROOT / "tests" / "exercises" / "conftest.py", root / "tests" / "exercises" / "conftest.py")
    (root / "tests" / "exercises" / "test_step07.py").write_text(TESTS)
    return root


def learner(course: Path, source: str) -> Path:
    path = course.parent / "mine" / "step07.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if text in ln)


def test_the_synthetic_step_passes_when_solved(course):
    report = run_checks(7, file=learner(course, GOOD), root=course)
    assert report.all_passed, report.format()
    assert [(e.name, e.checks) for e in report.exercises] == [("add", 1), ("loop_a", 3), ("loop_b", 3), ("last", 1)]


@posix_only
def test_a_loop_costs_one_timeout_per_exercise_and_names_its_line(course):
    mine = learner(course, GOOD + LOOP.format(name="loop_a") + LOOP.format(name="loop_b"))
    start = time.perf_counter()
    report = run_checks(7, file=mine, root=course, test_timeout=1)
    took = time.perf_counter() - start
    res = {e.name: e for e in report.exercises}
    assert not report.error, report.error
    loops = [i for i, ln in enumerate(mine.read_text().splitlines(), 1) if "while True" in ln]
    for name, line in zip(("loop_a", "loop_b"), loops):
        assert res[name].status == FAILED and res[name].skipped_checks == 2, report.format()
        assert "still running after 1 s" in res[name].message
        assert f"line {line}: `while True:`" in res[name].message
    assert res["add"].status == PASSED and res["last"].status == PASSED  # checks after the loops still run
    assert "(0 of 3 checks pass, 2 skipped)" in report.format()
    assert took < 30  # two timeouts of 1 s, not six (nor six of 30)


@posix_only
def test_the_overall_limit_keeps_the_results_so_far(course):
    mine = learner(course, GOOD + LOOP.format(name="loop_a"))
    report = run_checks(7, file=mine, root=course, test_timeout=120, timeout=10)
    res = {e.name: e for e in report.exercises}
    assert not report.error, report.error
    assert res["add"].status == PASSED
    assert res["loop_a"].status == FAILED and "time limit" in res["loop_a"].message
    assert res["loop_b"].status == "not run" and res["last"].status == "not run"
    text = report.format()
    assert "? loop_b  not run: time limit (10 s for the whole check)" in text, text
    assert "1 of 4 exercises passed, 1 failing, 2 not run." in text


@posix_only
def test_a_loop_at_import_is_reported_with_its_line(course):
    mine = learner(course, GOOD + "\ncount = 0\nwhile True:\n    count += 1\n")
    start = time.perf_counter()
    report = run_checks(7, file=mine, root=course, test_timeout=1, timeout=60)
    assert time.perf_counter() - start < 30
    assert "still running after 1 s" in report.error, report.format()
    assert f"line {line_of(mine, 'while True')}: `while True:`" in report.error
    assert "top level" in report.error  # the fix


@pytest.mark.parametrize("call", ["sys.exit('done')", "sys.exit()", "os._exit(0)", "os._exit(3)"])
def test_exiting_at_import_is_named(course, call):
    mine = learner(course, "import os, sys\n" + GOOD + f"\n{call}\n")
    report = run_checks(7, file=mine, root=course)
    want = f"your file exits when imported (line {line_of(mine, call)}: `{call}`)"
    assert want in report.error, report.format()


@pytest.mark.parametrize("call", ["sys.exit(1)", "os._exit(1)"])
def test_exiting_inside_an_exercise_fails_that_exercise_only(course, call):
    mine = learner(course, "import os, sys\n" + GOOD + f"\ndef loop_b(i):\n    {call}\n")
    report = run_checks(7, file=mine, root=course)
    res = {e.name: e for e in report.exercises}
    assert not report.error, report.format()
    assert res["loop_b"].status == FAILED
    assert "your code exits the process" in res["loop_b"].message
    assert f"line {line_of(mine, call)}" in res["loop_b"].message
    assert res["add"].status == res["loop_a"].status == res["last"].status == PASSED


def test_relative_paths_land_in_a_temporary_folder(course):
    """Run from the course folder, the learner's relative deletes would hit its files."""
    (course / "victim.txt").write_text("keep me")
    (course.parent / "mine").mkdir()
    (course.parent / "mine" / "victim.txt").write_text("keep me too")
    mine = learner(course, GOOD + '''
import os
from pathlib import Path

def last():
    seen = sorted(os.listdir("."))
    Path("victim.txt").unlink(missing_ok=True)
    Path("made-by-learner.txt").write_text("x")
    return "ok" if seen == [] else f"the working folder was not empty: {seen}"
''')
    report = run_checks(7, file=mine, root=course)
    assert report.all_passed, report.format()
    assert (course / "victim.txt").read_text() == "keep me"
    assert (mine.parent / "victim.txt").read_text() == "keep me too"
    assert not list(course.parent.rglob("made-by-learner.txt"))


@pytest.mark.parametrize("kind", ["folder", "missing", "not python"])
def test_a_file_argument_that_is_not_a_python_file_is_a_clear_error(course, tmp_path, kind):
    target = {"folder": tmp_path, "missing": tmp_path / "step07.py", "not python": tmp_path / "notes.txt"}[kind]
    if kind == "not python":
        target.write_text("notes")
    with pytest.raises(ValueError, match=r"^file '.*' (is a folder|does not exist|is not a Python file)"):
        check(7, file=target)
