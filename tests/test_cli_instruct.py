"""`course finetune instruct`, `course generate` and `course evaluate` (step 7), in the tiny profile.

One real `course finetune instruct` runs as a subprocess (as a learner runs it; the tiny recipe trains
96 examples for one epoch and answers 8 test instructions) for what it writes and prints. Everything
else runs in-process through ``cli.main``: the failure paths with the fine-tuning replaced by that
finished run (rebuilt from its files, so they cost no training), `course generate` on its model, and
`course evaluate` against a chat-completions server that the test starts on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import course_lib.files as files
import course_lib.instruction as instruction
from course_lib import cli
from course_lib.checkpoint import NonFiniteError, load_checkpoint, model_from_checkpoint, save_checkpoint
from course_lib.classification import GPTClassifier
from course_lib.config import get_config
from course_lib.evaluation import rouge_l
from course_lib.instruction import InstructResult, generate_response
from course_lib.model import GPTModel
from course_lib.tokenizers import tiktoken_gpt2
from course_lib.training import History
from _course import one_error_line

ROOT = Path(__file__).resolve().parents[1]
FILES = ("model.pt", "responses.json", "metrics.json")


def course(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "course_lib.cli", *args], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real `course finetune instruct` in the tiny profile, into a folder it creates."""
    out = tmp_path_factory.mktemp("instruct") / "run"
    r = course("finetune", "instruct", "--profile", "tiny", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


@pytest.fixture(scope="module")
def finished(trained):
    """The finished tiny run as `finetune_instructions` returned it, rebuilt from its files."""
    out, _ = trained
    extra = load_checkpoint(out / "model.pt")["extra"]
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("style")   # added by the command, not the library
    return InstructResult(model_from_checkpoint(out / "model.pt"), History.from_dict(extra["history"]),
                          json.loads((out / "responses.json").read_text()), metrics, ())


@pytest.fixture
def fake_run(monkeypatch, finished):
    """Replace the fine-tuning by the finished run; the keyword arguments it was called with are recorded."""
    calls = []

    def run(profile=None, **kwargs):
        calls.append({"profile": profile, **kwargs})
        return finished
    monkeypatch.setattr(instruction, "finetune_instructions", run)
    return calls


def must_not_train(*a, **k):
    pytest.fail("must not train")


# --------------------------------------------------------------------------- #
# course finetune instruct
# --------------------------------------------------------------------------- #
def test_finetune_writes_metrics_with_sane_values(trained):
    out, r = trained
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    m = json.loads((out / "metrics.json").read_text())
    for key in ("exact_match", "rouge_l", "base_exact_match", "base_rouge_l", "stopped_at_end_of_text",
                "base_stopped_at_end_of_text", "with_template_markers"):
        assert isinstance(m[key], float) and 0.0 <= m[key] <= 1.0, (key, m[key])
    assert 0 < m["response_loss"] < m["base_response_loss"] < 20       # the tuning lowered the response loss
    assert m["loss_reduction"] == pytest.approx(1 - m["response_loss"] / m["base_response_loss"])
    assert m["seconds"] > 0 and m["profile"] == "tiny" and m["device"] == "cpu" and "gpt-tiny" in m["base_model"]
    assert m["responses"] == 8 and m["examples"] == {"train": 96, "test": 110, "validation": 55}
    assert m["recipe"] == dataclasses.asdict(instruction.INSTRUCTION_RECIPES["tiny"])
    assert m["style"] == m["recipe"]["style"] == "alpaca"
    # the figures the summary prints are those of the file
    assert f"{m['base_response_loss']:.3f} -> {m['response_loss']:.3f} ({100 * m['loss_reduction']:.1f}% lower)" \
        in r.stdout
    assert f"ROUGE-L     {m['base_rouge_l']:.3f} -> {m['rouge_l']:.3f}" in r.stdout
    assert f"{100 * m['stopped_at_end_of_text']:.1f}% of the responses ended with end-of-text" in r.stdout
    for name in FILES:
        assert str(out / name) in r.stdout
    # the model carries its template, its metrics and its history
    extra = load_checkpoint(out / "model.pt")["extra"]
    assert (extra["kind"], extra["style"], extra["mask_prompt"], extra["max_new_tokens"]) == \
        ("instruct", "alpaca", False, 16)
    assert extra["metrics"] == m and extra["history"]["step"] == 12


def test_finetune_responses_are_the_test_splits_and_the_saved_models(trained):
    out, _ = trained
    responses = json.loads((out / "responses.json").read_text())
    _, test, _ = instruction.split_instruction_data(instruction.load_instruction_data(), seed=123)
    assert len(responses) == 8
    for entry, ref in zip(responses, test[:8]):
        assert {k: entry[k] for k in ref} == ref
        assert isinstance(entry["model_response"], str) and isinstance(entry["base_response"], str)
    # the model that was saved is the one that wrote the responses
    model, tokenizer = model_from_checkpoint(out / "model.pt"), tiktoken_gpt2()
    for entry in responses:
        assert generate_response(model, tokenizer, entry, max_new_tokens=16) == entry["model_response"]


def test_finetune_options_reach_the_run(tmp_path, fake_run, capsys):
    assert cli.main(["finetune", "instruct", "--profile", "tiny", "--style", "phi3", "--mask-prompt",
                     "--epochs", "2", "--lr", "2e-4", "--device", "cpu", "--out", str(tmp_path / "a"), "-q"]) == 0
    assert fake_run[-1] == {"profile": "tiny", "style": "phi3", "mask_prompt": True, "num_epochs": 2, "lr": 2e-4,
                            "device": torch.device("cpu"), "progress": False, "verbose": False}
    # without the options, the recipe decides (None), and the bars and evaluations are on
    assert cli.main(["finetune", "instruct", "--profile", "tiny", "--out", str(tmp_path / "b")]) == 0
    assert {k: fake_run[-1][k] for k in ("style", "mask_prompt", "num_epochs", "lr", "progress", "verbose")} == \
        {"style": None, "mask_prompt": None, "num_epochs": None, "lr": None, "progress": True, "verbose": True}
    assert "instruction-tuned gpt-tiny" in capsys.readouterr().out


def test_cli_styles_are_the_librarys():
    assert cli._STYLES == instruction.STYLES


def test_finetune_refuses_to_overwrite_a_learners_files(tmp_path):
    for name in FILES:
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text("a learner's earlier run")
        r = course("finetune", "instruct", "--profile", "tiny", "--out", str(out))
        assert r.returncode == 2 and r.stdout == "", r.stdout
        line = one_error_line(r.stderr)
        assert f"--out {out}" in line and name in line and "--force" in line
        assert snapshot(out) == {name: b"a learner's earlier run"}


def test_finetune_force_replaces_the_three_files(tmp_path, fake_run, capsys, finished):
    for name in FILES:
        (tmp_path / name).write_text("old")
    assert cli.main(["finetune", "instruct", "--out", str(tmp_path), "--force", "-q"]) == 0
    assert json.loads((tmp_path / "responses.json").read_text()) == finished.responses
    assert json.loads((tmp_path / "metrics.json").read_text()) == {**finished.metrics, "style": "alpaca"}
    model = model_from_checkpoint(tmp_path / "model.pt")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids), finished.model.eval()(ids))
    assert "resp. loss" in capsys.readouterr().out


