"""`course serve` and `course chat` (step 9).

One real `course serve --profile tiny --port 0` runs as a subprocess (as a learner starts it) and answers
the official ``openai`` client. `course chat` runs in-process through ``cli.main`` with its stdin fed by
the test, on a small random model saved as a course checkpoint; its answers are compared with step 5's
greedy ``inference.generate`` on the chat prompt, history included, both in-process and through a server.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from course_lib import cli
from course_lib.base_model import load_base_model
from course_lib.checkpoint import save_checkpoint
from course_lib.config import get_config
from course_lib.engine import Engine
from course_lib.inference import generate
from course_lib.model import GPTModel
from course_lib.serve import chat_prompt, running_server
from course_lib.tokenizers import tiktoken_gpt2
from _course import one_error_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random GPT saved as a course checkpoint (no template recorded), and the model itself."""
    torch.manual_seed(1)
    model = GPTModel(get_config("gpt-tiny", context_length=128)).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("chat") / "model.pt", model, include_rng=False)
    return path, model


def greedy(model, prompt: str, max_tokens: int) -> str:
    tok = tiktoken_gpt2()
    ids = tok.encode(prompt)
    new = generate(model, torch.tensor([ids]), min(max_tokens, model.cfg.context_length - len(ids)),
                   temperature=0)[0, len(ids):].tolist()
    return tok.decode(new[:new.index(50256)] if 50256 in new else new)


def expected_chat(model, questions: list[str], style: str, max_tokens: int) -> list[str]:
    """The answers a chat with history gets: each turn's prompt holds the earlier turns (chat_prompt)."""
    history, answers = [], []
    for q in questions:
        history.append({"role": "user", "content": q})
        answers.append(greedy(model, chat_prompt(history, style), max_tokens))
        history.append({"role": "assistant", "content": answers[-1]})
    return answers


