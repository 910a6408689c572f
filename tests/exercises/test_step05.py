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
# perplexity_from_loader
# --------------------------------------------------------------------------- #
V = 23


def _model():
    return nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, V)).eval()  # ids [B, T] -> logits [B, T, V]


def _loader(rows=14, batch=4, tokens=6):  # 14 rows in batches of 4: the last batch has only 2
    x = torch.randint(0, V, (rows, tokens))
    y = torch.randint(0, V, (rows, tokens))
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _nll(model, x, y):  # mean negative log-likelihood, written out: logsumexp(logits) - logit of the target
    logits = model(x).double()
    return (logits.logsumexp(-1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean().item()


def _want(model, loader):  # every token counted once: sum of the per-token losses / number of tokens
    with torch.no_grad():
        pairs = [(_nll(model, x, y) * y.numel(), y.numel()) for x, y in loader]
    return math.exp(sum(s for s, _ in pairs) / sum(n for _, n in pairs))


@pytest.mark.exercise("perplexity_from_loader")
def test_perplexity_weights_every_token_once(ex):
    model, loader = _model(), _loader()
    got = ex.perplexity_from_loader(loader, model, "cpu")
    want = _want(model, loader)
    assert isinstance(got, float), f"expected a Python float, got {type(got).__name__}. Hint: use .item() and math.exp."
    with torch.no_grad():
        by_batch = math.exp(sum(_nll(model, x, y) for x, y in loader) / len(loader))
    assert abs(by_batch - want) > 1e-3 * want  # the test data tells the two averages apart
    assert abs(got - want) < 1e-4 * want, (
        f"expected the perplexity over all {sum(y.numel() for _, y in loader)} tokens, {want:.4f}, got {got:.4f}"
        + (" (the average of the batch losses, which counts the short last batch as much as a full one)"
           if abs(got - by_batch) < 1e-4 * by_batch else "")
        + ". Hint: cross_entropy(..., reduction='sum') per batch, divide the total by the number of tokens, then exp.")


@pytest.mark.exercise("perplexity_from_loader")
def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(ex):
    class Uniform(nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, V)

    got = ex.perplexity_from_loader(_loader(), Uniform(), "cpu")
    assert abs(got - V) < 1e-3, (f"a model that gives all {V} tokens the same logit has perplexity {V}, got {got!r}. "
                                 "Hint: perplexity = exp(mean cross-entropy).")


@pytest.mark.exercise("perplexity_from_loader")
def test_perplexity_of_an_empty_loader_is_nan(ex):
    got = ex.perplexity_from_loader([], _model(), "cpu")
    assert isinstance(got, float) and math.isnan(got), (
        f"a loader with no batches should give float('nan'), got {got!r}. Hint: count the tokens; none means nan.")


# --------------------------------------------------------------------------- #
# lr_at_step
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("lr_at_step")
def test_lr_warmup_is_linear(ex):
    for step, want in ((0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0)):  # max_lr 1, 4 warmup steps: by hand
        got = ex.lr_at_step(step, 1.0, 4, 10)
        assert abs(got - want) < 1e-12, (
            f"lr_at_step({step}, max_lr=1.0, warmup_steps=4, total_steps=10): expected {want}, got {got!r}. "
            "Hint: during warmup, max_lr * (step + 1) / warmup_steps.")


@pytest.mark.exercise("lr_at_step")
def test_lr_decay_follows_torch_cosine_annealing(ex):
    max_lr, min_lr, warmup, total = 3e-4, 3e-5, 5, 25
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=max_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)
    for step in range(warmup, total):  # torch's scheduler is the independent reference for the decay
        want = opt.param_groups[0]["lr"]
        got = ex.lr_at_step(step, max_lr, warmup, total, min_lr)
        assert abs(got - want) < 1e-10, (
            f"step {step} (warmup {warmup}, total {total}, max_lr {max_lr}, min_lr {min_lr}): expected {want:.6g}, "
            f"got {got!r}. Hint: progress = (step - warmup_steps) / (total_steps - warmup_steps), then "
            "min_lr + 0.5 * (max_lr - min_lr) * (1 + cos(pi * progress)).")
        opt.step()
        sched.step()


@pytest.mark.exercise("lr_at_step")
def test_lr_after_the_schedule_is_min_lr(ex):
    for step in (10, 11, 1000):
        got = ex.lr_at_step(step, 1.0, 4, 10, 0.1)
        assert abs(got - 0.1) < 1e-12, (f"lr_at_step({step}, 1.0, 4, 10, min_lr=0.1): after total_steps expected "
                                        f"min_lr = 0.1, got {got!r}")


# --------------------------------------------------------------------------- #
# generate_until_eos
# --------------------------------------------------------------------------- #
class _NextIsSum(nn.Module):
    """Logits that make (sum of the ids it sees) % V the most likely next token; records the longest input."""

    def __init__(self):
        super().__init__()
        self.longest = 0

    def forward(self, ids):
        self.longest = max(self.longest, ids.shape[1])
        nxt = ids.cumsum(dim=1) % V                               # [1, T]: the sum of the ids up to each position
        return nn.functional.one_hot(nxt, V).float() * 5.0         # [1, T, V]


@pytest.mark.exercise("generate_until_eos")
def test_generate_uses_the_last_context_size_tokens(ex):
    model = _NextIsSum()
    got = ex.generate_until_eos(model, torch.tensor([[1, 2, 3]]), 5, context_size=2, eos_id=0)
    want = [1, 2, 3, 5, 8, 13, 21, 11]       # each new token is the sum of the last two, mod 23: worked by hand
    assert isinstance(got, torch.Tensor) and got.shape == (1, 8), (
        f"expected a [1, 8] tensor (3 prompt tokens + 5 new), got {getattr(got, 'shape', got)!r}")
    assert got.tolist() == [want], (
        f"expected {want}, got {got.tolist()[0]}. Hint: feed idx[:, -context_size:] and take argmax of the LAST "
        "position's logits.")
    assert model.longest <= 2, f"the model saw {model.longest} tokens at once; context_size was 2"


@pytest.mark.exercise("generate_until_eos")
def test_generate_stops_at_eos_and_keeps_it(ex):
    got = ex.generate_until_eos(_NextIsSum(), torch.tensor([[1, 2, 3]]), 10, context_size=2, eos_id=13)
    assert got.tolist() == [[1, 2, 3, 5, 8, 13]], (
        f"with eos_id=13 expected [1, 2, 3, 5, 8, 13] (stop after appending 13), got {got.tolist()[0]}")
    got = ex.generate_until_eos(_NextIsSum(), torch.tensor([[4]]), 10, context_size=2, eos_id=4)
    assert got.tolist() == [[4, 4]], (
        "an eos_id already in the prompt must not stop generation before the first new token; "
        f"expected [4, 4], got {got.tolist()[0]}")
