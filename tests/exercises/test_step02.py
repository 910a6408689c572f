"""Checks for step 2's exercises (``course check 2``). ``ex`` is the module being checked."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch
import torch.nn as nn


# --------------------------------------------------------------------------- #
# decode_words
# --------------------------------------------------------------------------- #
def _vocab(tokens):
    words = sorted(set(tokens))
    str_to_int = {w: i for i, w in enumerate(words)}
    return [str_to_int[t] for t in tokens], {i: w for w, i in str_to_int.items()}


@pytest.mark.exercise("decode_words")
def test_decode_words_reattaches_punctuation(ex):
    tokens = ["Hello", ",", "world", ".", "Is", "this", "(", "really", ")", "it", "?"]
    ids, int_to_str = _vocab(tokens)
    got = ex.decode_words(ids, int_to_str)
    want = "Hello, world. Is this (really) it?"
    assert got == want, (f"expected {want!r}, got {got!r}. Hint: join with ' ', then remove the space "
                         "before , . : ; ? ! ) and the space after (.")


@pytest.mark.exercise("decode_words")
def test_decode_words_round_trips_a_sentence(ex):
    text = ("I had always thought Jack Gisburn rather a cheap genius -- though a good fellow enough -- "
            "so it was no great surprise to me to hear that, in the height of his glory, he had dropped "
            "his painting: married a rich widow; and established himself (in a villa) on the Riviera!")
    tokens = [t for t in re.split(r"([,.:;?!()]|\s)", text) if t.strip()]
    ids, int_to_str = _vocab(tokens)
    got = ex.decode_words(ids, int_to_str)
    assert got == text, f"decoding the tokens of a sentence should give it back.\nexpected {text!r}\ngot      {got!r}"


@pytest.mark.exercise("decode_words")
def test_decode_words_empty(ex):
    got = ex.decode_words([], {0: "x"})
    assert got == "", f"no ids should decode to the empty string, got {got!r}"


# --------------------------------------------------------------------------- #
# count_pairs
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("count_pairs")
def test_count_pairs_textbook_example(ex):
    ids = list("aaabdaaabac".encode("utf-8"))
    got = ex.count_pairs(ids)
    a, b, c, d = 97, 98, 99, 100
    # Worked out by hand: aa aa ab bd da aa aa ab ba ac
    want = {(a, a): 4, (a, b): 2, (b, d): 1, (d, a): 1, (b, a): 1, (a, c): 1}
    assert dict(got) == want, (f"for the bytes of 'aaabdaaabac' expected {want}, got {dict(got)}. "
                               "Hint: zip(ids, ids[1:]) walks over neighbouring pairs.")


@pytest.mark.exercise("count_pairs")
def test_count_pairs_short_inputs(ex):
    for ids in ([], [5]):
        got = ex.count_pairs(ids)
        assert dict(got) == {}, f"count_pairs({ids}) has no pairs to count: expected {{}}, got {got!r}"


@pytest.mark.exercise("count_pairs")
def test_count_pairs_random_ids_against_counter(ex):
    rng = random.Random(0)
    ids = [rng.randrange(6) for _ in range(500)]
    got = ex.count_pairs(ids)
    want = Counter(zip(ids, ids[1:]))
    assert dict(got) == dict(want), "counts differ from collections.Counter(zip(ids, ids[1:])) on 500 random ids"
    assert sum(got.values()) == len(ids) - 1, f"{len(ids)} ids have {len(ids) - 1} neighbouring pairs"


# --------------------------------------------------------------------------- #
# merge_pair
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("merge_pair")
def test_merge_pair_textbook_example(ex):
    ids = list("aaabdaaabac".encode("utf-8"))
    before = list(ids)
    got = ex.merge_pair(ids, (97, 97), 256)
    # "aa a b d aa a b a c": the third 'a' of each 'aaa' stays alone.
    want = [256, 97, 98, 100, 256, 97, 98, 97, 99]
    assert list(got) == want, (f"merging (97, 97) -> 256 in 'aaabdaaabac' should give {want}, got {list(got)}. "
                               "Hint: after a merge, skip both ids (i += 2), so matches never overlap.")
    assert ids == before, "merge_pair must return a new list and leave its input unchanged"


@pytest.mark.exercise("merge_pair")
def test_merge_pair_edges(ex):
    cases = [
        (([], (1, 2), 9), []),
        (([1], (1, 2), 9), [1]),
        (([1, 2], (1, 2), 9), [9]),
        (([1, 2, 1, 2, 1], (1, 2), 9), [9, 9, 1]),
        (([2, 1, 3], (1, 2), 9), [2, 1, 3]),
        (([1, 1, 1, 1], (1, 1), 9), [9, 9]),
    ]
    for (ids, pair, new_id), want in cases:
        got = ex.merge_pair(list(ids), pair, new_id)
        assert list(got) == want, f"merge_pair({ids}, {pair}, {new_id}): expected {want}, got {list(got)}"


@pytest.mark.exercise("merge_pair")
def test_three_merges_give_the_textbook_result(ex):
    # The textbook's three merges on 'aaabdaaabac': aa -> Z, ab -> Y, ZY -> X gives "XdXac".
    ids = list("aaabdaaabac".encode("utf-8"))
    for new_id, pair in [(256, (97, 97)), (257, (97, 98)), (258, (256, 257))]:
        ids = ex.merge_pair(ids, pair, new_id)
    assert list(ids) == [258, 100, 258, 97, 99], (
        f"after merging aa -> 256, ab -> 257 and (256, 257) -> 258 the text should read "
        f"[258, 100, 258, 97, 99] ('XdXac'), got {list(ids)}")


# --------------------------------------------------------------------------- #
# window_starts and sliding_windows
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("window_starts")
def test_window_starts_by_hand(ex):
    cases = [((9, 4, 2), [0, 2, 4]), ((9, 4, 4), [0, 4]), ((10, 4, 1), [0, 1, 2, 3, 4, 5]),
             ((5, 4, 1), [0]), ((4, 4, 1), []), ((0, 3, 1), []), ((20, 3, 7), [0, 7, 14])]
    for (n, max_length, stride), want in cases:
        got = ex.window_starts(n, max_length, stride)
        assert list(got) == want, (
            f"window_starts({n}, max_length={max_length}, stride={stride}): expected {want}, got {list(got)}. "
            "Hint: a window at s needs s + max_length + 1 <= num_tokens (the last target is one past the inputs).")


@pytest.mark.exercise("window_starts")
def test_window_starts_count_formula(ex):
    for n, m, s in [(100, 7, 3), (257, 16, 16), (1000, 32, 5)]:
        got = list(ex.window_starts(n, m, s))
        want = (n - m - 1) // s + 1
        assert len(got) == want, f"{n} tokens, max_length={m}, stride={s}: expected {want} windows, got {len(got)}"
        assert got[-1] + m + 1 <= n, f"the last window (start {got[-1]}) runs past the end of the {n} tokens"


@pytest.mark.exercise("sliding_windows")
def test_sliding_windows_by_hand(ex):
    x, y = ex.sliding_windows(list(range(10, 19)), max_length=4, stride=2)
    want_x = [[10, 11, 12, 13], [12, 13, 14, 15], [14, 15, 16, 17]]
    want_y = [[11, 12, 13, 14], [13, 14, 15, 16], [15, 16, 17, 18]]
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), \
        f"return two tensors (inputs, targets), got {type(x).__name__} and {type(y).__name__}"
    assert x.tolist() == want_x, f"inputs: expected {want_x}, got {x.tolist()}"
    assert y.tolist() == want_y, f"targets: expected {want_y}, got {y.tolist()}. Hint: targets start one later."
    assert x.dtype == torch.long and y.dtype == torch.long, f"use torch.long ids, got {x.dtype} and {y.dtype}"


@pytest.mark.exercise("sliding_windows")
def test_sliding_windows_stop_at_the_last_complete_window(ex):
    # 10 tokens, max_length 4, stride 1: starts 0..5; a window at 6 would need the target ids[10].
    x, y = ex.sliding_windows(list(range(10)), max_length=4, stride=1)
    assert tuple(x.shape) == tuple(y.shape) == (6, 4), (
        f"10 tokens with max_length=4, stride=1 give 6 windows of 4, expected shape (6, 4), got "
        f"{tuple(x.shape)} and {tuple(y.shape)}. Hint: the last window's last target, ids[s + max_length], "
        "must exist.")
    assert y[-1].tolist() == [6, 7, 8, 9], f"the last targets should be [6, 7, 8, 9], got {y[-1].tolist()}"


@pytest.mark.exercise("sliding_windows")
def test_sliding_windows_match_a_dataloader_free_reference(ex):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (300,), generator=g).tolist()
    x, y = ex.sliding_windows(ids, max_length=32, stride=24)
    # Reference with tensor.unfold: every window of 33 tokens, every 24th kept.
    ref = torch.tensor(ids).unfold(0, 33, 24)  # [num_windows, 33]
    assert tuple(x.shape) == tuple(ref[:, :-1].shape), f"expected shape {tuple(ref[:, :-1].shape)}, got {tuple(x.shape)}"
    assert torch.equal(x, ref[:, :-1]) and torch.equal(y, ref[:, 1:]), "windows differ from the reference"


@pytest.mark.exercise("sliding_windows")
def test_sliding_windows_too_short_is_an_error(ex):
    with pytest.raises(ValueError):
        ex.sliding_windows([1, 2, 3, 4], max_length=4, stride=1)


# --------------------------------------------------------------------------- #
# one_hot_embed
# --------------------------------------------------------------------------- #
@pytest.mark.exercise("one_hot_embed")
def test_one_hot_embed_equals_nn_embedding(ex):
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3)
    ids = torch.tensor([[2, 0, 6], [6, 6, 1]])
    got = ex.one_hot_embed(ids, emb.weight)
    want = emb(ids)
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == (2, 3, 3), (
        f"expected a tensor of shape (2, 3, 3) ([batch, tokens, emb_dim]), got "
        f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}")
    torch.testing.assert_close(got, want, msg=lambda m: "one_hot(ids) @ weight should equal nn.Embedding(ids) "
                               f"with the same weight.\n{m}")


@pytest.mark.exercise("one_hot_embed")
def test_one_hot_embed_one_dimensional_ids_and_gradients(ex):
    weight = torch.arange(12.0).reshape(4, 3).requires_grad_()
    got = ex.one_hot_embed(torch.tensor([3, 1]), weight)
    assert got.tolist() == [[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]], (
        f"ids [3, 1] should pick rows 3 and 1 of the weight, got {got.tolist()}")
    got.sum().backward()
    assert weight.grad is not None and weight.grad.sum(dim=1).tolist() == [0.0, 3.0, 0.0, 3.0], \
        "gradients should reach exactly the rows that were used (keep the product differentiable)"
