"""`course cohort report DIR` (course_lib/cohort.py) on a folder of learners' files, good and bad, with
counts and medians computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from course_lib import cohort, progress
from course_lib.checker import FAILED, PASSED, CheckReport, ExerciseResult
from course_lib.cli import main

T0, T1, T2 = "2025-03-01T10:00:00+00:00", "2025-03-02T10:00:00+00:00", "2025-03-03T10:00:00+00:00"
NAMES = ["count_parameters", "bigram_counts", "next_token_probs", "sample_with_temperature"]


def ex(status, attempts):
    return {"status": status, "attempts": attempts, "first_passed": T0 if status == "passed" else None,
            "last_checked": T0}


def ri(best, profile="tiny", metric="plan score", higher=True):
    return {profile: {"metric": metric, "higher_is_better": higher, "best": best, "runs": 1, "last": best,
                      "best_at": T0, "profile": profile}}


def record(learner, updated, exercises, ri_entry, names=True):
    data = {"format": "course-progress", "version": 1, "learner": learner, "updated": updated,
            "steps": {"1": {"exercises": exercises, "ri": ri_entry}}}
    if names:
        data["exercise_names"] = {"1": NAMES} | {str(s): [] for s in range(2, 10)}
    return data


@pytest.fixture
def folder(tmp_path, monkeypatch, capsys):
    """3 learners (bob twice), and 7 files that are not progress records."""
    d = tmp_path / "share"
    d.mkdir()
    # ada: made with the real API, as `course progress --json` prints it
    monkeypatch.setenv("COURSE_PROGRESS_FILE", str(tmp_path / "ada-progress.json"))
    monkeypatch.setenv("COURSE_LEARNER", "ada")
    progress.record_check(CheckReport(1, Path("x"), [ExerciseResult("count_parameters", PASSED),
                                                     ExerciseResult("bigram_counts", FAILED)]))
    for _ in range(2):
        progress.record_check(CheckReport(1, Path("x"), [ExerciseResult("bigram_counts", FAILED)]))
    progress.record_check(CheckReport(1, Path("x"), [ExerciseResult("bigram_counts", PASSED)]))
    progress.record_ri(1, 80, metric="plan score", higher_is_better=True, profile="tiny")
    capsys.readouterr()
    assert main(["progress", "--json"]) == 0
    (d / "ada.json").write_text(capsys.readouterr().out)
    bob = ({"count_parameters": ex("passed", 2), "bigram_counts": ex("failed", 4)},
           ri(40) | ri(90, profile="cpu"))
    cy = ({"count_parameters": ex("failed", 1), "sample_with_temperature": ex("failed", 5)}, ri(60))
    files = {
        "bob.json": record("bob", T1, {"count_parameters": ex("passed", 9), "bigram_counts": ex("passed", 9)},
                           ri(99)),                                     # older than bob_new.json: dropped
        "bob_new.json": record("bob", T2, *bob),
        "cy.json": record("cy", T1, *cy, names=False),                  # a raw progress.json is fine too
        "bad.json": '{"format": "course-progress", ',
        "foreign.json": {"name": "some-package", "version": "1.0.0"},
        "v2.json": {"format": "course-progress", "version": 2},
        "empty.json": "",
    }
    for name, content in files.items():
        (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return d


def test_cohort_counts_and_medians_by_hand(folder):
    (folder / "binary.json").write_bytes(bytes(range(256)))
    (folder / "x.json").mkdir()
    (folder / "notes.txt").write_text("not a .json file: not read, not listed")
    c = cohort.read_cohort(folder)
    assert sorted(c.learners) == ["ada", "bob", "cy"] and c.files == 10
    assert c.learners["bob"]["updated"] == T2
    s = cohort.summarize(c)
    rows = {e["name"]: e for e in s["steps"]["1"]["exercises"]}
    assert list(rows) == NAMES  # the course's order, from the files' exercise_names
    # count_parameters: ada passed (1 attempt), bob passed (2), cy failed (1)
    assert (rows["count_parameters"]["passed"], rows["count_parameters"]["attempted"]) == (2, 3)
    assert rows["count_parameters"]["mean_attempts"] == pytest.approx(4 / 3)
    # bigram_counts: ada passed on her 4th attempt, bob failed 4 times, cy never tried
    assert (rows["bigram_counts"]["passed"], rows["bigram_counts"]["mean_attempts"]) == (1, 4.0)
    assert (rows["next_token_probs"]["passed"], rows["next_token_probs"]["mean_attempts"]) == (0, None)
    assert (rows["sample_with_temperature"]["passed"], rows["sample_with_temperature"]["attempted"]) == (0, 1)
    # Ri, each learner's best: tiny 80 (ada), 40 (bob), 60 (cy); cpu 90 (bob)
    assert s["steps"]["1"]["ri"] == [
        {"profile": "cpu", "metric": "plan score", "higher_is_better": True, "count": 1, "min": 90.0,
         "median": 90.0, "max": 90.0, "scores": [90.0]},
        {"profile": "tiny", "metric": "plan score", "higher_is_better": True, "count": 3, "min": 40.0,
         "median": 60.0, "max": 80.0, "scores": [40.0, 60.0, 80.0]}]
    # slowest, of the exercises someone tried: fewest passes first, then most attempts
    assert [(e["name"], e["passed"]) for e in s["slowest"]] == [("sample_with_temperature", 0), ("bigram_counts", 1),
                                                                ("count_parameters", 2)]
    # step 2: only ada's file (from `course progress --json`) names its exercises, and nobody started them
    assert s["steps"]["2"]["ri"] == [] and len(s["steps"]["2"]["exercises"]) == len(progress.exercise_names(2))
    assert all(e["passed"] == e["attempted"] == 0 for e in s["steps"]["2"]["exercises"])
    skipped = dict(c.skipped)
    assert set(skipped) == {"bob.json", "bad.json", "foreign.json", "v2.json", "empty.json", "binary.json",
                            "x.json"}
    assert "older record of learner 'bob'" in skipped["bob.json"]
    assert skipped["bad.json"].startswith("not valid JSON")
    assert skipped["foreign.json"].startswith("not a course progress file")
    assert "version 2" in skipped["v2.json"] and skipped["empty.json"] == "empty"
    assert skipped["binary.json"].startswith("not text") and skipped["x.json"].startswith("a folder")


def test_the_newer_record_wins_whichever_file_comes_first(folder):
    (folder / "bob_new.json").rename(folder / "a_bob_new.json")  # now read before the older bob.json
    c = cohort.read_cohort(folder)
    assert c.learners["bob"]["updated"] == T2 and ("bob.json", "an older record of learner 'bob' than "
                                                    "a_bob_new.json") in c.skipped


def test_cli_report_table_json_and_plot(folder, capsys, tmp_path):
    plot = tmp_path / "plots" / "cohort.png"
    assert main(["cohort", "report", str(folder), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "Cohort: 3 learners (ada, bob, cy)" in out
    assert "count_parameters         passed   2/3" in out
    assert "Ri plan score (tiny, higher is better): n=3  min 40  median 60  max 80" in out
    assert "  bad.json: not valid JSON" in out and "Skipped files:" in out
    assert "Nobody has started steps 2, 3, 4, 5, 6, 7, 8, 9." in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    # an existing plot is not replaced without --force
    assert main(["cohort", "report", str(folder), "--plot", str(plot)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["cohort", "report", str(folder), "--plot", str(plot), "--force", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["learners"] == ["ada", "bob", "cy"] and len(summary["skipped"]) == 5
    assert "plot:" in captured.err
    assert main(["cohort", "report", str(folder), "--plot", str(tmp_path / "c.jpg")]) == 2
    assert ".png" in capsys.readouterr().err


@pytest.mark.parametrize("case, says", [("missing", "does not exist"), ("empty", "holds no .json files"),
                                        ("file", "is a file"), ("only-bad", "none of the 2 .json files")])
def test_folders_without_records_are_one_error_line(tmp_path, capsys, case, says):
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
    elif case == "file":
        target.write_text("{}")
    elif case == "only-bad":
        target.mkdir()
        (target / "a.json").write_text("[1, 2]")
        (target / "b.json").write_text("{")
    assert main(["cohort", "report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err and "Traceback" not in err
