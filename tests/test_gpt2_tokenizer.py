"""course_lib.tokenizers.GPT2Tokenizer and tiktoken_gpt2 against tiktoken's own ``gpt2`` encoding:
every staged corpus, edge cases, arbitrary Unicode, special tokens, partial id sequences."""

from __future__ import annotations

import json

import pytest
import regex
from hypothesis import example, given, settings
from hypothesis import strategies as st

from course_lib.data import GUTENBERG_BOOKS, DataFetchError, fetch
from _corpora import corpus, gpt2_tiktoken
from course_lib.tokenizers import ENDOFTEXT, GPT2_SPLIT_PATTERN, TIKTOKEN_GPT2_PATTERN, GPT2Tokenizer, tiktoken_gpt2

tiktoken = pytest.importorskip("tiktoken")
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def ref():
    return gpt2_tiktoken()


@pytest.fixture(scope="module")
def tok() -> GPT2Tokenizer:
    try:
        return GPT2Tokenizer.from_pretrained()
    except DataFetchError as err:
        pytest.skip(f"GPT-2's encoder.json / vocab.bpe are not staged: {err}".splitlines()[0])


# --------------------------------------------------------------------------- #
# tiktoken_gpt2(): the production encoding, built from the registry's files
# --------------------------------------------------------------------------- #
def test_tiktoken_gpt2_is_tiktokens_gpt2(ref):
    enc = tiktoken_gpt2()
    assert isinstance(enc, tiktoken.Encoding) and enc is tiktoken_gpt2()  # cached
    assert enc.name == "gpt2" and enc.n_vocab == ref.n_vocab == 50257
    assert enc._pat_str == ref._pat_str == TIKTOKEN_GPT2_PATTERN
    assert enc._mergeable_ranks == ref._mergeable_ranks
    assert enc._special_tokens == ref._special_tokens == {EOT: 50256}
    text = corpus("the-verdict") + EOT
    assert enc.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")


def test_the_one_endoftext_is_gpt2s_special_token(ref, tok):
    """ENDOFTEXT is spelt once (tokenizers/regex_tokenizer.py); every other module imports it."""
    import course_lib.text_data
    import course_lib.tokenizers.bpe
    import course_lib.tokenizers.gpt2

    assert ref.special_tokens_set == {ENDOFTEXT} and tok.special_tokens == {ENDOFTEXT: 50256}
    for module in (course_lib.text_data, course_lib.tokenizers.bpe, course_lib.tokenizers.gpt2):
        assert module.ENDOFTEXT is ENDOFTEXT


def test_tiktoken_gpt2_needs_no_tiktoken_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    tiktoken_gpt2.cache_clear()
    try:
        assert tiktoken_gpt2().encode("Hello, world") == [15496, 11, 995]
        assert not (tmp_path / "empty").exists()  # nothing copied into tiktoken's cache
    finally:
        tiktoken_gpt2.cache_clear()


# --------------------------------------------------------------------------- #
# The pre-tokenizer
# --------------------------------------------------------------------------- #
def test_gpt2_pattern_splits_like_tiktokens_spelling():
    ours, theirs = regex.compile(GPT2_SPLIT_PATTERN), regex.compile(TIKTOKEN_GPT2_PATTERN)
    for name in ("the-verdict", "gutenberg-2701", "sms-spam"):
        text = corpus(name)
        assert ours.findall(text) == theirs.findall(text), name


# --------------------------------------------------------------------------- #
# Parity on every staged corpus
# --------------------------------------------------------------------------- #
CORPORA = ["the-verdict", "tiny-shakespeare", "tinystories-sample",
           *(f"gutenberg-{n}" for n, *_ in GUTENBERG_BOOKS)]


@pytest.mark.parametrize("name", CORPORA)
def test_same_ids_and_text_as_tiktoken_on_corpus(tok, ref, name):
    text = corpus(name)
    ids = tok.encode(text, allowed_special="all")
    assert ids == ref.encode(text, allowed_special="all")
    assert tok.decode(ids) == ref.decode(ids) == text


def test_same_ids_on_every_instruction_example(tok, ref):
    raw = corpus("instruction-data")
    assert tok.encode(raw) == ref.encode(raw)
    for entry in json.loads(raw):
        for field in ("instruction", "input", "output"):
            assert tok.encode(entry[field]) == ref.encode(entry[field]), (field, entry)


def test_same_ids_on_every_sms_message(tok, ref):
    lines = corpus("sms-spam").split("\n")
    messages = [line.split("\t", 1)[1] for line in lines if line]
    assert len(messages) == 5574
    assert [tok.encode(m) for m in messages] == ref.encode_batch(messages)


