"""The bigram language model of step 1, against counts done with the standard library."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch

from course_lib.bigram import BigramLM, apply_temperature, join_words


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


def test_join_words_puts_no_space_before_punctuation():
    # the split notebook 01 uses for its word model, undone
    text = "Well, I said it: she was gone (for good). Wasn't she? Yes!"
    tokens = re.findall(r"[A-Za-z']+|[.,;:!?()]", text)
    assert join_words(tokens) == text
    assert join_words(["I", ",", "too", "."]) == "I, too."
    assert join_words([]) == ""
    with pytest.raises(TypeError, match="sequence of tokens"):
        join_words("not a list")


def test_word_samples_read_like_text():
    words = re.findall(r"[A-Za-z']+|[.,;!?]", "I saw it. I did, and I said so! Did you?")
    lm = BigramLM(smoothing=0.0).fit(words)
    text = join_words(lm.sample("I", 40, generator=torch.Generator().manual_seed(0)))
    assert not re.search(r" [.,;!?]", text), text
