"""Checks for step 5's exercises (``course check 5``). ``ex`` is the module being checked."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- #
# calc_loss_loader
# --------------------------------------------------------------------------- #
V = 23


def _model():
    return nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V)).eval()  # ids [B, T] -> logits [B, T, V]


def _loader(n_batches=5, batch=3, tokens=6):
    x = torch.randint(0, V, (n_batches * batch, tokens))
    y = torch.randint(0, V, (n_batches * batch, tokens))
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _nll(model, x, y):  # mean negative log-likelihood, written out: logsumexp(logits) - logit of the target
    logits = model(x).double()
    return (logits.logsumexp(-1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean().item()


def _want(model, loader, n):
    with torch.no_grad():
        losses = [_nll(model, x, y) for x, y in list(loader)[:n]]
    return sum(losses) / len(losses)


@pytest.mark.exercise("calc_loss_loader")
def test_calc_loss_loader_averages_all_batches(ex):
    model, loader = _model(), _loader()
    got = ex.calc_loss_loader(loader, model, "cpu")
    want = _want(model, loader, 5)
    assert isinstance(got, float), f"expected a Python float, got {type(got).__name__}. Hint: use loss.item()."
    assert abs(got - want) < 1e-5, (
        f"expected the mean loss over the 5 batches, {want:.5f}, got {got:.5f}. Hint: flatten the logits to "
        "[batch * tokens, vocab] and the targets to [batch * tokens] before cross_entropy, then average per batch.")


@pytest.mark.exercise("calc_loss_loader")
def test_calc_loss_loader_stops_after_num_batches(ex):
    model, loader = _model(), _loader()
    got = ex.calc_loss_loader(loader, model, "cpu", num_batches=2)
    want = _want(model, loader, 2)
    assert abs(got - want) < 1e-5, (
        f"with num_batches=2 expected the mean over the first 2 batches, {want:.5f}, got {got:.5f}. "
        "Hint: stop the loop after num_batches batches and divide by num_batches.")
    got = ex.calc_loss_loader(loader, model, "cpu", num_batches=50)
    assert abs(got - _want(model, loader, 5)) < 1e-5, (
        "with num_batches=50 but only 5 batches, expected the mean over all 5. "
        "Hint: use min(num_batches, len(data_loader)).")


@pytest.mark.exercise("calc_loss_loader")
def test_calc_loss_loader_empty_loader_is_nan(ex):
    got = ex.calc_loss_loader([], _model(), "cpu")
    assert isinstance(got, float) and math.isnan(got), (
        f"a loader with no batches should give float('nan'), got {got!r}. Hint: check len(data_loader) first.")


# --------------------------------------------------------------------------- #
# softmax_with_temperature
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("softmax_with_temperature")
def test_temperature_one_is_the_softmax(ex):
    logits = torch.randn(4, 10) * 3
    want = logits.exp() / logits.exp().sum(-1, keepdim=True)
    got = ex.softmax_with_temperature(logits, 1.0)
    assert got.shape == want.shape, f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
    assert torch.allclose(got, want, atol=1e-6), (
        "with temperature 1 expected the plain softmax over the last dimension. Hint: torch.softmax(x, dim=-1).")


@pytest.mark.exercise("softmax_with_temperature")
def test_temperature_divides_the_logits(ex):
    logits = torch.tensor([2.0, 1.0, 0.1])
    for t in (0.1, 0.5, 2.0, 10.0):
        scaled = logits / t
        want = scaled.exp() / scaled.exp().sum()
        got = ex.softmax_with_temperature(logits, t)
        assert torch.allclose(got, want, atol=1e-6), (
            f"temperature {t}: expected {want.tolist()}, got {got.tolist()}. "
            "Hint: divide the logits by the temperature (not multiply) before the softmax.")
    low, high = ex.softmax_with_temperature(logits, 0.5), ex.softmax_with_temperature(logits, 5.0)
    assert low.max() > high.max(), "a low temperature should make the top token more likely than a high one"


# --------------------------------------------------------------------------- #
# top_k_filter
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("top_k_filter")
def test_top_k_small_example(ex):
    got = ex.top_k_filter(torch.tensor([1.0, 3.0, 2.0]), 2)
    want = torch.tensor([float("-inf"), 3.0, 2.0])
    assert torch.equal(got, want), (f"top_k_filter([1., 3., 2.], k=2): expected {want.tolist()}, got "
                                    f"{got.tolist()}. Hint: set everything below the k-th largest value to -inf.")


@pytest.mark.exercise("top_k_filter")
def test_top_k_keeps_the_k_largest_in_every_row(ex):
    logits = torch.randn(5, 40)
    original = logits.clone()
    got = ex.top_k_filter(logits, 6)
    assert torch.equal(logits, original), "top_k_filter changed its input; work on a copy (masked_fill, not masked_fill_)"
    assert got.shape == logits.shape, f"expected shape {tuple(logits.shape)}, got {tuple(got.shape)}"
    for row, out in zip(logits, got):
        keep = set(sorted(range(40), key=lambda i: -row[i].item())[:6])  # the six largest, by sorting
        finite = {i for i in range(40) if torch.isfinite(out[i])}
        assert finite == keep, (f"expected to keep positions {sorted(keep)}, kept {sorted(finite)}. "
                                "Hint: compare against the k-th largest value of each row (keepdim / [..., -1:]).")
        assert all(out[i] == row[i] for i in keep), "the kept logits must keep their values"
        assert all(out[i] == float("-inf") for i in range(40) if i not in keep), "the others must be -inf"


@pytest.mark.exercise("top_k_filter")
def test_top_k_larger_than_the_vocabulary_keeps_everything(ex):
    logits = torch.randn(2, 5)
    got = ex.top_k_filter(logits, 10)
    assert torch.equal(got, logits), "with k >= vocabulary size every logit should be kept unchanged"