# --------------------------------------------------------------------------- #
# Edge cases
# --------------------------------------------------------------------------- #
EDGE_CASES = [
    "", " ", "  ", "\n", "\t", " \n ", "\r\n", "    ", " " * 10_000, "\n" * 5000, " \n" * 1000,
    "word" + " " * 300 + "word", "a\n\n\n\nb", "trailing spaces   ", "   leading",
    "🙂", "👩‍👩‍👧‍👦 family", "🇫🇷🇩🇪", "e\u0301 combining", "Z̷̢̛a̵l̶g̸o̵", "\u200b\u200b zero width",
    "Hello 世界 Привет мир مرحبا שלום नमस्ते 안녕하세요", "Ελληνικά και English", "東京タワー",
    "I'm, you're, he's, we'll, they've, I'd, don't", "I'M SHOUTING, DON'T", "rock 'n' roll", "''''",
    "123 4567 89.01 1,000,000", "x²+y³ ½ ⅔", "tab\tseparated\tvalues", "\x00\x01\x1c\x1f\x7f", "\x85\xa0\u2028\u3000",
    "<|endoftext|>", f"one{EOT}two", f"{EOT}{EOT}", f" {EOT} ", "<|endoftext", "<|endoftext|", "<<|endoftext|>>",
    "def f(x):\n    return x ** 2  # square\n", "https://example.com/a?b=c&d=e", "CamelCaseWord snake_case_word",
]


@pytest.mark.parametrize("text", EDGE_CASES, ids=[repr(t)[:30] for t in EDGE_CASES])
def test_edge_cases_like_tiktoken(tok, ref, text):
    for kwargs in ({"allowed_special": "all"}, {"disallowed_special": ()}):
        ids = tok.encode(text, **kwargs)
        assert ids == ref.encode(text, **kwargs)
        assert tok.decode(ids) == ref.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_same_ids_as_tiktoken_on_any_unicode(tok, ref, text):
    ids = tok.encode(text, disallowed_special=())
    assert ids == ref.encode(text, disallowed_special=())
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", categories=["Zs", "Cc", "Ll", "Lu", "Nd", "Po", "Mn", "So"]),
                    max_size=200))
def test_same_ids_as_tiktoken_on_whitespace_heavy_text(tok, ref, text):
    assert tok.encode_ordinary(text) == ref.encode_ordinary(text)


def test_lone_surrogates_cleaned_like_tiktoken(tok, ref):
    for text in ["a\ud800b", "\ud83d\ude00 smile", "x\udfff", "\ud800"]:
        assert tok.encode(text) == ref.encode(text)


# --------------------------------------------------------------------------- #
# Special tokens
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("allowed, disallowed", [
    (set(), "all"), ({EOT}, "all"), ("all", "all"), (set(), ()), ({EOT}, ()), ("all", ()),
    (set(), {EOT}), ({"<|unknown|>"}, ()), (set(), {"<|pad|>"}),
])
@pytest.mark.parametrize("text", ["no special here", f"a{EOT}b", f"{EOT}", "<|pad|> x", f"x <|pad|>{EOT}"])
def test_special_tokens_like_tiktoken(tok, ref, text, allowed, disallowed):
    try:
        expected = ref.encode(text, allowed_special=allowed, disallowed_special=disallowed)
    except ValueError:
        with pytest.raises(ValueError, match="special token"):
            tok.encode(text, allowed_special=allowed, disallowed_special=disallowed)
    else:
        assert tok.encode(text, allowed_special=allowed, disallowed_special=disallowed) == expected


def test_sizes_and_eot(tok, ref):
    assert tok.n_vocab == ref.n_vocab == 50257 == tok.vocab_size
    assert tok.eot_token == ref.eot_token == 50256
    assert tok.special_tokens == {EOT: 50256}
    assert len(tok.merges) == 50_000
    sample = [0, 1, 220, 198, 50256, 15496, 40345]
    assert tok.decode_tokens_bytes(sample) == [ref.decode_single_token_bytes(i) for i in sample]
    assert all(tok.vocab[i] == ref.decode_single_token_bytes(i) for i in range(0, 50257, 97))


# --------------------------------------------------------------------------- #
# Decoding partial sequences
# --------------------------------------------------------------------------- #
def test_partial_sequences_decode_with_replacement_like_tiktoken(tok, ref):
    text = "naïve 🙂 café 東京 👩‍👩‍👧"
    ids = ref.encode(text)
    for i in range(len(ids)):
        for j in range(i + 1, len(ids) + 1):
            assert tok.decode(ids[i:j]) == ref.decode(ids[i:j])
    emoji = ref.encode("🙂")
    assert len(emoji) > 1 and "\ufffd" in tok.decode(emoji[:1])


