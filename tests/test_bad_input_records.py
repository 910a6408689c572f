"""Bad input to the learner's records and the tools that read them (progress, hints, cohort, checker): a clear
error naming the argument, never a deep traceback, a silently wrong result or a learner's file overwritten.

Every file lives in ``tmp_path`` (the progress file, the hints file, the home folder of a ``~`` path).
"""

from __future__ import annotations

import json
import warnings

import pytest

from course_lib import checker, cli, cohort, hints, progress

T1 = "2025-03-01T10:00:00+00:00"


@pytest.fixture(autouse=True)
def _own_files(tmp_path, monkeypatch):
    """The progress and hints files, the home folder and the working directory are all in ``tmp_path``."""
    monkeypatch.setenv("COURSE_PROGRESS_FILE", str(tmp_path / "record" / "progress.json"))
    monkeypatch.setenv("COURSE_HINTS_FILE", str(tmp_path / "record" / "hints_seen.json"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)


def record(**steps) -> dict:
    rec = progress.new_progress("ada")
    rec["updated"] = T1
    rec["steps"] = steps
    return rec


def failed(*names) -> dict:
    return {"exercises": {n: {"status": "failed", "attempts": 1, "first_passed": None, "last_checked": T1}
                          for n in names}, "ri": {}}


# --------------------------------------------------------------------------- #
# 1. hints: a ~ path, a folder, a path under a file, a newer file
# --------------------------------------------------------------------------- #
def test_a_tilde_hints_path_is_the_home_file_and_keeps_other_exercises(tmp_path):
    assert hints.next_hint(1, "bigram_counts", "~/h.json").level == 1
    assert hints.next_hint(1, "bigram_counts", "~/h.json").level == 2
    assert hints.next_hint(1, "count_parameters", "~/h.json").level == 1
    seen = json.loads((tmp_path / "home" / "h.json").read_text())["seen"]
    assert seen == {"1": {"bigram_counts": 2, "count_parameters": 1}}
    assert hints.revealed(1, "~/h.json")["bigram_counts"] == 2
    assert not (tmp_path / "~").exists()


def test_a_hints_path_that_is_a_folder_or_under_a_file_is_a_clear_error(tmp_path):
    with pytest.raises(IsADirectoryError, match="hints you have seen.*is a folder; give a file path"):
        hints.next_hint(1, "bigram_counts", tmp_path)
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(NotADirectoryError, match="notes is a file, not a folder"):
        hints.revealed(1, tmp_path / "notes" / "h.json")
    assert (tmp_path / "notes").read_text() == "mine"
    with pytest.raises(TypeError, match="path must be the file of revealed hints"):
        hints.revealed(1, 7)


def test_a_hints_file_of_a_newer_version_is_not_rewritten(tmp_path, capsys):
    path = tmp_path / "record" / "hints_seen.json"
    path.parent.mkdir()
    newer = json.dumps({"version": 99, "seen": {"1": {"bigram_counts": 1}}})
    path.write_text(newer)
    with pytest.raises(OSError, match="version 99.*newer course") as caught:  # `course hint` reports OSErrors
        hints.next_hint(1, "bigram_counts", path)
    assert type(caught.value).__name__ == "HintsFileError"
    with pytest.raises(OSError, match="newer course"):
        hints.revealed(1, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["hint", "1", "bigram_counts"]) == 1  # the environment's file: one error line
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "newer course" in err and err.count("\n") == 1
    assert path.read_text() == newer and sorted(p.name for p in path.parent.iterdir()) == ["hints_seen.json"]


# --------------------------------------------------------------------------- #
# 2. save_progress replaces only a progress record, and validates before changing the dict
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("content", [b"my notes, not a record", b'{"format": "course-progress", "version": 2}',
                                     b"\xff\xfe binary"])
def test_save_progress_keeps_a_file_that_is_not_a_record(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(progress.ProgressFileError, match="not a course progress record.*the file is kept"):
        progress.save_progress(progress.new_progress("bob"), path)
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["home", "notes.txt"]


def test_save_progress_still_replaces_a_record_and_fills_an_empty_file(tmp_path):
    path = tmp_path / "p.json"
    progress.save_progress(record(), path)
    progress.save_progress(progress.new_progress("bob"), path)
    assert progress.load_progress(path)["learner"] == "bob"
    (tmp_path / "empty.json").write_text("")
    progress.save_progress(record(), tmp_path / "empty.json")
    assert progress.load_progress(tmp_path / "empty.json")["learner"] == "ada"


def test_save_progress_validates_before_changing_the_record(tmp_path):
    bad = {"format": "other", "updated": "kept"}
    with pytest.raises(ValueError, match="progress is not a valid record"):
        progress.save_progress(bad, tmp_path / "p.json")
    assert bad == {"format": "other", "updated": "kept"} and not (tmp_path / "p.json").exists()
    with pytest.raises(TypeError, match="progress must be a progress record"):
        progress.save_progress([], tmp_path / "p.json")


# --------------------------------------------------------------------------- #
# 3. record_ri: the profile is one of tiny, cpu, gpu
# --------------------------------------------------------------------------- #
def test_record_ri_lower_cases_and_checks_the_profile(tmp_path, capsys):
    path = tmp_path / "p.json"
    progress.record_ri(1, 1.0, metric="m", higher_is_better=True, profile="Tiny", path=path)
    assert list(progress.load_progress(path)["steps"]["1"]["ri"]) == ["tiny"]
    before = path.read_bytes()
    with pytest.raises(ValueError, match="profile must be the profile's name \\(tiny, cpu, gpu\\).*'tnyy'"):
        progress.record_ri(1, 2.0, metric="m", higher_is_better=True, profile="tnyy", path=path)
    with pytest.raises(TypeError, match="profile must be the profile's name"):
        progress.record_ri(1, 2.0, metric="m", higher_is_better=True, profile=1, path=path)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- #
# 4. and 5. exercise_names and huge numbers are validated: damage, moved aside or skipped
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("names, says", [({"1": "bigram_counts"}, "not a list of names"),
                                         (["x"], "exercise_names is not an object"),
                                         ({"1": 7}, "not a list of names"), ({"12": []}, "unknown step")])
def test_bad_exercise_names_are_damage(tmp_path, names, says):
    rec = {**record(**{"1": failed("a")}), "exercise_names": names}
    assert says in progress.validate_progress(rec)
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "a.json").write_text(json.dumps(rec))
    (tmp_path / "cohort" / "b.json").write_text(json.dumps(record(**{"1": failed("b")})))
    found = cohort.read_cohort(tmp_path / "cohort")
    assert list(found.learners) == ["ada"] and found.skipped[0][0] == "a.json" and says in found.skipped[0][1]
    assert [e["name"] for e in cohort.summarize(found)["steps"]["1"]["exercises"]] == ["b"]


def test_good_exercise_names_are_kept(tmp_path):
    rec = {**record(**{"1": failed("a")}), "exercise_names": {"1": ["b", "a"], "2": []}}
    assert progress.validate_progress(rec) is None
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "a.json").write_text(json.dumps(rec))
    summary = cohort.summarize(cohort.read_cohort(tmp_path / "cohort"))
    assert [e["name"] for e in summary["steps"]["1"]["exercises"]] == ["b", "a"]


