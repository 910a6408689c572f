"""The `course` command, run as a learner runs it (a subprocess of the installed console script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from _course import fake_course

ROOT = Path(__file__).resolve().parents[1]


def course(*args, env=None, cwd=ROOT, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "course_lib.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_doctor_bogus_profile_fails_and_lists_valid_ones():
    r = course("doctor", "--no-data", env={"COURSE_PROFILE": "bogus"})
    assert r.returncode != 0
    fail = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1 and "profile" in fail[0]
    for name in ("tiny", "cpu", "gpu"):
        assert name in fail[0]


def test_doctor_all_ok_here():
    r = course("doctor", env={"COURSE_PROFILE": "tiny"})
    assert r.returncode == 0, r.stdout
    body = [line for line in r.stdout.splitlines() if line.startswith(("OK", "WARN", "FAIL"))]
    assert body and not any(line.startswith("FAIL") for line in body), r.stdout
    # only data may warn (a file the mirror lacks, e.g. GPT-2's weights in this workplace)
    assert all(line.split()[1] == "data" for line in body if line.startswith("WARN")), r.stdout


def test_doctor_warns_about_files_an_offline_mirror_lacks(tmp_path):
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    (mirror / "text").mkdir(parents=True)
    cache.mkdir()
    r = course("doctor", env={"COURSE_PROFILE": "tiny", "COURSE_DATA_MIRROR": str(mirror),
                              "COURSE_DATA_DIR": str(cache)})
    assert r.returncode == 0, r.stdout
    warns = [line for line in r.stdout.splitlines() if line.startswith("WARN")]
    assert any("data the-verdict" in line and "needs the internet" in line for line in warns), r.stdout
    assert any("data gpt2-weights" in line and "only the gpu profile" in line for line in warns), r.stdout
    assert not any("gpt2-xl-weights" in line for line in warns)  # optional files are not expected in a mirror
    assert f"{len(warns)} WARN, 0 FAIL" in r.stdout
    # without a mirror nothing warns: an online learner downloads on first use
    env = {k: v for k, v in os.environ.items() if k != "COURSE_DATA_MIRROR"}
    env.update(COURSE_PROFILE="tiny", COURSE_DATA_DIR=str(cache))
    r = subprocess.run([sys.executable, "-m", "course_lib.cli", "doctor"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "WARN  " not in r.stdout, r.stdout


def test_check_solutions_pass_and_stubs_report_not_started():
    ok = course("check", "1", "--solutions")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "4 of 4 exercises passed" in ok.stdout
    stubs = course("check", "1")
    assert stubs.returncode == 1
    assert stubs.stdout.count("not started") >= 4


def test_check_reports_a_wrong_answer_with_a_hint(tmp_path):
    mine = tmp_path / "step01.py"
    mine.write_text((ROOT / "solutions" / "step01.py").read_text().replace("+ 2 * d + head", "+ head"))
    r = course("check", "1", "--file", str(mine))
    assert r.returncode == 1
    assert "✘ count_parameters" in r.stdout and "Hint" in r.stdout
    assert "✔ bigram_counts" in r.stdout


def test_check_reports_a_syntax_error_clearly(tmp_path):
    mine = tmp_path / "step01.py"
    mine.write_text("def count_parameters(:\n")
    r = course("check", "1", "--file", str(mine))
    assert r.returncode == 1 and "could not be imported" in r.stdout and "SyntaxError" in r.stdout


def test_check_unknown_step_is_a_clear_error():
    r = course("check", "12")
    assert r.returncode == 2 and "between 1 and 9" in r.stderr


def test_run_executes_a_notebook_and_times_sections(tmp_path):
    root = tmp_path / "course"
    for sub in ("notebooks", "exercises"):
        (root / sub).mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Step 7 — demo"),
                nbformat.v4.new_code_cell("import os; print(os.environ['COURSE_PROFILE'])"),
                nbformat.v4.new_markdown_cell("## Shu — sleep"),
                nbformat.v4.new_code_cell("import time; time.sleep(0.3)")]
    nbformat.write(nb, root / "notebooks" / "07_demo.ipynb")
    r = course("run", "7", "--profile", "tiny", env={"COURSE_ROOT": str(root)}, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = root / "runs" / "tiny" / "07_demo.ipynb"
    executed = json.loads(out.read_text())
    assert "tiny" in "".join(executed["cells"][1]["outputs"][0]["text"])
    assert "Shu — sleep" in r.stdout and "total" in r.stdout
    source = json.loads((root / "notebooks" / "07_demo.ipynb").read_text())
    assert not source["cells"][1]["outputs"], "the course's notebook must stay unexecuted"


def test_run_missing_notebook_and_bad_profile():
    r = course("run", "9", "--profile", "tiny", env={"COURSE_ROOT": str(ROOT)})
    if not list((ROOT / "notebooks").glob("09_*.ipynb")):
        assert r.returncode == 2 and "no notebook for step 9" in r.stderr
    r = course("run", "1", "--profile", "huge")
    assert r.returncode == 2 and "tiny, cpu, gpu" in r.stderr


@pytest.mark.parametrize("args", [["data", "list"], ["--help"]])
def test_help_and_list(args):
    r = course(*args)
    assert r.returncode == 0


@pytest.mark.parametrize("args", [["--help"], ["data", "list"], ["check", "--help"]])
def test_commands_that_need_no_model_do_not_import_torch(args):
    """The CLI's docstring promises an instant ``course --help``: importing the package (which
    ``python -m course_lib.cli`` does first) must not import torch (about 1.5 s)."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['course', *{args!r}]\n"
            "try:\n    runpy.run_module('course_lib.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "sys.stdout.flush()\n"
            "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip().endswith("NO-TORCH"), (r.stdout[-300:], r.stderr[-2000:])


