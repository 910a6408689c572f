"""Bad input to the `course` command, found by a sweep of every verb: each is one `error:` line naming the
argument (no traceback), refused before any work starts. Run in-process (``cli.main``)."""

from __future__ import annotations

import pytest
import torch
from _course import one_error_line

from course_lib import cli
from course_lib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from course_lib.config import get_config
from course_lib.model import GPTModel
from course_lib.serve import _bind


def refused(capsys, *args) -> str:
    assert cli.main(list(args)) == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("args, words", [
    # a blank path or name meant a default folder, the current folder or every interface
    (["finetune", "classify", "--out", ""], "--out is empty"),
    (["finetune", "instruct", "--out", " "], "--out is empty"),
    (["run", "1", "--profile", ""], "--profile is empty"),
    (["run", "1", "--out", ""], "--out is empty"),
    (["check", "1", "--file", ""], "--file is empty"),
    (["cohort", "report", ""], "DIR: an argument is empty"),
    (["site", "serve", "--dir", ""], "--dir is empty"),
    (["site", "serve", "--host", ""], "--host is empty"),
    (["serve", "--profile", "tiny", "--name", " "], "--name is empty"),
    (["adapters", "merge", "", "x", "--out", "m"], "an argument is empty"),
    # numbers and addresses torch or httpx would have raised on
    (["generate", "x", "hi", "--temperature", "1", "--seed", str(10**23)], "--seed must be a whole number"),
    (["chat", "--seed", str(-2**64)], "--seed must be a whole number"),
    (["chat", "--base-url", "http://[::1"], "--base-url 'http://[::1' is not a valid address"),
    (["chat", "--base-url", "http://:80/v1"], "names no host"),
    (["evaluate", "x", "--judge-url", "http://h:99999/v1", "--judge-model", "m"], "is not a valid address"),
    (["run", "1", "--device", "bogus"], "--device: 'bogus'"),
    (["data", "fetch"], "name the files to fetch"),
])
def test_bad_arguments_are_one_error_line(capsys, args, words):
    assert words in refused(capsys, *args)


def test_files_in_the_wrong_place_are_named(tmp_path, capsys):
    torch.manual_seed(0)
    base = save_checkpoint(tmp_path / "base" / "model.pt", GPTModel(get_config("gpt-tiny")), include_rng=False)
    (tmp_path / "afile").write_text("x")
    assert "the adapter folder" in (line := refused(capsys, "adapters", "merge", str(base), str(tmp_path / "afile"),
                                                     "--out", str(tmp_path / "m"))) and "is a file" in line
    (tmp_path / "odd" / "model.pt").mkdir(parents=True)
    for verb, extra in (("classify", ["hi"]), ("generate", ["hi"])):
        line = refused(capsys, verb, str(tmp_path / "odd"), *extra)
        assert "model.pt is a folder, not a checkpoint" in line, line


def test_a_file_that_is_no_checkpoint_is_called_damaged_not_unsafe(tmp_path, capsys):
    bad = tmp_path / "bad" / "model.pt"
    bad.parent.mkdir()
    bad.write_bytes(bytes(range(256)) * 20)               # what a failed copy or a wrong file looks like
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint .* damaged, or another kind of file"):
        load_checkpoint(bad)
    line = refused(capsys, "generate", str(bad.parent), "hi")
    assert "not a PyTorch checkpoint" in line and "trust" not in line


def test_generate_says_when_top_k_and_seed_do_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "m" / "model.pt", GPTModel(get_config("gpt-tiny")), include_rng=False)
    assert cli.main(["generate", str(path.parent), "hi", "--max-new-tokens", "2", "--top-k", "5", "--seed", "1",
                     "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "--top-k and --seed only change sampling" in err


def test_a_host_that_is_not_this_machines_is_named_not_the_port():
    with pytest.raises(ValueError, match="'192.0.2.1' is not an address of this machine"):    # TEST-NET-1
        _bind("192.0.2.1", 0)


def test_a_course_root_that_is_no_folder_is_named(monkeypatch, capsys):
    monkeypatch.setenv("COURSE_ROOT", "/no/such/course")
    assert "COURSE_ROOT=/no/such/course is not a folder" in refused(capsys, "run", "1")


def test_data_list_and_cohort_plot_name_a_wrong_kind_of_path(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert "--mirror" in refused(capsys, "data", "list", "--mirror", str(tmp_path / "nope"))
    assert "--cache" in refused(capsys, "data", "list", "--cache", str(tmp_path / "afile"))
    (tmp_path / "dir.png").mkdir()
    for extra in ([], ["--force"]):
        line = refused(capsys, "cohort", "report", str(tmp_path), "--plot", str(tmp_path / "dir.png"), *extra)
        assert "is a folder; give a file name" in line
