"""`course finetune classify` and `course classify` (step 6), in the tiny profile.

The real command runs as a subprocess (as a learner runs it) for what it writes and prints; the
failure paths (Ctrl-C, a diverged run, a full disk) run in-process through ``cli.main`` with the
fine-tuning replaced by a finished tiny run, so they cost no training. The tiny base model comes
from the data cache (pretrained there by its first user, then shared by every test and notebook).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import course_lib.classification as classification
import course_lib.files as files
from course_lib import cli
from course_lib.checkpoint import NonFiniteError, load_checkpoint, model_from_checkpoint, save_checkpoint
from course_lib.classification import GPTClassifier
from course_lib.config import get_config
from course_lib.model import GPTModel
from course_lib.tokenizers import tiktoken_gpt2
from _course import one_error_line

ROOT = Path(__file__).resolve().parents[1]

SPAMMY = "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward! Call now"
HAMMY = "Ok lar... see you at lunch, I'll bring the notes"
LONG = "Please call me back when you are free, it is about the trip. " * 40   # longer than tiny's 128 tokens
TEXTS = [SPAMMY, HAMMY, "ok", LONG]


def course(*args, stdin: str | None = None, timeout=300):
    return subprocess.run([sys.executable, "-m", "course_lib.cli", *args], cwd=ROOT, env=dict(os.environ),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real `course finetune classify` in the tiny profile, into a folder it creates."""
    out = tmp_path_factory.mktemp("classify") / "run"
    r = course("finetune", "classify", "--profile", "tiny", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


@pytest.fixture(scope="module")
def finished():
    """A finished tiny fine-tuning run (in-process), for the tests that replace the fine-tuning."""
    return classification.finetune_classifier("tiny", device="cpu", progress=False, verbose=False)


def predictions(stdout: str) -> list[tuple[str, float, str]]:
    rows = []
    for line in stdout.splitlines():
        label, prob, text = line.split(maxsplit=2)
        rows.append((label, float(prob), text))
    return rows


# --------------------------------------------------------------------------- #
# course finetune classify
# --------------------------------------------------------------------------- #
def test_finetune_writes_metrics_with_sane_values(trained):
    out, r = trained
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_precision", "test_recall", "test_f1"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["seconds"] > 0 and metrics["profile"] == "tiny" and "gpt-tiny" in metrics["base_model"]
    assert metrics["recipe"] == dataclasses.asdict(classification.CLASSIFIER_RECIPES["tiny"])
    # the figures the summary prints are those of the file
    assert f"test {100 * metrics['test_accuracy']:.1f}%" in r.stdout
    assert f"F1 {100 * metrics['test_f1']:.1f}%" in r.stdout
    assert str(out / "model.pt") in r.stdout
    # the model carries its own metrics
    assert load_checkpoint(out / "model.pt")["extra"]["metrics"] == metrics


def test_finetune_model_reloads_and_trainable_count_is_the_last_block(trained):
    out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    model = model_from_checkpoint(out / "model.pt")
    assert isinstance(model, GPTClassifier) and model.pooling == "last" and model.labels == ("ham", "spam")
    gpt = model.gpt
    # the tiny recipe trains the last block, the final norm and the head: counted from the modules
    expected = sum(p.numel() for m in (gpt.trf_blocks[-1], gpt.final_norm, gpt.out_head) for p in m.parameters())
    assert metrics["trainable_parameters"] == expected
    assert metrics["total_parameters"] == sum(p.numel() for p in model.parameters())


def test_finetune_options_reach_the_run(tmp_path):
    out = tmp_path / "head-mean"
    r = course("finetune", "classify", "--profile", "tiny", "--trainable", "head", "--pooling", "mean",
               "--epochs", "2", "--out", str(out), "--device", "cpu", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "training:" not in r.stdout + r.stderr   # -q: no progress bar, no evaluations
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["recipe"]["trainable"], metrics["recipe"]["pooling"], metrics["recipe"]["num_epochs"]) == \
        ("head", "mean", 2)
    cfg = get_config("gpt-tiny")
    assert metrics["trainable_parameters"] == cfg.emb_dim * 2 + 2   # the new [2, emb_dim] layer and its bias
    assert model_from_checkpoint(out / "model.pt").pooling == "mean"


def test_finetune_refuses_to_overwrite_a_learners_files(tmp_path):
    for name in ("model.pt", "metrics.json"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text("a learner's earlier run")
        r = course("finetune", "classify", "--profile", "tiny", "--out", str(out))
        assert r.returncode == 2 and r.stdout == "", r.stdout
        line = one_error_line(r.stderr)
        assert f"--out {out}" in line and name in line and "--force" in line
        assert (out / name).read_text() == "a learner's earlier run"
        assert sorted(p.name for p in out.iterdir()) == [name]


def test_finetune_force_replaces_both_files(tmp_path, monkeypatch, capsys, finished):
    monkeypatch.setattr(classification, "finetune_classifier", lambda *a, **k: finished)
    (tmp_path / "model.pt").write_text("old")
    (tmp_path / "metrics.json").write_text("old")
    assert cli.main(["finetune", "classify", "--out", str(tmp_path), "--force", "-q"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["test_f1"] == finished.metrics["test_f1"]
    model = model_from_checkpoint(tmp_path / "model.pt")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids), finished.model.eval()(ids))
    assert "test, spam" in capsys.readouterr().out


@pytest.mark.parametrize("args, expect", [
    (["--epochs", "0"], "--epochs must be a positive"),
    (["--profile", "huge"], "tiny, cpu, gpu"),
    (["--device", "nonsense"], "not a device name"),
])
def test_finetune_bad_options_are_one_line(tmp_path, capsys, args, expect):
    assert cli.main(["finetune", "classify", "--out", str(tmp_path / "x"), *args]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert expect in err and not (tmp_path / "x").exists()


def test_finetune_out_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("notes")
    monkeypatch.setattr(classification, "finetune_classifier", lambda *a, **k: pytest.fail("must not train"))
    assert cli.main(["finetune", "classify", "--out", str(afile)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "--out" in err and "is a file" in err and afile.read_text() == "notes"


def test_finetune_out_holding_a_folder_named_model_pt_is_refused_even_with_force(tmp_path, monkeypatch, capsys):
    (tmp_path / "model.pt").mkdir()
    monkeypatch.setattr(classification, "finetune_classifier", lambda *a, **k: pytest.fail("must not train"))
    assert cli.main(["finetune", "classify", "--out", str(tmp_path), "--force"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "folder named model.pt" in err and "--out" in err and (tmp_path / "model.pt").is_dir()


def test_finetune_stopped_by_ctrl_c_writes_nothing(tmp_path, monkeypatch, capsys, finished):
    stopped = dataclasses.replace(finished, history=dataclasses.replace(finished.history, interrupted=True))
    monkeypatch.setattr(classification, "finetune_classifier", lambda *a, **k: stopped)
    assert cli.main(["finetune", "classify", "--out", str(tmp_path / "run"), "-q"]) == 130
    assert "nothing was written" in capsys.readouterr().err and not (tmp_path / "run").exists()

    def second_press(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(classification, "finetune_classifier", second_press)
    assert cli.main(["finetune", "classify", "--out", str(tmp_path / "run"), "-q"]) == 130
    assert not (tmp_path / "run").exists()


def test_finetune_that_diverges_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def diverge(*a, **k):
        raise NonFiniteError("loss is nan at step 3 (epoch 1, batch 3): training diverged and stopped")
    monkeypatch.setattr(classification, "finetune_classifier", diverge)
    assert cli.main(["finetune", "classify", "--out", str(tmp_path / "run"), "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert "diverged" in err and "Nothing was written" in err and not (tmp_path / "run").exists()


def test_a_full_disk_leaves_no_part_of_model_pt(tmp_path, monkeypatch, capsys, finished):
    monkeypatch.setattr(classification, "finetune_classifier", lambda *a, **k: finished)
    real_write, written = files._WriteRecorder.write, [0]

    def write(self, data):   # the disk fills up part of the way into model.pt
        written[0] += len(data)
        if written[0] > 20_000:
            self.error = self.error or OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real_write(self, data)
    monkeypatch.setattr(files._WriteRecorder, "write", write)
    out = tmp_path / "run"
    assert cli.main(["finetune", "classify", "--out", str(out), "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert "no space left" in err and "nothing was written" in err
    assert written[0] > 20_000 and list(out.iterdir()) == []   # no model.pt, no temporary file


def test_metrics_that_cannot_be_written_take_the_new_model_with_them(tmp_path, monkeypatch, capsys, finished):
    monkeypatch.setattr(classification, "finetune_classifier", lambda *a, **k: finished)

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, f"no space left on the device holding {Path(path).parent}")
    monkeypatch.setattr(files, "atomic_write", full)   # the CLI's metrics.json write; save_checkpoint keeps its own
    out = tmp_path / "run"
    assert cli.main(["finetune", "classify", "--out", str(out), "-q"]) == 1
    assert "no space left" in one_error_line(capsys.readouterr().err)
    assert list(out.iterdir()) == []


def test_cli_choices_are_the_librarys():
    assert cli._TRAINABLE == classification.TRAINABLE and cli._POOLING == classification.POOLING


# --------------------------------------------------------------------------- #
# course classify
# --------------------------------------------------------------------------- #
def manual(model, text: str) -> tuple[str, float]:
    ids = tiktoken_gpt2().encode_ordinary(text)[: model.cfg.context_length]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])), dim=-1)[0]
    k = int(probs.argmax())
    return model.labels[k], float(probs[k])


def test_classify_agrees_with_a_manual_forward_pass(trained):
    out, _ = trained
    r = course("classify", str(out), *TEXTS)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = predictions(r.stdout)
    model = model_from_checkpoint(out / "model.pt")
    assert len(rows) == len(TEXTS)
    for (label, prob, shown), text in zip(rows, TEXTS):
        want_label, want_prob = manual(model, text)
        assert label == want_label and abs(prob - want_prob) <= 5e-5, (text[:30], label, prob, want_label, want_prob)
        assert shown == " ".join(text.split())
        assert 0.5 <= prob <= 1.0
    # the long text was cut to the context, and the command says so
    assert "note: text 4 is longer than the model's context" in r.stderr
    # the same texts from stdin (one a line, blank lines skipped) give the same lines; "-" mixes with arguments
    piped = course("classify", str(out), "-", "ok", stdin=f"{SPAMMY}\n\n{HAMMY}\r\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines() == r.stdout.splitlines()[:3]
    # the model.pt file itself is accepted as well as its folder
    direct = course("classify", str(out / "model.pt"), SPAMMY)
    assert direct.stdout.splitlines() == r.stdout.splitlines()[:1]


@pytest.fixture
def not_a_classifier(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lm" / "model.pt", GPTModel(get_config("gpt-tiny")))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize("where, texts, stdin, expect", [
    ("missing", ["hi"], None, "does not exist"),
    ("empty", ["hi"], None, "no model.pt in"),
    ("lm", ["hi"], None, "holds a GPTModel, not a classifier"),
    ("broken", ["hi"], None, "not a readable checkpoint"),
    ("lm", [], None, "give at least one text"),
    ("lm", ["hi", "  "], None, "text 2 is empty"),
    ("lm", [""], None, "text 1 is empty"),
    ("lm", ["-"], "\n  \n", "no texts on stdin"),
    ("lm", ["-", "-"], "hi\n", "only once"),
])
def test_classify_bad_input_is_one_line(not_a_classifier, monkeypatch, capsys, where, texts, stdin, expect):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
    assert cli.main(["classify", str(not_a_classifier / where), *texts]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and expect in one_error_line(captured.err)


def test_classify_bad_input_from_the_real_command(tmp_path):
    r = course("classify", str(tmp_path / "nowhere"), "hi")
    assert r.returncode == 2 and r.stdout == "" and "does not exist" in one_error_line(r.stderr)