def test_decode_accepts_a_tensor(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode("Hello, world")
    assert tok.decode(torch.tensor(ids)) == "Hello, world"


# --------------------------------------------------------------------------- #
# Streaming a file
# --------------------------------------------------------------------------- #
def test_encode_iterable_streams_a_book_like_tiktoken(tok, ref):
    path = fetch("gutenberg-1513", progress=False)
    with open(path, encoding="utf-8") as fh:
        streamed = list(tok.encode_iterable(fh, buffer_chars=4096))
    assert streamed == ref.encode(path.read_text(encoding="utf-8"))


def test_encode_iterable_found_by_hypothesis(tok, ref):
    # A whitespace run's split depends on the character after the whole run: " \xa0" is one
    # pre-token at the end of the text but " " + "\xa0" before "0". The old cut after "\xa0"
    # encoded " \xa0" alone.
    assert list(tok.encode_iterable([" \xa00:"], buffer_chars=1)) == ref.encode(" \xa00:") == [220, 1849, 15, 25]


# Whitespace runs (Unicode spaces, newlines, tabs), contractions and digits, where the cut
# decides how the text around it is pre-tokenized.
STREAM_EDGE_CASES = [
    " \xa00:", "a \xa0\xa0b", "x\n\n y", "a    1", " \u3000x", "we\u2009'll go", "it's", "x're!",
    "we'l l", "\r\n\r\nz", "a \n\tb", "... ?", " \xa0<|endoftext|> \xa0a", "1 2\u00a03\u20034",
    "naïve café\u202f!", "\t\t'", "a' ve", " 'll\n", "東京 \u3000 大阪", "x\u0301 \u0301",
    "\n\na ", " \xa0a'", "\xa0\xa0'\r", "\n\xa0a\u3000", "\t\ta\n", "\n\n'\t",
]


@pytest.mark.parametrize("text", STREAM_EDGE_CASES, ids=[repr(t)[:30] for t in STREAM_EDGE_CASES])
def test_encode_iterable_like_tiktoken_at_every_cut(tok, ref, text):
    """Every way of cutting the text into two or three chunks, with cuts tried after each chunk."""
    kw = {"allowed_special": "all"}
    expected = ref.encode(text, **kw)
    n = len(text)
    for i in range(n + 1):
        for j in range(i, n + 1):
            parts = [text[:i], text[i:j], text[j:]]
            for buffer_chars in (1, 2, 3):
                got = list(tok.encode_iterable(parts, buffer_chars=buffer_chars, **kw))
                assert got == expected, (parts, buffer_chars)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.text(max_size=8), max_size=12), buffer_chars=st.integers(1, 16))
@example(parts=["we'l", "l go"], buffer_chars=1)
@example(parts=["a <|endoftext|", "> b"], buffer_chars=1)
@example(parts=[" \xa00:"], buffer_chars=1)
def test_encode_iterable_like_tiktoken_however_the_text_is_cut(tok, ref, parts, buffer_chars):
    text = "".join(parts)
    for kw in ({"allowed_special": "all"}, {"disallowed_special": ()}):
        assert list(tok.encode_iterable(parts, buffer_chars=buffer_chars, **kw)) == ref.encode(text, **kw)


# --------------------------------------------------------------------------- #
# Files and bad input
# --------------------------------------------------------------------------- #
def test_from_files_names_a_binary_file(tmp_path):
    binary = tmp_path / "encoder.json"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="encoder_json .*encoder.json' is not JSON"):
        GPT2Tokenizer.from_files(binary, fetch("gpt2-vocab-bpe", progress=False))
    with pytest.raises(ValueError, match="vocab_bpe .*encoder.json' is not UTF-8"):
        GPT2Tokenizer.from_files(fetch("gpt2-encoder", progress=False), binary)
    binary.write_text('{"a": "0"}', encoding="utf-8")
    with pytest.raises(ValueError, match="token -> id"):
        GPT2Tokenizer.from_files(binary, fetch("gpt2-vocab-bpe", progress=False))


def test_from_files_checks_its_inputs(tmp_path):
    encoder, vocab = fetch("gpt2-encoder", progress=False), fetch("gpt2-vocab-bpe", progress=False)
    with pytest.raises(ValueError, match="not JSON|swap"):
        GPT2Tokenizer.from_files(vocab, encoder)
    lines = vocab.read_text(encoding="utf-8").split("\n")
    shuffled = tmp_path / "vocab.bpe"
    shuffled.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]), encoding="utf-8")
    with pytest.raises(ValueError, match="do not belong together"):
        GPT2Tokenizer.from_files(encoder, shuffled)
    with pytest.raises(FileNotFoundError):
        GPT2Tokenizer.from_files(tmp_path / "nope.json", vocab)


def test_from_pretrained_is_built_once(tok):
    assert GPT2Tokenizer.from_pretrained() is tok