@pytest.mark.parametrize("field", ["best", "attempts"])
def test_a_huge_integer_in_a_progress_file_is_damage(tmp_path, capsys, field):
    rec = record(**{"1": failed("a")})
    rec["steps"]["1"]["ri"] = {"cpu": {"metric": "m", "higher_is_better": True, "best": 1, "runs": 1, "last": 1,
                                       "best_at": T1, "profile": "cpu"}}
    text = json.dumps(rec).replace(f'"{field}": 1', f'"{field}": 1{"0" * 400}')
    path = tmp_path / "record" / "progress.json"
    path.parent.mkdir()
    path.write_text(text)
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "a.json").write_text(text)
    assert cohort.read_cohort(tmp_path / "cohort").skipped[0][0] == "a.json"
    assert progress.load_progress(path)["steps"] == {}
    assert "was damaged" in capsys.readouterr().err
    assert [p.read_text() for p in path.parent.glob("progress.json.damaged-*")] == [text]
    path.write_text(text)
    assert progress.record_ri(1, 2.0, metric="m", higher_is_better=True, profile="cpu") is True
    assert progress.load_progress(path)["steps"]["1"]["ri"]["cpu"]["best"] == 2.0


# --------------------------------------------------------------------------- #
# 6. new_progress: None is the default learner, "" and 0 are errors
# --------------------------------------------------------------------------- #
def test_new_progress_refuses_an_empty_or_non_str_learner(monkeypatch):
    monkeypatch.setenv("COURSE_LEARNER", "ada")
    assert progress.new_progress()["learner"] == progress.new_progress(None)["learner"] == "ada"
    with pytest.raises(ValueError, match="learner must be a name"):
        progress.new_progress("")
    with pytest.raises(TypeError, match="learner must be a name.*int 0"):
        progress.new_progress(0)