def test_the_package_exports_stay_importable():
    import course_lib
    from course_lib import GPTConfig, fetch, setup
    from course_lib.config import setup as config_setup
    assert setup is config_setup and callable(fetch) and GPTConfig.__name__ == "GPTConfig"
    assert set(course_lib.__all__) <= set(dir(course_lib))
    with pytest.raises(AttributeError, match="no_such_name"):
        course_lib.no_such_name


def test_output_into_a_closed_pipe_ends_quietly():
    """`course data list -l | head`: the reader leaves early; no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        r = subprocess.run([sys.executable, "-m", "course_lib.cli", "data", "list", "-l"], cwd=ROOT,
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert r.stderr == "" and r.returncode == 1


@pytest.mark.parametrize("kind", ["folder", "missing"])
def test_check_file_that_is_not_a_file_is_one_line(tmp_path, kind):
    target = tmp_path if kind == "folder" else tmp_path / "step01.py"
    r = course("check", "1", "--file", str(target))
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: file ")
    if kind == "folder":
        assert "is a folder" in r.stderr and str(tmp_path / "step01.py") in r.stderr  # the fix: the file inside
    else:
        assert "does not exist" in r.stderr and "exercises/step01.py" in r.stderr


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="per-check timeout is POSIX only")
def test_check_an_endless_loop_skips_the_exercises_other_checks(tmp_path):
    mine = tmp_path / "step01.py"
    mine.write_text((ROOT / "solutions" / "step01.py").read_text()
                    + "\n\ndef sample_with_temperature(*args, **kwargs):\n    while True:\n        pass\n")
    r = course("check", "1", "--file", str(mine), "--timeout", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "✘ sample_with_temperature  failed (0 of 7 checks pass, 6 skipped)" in r.stdout, r.stdout
    assert "still running after 1 s" in r.stdout and "while True" in r.stdout
    assert "6 more checks of this exercise skipped" in r.stdout
    assert "✔ count_parameters" in r.stdout


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_run_out_that_cannot_be_a_folder_is_one_line_before_running(tmp_path, kind):
    root = fake_course(tmp_path, [nbformat.v4.new_code_cell("raise SystemExit('must not run')")])
    afile = tmp_path / "notes.txt"
    afile.write_text("a learner's notes")
    out = afile if kind == "file" else afile / "runs"
    r = course("run", "7", "--profile", "tiny", "--out", str(out), env={"COURSE_ROOT": str(root)}, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "--out" in r.stderr
    assert "is a file" in r.stderr and "give a folder you can write" in r.stderr
    assert afile.read_text() == "a learner's notes"


def test_run_prints_each_section_as_it_finishes(tmp_path):
    """The first section's line must arrive while the notebook is still running: its last cell
    waits for a flag file that this test creates only after reading that line."""
    flag = tmp_path / "go"
    root = fake_course(tmp_path, [
        nbformat.v4.new_markdown_cell("# Step 7 — demo"),
        nbformat.v4.new_markdown_cell("## Shu — first"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_markdown_cell("## Ri — waits for the test"),
        nbformat.v4.new_code_cell(f"import os, time\nt = time.time()\nwhile not os.path.exists({str(flag)!r}):\n"
                                  "    assert time.time() - t < 60, 'no flag: sections are not printed live'\n"
                                  "    time.sleep(0.05)"),
    ])
    proc = subprocess.Popen([sys.executable, "-m", "course_lib.cli", "run", "7", "--profile", "tiny"], cwd=tmp_path,
                            env=dict(os.environ, COURSE_ROOT=str(root)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("  Shu — first ... "):
                assert proc.poll() is None
                flag.touch()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    out = "\n".join(lines)
    assert flag.exists() and proc.returncode == 0, out
    live = [ln for ln in lines if " ... " in ln and ln.endswith(" s")]
    assert [ln.split(" ... ")[0].strip() for ln in live] == ["Shu — first", "Ri — waits for the test"], out
    assert "total" in out  # ...and the table at the end, as before


@pytest.mark.parametrize("euid", [0, 1000])
def test_lab_as_root_passes_allow_root(monkeypatch, capsys, euid):
    from course_lib import cli

    calls = []
    monkeypatch.setattr(cli.os, "geteuid", lambda: euid, raising=False)
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: calls.append(argv))
    assert cli.main(["lab", "--no-browser"]) == 0
    (argv,) = calls
    out = capsys.readouterr().out
    assert argv[1:4] == ["-m", "jupyter", "lab"] and "--no-browser" in argv
    if euid == 0:
        assert argv.count("--allow-root") == 1 and "running as root" in out and "--allow-root" in out
    else:
        assert "--allow-root" not in argv and "running as root" not in out
