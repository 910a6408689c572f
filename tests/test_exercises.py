"""Both sides of every step's exercises: the solutions pass every check, the untouched stubs none.

This runs the same checker a learner runs (`course check N`), in a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from course_lib.checker import FAILED, NOT_STARTED, PASSED, run_checks

ROOT = Path(__file__).resolve().parents[1]
STEPS = sorted(int(p.stem[-2:]) for p in (ROOT / "tests" / "exercises").glob("test_step[0-9][0-9].py"))


def test_every_step_with_exercises_has_stub_and_solution():
    assert STEPS, "no exercise tests found"
    for step in STEPS:
        assert (ROOT / "exercises" / f"step{step:02d}.py").is_file()
        assert (ROOT / "solutions" / f"step{step:02d}.py").is_file()


@pytest.mark.parametrize("step", STEPS)
def test_solutions_pass_everything(step):
    report = run_checks(step, solutions=True, root=ROOT)
    assert not report.error, report.error
    assert report.exercises, f"step {step}: no exercises were checked"
    assert report.all_passed, report.format()
    n = len(report.exercises)
    assert repr(report) == f"<CheckReport step {step}: {n} of {n} exercises passed>"  # one line in a notebook


@pytest.mark.parametrize("step", STEPS)
def test_untouched_stubs_fail_everything(step):
    report = run_checks(step, solutions=False, root=ROOT)
    assert not report.error, report.error
    statuses = {e.name: e.status for e in report.exercises}
    assert statuses and all(s in (NOT_STARTED, FAILED) for s in statuses.values()), report.format()
    assert all(s == NOT_STARTED for s in statuses.values()), \
        f"untouched stubs should read as 'not started':\n{report.format()}"
    assert PASSED not in statuses.values()


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="per-check timeout is POSIX only")
def test_an_endless_loop_fails_one_check_and_names_its_line(tmp_path):
    mine = tmp_path / "step01.py"
    mine.write_text((ROOT / "solutions" / "step01.py").read_text()
                    + "\n\ndef bigram_counts(tokens):\n    while True:\n        pass\n")
    report = run_checks(1, file=mine, root=ROOT, test_timeout=1)
    assert not report.error, report.error
    statuses = {e.name: e for e in report.exercises}
    assert statuses["bigram_counts"].status == FAILED
    message = statuses["bigram_counts"].message
    assert "still running after 1 s" in message and "line" in message and "while True" in message, message
    assert statuses["count_parameters"].status == PASSED  # the other exercises are still checked
