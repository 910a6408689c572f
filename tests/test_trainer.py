"""The production trainer on one CPU process: weight-decay groups, accumulation and clipping against a
plain PyTorch loop, bf16 autocast, the logged lr and MFU, exact resume after a kill or Ctrl-C, refusing
to overwrite a run, divergence, and config errors. (Two processes: tests/test_trainer_ddp.py.)"""

from __future__ import annotations

import json
import math
import os
import signal

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _corpora import verdict_shards
from course_lib.anatomy import flops_per_token
from course_lib.checkpoint import CheckpointError, NonFiniteError, load_checkpoint, save_checkpoint
from course_lib.data import DataFetchError
from course_lib.model import GPTModel, LayerNorm
from course_lib.schedules import lr_at, wsd_lr_at
from course_lib.shards import ShardLoader
from course_lib.trainer import (TrainerConfig, check_config, configure_optimizer, evaluate, param_groups, plot_log,
                                read_log, recipe, train)

matplotlib.use("Agg")
torch.set_num_threads(1)

#: A 2-layer, 32-wide GPT with GPT-2's vocabulary (the shards hold GPT-2 ids); no dropout unless asked.
MODEL = {"base": "gpt-tiny", "n_layers": 2, "emb_dim": 32, "n_heads": 2, "drop_rate": 0.0}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return verdict_shards(tmp_path_factory)


def _cfg(shards, out, **changes) -> TrainerConfig:
    cfg = TrainerConfig(model=MODEL, tie_weights=True, data=str(shards), out_dir=str(out), batch_size=2,
                        context_length=16, max_steps=6, max_lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=1000,
                        eval_batches=2, log_every=1, checkpoint_every=1000, seed=5, device="cpu")
    return cfg.replace(**changes)


def _train(cfg, **kwargs):
    return train(cfg, progress=False, verbose=False, **kwargs)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _reference(cfg: TrainerConfig, batch_size: int, steps: int, clip: float):
    """nanoGPT's loop written out with torch alone: the same init, AdamW groups, lr, batches (in order)."""
    torch.manual_seed(cfg.seed)
    model = GPTModel(cfg.model_config(), tie_weights=cfg.tie_weights)
    matrices = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not model.tok_emb.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in matrices)]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.max_lr, betas=cfg.betas, eps=cfg.eps)
    loader = ShardLoader(cfg.data, "train", batch_size=batch_size, context_length=cfg.context_length, sequential=True)
    losses, norms = [], []
    for k in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(k, max_lr=cfg.max_lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                            total_steps=cfg.max_steps)
        x, y = loader.next_batch()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)))
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return _params(model), losses, norms


