"""`course finetune classify --lora RANK` (step 9), in the tiny profile.

One real run as a subprocess (as a learner runs it); the refusals run in-process through
``cli.main`` and return before any training. The checks on what was written are independent of
the command: the tiny base model's own weights, a hand count of LoRA's parameters, and the
adapter folder read back with ``load_adapter`` onto the base model.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib import cli
from course_lib.base_model import load_base_model
from course_lib.checkpoint import model_from_checkpoint
from course_lib.classification import GPTClassifier
from course_lib.lora import DEFAULT_TARGETS, LORA_RECIPES, LoRALinear, load_adapter
from _course import one_error_line

ROOT = Path(__file__).resolve().parents[1]
RANK = 4


def course(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "course_lib.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real `course finetune classify --lora 4` in the tiny profile."""
    out = tmp_path_factory.mktemp("lora") / "run"
    r = course("finetune", "classify", "--profile", "tiny", "--lora", str(RANK), "--out", str(out),
               "--device", "cpu", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return load_base_model("tiny", device="cpu", verbose=False)


def test_writes_model_adapter_and_metrics(trained):
    out, r = trained
    assert (out / "model.pt").is_file() and (out / "metrics.json").is_file()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "adapter" in r.stdout and "LoRA r=4" in r.stdout


def test_metrics_record_lora_and_a_hand_count_of_trainable_parameters(trained):
    out, _ = trained
    m = json.loads((out / "metrics.json").read_text())
    lora = m["lora"]
    assert (lora["rank"], lora["alpha"], lora["targets"]) == (RANK, 2.0 * RANK, list(DEFAULT_TARGETS))
    model = model_from_checkpoint(out / "model.pt", device="cpu")
    cfg, head = model.gpt.cfg, model.gpt.out_head
    d = cfg.emb_dim
    # 4 attention projections of [d, d] per block, each with A [r, d] and B [d, r]; plus the head in full
    expected = cfg.n_layers * 4 * RANK * (d + d) + sum(p.numel() for p in head.parameters())
    assert m["trainable_parameters"] == lora["trainable_parameters"] == expected
    full = sum(p.numel() for p in model.parameters())
    assert m["trainable_parameters"] < full / 100
    assert m["recipe"]["trainable"] == "lora"
    assert "model.pt" in lora["note"]                               # where the fully trained head lives


def test_model_pt_is_the_base_plus_adapter_and_head(trained, base):
    """Only the targets changed, and base + adapter/ + model.pt's head computes what model.pt computes."""
    out, _ = trained
    model = model_from_checkpoint(out / "model.pt", device="cpu").eval()
    assert isinstance(model, GPTClassifier)
    assert not any(isinstance(mod, LoRALinear) for mod in model.modules())   # merged: a plain classifier
    base_sd = base.state_dict()
    changed = set()
    for name, p in model.gpt.state_dict().items():
        if name.startswith("out_head."):
            continue
        if not torch.equal(p, base_sd[name]):
            changed.add(name)
    assert changed, "training changed nothing"
    assert all(any(f".att.{t}.weight" in n for t in DEFAULT_TARGETS) for n in changed), sorted(changed)

    rebuilt = copy.deepcopy(model)
    rebuilt.gpt.load_state_dict({**base_sd, **{k: v for k, v in model.gpt.state_dict().items()
                                               if k.startswith("out_head.")}})
    load_adapter(rebuilt, out / "adapter")
    rebuilt.eval()
    idx = torch.randint(0, model.gpt.cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_classify_reads_the_lora_run(trained):
    out, _ = trained
    r = course("classify", str(out), "WINNER!! You have won a prize, call now", "see you at lunch?")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        label, prob, _ = line.split(maxsplit=2)
        assert label in ("spam", "ham") and 0.5 <= float(prob) <= 1.0


@pytest.mark.parametrize("args, words", [
    (["--lora", "0"], ["--lora", "positive"]),
    (["--lora", "-3"], ["--lora", "positive"]),
    (["--lora", "4", "--alpha", "0"], ["--alpha", "positive"]),
    (["--lora", "4", "--alpha", "nan"], ["--alpha", "positive"]),
    (["--alpha", "8"], ["--lora RANK"]),
    (["--targets", "W_query"], ["--lora RANK"]),
    (["--lora", "4", "--targets", " , "], ["--targets"]),
    (["--lora", "4", "--targets", "W_query,head"], ["head"]),
    (["--lora", "4", "--trainable", "all"], ["--trainable", "--lora"]),
])
def test_bad_lora_options_are_one_error_line_and_write_nothing(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    status = cli.main(["finetune", "classify", "--profile", "tiny", "--out", str(out), "--device", "cpu", *args])
    err = one_error_line(capsys.readouterr().err)
    assert status == 2
    assert all(w in err for w in words), err
    assert not out.exists()


def test_bad_lora_0_as_a_subprocess(tmp_path):
    r = course("finetune", "classify", "--profile", "tiny", "--lora", "0", "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    assert "--lora must be a positive rank" in one_error_line(r.stderr)


def test_unknown_target_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    status = cli.main(["finetune", "classify", "--profile", "tiny", "--lora", "4", "--targets", "W_nothing",
                       "--out", str(out), "--device", "cpu", "-q"])
    err = one_error_line(capsys.readouterr().err)
    assert status == 2 and "W_nothing" in err and "W_query" in err     # names the target and the choices
    assert not (out / "model.pt").exists() and not (out / "adapter").exists()


def test_an_earlier_adapter_is_not_replaced_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    status = cli.main(["finetune", "classify", "--profile", "tiny", "--lora", "4", "--out", str(out)])
    err = one_error_line(capsys.readouterr().err)
    assert status == 2 and "adapter_config.json" in err and "--force" in err
    assert (out / "adapter" / "adapter_config.json").read_text() == "{}"


def test_a_file_named_adapter_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter").write_text("mine")
    status = cli.main(["finetune", "classify", "--profile", "tiny", "--lora", "4", "--out", str(out)])
    assert status == 2 and "adapter" in one_error_line(capsys.readouterr().err)
    assert (out / "adapter").read_text() == "mine"


def test_the_run_follows_the_profiles_lora_recipe(trained):
    out, _ = trained
    metrics, recipe = json.loads((out / "metrics.json").read_text()), LORA_RECIPES["classify"]["tiny"]
    assert metrics["recipe"]["lr"] == recipe.lr and metrics["lora"]["targets"] == list(recipe.targets)


@pytest.mark.parametrize("lr", ["0", "-1e-3", "nan", "inf"])
def test_a_bad_learning_rate_is_refused_before_training(tmp_path, capsys, lr):
    status = cli.main(["finetune", "classify", "--profile", "tiny", "--lora", "4", f"--lr={lr}",
                       "--out", str(tmp_path / "run")])
    assert status == 2 and "--lr must be a positive learning rate" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- #
# course finetune instruct --lora
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def instructed(tmp_path_factory):
    """One real `course finetune instruct --lora 4` in the tiny profile."""
    out = tmp_path_factory.mktemp("lora-instruct") / "run"
    r = course("finetune", "instruct", "--profile", "tiny", "--lora", str(RANK), "--out", str(out),
               "--device", "cpu", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def test_instruct_writes_adapter_and_records_lora(instructed):
    out, r = instructed
    for name in ("model.pt", "responses.json", "metrics.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    lora = json.loads((out / "metrics.json").read_text())["lora"]
    model = model_from_checkpoint(out / "model.pt", device="cpu")
    cfg = model.cfg
    assert (lora["rank"], lora["alpha"], lora["targets"]) == (RANK, 2.0 * RANK, list(DEFAULT_TARGETS))
    assert lora["trainable_parameters"] == cfg.n_layers * 4 * RANK * 2 * cfg.emb_dim      # nothing else trains
    assert lora["trainable_parameters"] < sum(p.numel() for p in model.parameters()) / 100
    assert "LoRA" in r.stdout and "adapter" in r.stdout
    # the template it was tuned with travels with the adapter (course adapters merge puts it in the tokenizer)
    from course_lib.serve import chat_template
    style = json.loads((out / "metrics.json").read_text())["style"]
    assert (out / "adapter" / "chat_template.jinja").read_text() == chat_template(style)


def test_instruct_model_pt_is_the_base_plus_adapter(instructed, base):
    out, _ = instructed
    model = model_from_checkpoint(out / "model.pt", device="cpu").eval()
    assert not any(isinstance(mod, LoRALinear) for mod in model.modules())
    base_sd = base.state_dict()
    changed = {n for n, p in model.state_dict().items() if not torch.equal(p, base_sd[n])}
    assert changed and all(any(f".att.{t}.weight" in n for t in DEFAULT_TARGETS) for n in changed), sorted(changed)
    rebuilt = copy.deepcopy(base)
    load_adapter(rebuilt, out / "adapter")
    rebuilt.eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_generate_reads_the_lora_instruct_run(instructed):
    out, _ = instructed
    r = course("generate", str(out), "Name three fruits.", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, words", [
    (["--lora", "0"], ["--lora", "positive"]),
    (["--alpha", "8"], ["--lora RANK"]),
    (["--lora", "4", "--alpha", "-1"], ["--alpha", "positive"]),
])
def test_instruct_bad_lora_options(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    status = cli.main(["finetune", "instruct", "--profile", "tiny", "--out", str(out), "--device", "cpu", *args])
    err = one_error_line(capsys.readouterr().err)
    assert status == 2 and all(w in err for w in words), err
    assert not out.exists()


def test_prepare_model_hooks_refuse_a_non_function():
    from course_lib.classification import finetune_classifier
    from course_lib.instruction import finetune_instructions

    for finetune in (finetune_classifier, finetune_instructions):
        with pytest.raises(TypeError, match="prepare_model"):
            finetune("tiny", device="cpu", prepare_model="add_lora", progress=False, verbose=False)


def test_lora_options_take_targets_and_their_ranks_from_the_profiles_recipe():
    import argparse

    args = argparse.Namespace(lora=8, alpha=None, targets=None)
    recipe = LORA_RECIPES["classify"]["cpu"]
    assert cli._lora_options(args, "classify", "cpu") == (8, 16.0, recipe.targets, recipe.rank_pattern)
    args.targets = "W_query,W_value"   # the learner's own targets: every one at the given rank
    assert cli._lora_options(args, "classify", "cpu") == (8, 16.0, ("W_query", "W_value"), {})
