"""course_lib.tokenizers.BPETokenizer: training against hand-worked answers, a brute-force
trainer and Hugging Face's; encoding against tiktoken loaded with our merges; files; streams."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from _corpora import corpus
from course_lib.tokenizers import GPT2_SPLIT_PATTERN, BPETokenizer

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def verdict() -> str:
    return corpus("the-verdict")


@pytest.fixture(scope="module")
def verdict_tok(verdict) -> BPETokenizer:
    return BPETokenizer.train(verdict, 256 + 300 + 1)


# --------------------------------------------------------------------------- #
# A reference trainer: recount every pair of byte strings after every merge
# --------------------------------------------------------------------------- #
def brute_force_merges(text: str, n_merges: int, specials=(EOT,)) -> list[tuple[bytes, bytes]]:
    """The definition, slowly: words as tuples of byte strings, all pairs recounted each step."""
    docs = regex.split("|".join(regex.escape(s) for s in specials), text) if specials else [text]
    words: Counter = Counter()
    for doc in docs:
        for piece in regex.findall(GPT2_SPLIT_PATTERN, doc):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1
    merges = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, c in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # most frequent, then greatest bytes
        merges.append(best)
        merged: Counter = Counter()
        for word, c in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


def train_quietly(text, vocab_size, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ran out of pairs" on tiny texts
        return BPETokenizer.train(text, vocab_size, **kw)


# --------------------------------------------------------------------------- #
# Known answers
# --------------------------------------------------------------------------- #
def test_textbook_aaabdaaabac_under_the_tie_rule():
    # GPT-2's pattern keeps "aaabdaaabac" in one piece (it is all letters), so the
    # pre-tokenizer changes nothing here. Pairs, counted with overlaps:
    #   aa: 4 (two in each "aaa"), ab: 2, bd: 1, da: 1, ba: 1, ac: 1
    # 1. (a, a) -> "aa"           tokens: aa a b d aa a b a c
    #    now (aa, a): 2 and (a, b): 2 tie. Wikipedia's textbook picks "ab" (Y) and then
    #    "ZY" = (aa, ab). Our documented rule takes the lexicographically greatest pair
    #    of byte strings: (b"aa", b"a") > (b"a", b"b") since b"aa" > b"a".
    # 2. (aa, a) -> "aaa"         tokens: aaa b d aaa b a c
    #    (aaa, b): 2, every other pair 1.
    # 3. (aaa, b) -> "aaab"       tokens: aaab d aaab a c
    tok = BPETokenizer.train("aaabdaaabac", 256 + 3 + 1)
    assert tok.merges == [(b"a", b"a"), (b"aa", b"a"), (b"aaa", b"b")]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.vocab[258] == b"aaab" and tok.special_tokens == {EOT: 259}


def test_tie_rule_on_equal_counts():
    # "abcd": (a,b), (b,c), (c,d) all occur once; the greatest pair is (c, d).
    # Then (a,b), (b,cd): (b"b", b"cd") > (b"a", b"b"). Then (a, bcd).
    tok = BPETokenizer.train("abcd", 256 + 3, special_tokens=())
    assert tok.merges == [(b"c", b"d"), (b"b", b"cd"), (b"a", b"bcd")]


def test_pretokenizer_keeps_merges_inside_pieces():
    # " ab ab" is two pieces " ab" (GPT-2 keeps the space in front of a word):
    # (" ", a): 2, (a, b): 2 -> tie, greatest is (b"a", b"b") since b"a" > b" ".
    tok = BPETokenizer.train(" ab ab", 256 + 2, special_tokens=())
    assert tok.merges == [(b"a", b"b"), (b" ", b"ab")]
    assert tok.encode(" ab ab") == [257, 257]


def test_matches_brute_force_trainer_on_the_verdict(verdict, verdict_tok):
    assert verdict_tok.merges == brute_force_merges(verdict, 300)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(st.sampled_from(list("aab b'\n") + ["<|endoftext|>", "é", "🙂"]), max_size=60).map("".join),
       n_merges=st.integers(1, 25))
def test_matches_brute_force_trainer_on_random_text(text, n_merges):
    # A tiny alphabet makes ties, overlapping pairs ("aaa") and special tokens frequent.
    tok = train_quietly(text, 256 + n_merges + 1)
    assert tok.merges == brute_force_merges(text, n_merges)


def test_vocab_layout_and_size(verdict):
    tok = BPETokenizer.train(verdict, 400, special_tokens=(EOT, "<|pad|>"))
    assert tok.vocab_size == len(tok.vocab) == 400 == tok.n_vocab
    assert len(tok.merges) == 400 - 256 - 2
    assert all(tok.vocab[b] == bytes([b]) for b in range(256))
    assert all(tok.vocab[256 + i] == a + b for i, (a, b) in enumerate(tok.merges))
    assert tok.special_tokens == {EOT: 398, "<|pad|>": 399}


def test_special_tokens_split_training_text():
    # Without the split, "<|", "endoftext", "|>" would be pieces with pairs to merge.
    with pytest.warns(UserWarning, match="ran out of pairs to merge after 0 merges"):
        tok = BPETokenizer.train(f"a{EOT}b{EOT}c", 300)
    assert tok.merges == [] and tok.vocab_size == 257
    tok = BPETokenizer.train(f"xy{EOT}xy{EOT}", 256 + 1 + 1)
    assert tok.merges == [(b"x", b"y")]
    assert all(EOT.encode() not in tok.vocab[i] for i in range(256 + len(tok.merges)))


def test_callback_and_verbose_report_each_merge(capsys):
    seen = []
    tok = BPETokenizer.train("aaabdaaabac", 259, special_tokens=(), verbose=True,
                             callback=lambda i, pair, new_id, count: seen.append((i, pair, new_id, count)))
    assert seen == [(0, (b"a", b"a"), 256, 4), (1, (b"aa", b"a"), 257, 2), (2, (b"aaa", b"b"), 258, 2)]
    out = capsys.readouterr().out
    assert out.count("merge ") == 3 and "b'aaa' + b'b' -> 258" in out


def test_hugging_face_trainer_agrees_on_size_and_compression(verdict):
    """An independent trainer (Rust, same pre-tokenizer, its own tie rule): same number of
    merges, nearly the same merges, the same compression on held-out text."""
    tokenizers = pytest.importorskip("tokenizers")
    from course_lib.tokenizers.bpe import _from_printable

    train, held_out = corpus("gutenberg-84")[:200_000], verdict
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=1000, special_tokens=[EOT], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([train], trainer)
    hf_merges = [tuple(_from_printable(x, "hf") for x in (m.split(" ") if isinstance(m, str) else m))
                 for m in json.loads(hf.to_str())["model"]["merges"]]
    ours = BPETokenizer.train(train, 1000)
    assert hf.get_vocab_size() == ours.vocab_size == 1000
    assert len(hf_merges) == len(ours.merges)
    overlap = len(set(hf_merges) & set(ours.merges)) / len(ours.merges)
    assert overlap > 0.95, f"only {overlap:.1%} of the merges agree with Hugging Face's"
    n_ours, n_hf = len(ours.encode(held_out)), len(hf.encode(held_out).ids)
    assert abs(n_ours - n_hf) / n_hf < 0.01, (n_ours, n_hf)


# --------------------------------------------------------------------------- #
# Encoding: tiktoken loaded with our merges is the reference
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tiktoken_of(verdict_tok):
    tiktoken = pytest.importorskip("tiktoken")

    def build(tok: BPETokenizer):
        ranks = {tok.vocab[i]: i for i in range(256 + len(tok.merges))}
        return tiktoken.Encoding(name="ours", pat_str=tok.pattern, mergeable_ranks=ranks,
                                 special_tokens=tok.special_tokens)
    return build


def test_encode_matches_tiktoken_with_our_merges_on_held_out_text():
    tok = BPETokenizer.train(corpus("gutenberg-1342")[:300_000], 2000)
    import tiktoken

    ranks = {tok.vocab[i]: i for i in range(256 + len(tok.merges))}
    ref = tiktoken.Encoding(name="ours", pat_str=tok.pattern, mergeable_ranks=ranks,
                            special_tokens=tok.special_tokens)
    for name in ("the-verdict", "gutenberg-1513", "instruction-data"):
        text = corpus(name)
        assert tok.encode_ordinary(text) == ref.encode_ordinary(text), name


@pytest.fixture(scope="module")
def two_specials(verdict, tiktoken_of):
    tok = BPETokenizer.train(verdict[:5000], 300, special_tokens=(EOT, "<|pad|>"))
    return tok, tiktoken_of(tok)


@pytest.mark.parametrize("allowed, disallowed", [
    (set(), "all"), ({EOT}, "all"), ("all", "all"), (set(), ()), ({EOT}, ()),
    (set(), {"<|pad|>"}), ({"<|pad|>"}, {EOT}), ({"<|not-ours|>"}, ()),
])
@pytest.mark.parametrize("text", ["plain text", f"a{EOT}b", f"x<|pad|>{EOT}", "<|endof", f"{EOT}{EOT}"])
def test_special_tokens_like_tiktoken(two_specials, text, allowed, disallowed):
    tok, ref = two_specials
    try:
        expected = ref.encode(text, allowed_special=allowed, disallowed_special=disallowed)
    except ValueError:
        with pytest.raises(ValueError, match="special token"):
            tok.encode(text, allowed_special=allowed, disallowed_special=disallowed)
    else:
        assert tok.encode(text, allowed_special=allowed, disallowed_special=disallowed) == expected


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_decode_inverts_encode_on_any_unicode(verdict_tok, text):
    assert verdict_tok.decode(verdict_tok.encode(text, disallowed_special=())) == text


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.one_of(st.text(), st.just(EOT)), max_size=6))
def test_decode_inverts_encode_with_special_tokens(verdict_tok, parts):
    text = "".join(parts)
    ids = verdict_tok.encode(text, allowed_special="all")
    assert verdict_tok.decode(ids) == text
    assert ids.count(verdict_tok.special_tokens[EOT]) == text.count(EOT)


def test_decode_replaces_invalid_utf8(verdict_tok):
    bytes_only = BPETokenizer([])                    # no merges: one token per byte
    ids = bytes_only.encode("é🙂")
    assert ids == list("é🙂".encode()) and bytes_only.decode(ids) == "é🙂"
    assert bytes_only.decode(ids[:1]) == "\ufffd"   # half of "é"
    assert bytes_only.decode(ids[:4]) == "é\ufffd"  # é, then 2 of the emoji's 4 bytes
    with pytest.raises(UnicodeDecodeError):
        bytes_only.decode(ids[:1], errors="strict")
    assert verdict_tok.decode_tokens_bytes(verdict_tok.encode(" the cat")) == [
        verdict_tok.vocab[i] for i in verdict_tok.encode(" the cat")]


def test_lone_surrogates_are_cleaned_like_tiktoken(verdict_tok, tiktoken_of):
    ref = tiktoken_of(verdict_tok)
    for text in ["a\ud800b", "\ud83d\ude00", "x\udfff"]:
        assert verdict_tok.encode(text) == ref.encode(text)


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #
def test_save_load_roundtrip(tmp_path, verdict, verdict_tok):
    path = verdict_tok.save(tmp_path / "sub" / "verdict.json")
    loaded = BPETokenizer.load(path)
    assert loaded.merges == verdict_tok.merges
    assert loaded.vocab == verdict_tok.vocab
    assert loaded.special_tokens == verdict_tok.special_tokens
    text = verdict + f"{EOT} naïve café 🙂"
    assert loaded.encode(text, allowed_special="all") == verdict_tok.encode(text, allowed_special="all")
    # Readable: one merge per line in GPT-2's byte alphabet, JSON all the same.
    lines = path.read_text(encoding="utf-8").splitlines()
    assert '    ["Ġ", "t"],' in lines or any(line.strip().startswith('["Ġ"') for line in lines)
    assert json.loads(path.read_text(encoding="utf-8"))["special_tokens"] == {EOT: 556}
    assert [p.name for p in path.parent.iterdir()] == ["verdict.json"]  # no temp file left


def test_save_replaces_atomically(tmp_path, verdict_tok, monkeypatch):
    path = tmp_path / "tok.json"
    BPETokenizer.train("aaabdaaabac", 258).save(path)
    before = path.read_text(encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("course_lib.tokenizers.bpe.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        verdict_tok.save(path)
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]


def test_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a BPETokenizer file"):
        BPETokenizer.load(bad)
    bad.write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        BPETokenizer.load(bad)
    bad.write_text('{"format": "course_lib.BPETokenizer", "version": 1, "merges": [["a"]]}', encoding="utf-8")
    with pytest.raises(ValueError, match="damaged"):
        BPETokenizer.load(bad)


def _damage(path, **changes):
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**data, **changes}), encoding="utf-8")


@pytest.mark.parametrize("changes, says", [
    (dict(merges=["ab"]), r"merge 0 is \"ab\", not a \[left, right\] pair of strings"),  # used to load as (a, b)
    (dict(merges=[["a", "b", "c"]]), r"merge 0 is \[\"a\", \"b\", \"c\"\]"),
    (dict(merges=[["a", 7]]), r"merge 0 is \[\"a\", 7\]"),
    (dict(merges=None), r"\"merges\" must be a list"),
    (dict(special_tokens=[EOT]), r"\"special_tokens\" must be an object \{token: id\}"),
    (dict(special_tokens={EOT: "258"}), r"\"special_tokens\" must be an object"),
    (dict(pattern="("), r"pattern '\(' is not a valid regular expression"),
    (dict(pattern=5), "pattern must be a str"),
], ids=["merge-as-string", "merge-of-three", "merge-with-int", "merges-null", "specials-list",
        "special-id-str", "bad-pattern", "pattern-int"])
def test_load_names_the_file_and_the_damaged_entry(tmp_path, changes, says):
    path = BPETokenizer.train("aaabdaaabac", 258).save(tmp_path / "tok.json")
    BPETokenizer.load(path)
    _damage(path, **changes)
    with pytest.raises(ValueError, match=says) as err:
        BPETokenizer.load(path)
    assert str(err.value).startswith(f"{path} is a damaged BPETokenizer file: ")


def test_load_of_a_binary_or_missing_file_or_a_folder(tmp_path):
    path = tmp_path / "tok.json"
    path.write_bytes(b"\x80\x81 not utf-8 \xff")
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text"):
        BPETokenizer.load(path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        BPETokenizer.load(tmp_path / "nothing.json")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        BPETokenizer.load(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        BPETokenizer([]).save(tmp_path)


def test_more_bad_arguments_say_what_to_fix(verdict_tok):
    with pytest.raises(ValueError, match="buffer_chars must be a positive int, got True"):
        list(verdict_tok.encode_iterable(["ab"], buffer_chars=True))
    for bad in (None, 5):
        with pytest.raises(TypeError, match="iterable must be an iterable of str"):
            list(verdict_tok.encode_iterable(bad))
    with pytest.raises(TypeError, match="merges must be a sequence of \\(bytes, bytes\\) pairs, got NoneType"):
        BPETokenizer(None)
    with pytest.raises(TypeError, match="got a str .*call encode"):
        verdict_tok.decode("hello")


def test_an_invalid_pattern_is_named():
    with pytest.raises(ValueError, match=r"pattern '\(' is not a valid regular expression"):
        BPETokenizer.train("abc", 300, pattern="(")
    with pytest.raises(ValueError, match=r"pattern '\[a-' is not a valid regular expression"):
        BPETokenizer([], pattern="[a-")
    with pytest.raises(TypeError, match="pattern must be a str"):
        BPETokenizer.train("abc", 300, pattern=None)


# --------------------------------------------------------------------------- #
# Streams
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def stream_tok(verdict) -> BPETokenizer:
    """Merges for contractions, runs of whitespace and pieces of <|endoftext|>: a wrong cut
    in encode_iterable then changes the ids, not only the pre-tokens."""
    extra = "x'll we're a  \n b  <|endoftext| a <|  " * 30
    return BPETokenizer.train(verdict + extra, 700)


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(st.one_of(st.lists(st.sampled_from(list("ab '\n\t.1slrev") + ["<|", "endof", "text|", ">", EOT]),
                                         max_size=8).map("".join),
                                st.text(max_size=5)), max_size=20),
       buffer_chars=st.integers(1, 12))
@example(parts=["x'l", "l"], buffer_chars=1)              # "'ll" is one pre-token: not cut after "'"
@example(parts=["a <|endoftext|", ">b"], buffer_chars=1)  # a special token split across chunks
@example(parts=["a  ", "\n", " b"], buffer_chars=1)       # whitespace runs decided by what follows
def test_encode_iterable_equals_encode(stream_tok, parts, buffer_chars):
    text = "".join(parts)
    for kw in ({"allowed_special": "all"}, {"disallowed_special": ()}):
        got = list(stream_tok.encode_iterable(iter(parts), buffer_chars=buffer_chars, **kw))
        assert got == stream_tok.encode(text, **kw)


def test_encode_iterable_with_another_pattern_cuts_only_after_special_tokens():
    # With this pattern "ab" is one piece only before "ccc": a cut that is safe for GPT-2's
    # pattern (after "a", two characters before the end) splits it here.
    pattern = r"ab(?=ccc)|\S|\s"
    tok = BPETokenizer.train("abccc " * 20, 258, pattern=pattern)
    assert tok.merges[0] == (b"a", b"b")
    text = f"abccc ab{EOT}abccc"
    for buffer_chars in (1, 2, 4):
        parts = ["ab", "c", "cc ab", EOT, "ab", "c", "cc"]
        assert list(tok.encode_iterable(parts, allowed_special="all", buffer_chars=buffer_chars)) == \
            tok.encode(text, allowed_special="all")


def test_property_tests_are_derandomized_in_ci():
    """The root conftest.py: the same examples on every CI run, new ones locally."""
    root = Path(__file__).resolve().parents[1]
    code = ("import runpy; runpy.run_path('conftest.py'); from hypothesis import settings; "
            "print(settings.default.derandomize)")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    for extra, derandomized in [({"CI": "true"}, True), ({}, False), ({"CI": "false"}, False),
                                ({"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, False),
                                ({"HYPOTHESIS_PROFILE": "ci"}, True)]:
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, **extra},
                             capture_output=True, text=True, check=True).stdout
        assert out.split() == [str(derandomized)], extra


def test_encode_iterable_streams_a_file(tmp_path, verdict, verdict_tok):
    path = tmp_path / "big.txt"
    path.write_text((verdict + EOT) * 20, encoding="utf-8")
    with open(path, encoding="utf-8") as fh:
        got = list(verdict_tok.encode_iterable(fh, allowed_special={EOT}))
    assert got == verdict_tok.encode((verdict + EOT) * 20, allowed_special={EOT})


def test_encode_iterable_is_lazy(verdict_tok):
    # An endless stream: ids must come out without reading it all.
    first = list(itertools.islice(verdict_tok.encode_iterable(itertools.repeat("It was a dark night. ")), 5000))
    assert verdict_tok.decode(first).startswith("It was a dark night. It was")


def test_encode_iterable_raises_on_disallowed_special(verdict_tok):
    with pytest.raises(ValueError, match="disallowed"):
        list(verdict_tok.encode_iterable(["hello <|endof", "text|> world"]))


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def test_bad_arguments_say_what_to_fix(verdict_tok):
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        BPETokenizer.train("abc", 200)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        BPETokenizer.train("abc", 300.0)
    with pytest.raises(TypeError, match="not a single string"):
        BPETokenizer.train("abc", 300, special_tokens=EOT)
    with pytest.raises(TypeError, match="decode bytes first"):
        verdict_tok.encode(b"bytes")
    with pytest.raises(TypeError, match="allowed_special must be 'all' or a collection"):
        verdict_tok.encode("x", allowed_special=EOT)
    with pytest.raises(ValueError, match="token id 99999 is not in the vocabulary"):
        verdict_tok.decode([1, 99999])
    with pytest.raises(TypeError, match="flat sequence"):
        verdict_tok.decode([[1, 2]])
    with pytest.raises(ValueError, match="is not a token yet"):
        BPETokenizer([(b"ab", b"c")])
