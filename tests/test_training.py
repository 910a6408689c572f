"""The losses, perplexity and the training loop — including an exact resume from a checkpoint."""

from __future__ import annotations

import math

import matplotlib
import pytest
import torch
import torch.nn as nn

from course_lib.config import GPTConfig
from course_lib.model import GPTModel
from course_lib.text_data import create_dataloader
from course_lib.training import (History, calc_loss_batch, calc_loss_loader, perplexity, plot_losses,
                                 train)

matplotlib.use("Agg")

TEXT = ("the cat sat on the mat. the dog ran to the cat. a bird sang in the tree and the cat looked up. "
        "every day the dog and the cat and the bird met by the old tree near the mat. ") * 6


class CharTokenizer:
    """One id per character (a tiny vocabulary keeps the test models small)."""

    def __init__(self, text):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text):
        return [self.index[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


TOK = CharTokenizer(TEXT)
CFG = GPTConfig(vocab_size=len(TOK.chars), context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)


def _loaders(seed=7, shuffle=True):
    ids = TOK.encode(TEXT)
    cut = int(0.85 * len(ids))
    train_loader = create_dataloader(ids[:cut], batch_size=4, max_length=16, stride=16, shuffle=shuffle, seed=seed)
    val_loader = create_dataloader(ids[cut:], batch_size=4, max_length=16, stride=16, shuffle=False, drop_last=False)
    return train_loader, val_loader


def _model_and_opt(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
def test_calc_loss_batch_is_the_mean_negative_log_likelihood_of_the_targets():
    model, _ = _model_and_opt()
    model.eval()
    x = torch.randint(0, CFG.vocab_size, (3, 9))
    y = torch.randint(0, CFG.vocab_size, (3, 9))
    with torch.no_grad():
        logits = model(x).double()
        probs = logits.exp() / logits.exp().sum(-1, keepdim=True)       # softmax by hand
        p_target = torch.stack([probs[b, t, y[b, t]] for b in range(3) for t in range(9)])
        want = -p_target.log().mean()
        got = calc_loss_batch(x, y, model, "cpu")
    assert got.shape == ()
    assert abs(got.item() - want.item()) < 1e-5


def test_calc_loss_batch_keeps_the_graph_for_backward():
    model, _ = _model_and_opt()
    x = torch.randint(0, CFG.vocab_size, (2, 5))
    calc_loss_batch(x, x, model).backward()
    assert model.tok_emb.weight.grad is not None


def test_calc_loss_batch_rejects_mismatched_or_float_batches():
    model, _ = _model_and_opt()
    with pytest.raises(ValueError, match="same shape"):
        calc_loss_batch(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), model)
    with pytest.raises(TypeError, match="input_batch"):
        calc_loss_batch(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), model)


def test_calc_loss_loader_averages_the_first_num_batches():
    model, _ = _model_and_opt()
    model.eval()
    train_loader, _ = _loaders(shuffle=False)
    batches = list(train_loader)
    with torch.no_grad():
        per_batch = [calc_loss_batch(x, y, model).item() for x, y in batches]
    assert calc_loss_loader(train_loader, model, "cpu", num_batches=3) == pytest.approx(sum(per_batch[:3]) / 3)
    assert calc_loss_loader(train_loader, model, "cpu") == pytest.approx(sum(per_batch) / len(per_batch))
    assert calc_loss_loader(train_loader, model, "cpu", num_batches=10_000) == pytest.approx(
        sum(per_batch) / len(per_batch))
    assert math.isnan(calc_loss_loader([], model))
    with pytest.raises(ValueError, match="num_batches"):
        calc_loss_loader(train_loader, model, num_batches=0)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    class Uniform(nn.Module):  # the same logit for every token: probability 1/V each
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, idx):
            return torch.zeros(*idx.shape, 500) + self.w

    x = torch.randint(0, 500, (2, 7))
    loss = calc_loss_batch(x, x, Uniform())
    assert loss.item() == pytest.approx(math.log(500), rel=1e-6)
    assert perplexity(loss) == pytest.approx(500, rel=1e-5)
    assert perplexity(0.0) == 1.0
    with pytest.raises(ValueError, match="negative"):
        perplexity(-1.0)


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #
def test_train_learns_and_records_its_history():
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    steps_per_epoch = len(train_loader)
    history = train(model, train_loader, val_loader, opt, "cpu", num_epochs=4, eval_freq=3, eval_iter=2,
                    start_context="the cat", tokenizer=TOK, sample_freq=6, progress=False, verbose=False)
    n = 4 * steps_per_epoch
    assert history.step == n
    assert history.tokens == n * 4 * 16
    want_steps = list(range(3, n + 1, 3)) + ([n] if n % 3 else [])
    assert history.steps == want_steps
    assert history.tokens_seen == [s * 4 * 16 for s in want_steps]
    assert len(history.train_losses) == len(history.val_losses) == len(want_steps)
    assert history.train_losses[-1] < history.train_losses[0] - 0.5, history.train_losses
    assert history.best_val_loss < history.val_losses[0]
    assert [s for s, _ in history.samples] == list(range(6, n + 1, 6))
    assert all(text.startswith("the cat") for _, text in history.samples)
    assert not model.training


