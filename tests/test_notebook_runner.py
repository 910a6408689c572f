"""`course run`'s runner on small synthetic notebooks (the real ones are executed by nbval)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from _course import fake_course
from _readonly import read_only  # noqa: F401  (a fixture)

from course_lib.notebook_runner import run_notebook


def test_a_read_only_out_dir_is_refused_before_running(tmp_path, read_only):
    flag = tmp_path / "ran"
    root = fake_course(tmp_path, [nbformat.v4.new_code_cell(f"open({str(flag)!r}, 'w').close()")])
    out = read_only(tmp_path / "out")
    with pytest.raises(ValueError, match=r"the output folder .*out \(--out / out_dir\) is read-only"):
        run_notebook(7, "tiny", out_dir=out, root=root)
    assert not flag.exists(), "the notebook ran although its copy could not be saved"
    with pytest.raises(ValueError, match="cannot be created: .* is read-only"):
        run_notebook(7, "tiny", out_dir=out / "sub", root=root)


def test_sections_are_reported_as_they_finish_up_to_a_failure(tmp_path):
    root = fake_course(tmp_path, [
        nbformat.v4.new_markdown_cell("# Step 7 — demo"),
        nbformat.v4.new_code_cell("import time"),
        nbformat.v4.new_markdown_cell("## Shu — no code here"),
        nbformat.v4.new_markdown_cell("## Shu — sleeps"),
        nbformat.v4.new_code_cell("time.sleep(0.5)"),
        nbformat.v4.new_markdown_cell("## Ha — fails"),
        nbformat.v4.new_code_cell("1 / 0"),
        nbformat.v4.new_markdown_cell("## Ri — never reached"),
        nbformat.v4.new_code_cell("x = 1"),
    ])
    seen = []
    result = run_notebook(7, "tiny", root=root, on_section=lambda name, s: seen.append((name, s)))
    assert result.error and "ZeroDivisionError" in result.error
    assert [name for name, _ in seen] == ["(setup)", "Shu — sleeps", "Ha — fails"]
    assert 0.5 <= seen[1][1] < 5
    table = dict(result.sections)
    assert table["Ri — never reached"] is None and abs(table["Shu — sleeps"] - seen[1][1]) < 0.3


def test_a_cell_with_two_headings_times_the_code_under_the_second(tmp_path):
    """Notebook 08 has "## Shu 10" (reading only) and "## Shu 11" (the training run) in one markdown cell:
    the run's minutes belong to Shu 11, live and in the table."""
    root = fake_course(tmp_path, [
        nbformat.v4.new_markdown_cell("# Step 7 — demo\n\n## Shu 1 — first"),
        nbformat.v4.new_code_cell("import time"),
        nbformat.v4.new_markdown_cell("## Shu 2 — reading only\n\ntext\n\n## Shu 3 — the long run"),
        nbformat.v4.new_code_cell("time.sleep(0.3)"),
    ])
    seen = []
    result = run_notebook(7, "tiny", root=root, on_section=lambda name, s: seen.append((name, s)))
    assert not result.error
    assert [name for name, _ in seen] == ["Shu 1 — first", "Shu 3 — the long run"]
    assert [name for name, _ in result.sections] == ["Shu 1 — first", "Shu 3 — the long run"]


def test_bad_arguments_are_refused_before_the_environment_is_changed(tmp_path, monkeypatch):
    import os

    from course_lib.notebook_runner import find_notebook

    flag = tmp_path / "ran"
    root = fake_course(tmp_path, [nbformat.v4.new_code_cell(f"open({str(flag)!r}, 'w').close()")])
    monkeypatch.setenv("COURSE_PROFILE", "cpu")
    for kwargs, error, match in (({"device": 1}, TypeError, "device must be a device name"),
                                 ({"out_dir": ""}, ValueError, "out_dir is ''"),
                                 ({"timeout_per_cell": -5}, ValueError, "timeout_per_cell"),
                                 ({"on_section": "print"}, TypeError, "on_section must be a function")):
        with pytest.raises(error, match=match):
            run_notebook(7, "tiny", root=root, **{"out_dir": tmp_path / "out", **kwargs})
        assert os.environ["COURSE_PROFILE"] == "cpu"          # device=1 left it at "tiny"
    assert not flag.exists()
    for step in (7.5, True, float("inf")):                    # 7.5 was step 7, True step 1
        with pytest.raises(ValueError, match="step must be a number 1-9"):
            find_notebook(step, root)
    assert find_notebook("7", root).name.startswith("07_")