# --------------------------------------------------------------------------- #
# The optimizer's parameter groups
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("tie", [False, True])
def test_weight_decay_goes_to_linear_matrices_only(tie):
    cfg = TrainerConfig(model=MODEL, context_length=16).model_config()
    model = GPTModel(cfg, tie_weights=tie)
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decayed, kept = ({id(p) for p in g["params"]} for g in groups)
    assert not decayed & kept                                                    # no tensor in two groups
    assert sum(len(g["params"]) for g in groups) == len(decayed) + len(kept)     # nor twice in one
    assert decayed | kept == {id(p) for p in model.parameters()}                 # every parameter covered
    names = {id(p): n for n, p in model.named_parameters()}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            where = f"{mod_name}.{p_name}"
            if isinstance(module, nn.Embedding) or (tie and p is model.tok_emb.weight):
                assert id(p) in kept, f"{where}: an embedding is not decayed"
            elif isinstance(module, nn.Linear) and p_name == "weight":
                assert id(p) in decayed, f"{where}: a Linear weight is decayed"
            else:
                assert isinstance(module, (nn.Linear, LayerNorm)) and id(p) in kept, f"{where}: bias/norm not decayed"
    # by name, as nanoGPT prints them
    assert {names[i] for i in decayed} == {n for n, p in model.named_parameters()
                                          if n.endswith("weight") and p.dim() == 2 and "emb" not in n}
    opt = configure_optimizer(model, TrainerConfig(), "cpu")
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("fused")
    assert [len(g["params"]) for g in opt.param_groups] == [len(decayed), len(kept)]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_param_groups_refuses_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        param_groups("not a model", 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(nn.Linear(2, 2), -0.1)


# --------------------------------------------------------------------------- #
# One step against plain PyTorch: accumulation and clipping
# --------------------------------------------------------------------------- #
def test_accumulating_4_micro_batches_equals_one_batch_4_times_larger(shards, tmp_path):
    # In-order windows: micro-batches 0..3 of 2 windows are the 8 windows of one batch of 8.
    cfg = _cfg(shards, tmp_path / "acc", shuffle=False, max_steps=3, warmup_steps=1, grad_clip=0.0)
    acc = _train(cfg.replace(batch_size=2, grad_accum_steps=4))
    big = _train(cfg.replace(batch_size=8, grad_accum_steps=1, out_dir=str(tmp_path / "big")))
    ref, ref_losses, ref_norms = _reference(cfg, batch_size=8, steps=3, clip=0.0)
    log = read_log(tmp_path / "acc")
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [r["loss"] for r in log] == pytest.approx(ref_losses, rel=1e-5)
    assert [r["grad_norm"] for r in log] == pytest.approx(ref_norms, rel=1e-5)  # measured with clipping off
    assert _max_diff(_params(acc.model), ref) < 1e-5
    assert _max_diff(_params(big.model), _params(acc.model)) < 1e-5
    assert acc.tokens == big.tokens == 3 * 8 * 16
    # the lr of update k is lr_at(k): warmup 1 -> max_lr, then cosine to min_lr at the last step
    assert [r["lr"] for r in log] == [lr_at(k, max_lr=3e-3, min_lr=3e-4, warmup_steps=1, total_steps=3)
                                      for k in (1, 2, 3)]
    assert log[0]["lr"] == 3e-3 and log[-1]["lr"] == 3e-4


def test_clipping_equals_torchs_and_the_logged_norm_is_the_one_before_clipping(shards, tmp_path):
    cfg = _cfg(shards, tmp_path / "clip", shuffle=False, max_steps=3, warmup_steps=1, grad_clip=0.05,
               batch_size=4)
    result = _train(cfg)
    ref, _, ref_norms = _reference(cfg, batch_size=4, steps=3, clip=0.05)
    unclipped, _, _ = _reference(cfg, batch_size=4, steps=3, clip=0.0)
    log = read_log(tmp_path / "clip")
    assert [r["grad_norm"] for r in log] == pytest.approx(ref_norms, rel=1e-5)
    assert min(ref_norms) > 0.05                                  # so the clip acted at every step
    assert _max_diff(_params(result.model), ref) < 1e-5
    assert _max_diff(ref, unclipped) > 1e-4                       # and it changed the weights


# --------------------------------------------------------------------------- #
# Precision, logging
# --------------------------------------------------------------------------- #
def test_bf16_autocast_trains_the_tiny_recipe_on_cpu(shards, tmp_path):
    cfg = recipe("tiny").replace(data=str(shards), out_dir=str(tmp_path / "bf16"), dtype="bf16", max_steps=20,
                                 log_every=1, eval_every=20, checkpoint_every=20, device="cpu")
    dtypes = []

    def watch(state):  # from step 2 on, record the dtype of the logits
        if state["step"] == 1:
            state["model"].out_head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))

    result = _train(cfg, callback=watch)
    losses = [r["loss"] for r in read_log(tmp_path / "bf16")]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # the weights stay fp32
    assert math.isfinite(result.val_loss) and result.steps == 20


def test_fp16_on_cpu_is_a_clear_error(shards, tmp_path):
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        _train(_cfg(shards, tmp_path / "fp16", dtype="fp16"))
    assert not (tmp_path / "fp16").exists()