def test_max_steps_and_max_seconds_stop_training():
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    h = train(model, train_loader, val_loader, opt, max_steps=5, eval_freq=2, progress=False, verbose=False)
    assert h.step == 5 and h.steps == [2, 4, 5]
    h = train(model, train_loader, val_loader, opt, num_epochs=100, eval_freq=1000, max_seconds=0.0,
              progress=False, verbose=False)
    assert h.step == 1


def _train_chunk(tmp_path, name, max_steps, resume=False, init_seed=0, loader_seed=7):
    model, opt = _model_and_opt(init_seed)
    train_loader, val_loader = _loaders(seed=loader_seed)
    h = train(model, train_loader, val_loader, opt, max_steps=max_steps, eval_freq=3, eval_iter=2,
              checkpoint_path=tmp_path / name, checkpoint_freq=4, resume=resume, progress=False, verbose=False)
    return model, h


@pytest.mark.parametrize("stop_at, seeded", [(7, True), (13, True), (7, False)],
                         ids=["mid-epoch", "epoch-boundary", "unseeded-loader"])
def test_resumed_training_continues_exactly_like_the_uninterrupted_run(tmp_path, stop_at, seeded):
    n_total = 30  # 13 batches per epoch: the runs cross two epoch boundaries, with dropout on
    first_seed, other_seed = (7, 8) if seeded else (None, None)
    full_model, full = _train_chunk(tmp_path, "full.pt", n_total, loader_seed=first_seed)
    assert len(_loaders()[0]) == 13

    _train_chunk(tmp_path, "part.pt", stop_at, loader_seed=first_seed)
    torch.manual_seed(999)  # disturb every generator: the checkpoint must bring them back
    # A fresh model with other weights and a loader seeded differently: all of it comes from the checkpoint.
    resumed_model, resumed = _train_chunk(tmp_path, "part.pt", n_total, resume=True, init_seed=5,
                                          loader_seed=other_seed)

    assert resumed.steps == full.steps
    assert resumed.tokens_seen == full.tokens_seen
    assert resumed.train_losses == full.train_losses  # exactly equal, not approximately
    assert resumed.val_losses == full.val_losses
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_without_a_checkpoint_starts_fresh_and_an_existing_one_is_never_overwritten(tmp_path):
    _, h = _train_chunk(tmp_path, "run.pt", 3, resume=True)  # nothing to resume: a new run
    assert h.step == 3
    before = (tmp_path / "run.pt").read_bytes()
    with pytest.raises(FileExistsError, match="resume=True"):
        _train_chunk(tmp_path, "run.pt", 6, resume=False)
    assert (tmp_path / "run.pt").read_bytes() == before


def test_train_argument_errors():
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    with pytest.raises(ValueError, match="num_epochs"):
        train(model, train_loader, val_loader, opt, progress=False)
    with pytest.raises(ValueError, match="eval_freq"):
        train(model, train_loader, val_loader, opt, max_steps=2, eval_freq=0, progress=False)
    with pytest.raises(TypeError, match="optimizer"):
        train(model, train_loader, val_loader, "adam", max_steps=2, progress=False)


