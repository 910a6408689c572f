"""The learner's progress record (course_lib/progress.py) and `course progress`, with hand-computed expectations.

Every test writes to its own temporary file (``COURSE_PROGRESS_FILE``); `course check` runs on a small
synthetic course (no torch), found through ``COURSE_ROOT``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from course_lib import files, progress
from course_lib.checker import FAILED, NOT_RUN, NOT_STARTED, PASSED, CheckReport, ExerciseResult
from course_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]
T1, T2, T3 = "2025-03-01T10:00:00+00:00", "2025-03-02T10:00:00+00:00", "2025-03-03T10:00:00+00:00"


@pytest.fixture
def pfile(tmp_path, monkeypatch):
    path = tmp_path / "record" / "progress.json"
    monkeypatch.setenv("COURSE_PROGRESS_FILE", str(path))
    return path


@pytest.fixture
def clock(monkeypatch):
    """``progress._now`` returns ``clock.now`` (``T1`` until a test sets another)."""
    class Clock:
        now = T1

        def __call__(self):
            return self.now
    c = Clock()
    monkeypatch.setattr(progress, "_now", c)
    return c


def report(step, **statuses):
    return CheckReport(step, Path("exercises") / f"step{step:02d}.py",
                       [ExerciseResult(name, status) for name, status in statuses.items()])


def test_the_test_session_never_writes_the_learners_own_record():
    # conftest.py points every test, notebook kernel and `course` subprocess at a temporary file
    path = Path(os.environ["COURSE_PROGRESS_FILE"])
    assert path.is_relative_to(Path(tempfile.gettempdir())) and not path.is_relative_to(ROOT)


def test_default_path_is_in_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("COURSE_PROGRESS_FILE")
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "cache"))
    assert progress.progress_path() == tmp_path / "cache" / "progress.json"


def test_record_check_statuses_attempts_and_first_passed(pfile, clock):
    progress.record_check(report(2, a=PASSED, b=FAILED, c=NOT_STARTED, d=NOT_RUN))
    first = progress.load_progress()
    assert first["steps"]["2"]["exercises"] == {
        "a": {"status": "passed", "attempts": 1, "first_passed": T1, "last_checked": T1},
        "b": {"status": "failed", "attempts": 1, "first_passed": None, "last_checked": T1},
        "c": {"status": "not started", "attempts": 0, "first_passed": None, "last_checked": T1},
        "d": {"status": "not run", "attempts": 0, "first_passed": None, "last_checked": T1}}
    # a later failure keeps first_passed; "not run" keeps the status recorded before it
    clock.now = T2
    progress.record_check(report(2, a=FAILED, b=PASSED, c=NOT_RUN, d=NOT_STARTED))
    ex = progress.load_progress()["steps"]["2"]["exercises"]
    assert ex["a"] == {"status": "failed", "attempts": 2, "first_passed": T1, "last_checked": T2}
    assert ex["b"] == {"status": "passed", "attempts": 2, "first_passed": T2, "last_checked": T2}
    assert ex["c"] == {"status": "not started", "attempts": 0, "first_passed": None, "last_checked": T2}
    assert ex["d"]["status"] == "not started"
    clock.now = T3
    progress.record_check(report(2, a=PASSED))  # passed again: first_passed is still the first time
    ex = progress.load_progress()["steps"]["2"]["exercises"]
    assert ex["a"] == {"status": "passed", "attempts": 3, "first_passed": T1, "last_checked": T3}
    assert ex["b"]["last_checked"] == T2  # not in this report: untouched
    assert json.loads(pfile.read_text())["format"] == "course-progress"


def test_a_report_that_could_not_run_records_nothing(pfile):
    broken = report(3, a=PASSED)
    broken.error = "SyntaxError in your file"
    assert progress.record_check(broken) is None and not pfile.exists()
    with pytest.raises(TypeError, match="report must be the CheckReport"):
        progress.record_check({"step": 3})


def test_ri_best_follows_the_direction_and_the_profile(pfile, clock, capsys):
    assert progress.record_ri(4, 1.0, metric="gain", higher_is_better=True, profile="tiny") is True
    assert "first score recorded" in capsys.readouterr().out
    assert progress.record_ri(4, 0.5, metric="gain", higher_is_better=True, profile="tiny") is False
    assert "your best is still 1" in capsys.readouterr().out
    clock.now = T3
    assert progress.record_ri(4, np.float32(2.5), metric="gain", higher_is_better=True, profile="tiny") is True
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "a new best (was 1)" in out
    assert progress.record_ri(4, -3.0, metric="gain", higher_is_better=True, profile="cpu") is True  # own record
    ri = progress.load_progress()["steps"]["4"]["ri"]
    assert ri["tiny"] == {"metric": "gain", "higher_is_better": True, "best": 2.5, "runs": 3, "last": 2.5,
                          "best_at": T3, "profile": "tiny"}
    assert ri["cpu"]["best"] == -3.0 and ri["cpu"]["runs"] == 1

    # lower is better
    for score, new in ((3.0, True), (2.0, True), (2.5, False), (np.array(1.5), True)):
        assert progress.record_ri(5, score, metric="loss", higher_is_better=False, profile="tiny") is new
    assert progress.load_progress()["steps"]["5"]["ri"]["tiny"]["best"] == 1.5
    # another metric starts the profile's record anew, and says so
    assert progress.record_ri(5, 9.0, metric="other", higher_is_better=False, profile="tiny") is True
    assert "replaces the record of another metric (loss, best 1.5)" in capsys.readouterr().out


def test_ri_profile_defaults_to_course_profile(pfile, monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "gpu")
    progress.record_ri(1, 50, metric="plan score", higher_is_better=True)
    assert list(progress.load_progress()["steps"]["1"]["ri"]) == ["gpu"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(score=float("nan")), ValueError, "score must be a finite number"),
    (dict(score=float("inf")), ValueError, "score must be a finite number"),
    (dict(score="3.5"), TypeError, "score must be a number"),
    (dict(score=True), TypeError, "score must be a number"),
    (dict(step=0), ValueError, "step must be at least 1"),
    (dict(step=10), ValueError, "step must be between 1 and 9"),
    (dict(higher_is_better="yes"), TypeError, "higher_is_better must be True or False"),
    (dict(metric=" "), ValueError, "metric must name"),
    (dict(profile=""), ValueError, "profile must be"),
])
def test_record_ri_bad_arguments_name_the_argument(pfile, kwargs, error, match):
    args = dict(step=2, score=1.0, metric="m", higher_is_better=True, profile="tiny") | kwargs
    step, score = args.pop("step"), args.pop("score")
    with pytest.raises(error, match=match):
        progress.record_ri(step, score, **args)
    assert not pfile.exists()


@pytest.mark.parametrize("content", [b'{"format": "course-progress", "vers', b'{"format": "other", "version": 1}',
                                     b"\xff\xfe\x00binary", b'{"format": "course-progress", "version": 1, '
                                     b'"learner": "a", "updated": "2025-01-01T00:00:00", "steps": {"1": '
                                     b'{"ri": {"tiny": {"best": NaN}}}}}'])
def test_a_damaged_file_is_moved_aside_not_overwritten(pfile, capsys, content):
    pfile.parent.mkdir(parents=True)
    pfile.write_bytes(content)
    assert progress.record_ri(6, 0.5, metric="m", higher_is_better=True, profile="tiny") is True
    aside = list(pfile.parent.glob("progress.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert re.fullmatch(r"progress\.json\.damaged-\d{8}T\d{6}Z", aside[0].name)
    assert "was damaged" in capsys.readouterr().err
    assert progress.load_progress()["steps"]["6"]["ri"]["tiny"]["best"] == 0.5  # a new record started


def test_a_newer_version_is_left_alone(pfile, capsys):
    pfile.parent.mkdir(parents=True)
    newer = b'{"format": "course-progress", "version": 2, "learner": "a"}'
    pfile.write_bytes(newer)
    with pytest.raises(progress.ProgressFileError, match="newer"):
        progress.load_progress()
    assert progress.record_ri(6, 0.5, metric="m", higher_is_better=True, profile="tiny") is False
    assert "progress not recorded" in capsys.readouterr().err
    assert pfile.read_bytes() == newer
    assert sorted(p.name for p in pfile.parent.iterdir()) == [".progress.json.lock", "progress.json"]  # none aside
    assert main(["progress"]) == 2
    assert capsys.readouterr().err.startswith("error: the progress file")


def test_a_write_that_fails_half_way_keeps_the_old_file(pfile, monkeypatch, capsys):
    progress.record_ri(7, 0.3, metric="rouge", higher_is_better=True, profile="tiny")
    before = pfile.read_bytes()

    def half_then_full_disk(self, data):
        self._fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files._WriteRecorder, "write", half_then_full_disk)
    progress.record_ri(7, 0.9, metric="rouge", higher_is_better=True, profile="tiny")  # never raises
    assert "progress not recorded" in capsys.readouterr().err
    assert pfile.read_bytes() == before
    # no temporary file left (the lock file of files.locked stays, empty)
    assert sorted(p.name for p in pfile.parent.iterdir()) == [".progress.json.lock", "progress.json"]


def test_two_writers_at_once_both_count(pfile, monkeypatch):
    """A notebook's Ri cell and ``course check`` (here: two threads, each its own lock file handle,
    as two processes have) recording at the same moment: every change is kept. Without the lock,
    each read the old file while the other was saving, and one change of each pair was lost."""
    import threading
    import time

    plain = progress.save_progress

    def slow_save(data, path=None):         # widen the window between reading and renaming
        time.sleep(0.01)
        return plain(data, path)
    monkeypatch.setattr(progress, "save_progress", slow_save)
    go = threading.Barrier(2)

    def writer(profile):
        go.wait(timeout=10)
        for i in range(8):
            progress.record_ri(4, float(i), metric="loss", higher_is_better=False, profile=profile)

    threads = [threading.Thread(target=writer, args=(p,)) for p in ("tiny", "cpu")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ri = progress.load_progress(pfile)["steps"]["4"]["ri"]
    assert {p: ri[p]["runs"] for p in ("tiny", "cpu")} == {"tiny": 8, "cpu": 8}


def test_a_lock_held_elsewhere_is_a_warning_naming_it(pfile, monkeypatch, capsys):
    progress.record_ri(2, 3.0, metric="m", higher_is_better=True, profile="tiny")
    before = pfile.read_bytes()
    from filelock import FileLock
    plain = files.locked
    monkeypatch.setattr(progress, "locked", lambda path: plain(path, timeout=0.2))
    with FileLock(pfile.with_name(".progress.json.lock")):       # another process holds it
        progress.record_ri(2, 4.0, metric="m", higher_is_better=True, profile="tiny")    # never raises
    err = capsys.readouterr().err
    assert "progress not recorded" in err and ".progress.json.lock" in err and "being written" in err
    assert pfile.read_bytes() == before


def test_a_progress_file_that_cannot_be_written_is_one_clear_warning(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("COURSE_PROGRESS_FILE", str(tmp_path / "afile" / "progress.json"))
    progress.record_ri(2, 3.0, metric="m", higher_is_better=True, profile="tiny")      # never raises
    err = capsys.readouterr().err
    assert "progress not recorded" in err and f"the folder {tmp_path / 'afile'} is a file" in err, err
    assert main(["progress", "--learner", "ada"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_learner_name_from_env_and_from_the_cli(pfile, monkeypatch, capsys):
    monkeypatch.setenv("COURSE_LEARNER", "ada")
    progress.record_ri(1, 10, metric="m", higher_is_better=True, profile="tiny")
    assert progress.load_progress()["learner"] == "ada"
    assert main(["progress", "--learner", "Ada Lovelace"]) == 0
    assert progress.load_progress()["learner"] == "Ada Lovelace"  # kept, whatever COURSE_LEARNER says
    assert "Progress of Ada Lovelace" in capsys.readouterr().out
    assert main(["progress", "--learner", "  "]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: learner must be a name")


def test_exercise_names_are_the_exercise_files_public_functions():
    # independent reference: the exercises the step's tests are marked with
    for step in range(1, 10):
        test_file = (ROOT / "tests" / "exercises" / f"test_step{step:02d}.py").read_text()
        assert set(progress.exercise_names(step)) == set(re.findall(r'exercise\("(\w+)"\)', test_file)), step
    assert progress.exercise_names(1) == ["count_parameters", "bigram_counts", "next_token_probs",
                                          "sample_with_temperature"]


def test_progress_table_and_next_action_by_hand():
    names = {s: [] for s in range(1, 10)} | {1: ["a", "b", "c"], 2: ["x"]}
    record = progress.new_progress("ada")
    record["steps"] = {"1": {"exercises": {
        "a": {"status": "passed", "attempts": 1, "first_passed": T1, "last_checked": T1},
        "b": {"status": "failed", "attempts": 2, "first_passed": None, "last_checked": T1},
        "old": {"status": "passed", "attempts": 1, "first_passed": T1, "last_checked": T1}}, "ri": {}}}
    rows = progress.progress_table(record, names)
    assert len(rows) == 9
    assert (rows[0]["passed"], rows[0]["failed"], rows[0]["not_started"]) == (["a"], ["b"], ["c"])
    assert progress.next_action(rows).startswith("step 1: make b pass")
    for name in "bc":
        record["steps"]["1"]["exercises"][name] = dict(record["steps"]["1"]["exercises"]["a"])
    rows = progress.progress_table(record, names)
    assert not rows[0]["complete"] and progress.next_action(rows).startswith("step 1: run the Ri challenge")
    record["steps"]["1"]["ri"] = {"cpu": {"metric": "m", "higher_is_better": True, "best": 1.0, "runs": 1,
                                          "last": 1.0, "best_at": T1, "profile": "cpu"}}
    rows = progress.progress_table(record, names)
    assert rows[0]["complete"] and rows[0]["ri"][0]["best"] == 1.0
    assert progress.next_action(rows).startswith("step 2: make x pass")
    record["steps"]["2"] = {"exercises": {"x": record["steps"]["1"]["exercises"]["a"]},
                            "ri": {"cpu": record["steps"]["1"]["ri"]["cpu"]}}
    assert progress.next_action(progress.progress_table(record, names)).startswith("step 3: run the Ri")
    done = {s: [] for s in range(1, 10)}
    record["steps"] = {str(s): {"exercises": {}, "ri": {"cpu": record["steps"]["1"]["ri"]["cpu"]}}
                       for s in range(1, 10)}
    assert progress.next_action(progress.progress_table(record, done)).startswith("all done")


def test_course_progress_table_and_json(pfile, capsys):
    assert main(["progress"]) == 0
    out = capsys.readouterr().out
    assert "nothing recorded yet" in out and not pfile.exists()  # reading writes nothing
    progress.record_check(report(1, count_parameters=PASSED, bigram_counts=FAILED))
    progress.record_ri(1, 87.5, metric="plan score", higher_is_better=True, profile="tiny")
    capsys.readouterr()
    assert main(["progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    step1 = next(line for line in lines if line.split()[:1] == ["1"])
    assert step1.split()[:4] == ["1", "1/4", "1", "2"] and "87.5 plan score (tiny)" in step1
    assert lines[-1].startswith("next: step 1: make bigram_counts pass")
    assert "stuck? `course hint 1 bigram_counts`" in lines[-1]

    assert main(["progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    names = printed.pop("exercise_names")
    assert printed == json.loads(pfile.read_text())
    assert names["1"] == progress.exercise_names(1) and set(names) == {str(s) for s in range(1, 10)}


# --------------------------------------------------------------------------- #
# `course check` records the learner's own file only (a synthetic course, no torch)
# --------------------------------------------------------------------------- #
TESTS = '''
import pytest

@pytest.mark.exercise("add")
def test_add(ex):
    assert ex.add(1, 2) == 3, "add(1, 2) should be 3"

@pytest.mark.exercise("sub")
def test_sub(ex):
    assert ex.sub(3, 1) == 2, "sub(3, 1) should be 2"
'''
SOLVED = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
MINE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    raise NotImplementedError\n\ndef helper():\n    pass\n"


@pytest.fixture
def course(tmp_path, monkeypatch):
    root = tmp_path / "course"
    for sub in ("tests/exercises", "notebooks", "exercises", "solutions"):
        (root / sub).mkdir(parents=True)
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\nmarkers = ["exercise(name): x"]\n')
    shutil.copy(ROOT / "conftest.py", root / "conftest.py")
    shutil.copy(ROOT / "tests" / "exercises" / "conftest.py", root / "tests" / "exercises" / "conftest.py")
    (root / "tests" / "exercises" / "test_step07.py").write_text(TESTS)
    (root / "exercises" / "step07.py").write_text(MINE)
    (root / "solutions" / "step07.py").write_text(SOLVED)
    monkeypatch.setenv("COURSE_ROOT", str(root))
    return root


def test_course_check_records_and_solutions_or_other_files_do_not(course, pfile, capsys):
    assert progress.exercise_names(7) == ["add", "sub"]  # the learner's helper is no exercise
    assert main(["check", "7"]) == 1
    out = capsys.readouterr().out
    assert "stuck? `course hint 7 sub` gives a hint" in out and "course hint 7 add" not in out
    ex = progress.load_progress()["steps"]["7"]["exercises"]
    assert (ex["add"]["status"], ex["add"]["attempts"]) == ("passed", 1)
    assert (ex["sub"]["status"], ex["sub"]["attempts"]) == ("not started", 0)
    before = pfile.read_bytes()
    assert main(["check", "7", "--solutions"]) == 0
    other = course.parent / "elsewhere.py"
    other.write_text(SOLVED)
    assert main(["check", "7", "--file", str(other)]) == 0
    assert pfile.read_bytes() == before
    assert main(["check", "7", "--file", str(course / "exercises" / "step07.py")]) == 1  # the learner's own file
    assert progress.load_progress()["steps"]["7"]["exercises"]["add"]["attempts"] == 2


def test_a_failed_exercise_ends_with_the_hint_pointer():
    r = report(3, merge_heads=FAILED)
    r.exercises[0].message = "expected [2, 4], got [4, 2]"
    lines = r.format().splitlines()
    assert lines[-2].strip() == "stuck? `course hint 3 merge_heads` gives a hint"


def test_progress_and_cohort_report_do_not_import_torch(pfile, tmp_path):
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "a.json").write_text(json.dumps(progress.new_progress("a")))
    code = ("import sys\nfrom course_lib.cli import main\n"
            f"assert main(['progress']) == 0\nassert main(['cohort', 'report', {str(tmp_path / 'cohort')!r}]) == 0\n"
            "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().endswith("NO-TORCH"), (r.stdout[-500:], r.stderr[-2000:])
