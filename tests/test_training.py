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