def test_the_log_records_lr_mfu_and_tokens(shards, tmp_path):
    cfg = _cfg(shards, tmp_path / "wsd", schedule="wsd", decay_steps=3, max_steps=8, warmup_steps=2,
               peak_flops=1e12, eval_every=4)
    result = _train(cfg)
    log = read_log(tmp_path / "wsd")
    fpt = flops_per_token(cfg.model_config(), training=True)
    assert [r["step"] for r in log] == list(range(1, 9))
    for r in log:
        assert r["lr"] == wsd_lr_at(r["step"], max_lr=3e-3, min_lr=3e-4, warmup_steps=2, total_steps=8,
                                    decay_steps=3)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e12, rel=1e-12)
        assert r["tokens"] == r["step"] * 2 * 16
        assert r["grad_norm"] > 0
        assert ("val_loss" in r) == (r["step"] in (4, 8))
    assert result.mfu == pytest.approx(result.tokens_per_s * fpt / 1e12)
    assert result.val_loss == log[-1]["val_loss"] and result.train_loss == log[-1]["loss"]
    saved = json.loads((tmp_path / "wsd" / "config.json").read_text())
    assert saved["global_batch_tokens"] == 2 * 1 * 1 * 16 and saved["world_size"] == 1
    assert TrainerConfig.from_dict(saved) == cfg
    assert sorted(p.name for p in (tmp_path / "wsd").iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl"]
    ax = plot_log(tmp_path / "wsd")
    assert len(ax.lines) == 2 and list(ax.lines[1].get_xdata()) == [4, 8]


def test_read_log_leaves_out_a_last_line_cut_short(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_log(path)] == [1, 2]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_log(path)
    with pytest.raises(FileNotFoundError):
        read_log(tmp_path / "nothing")
    for line in ("7", '["step", 1]', '{"loss": 2.0}'):           # JSON, but no step record (plot_log failed on it)
        path.write_text(f'{{"step": 1}}\n{line}\n{{"step": 3}}\n')
        with pytest.raises(ValueError, match="line 2: not a record of a training step"):
            read_log(path)
    path.write_bytes(b'{"step": 1, "note": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="not UTF-8"):
        read_log(path)
    with pytest.raises(TypeError, match="path must be a run folder"):
        read_log(None)
    with pytest.raises(TypeError, match="data must be a dict of TrainerConfig fields"):
        TrainerConfig.from_dict(None)


# --------------------------------------------------------------------------- #
# Stopping and resuming
# --------------------------------------------------------------------------- #
def test_a_killed_or_interrupted_run_resumes_to_exactly_the_same_losses(shards, tmp_path):
    # dropout on and random windows, so the random state and the data position must both be restored
    cfg = _cfg(shards, tmp_path / "whole", model={**MODEL, "drop_rate": 0.1}, max_steps=8, checkpoint_every=3)
    whole = _train(cfg)
    want = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_log(tmp_path / "whole")]

    def kill_at_5(state):
        if state["step"] == 5:
            raise RuntimeError("killed")

    killed = cfg.replace(out_dir=str(tmp_path / "killed"))
    with pytest.raises(RuntimeError, match="killed"):
        _train(killed, callback=kill_at_5)
    assert [r["step"] for r in read_log(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 3
    resumed = _train(killed, resume=True)

    def ctrl_c_at_4(state):
        if state["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: finish the step, save, return

    stopped_cfg = cfg.replace(out_dir=str(tmp_path / "ctrl-c"))
    stopped = _train(stopped_cfg, callback=ctrl_c_at_4)
    assert stopped.interrupted and stopped.steps == 5
    assert load_checkpoint(tmp_path / "ctrl-c" / "checkpoint.pt")["step"] == 5
    again = _train(stopped_cfg, resume=True)

    for run, result in (("killed", resumed), ("ctrl-c", again)):
        got = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_log(tmp_path / run)]
        assert got == want, run                                   # every step once, the same numbers exactly
        assert result.steps == 8 and result.tokens == whole.tokens and not result.interrupted
        assert _max_diff(_params(result.model), _params(whole.model)) == 0.0
        assert result.val_loss == whole.val_loss


def test_a_new_run_refuses_an_out_dir_holding_a_run(shards, tmp_path):
    cfg = _cfg(shards, tmp_path / "run", max_steps=2)
    _train(cfg)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        _train(cfg)
    assert checkpoint.read_bytes() == before
    finished = _train(cfg, resume=True)  # nothing left to do: no step, no new log line
    assert finished.steps == 2 and len(read_log(tmp_path / "run")) == 2
    assert checkpoint.read_bytes() == before
    # a checkpoint without the trainer's state (data position, per-rank random state) cannot resume exactly
    other = tmp_path / "other" / "checkpoint.pt"
    save_checkpoint(other, finished.model, step=2)
    with pytest.raises(CheckpointError, match="not written by course_lib.trainer"):
        _train(cfg.replace(out_dir=str(other.parent)), resume=True)


def test_a_new_run_leaves_a_config_json_it_did_not_write_alone(shards, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    mine = out / "config.json"
    mine.write_text('{"my": "settings"}\n')
    with pytest.raises(FileExistsError, match=r"already holds a run \(config\.json\).*resume"):
        _train(_cfg(shards, out, max_steps=2))
    assert mine.read_text() == '{"my": "settings"}\n'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_run_that_fails_before_its_first_step_leaves_no_config_json(shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    small = _cfg(shards, out, model={**MODEL, "vocab_size": 100})     # the shards hold GPT-2 ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _train(small)
    assert list(out.iterdir()) == []               # so the same command, fixed, is not refused as a run
    _train(_cfg(shards, out, max_steps=2))


def test_a_resume_says_what_changed_and_when_there_is_nothing_to_train(shards, tmp_path, capsys):
    cfg = _cfg(shards, tmp_path / "run", max_steps=2)
    _train(cfg)
    train(cfg.replace(max_lr=2e-3), resume=True, progress=False, verbose=True)
    out = capsys.readouterr().out
    assert "max_lr 0.003 -> 0.002" in out and "nothing to train" in out and "max_steps" in out
    train(cfg.replace(max_steps=3), resume=True, progress=False, verbose=True)
    out = capsys.readouterr().out
    assert "other settings" not in out and "nothing to train" not in out and "3/3 steps" in out


@pytest.mark.parametrize("changes", [{"max_lr": math.inf}, {"eps": math.inf}, {"weight_decay": math.nan}])
def test_configure_optimizer_checks_the_config(changes):
    model = nn.Linear(3, 3)
    cfg = TrainerConfig(model=MODEL).replace(**changes)
    with pytest.raises(ValueError, match=next(iter(changes))):
        configure_optimizer(model, cfg, "cpu")


@pytest.mark.parametrize("decay", [math.inf, math.nan, -0.1, "0.1", True])
def test_param_groups_refuses_a_decay_that_is_not_a_finite_number(decay):
    with pytest.raises(ValueError, match="weight_decay must be a finite number"):
        param_groups(nn.Linear(3, 3), decay)
    assert param_groups(nn.Linear(3, 3), np.float32(0.1))[0]["weight_decay"] == pytest.approx(0.1)


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    cfg = _cfg(shards, tmp_path / "nan", max_steps=6, checkpoint_every=2)

    def poison_at_3(state):
        if state["step"] == 3:
            with torch.no_grad():
                state["model"].final_norm.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteError, match=r"loss is nan at step 4.*checkpoint\.pt \(step 2\)"):
        _train(cfg, callback=poison_at_3)
    saved = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert saved["step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert [r["step"] for r in read_log(tmp_path / "nan")] == [1, 2, 3]


# --------------------------------------------------------------------------- #
# Configuration and data
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("changes, field", [
    ({"warmup_steps": 7, "max_steps": 6}, "warmup_steps"),
    ({"min_lr": 1e-2, "max_lr": 1e-3}, "min_lr"),
    ({"batch_size": 0}, "batch_size"),
    ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ({"dtype": "fp8"}, "dtype"),
    ({"schedule": "step"}, "schedule"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"max_lr": 0.0}, "max_lr"),
    ({"model": "gpt-5"}, "model"),
    ({"schedule": "wsd", "decay_steps": 10}, "decay_steps"),
    ({"schedule": ["cosine"]}, "schedule"),        # not a bare "unhashable type: 'list'"
    ({"dtype": ["bf16"]}, "dtype"),
    ({"max_lr": 10**400}, "max_lr"),               # not an OverflowError from math.isfinite
    ({"seed": 2**70}, "seed"),                     # not torch.manual_seed's "Overflow when unpacking long long"
    ({"device": "gpu"}, "device"),
    ({}, "data"),                                  # "unused" is no corpus: refused before out_dir is made
])
def test_a_bad_config_is_a_clear_error_naming_the_field(tmp_path, changes, field):
    cfg = _cfg("unused", tmp_path / "bad").replace(**changes)
    with pytest.raises(ValueError, match=f"TrainerConfig.{field}"):
        _train(cfg)
    assert not (tmp_path / "bad").exists()


def test_an_out_dir_that_is_a_file_is_refused_naming_it(shards, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"{afile} is a file"):
        _train(_cfg(shards, afile))
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("flag", ["resume", "progress", "verbose"])
def test_train_flags_must_be_true_or_false(tmp_path, flag):
    with pytest.raises(TypeError, match=f"{flag} must be True or False"):
        train(_cfg("unused", tmp_path / "bad"), **{"progress": False, "verbose": False, flag: "no"})
    assert not (tmp_path / "bad").exists()


def test_numpy_numbers_in_the_config_become_plain_values_in_config_json(shards, tmp_path):
    np_cfg = _cfg(shards, tmp_path / "np", model={**MODEL, "n_layers": np.int64(1)}, batch_size=np.int64(2),
                  max_lr=np.float32(3e-3), betas=(np.float32(0.5), 0.95), seed=np.int64(5), max_steps=1,
                  warmup_steps=0)
    checked = check_config(np_cfg)
    plain = _cfg(shards, tmp_path / "np", model={**MODEL, "n_layers": 1}, batch_size=2, max_lr=float(np.float32(3e-3)),
                 betas=(0.5, 0.95), seed=5, max_steps=1, warmup_steps=0)
    assert checked == plain
    assert type(checked.batch_size) is int and type(checked.max_lr) is float and type(checked.seed) is int
    assert type(checked.model["n_layers"]) is int and all(type(b) is float for b in checked.betas)
    _train(np_cfg)                                 # config.json is JSON: no "int64 is not JSON serializable"
    saved = json.loads((tmp_path / "np" / "config.json").read_text())
    assert saved["batch_size"] == 2 and saved["model"]["n_layers"] == 1 and saved["model_config"]["n_layers"] == 1
    assert TrainerConfig.from_dict(saved) == plain


def test_evaluate_refuses_a_negative_number_of_batches():
    model = GPTModel(TrainerConfig(model=MODEL, context_length=16).model_config())
    assert math.isnan(evaluate(model, None, 0))
    with pytest.raises(ValueError, match="num_batches"):
        evaluate(model, None, -1)


def test_replace_is_checked_and_the_recipes_are_valid():
    with pytest.raises(TypeError, match="no field 'max_step'"):
        TrainerConfig().replace(max_step=3)
    assert TrainerConfig().replace(max_steps=None, skip_none=True).max_steps == TrainerConfig().max_steps
    for profile in ("tiny", "cpu", "gpu"):
        check_config(recipe(profile))
    gpu = recipe("gpu")
    assert gpu.model_config().n_layers == 12 and gpu.model_config().emb_dim == 768 and gpu.tie_weights
    assert gpu.batch_size * gpu.grad_accum_steps * gpu.context_length == 524_288   # ~0.5M tokens per step
    assert gpu.dtype == "bf16" and gpu.compile
    assert gpu.max_steps * 524_288 * flops_per_token(gpu.model_config()) == pytest.approx(1.8e17, rel=0.01)
    assert recipe("tiny").model_config().n_layers == 2 and recipe("tiny").model_config().context_length == 32
    # the cpu recipe is what its docstring says: gpt-cpu (4 x 256) at 128 tokens on tinystories-val, 150 steps
    # of 16 x 128 = 2,048 tokens, about 30 TFLOPs (6 N + attention, by hand: N = 12 L d^2 + V d)
    cpu = recipe("cpu")
    m = cpu.model_config()
    assert (m.n_layers, m.emb_dim, m.context_length, cpu.data, cpu.max_steps) == (4, 256, 128, "tinystories-val", 150)
    assert cpu.batch_size * cpu.grad_accum_steps * cpu.context_length == 2_048
    n = 12 * 4 * 256**2 + 50257 * 256
    per_token = 3 * (2 * n + 4 * 4 * 128 * 256)
    assert flops_per_token(m, training=True) == per_token
    assert 2_048 * 150 * per_token == pytest.approx(30e12, rel=0.05)
    with pytest.raises(ValueError, match="profile"):
        recipe("huge")


def test_a_corpus_name_is_tokenized_once_into_the_data_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "cache"))
    cfg = _cfg("the-verdict", tmp_path / "a", max_steps=1, warmup_steps=0)
    try:
        _train(cfg)
    except DataFetchError as err:
        pytest.skip(f"the-verdict is not staged: {err}".splitlines()[0])
    meta = tmp_path / "cache" / "shards" / "the-verdict" / "meta.json"
    first = meta.stat().st_mtime_ns
    _train(cfg.replace(out_dir=str(tmp_path / "b")))
    assert meta.stat().st_mtime_ns == first
    with pytest.raises(ValueError, match="TrainerConfig.data"):
        _train(cfg.replace(data="no-such-corpus", out_dir=str(tmp_path / "c")))


def test_a_damaged_val_shard_is_an_error_not_a_silent_nan(shards, tmp_path):
    """A val shard cut short must stop the run with ShardError naming it, not give val_loss=nan."""
    import shutil

    from course_lib.shards import ShardError, shard_files

    data = tmp_path / "shards"
    shutil.copytree(shards, data)
    val = shard_files(data, "val")[0]
    val.write_bytes(val.read_bytes()[:-7])          # truncated: the header's count no longer fits
    with pytest.raises(ShardError, match=val.name):
        _train(_cfg(data, tmp_path / "run"))


def test_a_run_that_fails_in_its_setup_leaves_no_empty_folder(shards, tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="context_length"):                  # no window fits the shards
        _train(_cfg(shards, out, context_length=8192, model={**MODEL, "context_length": 8192}))
    assert not out.exists()
    keep = tmp_path / "mine"                                                  # a folder that was there stays
    keep.mkdir()
    with pytest.raises(ValueError, match="context_length"):
        _train(_cfg(shards, keep, context_length=8192, model={**MODEL, "context_length": 8192}))
    assert keep.is_dir()
