"""Checks for step 1's exercises (``course check 1``). ``ex`` is the module being checked."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

# Parameter counts of OpenAI's released GPT-2 checkpoints (Hugging Face `num_parameters()`).
PUBLISHED = {
    (768, 12): 124_439_808,
    (1024, 24): 354_823_168,
    (1280, 36): 774_030_080,
    (1600, 48): 1_557_611_200,
}


@pytest.mark.exercise("count_parameters")
@pytest.mark.parametrize("emb_dim,n_layers", list(PUBLISHED))
def test_count_parameters_matches_published_gpt2(ex, emb_dim, n_layers):
    got = ex.count_parameters(50257, 1024, emb_dim, n_layers, qkv_bias=True, tied=True)
    want = PUBLISHED[(emb_dim, n_layers)]
    assert got == want, (
        f"GPT-2 with emb_dim={emb_dim}, n_layers={n_layers}: expected {want:,} parameters, got {got:,} "
        f"(off by {got - want:+,}). Hint: {_offset_hint(got - want, emb_dim, n_layers)}")


def _offset_hint(diff: int, d: int, L: int) -> str:
    """Name the piece a wrong count most likely missed (or counted twice)."""
    known = {
        2 * d: "the final LayerNorm (scale and shift, 2*emb_dim)",
        1024 * d: "the position embedding (context_length x emb_dim)",
        50257 * d: "the token embedding / output head (vocab_size x emb_dim; tied means counted once)",
        L * 4 * d: ("4*emb_dim per block: the two LayerNorms inside each block (2 x 2*emb_dim), "
                    "or the first feed-forward layer's bias"),
        L * 3 * d: "the query/key/value biases (3*emb_dim per block when qkv_bias=True)",
        L * d: "a bias of emb_dim per block (the attention output projection's, or the second feed-forward layer's)",
        L * 5 * d: "the feed-forward biases (4*emb_dim + emb_dim per block)",
    }
    for amount, piece in known.items():
        if abs(diff) == amount:
            return f"that is exactly {piece} — {'missing' if diff < 0 else 'counted one time too many'}."
    return ("per block count 4 attention matrices (emb_dim x emb_dim) with their biases, 2 feed-forward matrices "
            "of emb_dim x 4*emb_dim with biases, and 2 LayerNorms of 2*emb_dim; then both embeddings and the "
            "final LayerNorm.")


@pytest.mark.exercise("count_parameters")
def test_count_parameters_small_config_by_hand(ex):
    # vocab 10, context 4, d 2, 1 layer, no qkv bias, untied: worked out by hand
    # tok 20 + pos 8 + attn (3*4 + 4 + 2) + ff (2*8 + 8 + 8*2 + 2) + norms 8 + final norm 4 + head 20
    want = 20 + 8 + 18 + 42 + 8 + 4 + 20
    got = ex.count_parameters(10, 4, 2, 1, qkv_bias=False, tied=False)
    assert got == want, (f"vocab 10, context 4, emb_dim 2, 1 layer, no QKV bias, untied head: "
                         f"expected {want}, got {got}. Hint: with qkv_bias=False the three QKV projections "
                         "have no bias, but the output projection still has one; an untied head adds "
                         "vocab_size*emb_dim.")


@pytest.mark.exercise("count_parameters")
def test_untying_adds_exactly_one_embedding_matrix(ex):
    tied = ex.count_parameters(50257, 1024, 768, 12, qkv_bias=True, tied=True)
    untied = ex.count_parameters(50257, 1024, 768, 12, qkv_bias=True, tied=False)
    assert untied - tied == 50257 * 768, (f"an untied head should add vocab_size*emb_dim = {50257 * 768:,} "
                                          f"parameters; yours adds {untied - tied:,}")


@pytest.mark.exercise("bigram_counts")
def test_bigram_counts_small_example(ex):
    got = ex.bigram_counts(list("abab"))
    assert got == {("a", "b"): 2, ("b", "a"): 1}, (
        f"for list('abab') expected {{('a','b'): 2, ('b','a'): 1}}, got {got!r}. "
        "Hint: walk over neighbouring pairs, zip(tokens, tokens[1:]).")


@pytest.mark.exercise("bigram_counts")
def test_bigram_counts_on_words(ex):
    words = "the cat sat on the mat and the cat ran".split()
    got = ex.bigram_counts(words)
    want = Counter(zip(words, words[1:]))
    assert dict(got) == dict(want), f"expected {dict(want)}, got {dict(got)}"
    assert sum(got.values()) == len(words) - 1, "a text of n tokens has n-1 adjacent pairs"


@pytest.mark.exercise("next_token_probs")
def test_next_token_probs_normalises_one_row(ex):
    counts = {("a", "b"): 3, ("a", "c"): 1, ("b", "a"): 5}
    got = ex.next_token_probs(counts, "a")
    assert set(got) == {"b", "c"}, f"after 'a' only 'b' and 'c' were seen; got keys {sorted(got)}"
    assert got["b"] == pytest.approx(0.75) and got["c"] == pytest.approx(0.25), (
        f"expected {{'b': 0.75, 'c': 0.25}}, got {got}. Hint: divide each count by the total of its row.")
    assert sum(got.values()) == pytest.approx(1.0)


@pytest.mark.exercise("next_token_probs")
def test_next_token_probs_unknown_prev_is_an_error(ex):
    try:
        ex.next_token_probs({("a", "b"): 1}, "z")
    except ValueError:
        return
    except NotImplementedError:
        raise
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"for a prev that never starts a pair, raise ValueError (with a message); "
                             f"got {type(err).__name__}: {err}") from None
    raise AssertionError("for a prev that never starts a pair, raise ValueError; nothing was raised "
                         "(an empty row would make probabilities 0/0)")


@pytest.mark.exercise("sample_with_temperature")
def test_temperature_zero_is_argmax(ex):
    probs = torch.tensor([0.1, 0.6, 0.3])
    try:
        picks = {ex.sample_with_temperature(probs, 0.0) for _ in range(20)}
    except NotImplementedError:  # a subclass of RuntimeError: "not started", not "crashed"
        raise
    except (RuntimeError, ZeroDivisionError) as err:
        raise AssertionError(f"temperature 0 crashed with {type(err).__name__}: {err}. Hint: dividing by T=0 gives "
                             "inf/nan; treat temperature == 0 as a special case and return argmax.") from None
    assert picks == {1}, f"temperature 0 must always pick the most likely index (1); got {picks}"


@pytest.mark.exercise("sample_with_temperature")
def test_the_generator_makes_draws_repeatable(ex):
    probs = torch.full((50,), 1 / 50)
    a = [ex.sample_with_temperature(probs, 1.0, torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [ex.sample_with_temperature(probs, 1.0, torch.Generator().manual_seed(7)) for _ in range(5)]
    g = torch.Generator().manual_seed(7)
    c = [ex.sample_with_temperature(probs, 1.0, g) for _ in range(20)]
    assert a == b and len(set(c)) > 1, (
        "the same seeded generator must give the same draw, and successive draws from one generator should vary; "
        f"got {a} vs {b}, then {c}. Hint: pass generator=generator to torch.multinomial.")


@pytest.mark.exercise("sample_with_temperature")
def test_returns_python_int(ex):
    got = ex.sample_with_temperature(torch.tensor([0.5, 0.5]), 1.0, torch.Generator().manual_seed(0))
    assert type(got) is int, f"return a plain int (use int(...)), got {type(got).__name__}"


@pytest.mark.exercise("sample_with_temperature")
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_frequencies_follow_the_reshaped_distribution(ex, temperature):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    expected = probs ** (1 / temperature)
    expected = expected / expected.sum()
    g = torch.Generator().manual_seed(1234)
    n = 6000
    draws = [ex.sample_with_temperature(probs, temperature, g) for _ in range(n)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / n
    assert torch.allclose(freq, expected, atol=0.03), (
        f"at temperature {temperature} the draw frequencies should be close to {expected.numpy().round(3)}; "
        f"got {freq.numpy().round(3)}. Hint: p^(1/T), renormalised — i.e. softmax(log(p) / T).")


@pytest.mark.exercise("sample_with_temperature")
def test_negative_temperature_is_an_error(ex):
    with pytest.raises(ValueError):
        ex.sample_with_temperature(torch.tensor([0.5, 0.5]), -1.0)