def test_history_round_trips_through_a_dict_and_plots():
    h = History(steps=[1, 2], tokens_seen=[64, 128], train_losses=[3.0, 2.0], val_losses=[3.1, 2.5],
                samples=[(2, "hi")], lrs=[1e-3, 1e-3], step=2, tokens=128, seconds=1.0)
    assert History.from_dict(h.to_dict()) == h
    ax = plot_losses(h)
    assert [line.get_label() for line in ax.get_lines()] == ["training loss", "validation loss"]
    assert list(ax.get_lines()[1].get_ydata()) == [3.1, 2.5]


# --------------------------------------------------------------------------- #
# Reliability: divergence, Ctrl-C, unwritable paths, foreign checkpoints
# --------------------------------------------------------------------------- #
import signal  # noqa: E402

from course_lib.checkpoint import (CheckpointError, CheckpointMismatchError, NonFiniteError,  # noqa: E402
                                   load_checkpoint, save_checkpoint)


class OverflowAt(torch.optim.AdamW):
    """AdamW whose update number ``bad_step`` overflows a weight to inf (a learning-rate blow-up)."""

    def __init__(self, params, bad_step, **kw):
        super().__init__(params, **kw)
        self.bad_step, self.calls = bad_step, 0

    def step(self, closure=None):
        out = super().step(closure)
        self.calls += 1
        if self.calls == self.bad_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(float("inf"))
        return out


def _overflowing(bad_step, seed=0):
    torch.manual_seed(seed)
    model = GPTModel(CFG)
    return model, OverflowAt(model.parameters(), bad_step, lr=3e-3, weight_decay=0.1)


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    model, opt = _overflowing(bad_step=25)
    train_loader, val_loader = _loaders()
    path = tmp_path / "run.pt"
    with pytest.raises(NonFiniteError, match="step 26") as info:
        train(model, train_loader, val_loader, opt, max_steps=40, eval_freq=10, eval_iter=1,
              checkpoint_path=path, checkpoint_freq=10, progress=False, verbose=False)
    assert "run.pt (step 20)" in str(info.value)
    assert info.value.history.step == 25  # the history so far is reachable from the error
    state = load_checkpoint(path)
    assert state["step"] == 20
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not model.training


def test_weights_that_overflow_right_before_a_save_are_never_saved(tmp_path):
    model, opt = _overflowing(bad_step=20)  # the update of step 20 overflows; step 20 is a save point
    train_loader, val_loader = _loaders()
    path = tmp_path / "run.pt"
    with pytest.raises(NonFiniteError, match="weights became nan or inf at step 20"):
        train(model, train_loader, val_loader, opt, max_steps=40, eval_freq=10, eval_iter=1,
              checkpoint_path=path, checkpoint_freq=10, progress=False, verbose=False)
    assert load_checkpoint(path)["step"] == 10


class NanOnCalls(nn.Module):
    """Wraps a model; its training forward passes number ``bad`` return nan logits."""

    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad, self.calls = inner, set(bad), 0
        self.cfg = inner.cfg

    def forward(self, idx):
        out = self.inner(idx)
        if self.training:
            self.calls += 1
            if self.calls in self.bad:
                out = out * float("nan")
        return out


def test_skip_mode_skips_and_counts_non_finite_batches_without_touching_the_weights():
    model, _ = _model_and_opt()
    wrapped = NanOnCalls(model, bad={3, 7})
    opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3)
    train_loader, val_loader = _loaders()
    h = train(wrapped, train_loader, val_loader, opt, max_steps=10, eval_freq=5, eval_iter=1,
              on_nonfinite="skip", progress=False, verbose=False)
    assert h.step == 10 and h.skipped_steps == 2
    assert all(int(s["step"]) == 8 for s in opt.state.values())  # 8 updates, not 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(v) for v in h.val_losses)
    with pytest.raises(ValueError, match="on_nonfinite"):
        train(wrapped, train_loader, val_loader, opt, max_steps=1, on_nonfinite="ignore", progress=False)


def test_skip_mode_still_stops_when_the_weights_themselves_are_broken():
    model, opt = _overflowing(bad_step=3)
    train_loader, val_loader = _loaders()
    with pytest.raises(NonFiniteError, match="weights are nan or inf at step 4"):
        train(model, train_loader, val_loader, opt, max_steps=10, eval_freq=5, eval_iter=1,
              on_nonfinite="skip", progress=False, verbose=False)