def run_chat(monkeypatch, capsys, args: list[str], lines: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    status = cli.main(["chat", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_chat_in_process_streams_with_history(checkpoint, monkeypatch, capsys):
    path, model = checkpoint
    questions = ["Name a fruit.", "And a colour?"]
    status, out, err = run_chat(monkeypatch, capsys, [str(path), "--temperature", "0", "--max-tokens", "6",
                                                      "--style", "phi3", "--device", "cpu"],
                                "\n".join(questions) + "\n")
    assert status == 0, err
    name = path.parent.name
    assert out == "".join(f"{name}> {a}\n" for a in expected_chat(model, questions, "phi3", 6))
    # /reset forgets: the second question is then answered as a first one
    status, out, _ = run_chat(monkeypatch, capsys, [str(path), "--temperature", "0", "--max-tokens", "6"],
                              "Name a fruit.\n/reset\nAnd a colour?\n/exit\nnever read\n")
    first, second = expected_chat(model, ["Name a fruit."], "alpaca", 6)[0], \
        expected_chat(model, ["And a colour?"], "alpaca", 6)[0]
    assert out == f"{name}> {first}\n(history forgotten)\n{name}> {second}\n"


def test_chat_against_a_server(checkpoint, monkeypatch, capsys):
    path, model = checkpoint
    import copy

    engine = Engine(copy.deepcopy(model), name="mine")
    try:
        with running_server(engine, api_key="k") as url:
            questions = ["Hello!", "Tell me more."]
            status, out, err = run_chat(monkeypatch, capsys, ["--base-url", url, "--api-key", "k", "--temperature",
                                                              "0", "--max-tokens", "5"], "\n".join(questions) + "\n")
            assert status == 0, err
            assert out == "".join(f"mine> {a}\n" for a in expected_chat(model, questions, "alpaca", 5))
            assert f"chatting with mine at {url}" in err           # the server's name for it (was "model>")
            status, _, err = run_chat(monkeypatch, capsys, ["--base-url", url, "--api-key", "wrong"], "hi\n")
            assert status == 1 and "API key" in one_error_line(err)
    finally:
        engine.shutdown()


def test_chat_frequency_penalty_reaches_the_model_here_and_through_a_server(checkpoint, monkeypatch, capsys):
    """A model that says one token forever (tied, random) says others with --frequency-penalty, the same
    in the process and through a server."""
    import copy

    torch.manual_seed(0)
    loop = GPTModel(get_config("gpt-tiny", context_length=128), tie_weights=True).eval()
    path = save_checkpoint(checkpoint[0].parent / "loop" / "model.pt", loop, include_rng=False)
    answers = {}
    for penalty in ("0", "1.5"):
        status, out, err = run_chat(monkeypatch, capsys, [str(path), "--temperature", "0", "--max-tokens", "8",
                                                          "--device", "cpu", "--frequency-penalty", penalty], "hi\n")
        assert status == 0, err
        answers[penalty] = out
    engine = Engine(copy.deepcopy(loop), name="loop")
    try:
        with running_server(engine) as url:
            status, out, err = run_chat(monkeypatch, capsys, ["--base-url", url, "--temperature", "0",
                                                              "--max-tokens", "8", "--frequency-penalty", "1.5"], "hi\n")
    finally:
        engine.shutdown()
    assert answers["0"] == "loop> " + "\n" * 8 + "\n"                    # the loop (of newlines), without a penalty
    assert answers["1.5"] != answers["0"] and status == 0
    assert out == answers["1.5"]                                         # the same answer through the server


def test_chat_when_the_server_is_gone_is_one_error_line(checkpoint, monkeypatch, capsys):
    path, model = checkpoint
    import copy

    engine = Engine(copy.deepcopy(model), name="mine")
    with running_server(engine) as url:
        pass                                                 # stopped: nothing listens there now
    engine.shutdown()
    status, _, err = run_chat(monkeypatch, capsys, ["--base-url", url, "--model", "mine"], "hi\n")
    assert status == 1 and "Traceback" not in err, err      # stderr: the "chatting with" line, then the error
    assert err.splitlines()[-1].startswith("error: lost the connection") and "still running?" in err


@pytest.mark.parametrize("command, args, words", [
    ("serve", ["--port", "70000"], "--port"),
    ("serve", ["--adapter", "spam"], "NAME=PATH"),
    ("serve", ["--adapter", "spam=/no/such/folder"], "no such folder"),
    ("serve", ["--max-batch", "0"], "--max-batch"),
    ("serve", ["--api-key", " "], "--api-key"),
    ("serve", ["/no/such/model"], "does not exist"),
    ("serve", ["MODEL", "--profile", "tiny"], "not both"),
    ("chat", ["--temperature", "5"], "--temperature"),
    ("chat", ["--max-tokens", "0"], "--max-tokens"),
    ("chat", ["--frequency-penalty", "3"], "--frequency-penalty"),
    ("chat", ["--frequency-penalty", "nan"], "--frequency-penalty"),
    ("chat", ["MODEL", "--base-url", "http://127.0.0.1:1/v1"], "--base-url"),
    ("chat", ["--base-url", "localhost:8000"], "http://"),
    ("chat", ["MODEL", "--api-key", "k"], "--api-key goes with --base-url"),
    ("chat", ["MODEL", "--model", "nope"], "not loaded"),
])
def test_bad_options_are_one_error_line(checkpoint, capsys, command, args, words):
    path, _ = checkpoint
    args = [str(path) if a == "MODEL" else a for a in args]
    assert cli.main([command, *args]) == 2
    assert words in one_error_line(capsys.readouterr().err)


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_course_serve_profile_tiny_answers_the_openai_client():
    load_base_model("tiny", verbose=False)        # made (or read) here, so the subprocess only reads it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COURSE_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "course_lib.cli", "serve", "--profile", "tiny", "--port", "0"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)   # its own session: Ctrl-C reaches it alone
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    seen = []
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, "course serve ended before serving:\n" + "".join(seen)
            seen.append(line)
            if line.startswith("serving "):
                url = line.split(" at ")[1].split()[0]
        assert url is not None and url.startswith("http://127.0.0.1:"), "".join(seen)
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "Hi!"}],
                                               max_tokens=5)
        assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
        assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens <= 5
        assert [m.id for m in client.models.list().data] == ["tiny-base"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    log = "".join(seen) + "".join(iter(lambda: lines.get(timeout=5) or "", ""))
    assert "POST /v1/chat/completions 200 model=tiny-base tokens=" in log, log


def test_serve_warns_without_a_key_off_loopback_and_a_taken_port_is_an_error(checkpoint, capsys):
    import socket

    path, _ = checkpoint
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        status = cli.main(["serve", str(path), "--host", "0.0.0.0", "--port", str(port), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1
    assert "warning: listening on 0.0.0.0 without --api-key" in err
    assert f"error: cannot listen on 0.0.0.0:{port}" in err and "another --port" in err and "Traceback" not in err
    # a host that is not this machine's is a wrong option: status 2 (it was 1, as for a taken port)
    status = cli.main(["serve", str(path), "--host", "no-such-host.invalid", "--port", "0", "--device", "cpu",
                       "--api-key", "k"])
    err = capsys.readouterr().err
    assert status == 2 and err.splitlines()[-1].startswith("error: host 'no-such-host.invalid'"), err