# --------------------------------------------------------------------------- #
# 7. cohort: slowest, a missing cohort or summary
# --------------------------------------------------------------------------- #
def test_cohort_summary_arguments_are_checked(tmp_path):
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "a.json").write_text(json.dumps(record(**{"1": failed("a", "b", "c")})))
    found = cohort.read_cohort(tmp_path / "cohort")
    assert len(cohort.summarize(found, slowest=2)["slowest"]) == 2
    for bad in (-1, "3", 2.0, True):
        with pytest.raises(ValueError, match="slowest must be an integer >= 0"):
            cohort.summarize(found, slowest=bad)
    with pytest.raises(TypeError, match="cohort must be the Cohort read_cohort"):
        cohort.summarize(None)
    for bad in ({}, None, [1]):
        with pytest.raises(TypeError, match="summary must be the dict summarize"):
            cohort.format_cohort(bad)
    with pytest.raises(TypeError, match="summary must be the dict summarize"):
        cohort.plot_cohort({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- #
# 8. checker: the step, the root, solutions and the time limits
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("step, error, says", [(True, TypeError, "step must be an integer"),
                                               (2.7, TypeError, "step must be an integer"),
                                               (float("inf"), TypeError, "step must be an integer"),
                                               ("3", TypeError, "step must be an integer"),
                                               (0, ValueError, "step must be at least 1"),
                                               (10, ValueError, "step must be between 1 and 9")])
def test_checker_steps_are_integers_1_to_9(tmp_path, step, error, says):
    with pytest.raises(error, match=says):
        checker.run_checks(step, root=tmp_path)
    with pytest.raises(error, match=says):
        checker.exercise_file(step, root=tmp_path)


def test_exercise_file_takes_a_str_root_and_refuses_negative_steps(tmp_path):
    assert checker.exercise_file(2, root=str(tmp_path)) == tmp_path / "exercises" / "step02.py"
    assert checker.exercise_file(2, solutions=True, root=tmp_path) == tmp_path / "solutions" / "step02.py"
    with pytest.raises(ValueError, match="step must be at least 1"):
        checker.exercise_file(-1, root=tmp_path)
    with pytest.raises(TypeError, match="root must be the course folder"):
        checker.exercise_file(2, root=3)
    with pytest.raises(TypeError, match="solutions must be True or False"):
        checker.exercise_file(2, solutions="no", root=tmp_path)


@pytest.mark.parametrize("kwargs, error, says", [(dict(timeout="x"), TypeError, "timeout must be a number"),
                                                 (dict(timeout=float("nan")), ValueError, "timeout must be a finite"),
                                                 (dict(timeout=-1), ValueError, "timeout must be a finite number > 0"),
                                                 (dict(test_timeout=0), ValueError, "test_timeout must be a finite"),
                                                 (dict(solutions="no"), TypeError, "solutions must be True or False")])
def test_run_checks_arguments_are_checked(tmp_path, kwargs, error, says):
    with pytest.raises(error, match=says):
        checker.run_checks(1, root=tmp_path, **kwargs)


def test_check_refuses_a_string_flag_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_ROOT", str(tmp_path))  # no course here: nothing slow would run
    for kwargs in (dict(solutions="no"), dict(quiet="yes")):
        with pytest.raises(TypeError, match="must be True or False"):
            checker.check(1, **kwargs)
    assert not (tmp_path / "record").exists()


# --------------------------------------------------------------------------- #
# 9. format_hints: width
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("width, error", [(-5, ValueError), (3, ValueError), (0, ValueError), ("80", TypeError),
                                          (True, TypeError), (2.5, TypeError)])
def test_format_hints_width_is_an_integer_of_20_or_more(width, error):
    with pytest.raises(error, match="width must be"):
        hints.format_hints(1, "bigram_counts", 1, width=width)
    lines = hints.format_hints(1, "bigram_counts", 3, width=40).splitlines()
    assert max(map(len, lines)) <= 40 and lines[1].startswith("  1. ")


# --------------------------------------------------------------------------- #
# 10. the progress table's arguments
# --------------------------------------------------------------------------- #
def test_progress_table_json_and_format_check_their_arguments(tmp_path):
    names = {s: [] for s in range(1, 10)} | {1: ["a"]}
    rec = record(**{"1": failed("a")})
    with pytest.raises(TypeError, match="progress must be a progress record"):
        progress.progress_table(None, names)
    with pytest.raises(ValueError, match="progress is not a valid record"):
        progress.progress_table({"steps": {"1": []}}, names)
    with pytest.raises(TypeError, match="names must map a step"):
        progress.progress_json(rec, names=[1, 2])
    with pytest.raises(TypeError, match="names must map step numbers.*'1'"):
        progress.progress_table(rec, {"1": ["a"]})
    with pytest.raises(TypeError, match=r"names\[1\] must be a list of exercise names"):
        progress.progress_table(rec, {1: "a"})
    rows = progress.progress_table(rec, names)
    assert rows[0]["failed"] == ["a"] and progress.progress_json(rec, names)["exercise_names"]["1"] == ["a"]
    text = progress.format_progress(rec, rows, path=str(tmp_path / "p.json"))
    assert text.startswith(f"Progress of ada: nothing recorded yet in {tmp_path / 'p.json'}")
    with pytest.raises(TypeError, match="rows must be the list progress_table"):
        progress.format_progress(rec, None)
    with pytest.raises(TypeError, match="path must be the progress file's path"):
        progress.format_progress(rec, rows, path=1)