def test_the_best_validation_checkpoint_is_kept_beside_the_last_one(tmp_path):
    model, opt = _model_and_opt()
    opt.param_groups[0]["lr"] = 3e-2  # high enough to overfit and climb again within 40 steps
    train_loader, val_loader = _loaders()
    path = tmp_path / "run.pt"
    h = train(model, train_loader, val_loader, opt, max_steps=40, eval_freq=4, eval_iter=2,
              checkpoint_path=path, checkpoint_freq=8, progress=False, verbose=False)
    best = load_checkpoint(tmp_path / "run.best.pt")
    best_i = min(range(len(h.val_losses)), key=h.val_losses.__getitem__)
    assert best["step"] == h.steps[best_i]
    assert load_checkpoint(path)["step"] == 40
    # the best file holds the weights that gave the best validation loss
    best_model = GPTModel(CFG)
    load_checkpoint(tmp_path / "run.best.pt", best_model)
    best_model.eval()
    from course_lib.training import calc_loss_loader
    assert calc_loss_loader(val_loader, best_model, num_batches=2) == pytest.approx(h.val_losses[best_i], abs=1e-6)
    # a new run never overwrites an old run's best checkpoint, even if the last one was deleted
    path.unlink()
    with pytest.raises(FileExistsError, match="run.best.pt"):
        train(model, train_loader, val_loader, opt, max_steps=2, checkpoint_path=path, progress=False)


def _interrupt_on_training_forward(model, at_calls):
    """Send SIGINT (as Ctrl-C does) during the training forward passes numbered ``at_calls``."""
    calls = {"n": 0}

    def hook(module, args):
        if module.training:
            calls["n"] += 1
            for _ in range(at_calls.count(calls["n"])):
                signal.raise_signal(signal.SIGINT)

    return model.register_forward_pre_hook(hook)


def _train_interrupted(model, *args, **kwargs):
    try:
        return train(model, *args, **kwargs)
    except KeyboardInterrupt:  # without this a regression would end the whole pytest session
        pytest.fail("Ctrl-C escaped train() instead of returning the history")


def test_ctrl_c_stops_after_the_step_saves_and_returns_the_history_and_resume_is_exact(tmp_path):
    full_model, full = _train_chunk(tmp_path, "full.pt", 20)

    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders(seed=7)
    handle = _interrupt_on_training_forward(model, [9])
    h = _train_interrupted(model, train_loader, val_loader, opt, max_steps=20, eval_freq=3, eval_iter=2,
                           checkpoint_path=tmp_path / "part.pt", checkpoint_freq=4, progress=False, verbose=False)
    handle.remove()
    assert h.interrupted and h.step == 9
    assert not model.training
    assert load_checkpoint(tmp_path / "part.pt")["step"] == 9  # saved before leaving
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    resumed_model, resumed = _train_chunk(tmp_path, "part.pt", 20, resume=True, init_seed=5)
    assert resumed.train_losses == full.train_losses and resumed.val_losses == full.val_losses
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_ctrl_c_without_a_checkpoint_path_returns_the_history():
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    handle = _interrupt_on_training_forward(model, [5])
    h = _train_interrupted(model, train_loader, val_loader, opt, max_steps=20, eval_freq=2, eval_iter=1,
                           progress=False, verbose=False)
    handle.remove()
    assert h.interrupted and h.step == 5 and h.steps == [2, 4, 5]
    assert not model.training


def test_a_second_ctrl_c_stops_at_once_and_never_saves_a_half_done_step(tmp_path):
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    handle = _interrupt_on_training_forward(model, [6, 6])  # pressed twice during step 6
    h = _train_interrupted(model, train_loader, val_loader, opt, max_steps=20, eval_freq=2, eval_iter=1,
                           checkpoint_path=tmp_path / "run.pt", checkpoint_freq=4, progress=False, verbose=False)
    handle.remove()
    assert h.interrupted and h.step == 5  # step 6 never completed
    assert load_checkpoint(tmp_path / "run.pt")["step"] == 4  # the last complete save
    assert not model.training