def test_finetune_stores_the_style_it_was_tuned_with(tmp_path, monkeypatch, finished, capsys):
    phi3 = dataclasses.replace(finished, metrics={**finished.metrics,
                                                  "recipe": {**finished.metrics["recipe"], "style": "phi3"}})
    monkeypatch.setattr(instruction, "finetune_instructions", lambda *a, **k: phi3)
    assert cli.main(["finetune", "instruct", "--style", "phi3", "--out", str(tmp_path), "-q"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["style"] == "phi3"
    assert load_checkpoint(tmp_path / "model.pt")["extra"]["style"] == "phi3"
    assert "template    phi3" in capsys.readouterr().out


@pytest.mark.parametrize("args, expect", [
    (["--epochs", "0"], "--epochs must be a positive"),
    (["--profile", "huge"], "tiny, cpu, gpu"),
    (["--device", "nonsense"], "not a device name"),
])
def test_finetune_bad_options_are_one_line(tmp_path, monkeypatch, capsys, args, expect):
    monkeypatch.setattr(instruction, "finetune_instructions", must_not_train)
    assert cli.main(["finetune", "instruct", "--out", str(tmp_path / "x"), *args]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert expect in err and not (tmp_path / "x").exists()


def test_finetune_out_that_is_a_file_or_holds_a_folder_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(instruction, "finetune_instructions", must_not_train)
    afile = tmp_path / "notes.txt"
    afile.write_text("notes")
    assert cli.main(["finetune", "instruct", "--out", str(afile)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "--out" in err and "is a file" in err and afile.read_text() == "notes"
    (tmp_path / "run" / "responses.json").mkdir(parents=True)
    assert cli.main(["finetune", "instruct", "--out", str(tmp_path / "run"), "--force"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "folder named responses.json" in err and (tmp_path / "run" / "responses.json").is_dir()


def test_finetune_stopped_by_ctrl_c_writes_nothing(tmp_path, monkeypatch, capsys, finished):
    stopped = dataclasses.replace(finished, history=dataclasses.replace(finished.history, interrupted=True))
    monkeypatch.setattr(instruction, "finetune_instructions", lambda *a, **k: stopped)
    assert cli.main(["finetune", "instruct", "--out", str(tmp_path / "run"), "-q"]) == 130
    assert "nothing was written" in capsys.readouterr().err and not (tmp_path / "run").exists()

    def second_press(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(instruction, "finetune_instructions", second_press)
    assert cli.main(["finetune", "instruct", "--out", str(tmp_path / "run"), "-q"]) == 130
    assert not (tmp_path / "run").exists()


def test_finetune_that_diverges_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def diverge(*a, **k):
        raise NonFiniteError("loss is nan at step 3 (epoch 1, batch 3): training diverged and stopped")
    monkeypatch.setattr(instruction, "finetune_instructions", diverge)
    assert cli.main(["finetune", "instruct", "--out", str(tmp_path / "run"), "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert "diverged" in err and "Nothing was written" in err and not (tmp_path / "run").exists()


def test_a_full_disk_leaves_no_part_of_model_pt(tmp_path, monkeypatch, capsys, fake_run):
    real_write, written = files._WriteRecorder.write, [0]

    def write(self, data):   # the disk fills up part of the way into model.pt
        written[0] += len(data)
        if written[0] > 20_000:
            self.error = self.error or OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return real_write(self, data)
    monkeypatch.setattr(files._WriteRecorder, "write", write)
    out = tmp_path / "run"
    assert cli.main(["finetune", "instruct", "--out", str(out), "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert "no space left" in err and "nothing was written" in err
    assert written[0] > 20_000 and list(out.iterdir()) == []   # no model.pt, no temporary file


def fail_on(monkeypatch, name: str, error: BaseException):
    """Make the CLI's atomic write of ``name`` fail (save_checkpoint keeps its own atomic_write)."""
    real = files.atomic_write

    def write(path, *a, **k):
        if Path(path).name == name:
            raise error
        return real(path, *a, **k)
    monkeypatch.setattr(files, "atomic_write", write)


@pytest.mark.parametrize("name", ["responses.json", "metrics.json"])
def test_a_later_file_that_cannot_be_written_takes_the_new_ones_with_it(tmp_path, monkeypatch, capsys, fake_run,
                                                                       name):
    fail_on(monkeypatch, name, OSError(errno.ENOSPC, f"no space left on the device holding {tmp_path}"))
    out = tmp_path / "run"
    assert cli.main(["finetune", "instruct", "--out", str(out), "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert "no space left" in err and "nothing was written" in err
    assert list(out.iterdir()) == []


def test_a_failure_after_force_replaced_a_file_says_which(tmp_path, monkeypatch, capsys, fake_run):
    for name in FILES:
        (tmp_path / name).write_text("old")
    fail_on(monkeypatch, "metrics.json", OSError(errno.EIO, "could not write metrics.json: I/O error"))
    assert cli.main(["finetune", "instruct", "--out", str(tmp_path), "--force", "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert "model.pt and responses.json were already replaced" in err and "--force" in err
    assert (tmp_path / "metrics.json").read_text() == "old"


def test_ctrl_c_while_writing_leaves_nothing(tmp_path, monkeypatch, capsys, fake_run):
    fail_on(monkeypatch, "metrics.json", KeyboardInterrupt())
    out = tmp_path / "run"
    assert cli.main(["finetune", "instruct", "--out", str(out), "-q"]) == 130
    assert "interrupted while writing: nothing was written" in capsys.readouterr().err
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- #
# course generate
# --------------------------------------------------------------------------- #
ASK = {"instruction": "Rewrite the sentence in the passive voice.", "input": "The cat chased the mouse."}


def test_generate_prints_what_generate_response_returns(trained):
    out, _ = trained
    model, tokenizer = model_from_checkpoint(out / "model.pt"), tiktoken_gpt2()
    # the real command, greedy: the template and length it was tuned with (alpaca, 16 new tokens)
    r = course("generate", str(out), ASK["instruction"], "--input", ASK["input"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == generate_response(model, tokenizer, ASK, style="alpaca", max_new_tokens=16) + "\n"


@pytest.mark.parametrize("options, kwargs", [
    (["--temperature", "1.0", "--seed", "7"], dict(temperature=1.0, max_new_tokens=16)),
    (["--temperature", "1.5", "--top-k", "20", "--seed", "3", "--max-new-tokens", "30"],
     dict(temperature=1.5, top_k=20, max_new_tokens=30)),
])
def test_generate_sampled_with_a_seed_matches_in_process(trained, capsys, options, kwargs):
    out, _ = trained
    entry = {"instruction": "Name three fruits.", "input": ""}
    for where in (out, out / "model.pt"):   # the folder, or the file itself
        assert cli.main(["generate", str(where), entry["instruction"], "--device", "cpu", *options]) == 0
        printed = capsys.readouterr().out
        model = model_from_checkpoint(out / "model.pt")   # building a model draws random numbers: seed after it
        torch.manual_seed(int(options[options.index("--seed") + 1]))
        want = generate_response(model, tiktoken_gpt2(), entry, style="alpaca", **kwargs)
        assert want.strip() and printed == want + "\n"


def test_generate_uses_the_template_stored_in_the_model(tmp_path, monkeypatch, capsys, finished):
    seen = []
    real = instruction.generate_responses

    def spy(model, tokenizer, entries, **kwargs):
        seen.append((entries, kwargs["style"], kwargs["max_new_tokens"]))
        return real(model, tokenizer, entries, **kwargs)
    monkeypatch.setattr(instruction, "generate_responses", spy)
    save_checkpoint(tmp_path / "phi3" / "model.pt", finished.model,
                    extra={"kind": "instruct", "style": "phi3", "max_new_tokens": 9})
    assert cli.main(["generate", str(tmp_path / "phi3"), "Say hi."]) == 0
    assert seen[-1] == ([{"instruction": "Say hi.", "input": ""}], "phi3", 9)
    # --style overrides; a checkpoint that records no template gets alpaca, with a note
    assert cli.main(["generate", str(tmp_path / "phi3"), "Say hi.", "--style", "alpaca"]) == 0
    assert seen[-1][1] == "alpaca"
    capsys.readouterr()
    save_checkpoint(tmp_path / "plain" / "model.pt", finished.model)
    assert cli.main(["generate", str(tmp_path / "plain"), "Say hi."]) == 0
    assert seen[-1][1:] == ("alpaca", 32)   # half of the tiny model's 64-token context
    assert "records no prompt template" in capsys.readouterr().err


def test_generate_and_export_read_the_checkpoint_once(tmp_path, monkeypatch, capsys, finished):
    """The model and its recorded template come from one read of model.pt (they were two: a GPT-2 medium
    checkpoint is 1.4 GB)."""
    from course_lib import checkpoint

    reads = []
    real = checkpoint._read

    def counted(path, *args, **kwargs):
        reads.append(path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(checkpoint, "_read", counted)
    save_checkpoint(tmp_path / "run" / "model.pt", finished.model, extra={"kind": "instruct", "style": "phi3"})
    assert cli.main(["generate", str(tmp_path / "run"), "Say hi.", "--max-new-tokens", "2"]) == 0
    assert len(reads) == 1
    assert cli.main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert len(reads) == 2 and "phi3 chat template" in capsys.readouterr().out
    model, extra = checkpoint.model_from_checkpoint(tmp_path / "run" / "model.pt", return_extra=True)
    assert extra["style"] == "phi3" and isinstance(model, GPTModel)


@pytest.fixture
def checkpoints(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lm" / "model.pt", GPTModel(get_config("gpt-tiny")))
    save_checkpoint(tmp_path / "spam" / "model.pt", GPTClassifier(GPTModel(get_config("gpt-tiny"))))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize("where, args, expect", [
    ("missing", ["hi"], "does not exist"),
    ("empty", ["hi"], "no model.pt in"),
    ("spam", ["hi"], "use `course classify`"),
    ("broken", ["hi"], "not a readable checkpoint"),
    ("lm", [""], "the instruction is empty"),
    ("lm", ["  \n"], "the instruction is empty"),
    ("lm", ["hi", "--temperature", "-1"], "--temperature must be 0"),
    ("lm", ["hi", "--temperature", "nan"], "--temperature must be 0"),
    ("lm", ["hi", "--top-k", "0"], "--top-k must be a positive"),
    ("lm", ["hi", "--max-new-tokens", "0"], "--max-new-tokens must be a positive"),
    ("lm", ["hi", "--max-new-tokens", "64"], "leaves no room for the prompt"),   # tiny's context: 64
    ("lm", ["hi", "--device", "nonsense"], "not a device name"),
])
def test_generate_bad_input_is_one_line(checkpoints, capsys, where, args, expect):
    assert cli.main(["generate", str(checkpoints / where), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and expect in one_error_line(captured.err)


# --------------------------------------------------------------------------- #
# course evaluate
# --------------------------------------------------------------------------- #
RESPONSES = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris.",
     "model_response": "the capital of france is  Paris", "base_response": "Lyon"},
    {"instruction": "Rewrite in the passive voice.", "input": "The cat chased the mouse.",
     "output": "The mouse was chased by the cat.", "model_response": "The mouse was chased.",
     "base_response": "The cat chased the mouse."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red.",
     "model_response": "Blue.", "base_response": ""},
]
METRICS = {"response_loss": 1.25, "base_response_loss": 2.5, "exact_match": 1 / 3, "seconds": 12.5,
           "style": "alpaca", "recipe": {"style": "alpaca", "num_epochs": 1}}


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "responses.json").write_text(json.dumps(RESPONSES, indent=2))
    (out / "metrics.json").write_text(json.dumps(METRICS, indent=2))
    return out


def test_evaluate_recomputes_exact_match_and_rouge_l(run_dir, capsys):
    before = snapshot(run_dir)
    assert cli.main(["evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    # by hand: one exact match of three; ROUGE-L 1, 2*(4/4)*(4/7)/(4/4+4/7) = 8/11, 0
    assert "exact match 33.3% (base 0.0%)" in out
    base_rouge = rouge_l("The cat chased the mouse.", RESPONSES[1]["output"]) / 3   # the other two score 0
    assert f"ROUGE-L     {(1 + 8 / 11 + 0) / 3:.3f} (base {base_rouge:.3f})" in out
    assert "resp. loss  1.250 (from metrics.json; base 2.500)" in out
    assert snapshot(run_dir) == before     # without a judge, nothing is written


def test_evaluate_reads_a_real_run(trained, capsys):
    out, _ = trained
    m = json.loads((out / "metrics.json").read_text())
    assert cli.main(["evaluate", str(out)]) == 0
    printed = capsys.readouterr()
    assert f"exact match {100 * m['exact_match']:.1f}% (base {100 * m['base_exact_match']:.1f}%)" in printed.out
    assert f"ROUGE-L     {m['rouge_l']:.3f} (base {m['base_rouge_l']:.3f})" in printed.out
    assert "8 test responses, template alpaca" in printed.out and printed.err == ""


class ChatServer:
    """A chat-completions server on 127.0.0.1 that answers every request with ``reply``."""

    def __init__(self, reply: str = "80", status: int = 200):
        self.reply, self.status, self.requests = reply, status, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, self.headers.get("Authorization"), body))
                if server.status != 200:
                    data = json.dumps({"error": {"message": "the judge fell over"}}).encode()
                else:
                    data = json.dumps({
                        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": server.reply},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 3}}).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    servers = []

    def start(**kwargs):
        servers.append(ChatServer(**kwargs))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def test_evaluate_adds_the_judges_score_and_keeps_the_rest(run_dir, chat_server, capsys):
    server = chat_server(reply="Score: 80")
    assert cli.main(["evaluate", str(run_dir), "--judge-url", server.url, "--judge-model", "judge-7b",
                     "--judge-key", "k-123", "-q"]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["judge_score"] == 80 and metrics["judge_scored"] == 3 and metrics["judge_model"] == "judge-7b"
    assert {k: metrics[k] for k in METRICS} == METRICS       # the rest of the file is kept
    assert json.loads((run_dir / "responses.json").read_text()) == RESPONSES
    # one request per response, to the chat-completions route, with the key, the model and the response
    assert len(server.requests) == 3
    for (path, auth, body), entry in zip(server.requests, RESPONSES):
        assert path == "/v1/chat/completions" and auth == "Bearer k-123" and body["model"] == "judge-7b"
        prompt = body["messages"][-1]["content"]
        assert entry["instruction"] in prompt and entry["output"] in prompt and entry["model_response"] in prompt
    out = capsys.readouterr().out
    assert "judge       80.0 / 100 by judge-7b (3 of 3 scored)" in out
    # asked again without a judge, the stored score is shown
    assert cli.main(["evaluate", str(run_dir)]) == 0
    assert "80.0 / 100 by judge-7b" in capsys.readouterr().out


def test_evaluate_with_a_judge_from_the_real_command(trained, chat_server, tmp_path):
    out, _ = trained
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("responses.json", "metrics.json"):
        (run / name).write_bytes((out / name).read_bytes())
    server = chat_server(reply="80")
    r = course("evaluate", str(run), "--judge-url", server.url, "--judge-model", "m")
    assert r.returncode == 0, r.stderr
    before, after = json.loads((out / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert after == {**before, "judge_score": 80.0, "judge_scored": 8, "judge_responses": 8, "judge_model": "m",
                     "judge_url": server.url}
    assert len(server.requests) == 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_evaluate_with_an_unreachable_judge_leaves_metrics_unchanged(run_dir, capsys):
    before = snapshot(run_dir)
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert cli.main(["evaluate", str(run_dir), "--judge-url", url, "--judge-model", "m", "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert "cannot reach a judge" in err and url in err and "metrics.json is unchanged" in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("reply, status, expect", [
    ("I would rather not say.", 200, "no reply held a score"),
    ("80", 500, "requests failed"),
])
def test_evaluate_with_a_judge_that_scores_nothing_leaves_metrics_unchanged(run_dir, chat_server, capsys,
                                                                           reply, status, expect):
    before = snapshot(run_dir)
    server = chat_server(reply=reply, status=status)
    assert cli.main(["evaluate", str(run_dir), "--judge-url", server.url, "--judge-model", "m", "-q"]) == 1
    err = one_error_line(capsys.readouterr().err)
    assert "scored none of the 3 responses" in err and expect in err and "unchanged" in err
    assert snapshot(run_dir) == before and server.requests


@pytest.mark.parametrize("args, expect", [
    (["--judge-url", "http://127.0.0.1:9/v1"], "needs --judge-model"),
    (["--judge-model", "m"], "needs --judge-url"),
    (["--judge-key", "k"], "needs --judge-url"),
    (["--judge-url", "localhost:11434", "--judge-model", "m"], "must start with http://"),
    (["--judge-url", "http://127.0.0.1:9/v1", "--judge-model", " "], "--judge-model is empty"),
])
def test_evaluate_bad_judge_options_are_one_line(run_dir, capsys, args, expect):
    before = snapshot(run_dir)
    assert cli.main(["evaluate", str(run_dir), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and expect in one_error_line(captured.err)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("change, expect", [
    ("missing", "does not exist"),
    ("no-responses", "no responses.json in"),
    ("no-metrics", "no metrics.json in"),
    ("not-json", "is not readable JSON"),
    ("empty-list", "non-empty list of responses"),
    ("no-model-response", "response 1 has no 'model_response'"),
    ("metrics-a-list", "must hold a JSON object"),
])
def test_evaluate_bad_folders_are_one_line(run_dir, capsys, change, expect):
    where = run_dir
    if change == "missing":
        where = run_dir / "nowhere"
    elif change == "no-responses":
        (run_dir / "responses.json").unlink()
    elif change == "no-metrics":
        (run_dir / "metrics.json").unlink()
    elif change == "not-json":
        (run_dir / "responses.json").write_text("[{")
    elif change == "empty-list":
        (run_dir / "responses.json").write_text("[]")
    elif change == "no-model-response":
        broken = [RESPONSES[0], {k: v for k, v in RESPONSES[1].items() if k != "model_response"}]
        (run_dir / "responses.json").write_text(json.dumps(broken))
    elif change == "metrics-a-list":
        (run_dir / "metrics.json").write_text("[]")
    assert cli.main(["evaluate", str(where)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and expect in one_error_line(captured.err)
