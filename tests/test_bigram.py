"""The bigram language model of step 1, against counts done with the standard library."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from course_lib.bigram import BigramLM, apply_temperature


def test_probabilities_are_normalised_counts():
    text = "abracadabra"
    lm = BigramLM(smoothing=0.0).fit(list(text))
    pairs = Counter(zip(text, text[1:]))
    firsts = Counter(text[:-1])
    for (a, b), c in pairs.items():
        assert lm.next_token_probs(a)[b] == pytest.approx(c / firsts[a])
    assert torch.allclose(lm.probs.sum(dim=1), torch.ones(len(lm.vocab)))


def test_smoothing_gives_unseen_pairs_probability():
    lm = BigramLM(smoothing=1.0).fit(list("aab"))
    # after 'a': counts a->a 1, a->b 1, plus 1 each -> 2/4, 2/4
    assert lm.next_token_probs("a") == {"a": 0.5, "b": 0.5}
    assert math.isfinite(lm.perplexity(list("ba")))


def test_nll_by_hand():
    lm = BigramLM(smoothing=0.0).fit(list("abab"))
    # P(b|a) = 1, P(a|b) = 1 -> nll 0, perplexity 1
    assert lm.nll(list("abab")) == pytest.approx(0.0)
    assert lm.perplexity(list("abab")) == pytest.approx(1.0)


def test_sampling_is_seeded_and_follows_the_counts():
    lm = BigramLM(smoothing=0.0).fit("the cat sat on the mat".split())
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert lm.sample("the", 10, generator=g1) == lm.sample("the", 10, generator=g2)
    out = lm.sample("on", 1, temperature=0)
    assert out == ["on", "the"]


def test_temperature():
    p = torch.tensor([0.7, 0.2, 0.1])
    assert torch.allclose(apply_temperature(p, 1.0), p)
    assert torch.equal(apply_temperature(p, 0.0), torch.tensor([1.0, 0.0, 0.0]))
    sharp = apply_temperature(p, 0.5)
    assert torch.allclose(sharp, p**2 / (p**2).sum())
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(p, -1)


def test_errors():
    with pytest.raises(TypeError, match="list\\(text\\)"):
        BigramLM().fit("abc")
    lm = BigramLM().fit(list("abc"))
    with pytest.raises(ValueError, match="never appeared"):
        lm.next_token_probs("z")
