"""`course pretrain` and `course data shards` (step 8), in the tiny profile.

The real command runs as a subprocess, as a learner runs it, also under ``torchrun`` with two
gloo processes on the CPU; every subprocess uses one thread (``OMP_NUM_THREADS=1``) and the CPU.
Refusals (bad options, a folder that holds a run) end before any training, so they run
in-process through ``cli.main``, which is quicker than a new Python importing torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiktoken

from course_lib import cli, data
from course_lib.checkpoint import load_checkpoint, model_from_checkpoint
from course_lib.model import GPTModel
from course_lib.shards import ShardLoader, read_shard, shard_files
from course_lib.trainer import DTYPES, read_log, recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = recipe("tiny")
RUN_FILES = {"checkpoint.pt", "log.jsonl", "config.json"}


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("COURSE_DEVICE", None)
    return e


def course(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "course_lib.cli", *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def pretrain(out: Path, *args, timeout=300):
    return course("pretrain", "--profile", "tiny", "--out", str(out), "--device", "cpu", "-q", *args,
                  timeout=timeout)


def one_error_line(r, status: int = 2) -> str:
    assert r.returncode == status, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def refused(capsys, *args) -> str:
    """``course ARGS`` in this process: it must end with status 2 and one ``error:`` line."""
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return one_error_line(subprocess.CompletedProcess(args, status, captured.out, captured.err))


def refused_pretrain(capsys, out: Path, *args) -> str:
    return refused(capsys, "pretrain", "--profile", "tiny", "--out", str(out), "--device", "cpu", "-q", *args)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def steps_of(out: Path) -> list[int]:
    return [r["step"] for r in read_log(out / "log.jsonl")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One real `course pretrain --profile tiny`, into a folder it creates."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    r = pretrain(out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


# --------------------------------------------------------------------------- #
# One process
# --------------------------------------------------------------------------- #
def test_pretrain_writes_checkpoint_log_and_config(run):
    out, r = run
    assert {p.name for p in out.iterdir()} == RUN_FILES          # no temporary file left behind
    log = read_log(out / "log.jsonl")
    assert [rec["step"] for rec in log] == list(range(TINY.log_every, TINY.max_steps + 1, TINY.log_every))
    for rec in log:
        assert rec["tokens_per_s"] > 0 and 0 < rec["mfu"] < 1, rec
        assert rec["tokens"] == rec["step"] * TINY.batch_size * TINY.grad_accum_steps * TINY.context_length
    assert [rec["step"] for rec in log if rec.get("val_loss") is not None] == [10, 20, 30]
    config = json.loads((out / "config.json").read_text())
    assert config["max_steps"] == TINY.max_steps and config["world_size"] == 1 and config["out_dir"] == str(out)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == TINY.max_steps
    model = model_from_checkpoint(out / "checkpoint.pt")
    assert isinstance(model, GPTModel) and model.cfg.n_layers == 2 and model.cfg.context_length == 32
    # the summary: steps, both losses, tokens/s, MFU and where the files are
    assert f"{TINY.max_steps} of {TINY.max_steps}" in r.stdout
    last = log[-1]
    assert f"train {last['loss']:.3f}, validation {last['val_loss']:.3f}" in r.stdout
    assert "tokens/s, MFU " in r.stdout
    for name in RUN_FILES:
        assert str(out / name) in r.stdout


def test_a_second_run_into_the_same_folder_is_refused(run, capsys):
    out, _ = run
    before = snapshot(out)
    line = refused_pretrain(capsys, out)
    assert "--resume" in line and "--out" in line and str(out) in line
    assert snapshot(out) == before


def test_grad_accum_steps_sets_the_micro_batches_per_step(tmp_path):
    out = tmp_path / "run"
    r = pretrain(out, "--max-steps", "2", "--grad-accum-steps", "3")   # notebook 08's 8-GPU command needs it
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["grad_accum_steps"] == 3
    assert config["global_batch_tokens"] == 3 * TINY.batch_size * TINY.context_length
    assert read_log(out / "log.jsonl")[-1]["tokens"] == 2 * config["global_batch_tokens"]


def test_resume_continues_a_shorter_run_without_repeating_steps(tmp_path, capsys):
    out = tmp_path / "run"
    r = pretrain(out, "--max-steps", "10")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 10
    first = read_log(out / "log.jsonl")
    assert [rec["step"] for rec in first] == [5, 10]

    r = pretrain(out, "--resume")                      # the recipe's 30 steps
    assert r.returncode == 0, r.stderr
    log = read_log(out / "log.jsonl")
    assert [rec["step"] for rec in log] == [5, 10, 15, 20, 25, 30]
    assert log[:2] == first                            # the lines before the checkpoint are kept as they were
    assert log[2]["tokens"] == 15 * TINY.batch_size * TINY.context_length
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 30
    assert "30 of 30" in r.stdout

    before = snapshot(out)                             # nothing left to do: said, and nothing changes
    assert cli.main(["pretrain", "--profile", "tiny", "--out", str(out), "--device", "cpu", "-q", "--resume"]) == 0
    assert "nothing to train" in capsys.readouterr().err
    assert steps_of(out) == [5, 10, 15, 20, 25, 30] and snapshot(out)["checkpoint.pt"] == before["checkpoint.pt"]


def test_resume_with_another_recipe_is_refused_before_training(run, capsys):
    out, _ = run
    before = snapshot(out)
    line = refused(capsys, "pretrain", "--profile", "cpu", "--out", str(out), "--device", "cpu", "--resume")
    assert "other settings" in line and "n_layers 2 -> 4" in line, line
    assert snapshot(out) == before


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "course_lib.cli", "pretrain", "--profile", "tiny", "--out", str(out),
           "--device", "cpu", "-q", "--max-steps", "1000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():   # the first checkpoint (step 10): the loop is running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stdout + stderr
    step = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 10 <= step < 1000
    assert f"after step {step:,} of 1,000" in stderr
    assert f"course pretrain --profile tiny --out {out} --max-steps 1000 --device cpu --resume" in stderr
    assert "Traceback" not in stderr
    assert steps_of(out)[-1] == step
    assert "stopped the tiny recipe" in stdout and f"{step} of 1,000" in stdout and "tokens/s, MFU" in stdout


# --------------------------------------------------------------------------- #
# torchrun: two processes on the CPU (gloo)
# --------------------------------------------------------------------------- #
def test_torchrun_two_processes_write_one_run_from_rank_0(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "course_lib.cli", "pretrain", "--profile", "tiny", "--out", str(out), "--device", "cpu", "-q"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == RUN_FILES          # one checkpoint, no temporary files
    steps = steps_of(out)
    assert steps == sorted(set(steps)) and steps[-1] == TINY.max_steps   # one writer: no line twice
    log = read_log(out / "log.jsonl")
    assert all(rec["mfu"] > 0 and rec["tokens_per_s"] > 0 for rec in log)
    assert log[-1]["tokens"] == 2 * TINY.max_steps * TINY.batch_size * TINY.context_length  # both ranks' tokens
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert r.stdout.count("pretrained the tiny recipe") == 1 and r.stdout.count("tokens/s, MFU") == 1, r.stdout
    assert "on cpu x 2" in r.stdout
    assert load_checkpoint(out / "checkpoint.pt")["extra"]["world_size"] == 2


# --------------------------------------------------------------------------- #
# Bad input: one line, exit status 2, before any training
# --------------------------------------------------------------------------- #
def test_cli_dtypes_are_the_trainers():
    assert set(cli._DTYPES) == set(DTYPES)


def test_unknown_dtype_is_refused(tmp_path):
    r = pretrain(tmp_path / "run", "--dtype", "fp8")
    assert r.returncode == 2 and "--dtype" in r.stderr and "fp8" in r.stderr and "bf16" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, expect", [
    (["--max-steps", "0"], "--max-steps must be a positive number"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be a positive number"),
    (["--dtype", "fp16"], "--dtype fp16 needs a CUDA GPU"),
    (["--data", "no-such-corpus"], "neither a folder of shards nor a registered corpus"),
    (["--data", "gpt2-encoder"], "not a text corpus"),
])
def test_bad_options_are_one_line(tmp_path, capsys, args, expect):
    assert expect in refused_pretrain(capsys, tmp_path / "run", *args)
    assert not (tmp_path / "run").exists()


def test_an_empty_out_or_data_is_refused_not_read_as_the_default_or_the_current_folder(tmp_path, capsys,
                                                                                         monkeypatch):
    default = tmp_path / "default"           # where an empty --out used to train, unasked
    monkeypatch.setattr(cli, "_default_run_dir", lambda kind, profile: default)
    line = refused(capsys, "pretrain", "--profile", "tiny", "--out", "", "--device", "cpu", "-q", "--max-steps", "1")
    assert "--out is empty" in line
    assert not default.exists()
    line = refused_pretrain(capsys, tmp_path / "run", "--data", " ")
    assert "--data is empty" in line and "registered corpus" in line
    assert not (tmp_path / "run").exists()


def test_resume_on_an_empty_folder_starts_a_new_run_and_says_so(tmp_path, capsys):
    from course_lib.shards import prepare_shards

    shards, out = tmp_path / "shards", tmp_path / "empty"
    prepare_shards("the-verdict", shards, workers=1, progress=False)
    out.mkdir()
    args = ["pretrain", "--profile", "tiny", "--out", str(out), "--device", "cpu", "-q", "--data", str(shards),
            "--max-steps", "2", "--resume"]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint.pt in {out} yet, so a new run starts" in err, err
    assert steps_of(out) == [2] and load_checkpoint(out / "checkpoint.pt")["step"] == 2


def test_a_data_folder_without_shards_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "book.txt").write_text("Once upon a time.")
    line = refused_pretrain(capsys, tmp_path / "run", "--data", str(empty))
    assert "no training shards" in line and "course data shards" in line and str(empty) in line
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- #
# course data shards
# --------------------------------------------------------------------------- #
def test_data_shards_writes_what_tiktoken_reads_and_the_loader_serves(tmp_path):
    out = tmp_path / "verdict"
    r = course("data", "shards", "the-verdict", "--out", str(out), "--workers", "2", "--shard-tokens", "2000",
               "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    meta = json.loads((out / "meta.json").read_text())
    train, val = shard_files(out, "train"), shard_files(out, "val")
    assert len(train) >= 3 and val and [p.name for p in train] == meta["splits"]["train"]["files"]
    # the shards hold exactly tiktoken's ids of the text, after one end-of-text token
    enc = tiktoken.get_encoding("gpt2")
    text = data.fetch("the-verdict", progress=False).read_text(encoding="utf-8").strip()
    ids = [int(t) for f in train + val for t in read_shard(f)]
    assert ids == [enc.eot_token] + enc.encode_ordinary(text)
    # the summary's counts are meta.json's
    total = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert total == len(ids) and f"{total:,} tokens in" in r.stdout and "tokens/s" in r.stdout
    assert f"{meta['splits']['train']['tokens']:,} tokens" in r.stdout
    assert f"course pretrain --data {out}" in r.stdout
    # ShardLoader reads them, and the trainer takes the folder as --data
    x, y = ShardLoader(out, "train", batch_size=2, context_length=16).next_batch()
    assert x.shape == y.shape == (2, 16) and (x[:, 1:] == y[:, :-1]).all()
    assert cli._data_problem(str(out)) is None

    before = snapshot(out)
    line = one_error_line(course("data", "shards", "the-verdict", "--out", str(out), "-q"))  # not empty
    assert "--force" in line and str(out) in line
    assert snapshot(out) == before
    r = course("data", "shards", "the-verdict", "--out", str(out), "--force", "--workers", "1",
               "--shard-tokens", "2000", "-q")
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == before          # one worker writes the same files as two


@pytest.mark.parametrize("args, expect", [
    (["the-verdict", "--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    (["the-verdict", "--shard-tokens", "0"], "--shard-tokens must be a positive number"),
    (["the-verdict", "--workers", "0"], "--workers must be a positive number"),
    (["no-such-corpus"], "neither a registered data name"),
])
def test_data_shards_bad_input_is_one_line(tmp_path, capsys, args, expect):
    assert expect in refused(capsys, "data", "shards", *args, "--out", str(tmp_path / "out"), "-q")
    assert not (tmp_path / "out").exists()


def test_data_shards_refuses_an_empty_source_or_out(tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "cwd"                   # an empty --out used to mean ".": the shards landed here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert "NAME|PATH is empty" in refused(capsys, "data", "shards", "", "--out", str(tmp_path / "out"), "-q")
    assert "--out is empty" in refused(capsys, "data", "shards", "the-verdict", "--out", "", "--workers", "1", "-q")
    assert not (tmp_path / "out").exists() and not any(cwd.iterdir())