def test_an_unwritable_checkpoint_path_fails_before_the_first_step(tmp_path):
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="afile is a file"):
        train(model, train_loader, val_loader, opt, max_steps=2, progress=False,
              checkpoint_path=tmp_path / "afile" / "run.pt")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        train(model, train_loader, val_loader, opt, max_steps=2, progress=False, checkpoint_path=tmp_path)
    assert not opt.state  # no step was taken


def test_resuming_a_checkpoint_train_did_not_write_is_a_clear_error(tmp_path):
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    save_checkpoint(tmp_path / "plain.pt", model, opt)
    with pytest.raises(CheckpointError, match=r"not written by train\(\).*training position"):
        train(model, train_loader, val_loader, opt, max_steps=2, checkpoint_path=tmp_path / "plain.pt",
              resume=True, progress=False)
    save_checkpoint(tmp_path / "norng.pt", model, opt, include_rng=False,
                    extra={"history": History().to_dict(), "epoch": 0, "batch_in_epoch": 0, "seed": 1})
    with pytest.raises(CheckpointError, match="random state") as info:
        train(model, train_loader, val_loader, opt, max_steps=2, checkpoint_path=tmp_path / "norng.pt",
              resume=True, progress=False)
    assert "restore_rng" not in str(info.value)  # no advice naming an option train() lacks


def test_resuming_with_another_kind_of_optimizer_is_refused_and_changes_nothing(tmp_path):
    _train_chunk(tmp_path, "run.pt", 4)
    model, _ = _model_and_opt(seed=3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_loader, val_loader = _loaders()
    with pytest.raises(CheckpointMismatchError, match="AdamW, not a torch.optim.sgd.SGD"):
        train(model, train_loader, val_loader, sgd, max_steps=8, checkpoint_path=tmp_path / "run.pt",
              resume=True, progress=False)
    assert sgd.param_groups[0]["lr"] == 0.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_perplexity_of_nan_is_nan():
    assert math.isnan(perplexity(float("nan")))
    assert math.isnan(perplexity(torch.tensor(float("nan"))))
    assert perplexity(float("inf")) == math.inf


def test_the_progress_bar_ends_at_the_steps_taken_not_the_steps_planned(monkeypatch):
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    h = train(model, train_loader, val_loader, opt, num_epochs=100, eval_freq=1000, eval_iter=1,
              max_seconds=0.0, progress=True, verbose=False)
    assert h.step == 1
    assert (bars[0].n, bars[0].total) == (1, 1)


def test_a_run_with_progress_ends_with_a_plain_text_summary(capsys):
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    train(model, train_loader, val_loader, opt, max_steps=3, eval_freq=10, eval_iter=1, progress=True,
          verbose=False)
    assert "training: 3/3 steps, 192 tokens" in capsys.readouterr().out


def test_loss_fn_and_metrics_are_used_and_recorded():
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    calls = []

    def halved(x, y, m, device):
        calls.append(m.training)
        return 0.5 * calc_loss_batch(x, y, m, device)

    def metrics(m):
        assert not m.training and not torch.is_grad_enabled()
        return {"calls": len(calls)}

    h = train(model, train_loader, val_loader, opt, max_steps=4, eval_freq=2, eval_iter=1, loss_fn=halved,
              metrics=metrics, progress=False, verbose=False)
    assert h.metrics["calls"] and len(h.metrics["calls"]) == len(h.steps) == 2
    assert True in calls and False in calls  # used for training steps and for evaluation
    model.eval()
    x, y = next(iter(val_loader))
    assert h.val_losses[-1] == pytest.approx(0.5 * calc_loss_batch(x, y, model).item(), rel=1e-5)
    assert History.from_dict(h.to_dict()).metrics == h.metrics


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loss_fn="ce"), TypeError, "loss_fn must be a function"),
    (dict(metrics=3), TypeError, "metrics must be a function"),
    (dict(metrics=lambda m: 0.5), TypeError, "must return a dict"),
])
def test_bad_loss_fn_and_metrics(kwargs, error, match):
    model, opt = _model_and_opt()
    train_loader, val_loader = _loaders()
    with pytest.raises(error, match=match):
        train(model, train_loader, val_loader, opt, max_steps=2, eval_freq=1, progress=False, verbose=False, **kwargs)
