"""Sliding-window datasets and loaders (course_lib.text_data), checked against hand-computed windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from course_lib.text_data import GPTDataset, create_dataloader, encode_text, split_text, window_starts


class CountingTokenizer:
    """A word-level tokenizer whose encode takes only the text, and counts its calls."""

    def __init__(self):
        self.calls = 0
        self.vocab: dict[str, int] = {}

    def encode(self, text):
        self.calls += 1
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]


class SpecialAwareTokenizer(CountingTokenizer):
    """Like tiktoken: encode(text, allowed_special=...); records what it was given."""

    def __init__(self):
        super().__init__()
        self.allowed = None

    def encode(self, text, *, allowed_special=frozenset(), disallowed_special="all"):
        self.allowed = allowed_special
        return super().encode(text)


# --------------------------------------------------------------------------- #
# Windows by hand
# --------------------------------------------------------------------------- #
def test_windows_match_hand_computed_ones():
    ids = list(range(10, 19))  # 9 tokens: 10 .. 18
    ds = GPTDataset(ids, max_length=4, stride=2)
    # Starts 0, 2, 4 (start 6 would need ids[6 : 11], past the end).
    expected = [([10, 11, 12, 13], [11, 12, 13, 14]),
                ([12, 13, 14, 15], [13, 14, 15, 16]),
                ([14, 15, 16, 17], [15, 16, 17, 18])]
    assert len(ds) == 3
    for (x, y), (ex, ey) in zip(ds, expected):
        assert x.tolist() == ex and y.tolist() == ey
        assert x.dtype == torch.long and y.dtype == torch.long
    with pytest.raises(IndexError):
        ds[3]


@pytest.mark.parametrize("n,max_length,stride,count", [
    (9, 4, 2, 3), (9, 4, 4, 2), (9, 8, 1, 1), (10, 4, 1, 6), (10, 4, 5, 2), (10, 4, 6, 1), (100, 7, 3, 31),
])
def test_window_count_formula(n, max_length, stride, count):
    # count = (n - max_length - 1) // stride + 1, worked out by hand in the parametrization.
    ds = GPTDataset(list(range(n)), max_length, stride)
    assert len(ds) == count == len(window_starts(n, max_length, stride))
    # Every window's last target exists; the next window would not fit.
    last = ds.starts[-1]
    assert last + max_length + 1 <= n < last + stride + max_length + 1


def test_targets_are_inputs_shifted_by_one_and_stride_tiles():
    ids = torch.randint(0, 1000, (257,), generator=torch.Generator().manual_seed(0))
    ds = GPTDataset(ids, max_length=16, stride=16)
    for i, (x, y) in enumerate(ds):
        s = 16 * i
        assert torch.equal(x, ids[s:s + 16]) and torch.equal(y, ids[s + 1:s + 17])
        assert torch.equal(x[1:], y[:-1])
    # stride == max_length: every token after the first is a target exactly once.
    targets = torch.cat([y for _, y in ds])
    assert torch.equal(targets, ids[1:1 + 16 * len(ds)])


def test_accepts_lists_tuples_numpy_and_tensors_alike():
    ids = list(range(20))
    ref = [tuple(t.tolist() for t in item) for item in GPTDataset(ids, 5, 3)]
    for form in (tuple(ids), np.array(ids, dtype=np.int32), torch.tensor(ids, dtype=torch.int16)):
        got = [tuple(t.tolist() for t in item) for item in GPTDataset(form, 5, 3)]
        assert got == ref


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("stride", [0, -1])
def test_stride_below_one_is_a_clear_error(stride):
    with pytest.raises(ValueError, match="stride must be at least 1"):
        GPTDataset(list(range(10)), max_length=4, stride=stride)


@pytest.mark.parametrize("max_length", [0, -3])
def test_max_length_below_one_is_a_clear_error(max_length):
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        GPTDataset(list(range(10)), max_length=max_length, stride=1)


def test_non_integer_sizes_are_type_errors():
    with pytest.raises(TypeError, match="max_length"):
        GPTDataset(list(range(10)), max_length=4.0, stride=1)
    with pytest.raises(TypeError, match="stride"):
        GPTDataset(list(range(10)), max_length=4, stride="2")


def test_too_short_text_says_how_many_tokens_and_how_many_are_needed():
    tok = CountingTokenizer()
    with pytest.raises(ValueError) as err:
        GPTDataset("one two three four five", max_length=5, stride=1, tokenizer=tok)
    msg = str(err.value)
    assert "5 tokens" in msg and "at least 6" in msg
    # Exactly max_length + 1 tokens is enough for one window.
    assert len(GPTDataset("one two three four five six", max_length=5, stride=1, tokenizer=tok)) == 1
    with pytest.raises(ValueError, match="0 tokens"):
        GPTDataset([], max_length=1, stride=1)


def test_bad_token_ids_are_clear_errors():
    with pytest.raises(ValueError, match="1-D"):
        GPTDataset([[1, 2, 3], [4, 5, 6]], max_length=2, stride=1)
    with pytest.raises(TypeError, match="integers"):
        GPTDataset([0.5, 1.5, 2.5], max_length=2, stride=1)
    with pytest.raises(ValueError, match=">= 0"):
        GPTDataset([1, -2, 3], max_length=2, stride=1)
    with pytest.raises(TypeError, match="encode"):
        GPTDataset("some text", max_length=1, stride=1, tokenizer=object())


def test_loader_errors():
    ids = list(range(20))
    with pytest.raises(ValueError, match="batch_size"):
        create_dataloader(ids, batch_size=0, max_length=4, stride=4)
    # 20 tokens, max_length 4, stride 4 -> 4 windows: batch_size 5 with drop_last would yield nothing.
    with pytest.raises(ValueError, match="4 window"):
        create_dataloader(ids, batch_size=5, max_length=4, stride=4, drop_last=True)
    assert len(create_dataloader(ids, batch_size=5, max_length=4, stride=4, drop_last=False)) == 1
    with pytest.raises(ValueError, match="num_workers"):
        create_dataloader(ids, batch_size=1, max_length=4, stride=4, num_workers=-1)


def test_a_tokenizer_name_is_not_a_tokenizer():
    # str has an encode method: "gpt2".encode(text) used to fail with "unknown encoding: <the text>".
    text = "It was a dark and stormy night. " * 20
    with pytest.raises(TypeError, match=r"tokenizer must be a tokenizer object with \.encode\(\).*"
                                        r"tiktoken\.get_encoding\('gpt2'\).*got the str 'gpt2'"):
        create_dataloader(text, tokenizer="gpt2", batch_size=2, max_length=8, stride=8)
    with pytest.raises(TypeError, match="tokenizer must be a tokenizer object"):
        GPTDataset(text, max_length=8, stride=8, tokenizer=b"gpt2")
    with pytest.raises(TypeError, match="tokenizer must be a tokenizer object"):
        encode_text(text, "cl100k_base")


def test_loader_flags_must_be_bools():
    with pytest.raises(TypeError, match="shuffle must be True or False, got 'no'"):
        create_dataloader(list(range(20)), batch_size=1, max_length=4, stride=4, shuffle="no")
    with pytest.raises(TypeError, match="drop_last must be True or False"):
        create_dataloader(list(range(20)), batch_size=1, max_length=4, stride=4, drop_last=None)


# --------------------------------------------------------------------------- #
# Tokenizing: once, with the right call
# --------------------------------------------------------------------------- #
def test_the_text_is_tokenized_once_not_per_item():
    tok = CountingTokenizer()
    text = " ".join(f"w{i % 37}" for i in range(500))
    ds = GPTDataset(text, max_length=8, stride=3, tokenizer=tok)
    assert tok.calls == 1
    items = [ds[i] for i in range(len(ds))] + [ds[0], ds[len(ds) - 1]]
    assert tok.calls == 1 and len(items) == len(ds) + 2
    tok2 = CountingTokenizer()
    loader = create_dataloader(text, tokenizer=tok2, batch_size=4, max_length=8, stride=3)
    for _ in range(2):  # two epochs
        for _batch in loader:
            pass
    assert tok2.calls == 1


def test_text_only_and_allowed_special_tokenizers_both_work():
    text = "a b <|endoftext|> c d e"
    plain = CountingTokenizer()
    assert encode_text(text, plain) == [0, 1, 2, 3, 4, 5]
    special = SpecialAwareTokenizer()
    encode_text(text, special)
    assert special.allowed == {"<|endoftext|>"}

    class KwargsTokenizer(CountingTokenizer):  # like Hugging Face's encode(text, **kwargs)
        def encode(self, text, **kwargs):
            assert not kwargs, f"unexpected keyword arguments {kwargs}"
            return super().encode(text)

    assert encode_text(text, KwargsTokenizer()) == [0, 1, 2, 3, 4, 5]


def test_default_tokenizer_is_gpt2_and_reads_endoftext_as_special():
    import tiktoken

    from course_lib.tokenizers import tiktoken_gpt2

    enc = tiktoken_gpt2()
    assert isinstance(enc, tiktoken.Encoding) and enc.n_vocab == 50257
    text = "Hello there, world.<|endoftext|>A second document begins here and goes on."
    ds = GPTDataset(text, max_length=4, stride=4)
    expected = enc.encode(text, allowed_special={"<|endoftext|>"})
    assert 50256 in ds.token_ids.tolist()
    assert ds.token_ids.tolist() == expected


def test_the_course_tokenizers_work_as_given():
    from course_lib.tokenizers import BPETokenizer, GPT2Tokenizer, RegexTokenizer, tiktoken_gpt2

    text = "I had always thought Jack Gisburn rather a cheap genius -- though a good fellow enough. " * 3
    # Word level: encode(text) only.
    words = RegexTokenizer.from_text(text)
    ds = GPTDataset(text, max_length=6, stride=6, tokenizer=words)
    assert ds.token_ids.tolist() == words.encode(text)
    # Byte-level BPE and GPT-2's: <|endoftext|> is read as the special token.
    doc = text + "<|endoftext|>" + text
    bpe = BPETokenizer.train(text, vocab_size=300, special_tokens=("<|endoftext|>",))
    ids = GPTDataset(doc, max_length=6, stride=6, tokenizer=bpe).token_ids.tolist()
    assert bpe.special_tokens["<|endoftext|>"] in ids and bpe.decode(ids) == doc
    gpt2 = GPTDataset(doc, max_length=6, stride=6, tokenizer=GPT2Tokenizer.from_pretrained()).token_ids.tolist()
    assert gpt2 == tiktoken_gpt2().encode(doc, allowed_special={"<|endoftext|>"}) and 50256 in gpt2


# --------------------------------------------------------------------------- #
# Loader batches and reproducible shuffling
# --------------------------------------------------------------------------- #
def test_batches_have_the_right_shape_and_cover_the_windows_in_order_without_shuffle():
    ids = list(range(50))
    ds = GPTDataset(ids, max_length=6, stride=4)  # starts 0, 4, ..., 40 -> 11 windows
    loader = create_dataloader(ids, batch_size=3, max_length=6, stride=4, shuffle=False, drop_last=True)
    batches = list(loader)
    assert len(batches) == 11 // 3
    for b, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (3, 6)
        for r in range(3):
            ex, ey = ds[3 * b + r]
            assert torch.equal(x[r], ex) and torch.equal(y[r], ey)
    loader = create_dataloader(ids, batch_size=3, max_length=6, stride=4, shuffle=False, drop_last=False)
    assert [x.shape[0] for x, _ in loader] == [3, 3, 3, 2]


def _order(loader):
    return [x[:, 0].tolist() for x, _ in loader]


def test_shuffle_is_reproducible_with_a_seed():
    ids = list(range(400))
    make = lambda seed: create_dataloader(ids, batch_size=4, max_length=5, stride=5, seed=seed)
    a, b, c = make(7), make(7), make(8)
    assert _order(a) == _order(b)
    assert _order(a) != _order(c)
    # Each epoch visits every window once, in a new order.
    full = create_dataloader(ids, batch_size=4, max_length=5, stride=5, seed=7, drop_last=False)
    first, second = _order(full), _order(full)
    in_order = GPTDataset(ids, 5, 5).starts  # 0, 5, ..., 390
    for epoch in (first, second):
        flat = [v for batch in epoch for v in batch]
        assert sorted(flat) == in_order and flat != in_order
    assert first != second
    # The global RNG does not affect a seeded loader.
    torch.manual_seed(0)
    x = _order(make(7))
    torch.manual_seed(1)
    assert _order(make(7)) == x


def test_unseeded_shuffle_follows_torch_manual_seed():
    ids = list(range(400))
    torch.manual_seed(3)
    a = _order(create_dataloader(ids, batch_size=4, max_length=5, stride=5))
    torch.manual_seed(3)
    b = _order(create_dataloader(ids, batch_size=4, max_length=5, stride=5))
    assert a == b


# --------------------------------------------------------------------------- #
# split_text
# --------------------------------------------------------------------------- #
def test_split_text():
    text = "abcdefghij"
    assert split_text(text, 0.9) == ("abcdefghi", "j")
    assert split_text(text, 0.25) == ("ab", "cdefghij")
    train, val = split_text("x" * 1001, 0.9)
    assert len(train) == 900 and len(train) + len(val) == 1001
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="train_ratio"):
            split_text(text, bad)
    with pytest.raises(TypeError, match="text must be a str"):
        split_text([1, 2, 3], 0.5)
