"""Step 2 — the first tokenizer: words and punctuation marks, one id each.

Split the text on whitespace and punctuation (:data:`WORD_SPLIT_PATTERN`), give every
distinct piece an id (sorted, so the vocabulary does not depend on word order), and add
special tokens at the end:

* ``<|unk|>`` stands for any word the vocabulary has not seen;
* ``<|endoftext|>`` goes between documents, so a model can tell where one ends.

Whitespace is thrown away, so ``decode`` has to guess where the spaces were. It joins
tokens with single spaces and then re-attaches punctuation the way English text has it:

* no space before ``, . : ; ? ! )``; no space after ``(``;
* ``--`` (a dash) and an apostrophe between two word pieces (``don ' t``) touch both sides;
* ``"``, ``'`` and ``_`` (italics in Project Gutenberg texts) come in pairs: the 1st, 3rd,
  ... opens (touches the next token), the 2nd, 4th, ... closes (touches the previous one).

On *The Verdict* this rebuilds the text with its whitespace collapsed to single spaces
except in a handful of places (an unpaired quote, ``. . .``): a word tokenizer cannot know
more. Byte-level BPE (next section) keeps the spaces inside its tokens and round-trips
every string exactly.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..checks import describe

__all__ = ["RegexTokenizer", "WORD_SPLIT_PATTERN", "ENDOFTEXT", "UNK"]

#: Split on punctuation (kept, as tokens of their own), double dashes and whitespace.
WORD_SPLIT_PATTERN = r'([,.:;?_!"()\']|--|\s)'
#: The token put between documents: GPT-2's, and the one place the course spells it.
ENDOFTEXT = "<|endoftext|>"
UNK = "<|unk|>"

_NO_SPACE_BEFORE = frozenset(",.:;?!)")
_NO_SPACE_AFTER = frozenset("(")
_PAIRED = frozenset(['"', "'", "_"])


def _split(text: str, specials: Sequence[str]) -> list[str]:
    """Word and punctuation pieces of ``text``; special tokens stay whole."""
    if specials:
        chunks = re.split("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")", text)
    else:
        chunks = [text]
    pieces: list[str] = []
    for k, chunk in enumerate(chunks):
        if k % 2 == 1:              # re.split puts the captured special tokens at odd places
            pieces.append(chunk)
        else:
            pieces += [p.strip() for p in re.split(WORD_SPLIT_PATTERN, chunk) if p.strip()]
    return pieces


def _check_specials(special_tokens: Any) -> list[str]:
    """``special_tokens`` as a list of non-empty strings; a clear error otherwise."""
    if isinstance(special_tokens, str):
        raise TypeError(f"special_tokens must be a sequence of strings, e.g. ({special_tokens!r},)")
    try:
        specials = list(special_tokens)
    except TypeError:
        raise TypeError(f"special_tokens must be a sequence of strings, e.g. ({ENDOFTEXT!r},), "
                        f"got {type(special_tokens).__name__}") from None
    for s in specials:
        if not isinstance(s, str):
            raise TypeError(f"special_tokens must contain strings only, got {describe(s)}")
        if not s:
            raise ValueError(f"special_tokens contains an empty string; a special token needs at least one "
                             f"character, e.g. {ENDOFTEXT!r}")
    return specials


def _token_id_list(ids: Any) -> list[int]:
    """``ids`` (a list, tuple, tensor or NumPy array of token ids) as a list of ints.

    One C-level pass over the types in the usual case (every id a plain ``int``); only otherwise
    is each id looked at: NumPy integers are taken, floats (``104.0``) and bools refused.

    Raises:
        TypeError: ``ids`` is not a flat sequence of integers (``None``, a string, a batch, a
            float or bool id, a float tensor).
    """
    dtype = getattr(ids, "dtype", None)
    if hasattr(ids, "tolist"):  # torch.Tensor, NumPy array
        ids = ids.tolist()
    if isinstance(ids, (str, bytes, bytearray)):
        raise TypeError(f"ids must be a sequence of int token ids, got a {type(ids).__name__} "
                        f"(to get the ids of a text, call encode)")
    if not isinstance(ids, list):
        try:
            ids = list(ids)
        except TypeError:
            raise TypeError(f"ids must be a flat sequence of int token ids, got {type(ids).__name__}") from None
    if {*map(type, ids)} - {int}:    # rare: NumPy ints (fine), floats, bools, nested lists
        of_dtype = f" (the ids have dtype {dtype}: use ids.long() or ids.astype(int))" if dtype is not None else ""
        clean = []
        for k, i in enumerate(ids):
            if isinstance(i, (list, tuple)):
                raise TypeError(f"ids must be a flat sequence of ints (one sequence, not a batch), "
                                f"got {describe(i)} at position {k}")
            try:
                if isinstance(i, (bool, np.bool_)):  # an int to Python, never a token id
                    raise TypeError(i)
                clean.append(operator.index(i))     # int, NumPy integer, integer 0-d tensor
            except TypeError:
                raise TypeError(f"token ids must be integers, got {describe(i)} at position {k}{of_dtype}") from None
        ids = clean
    return ids


def _is_word(token: str) -> bool:
    return token[:1].isalnum() and token[-1:].isalnum()


class RegexTokenizer:
    """A word-level tokenizer with a fixed vocabulary.

    Args:
        vocab: token string -> id. Usually made by :meth:`from_text`.
        special_tokens: which entries of ``vocab`` are special (never split, matched
            whole in the text). Default: those of ``("<|endoftext|>", "<|unk|>")`` that
            are in ``vocab``.

    Attributes:
        str_to_int (dict[str, int]): token -> id.
        int_to_str (dict[int, str]): id -> token.
        special_tokens (list[str]): the special tokens.

    Example::

        tok = RegexTokenizer.from_text(fetch("the-verdict").read_text())
        ids = tok.encode('"It\\'s the last he painted, you know," Mrs. Gisburn said.')
        tok.decode(ids)   # the same sentence back
    """

    def __init__(self, vocab: dict[str, int], special_tokens: Sequence[str] | None = None):
        if not isinstance(vocab, dict) or not vocab:
            raise TypeError(f"vocab must be a non-empty dict token -> id, got {type(vocab).__name__}")
        if len(set(vocab.values())) != len(vocab):
            raise ValueError("vocab gives two tokens the same id; ids must be distinct")
        self.str_to_int = dict(vocab)
        self.int_to_str = {i: s for s, i in vocab.items()}
        if special_tokens is None:
            special_tokens = [s for s in (ENDOFTEXT, UNK) if s in vocab]
        special_tokens = _check_specials(special_tokens)
        missing = [s for s in special_tokens if s not in vocab]
        if missing:
            raise ValueError(f"special tokens {missing} are not in vocab; add them to it first")
        self.special_tokens = list(special_tokens)

    @classmethod
    def from_text(cls, text: str, special_tokens: Sequence[str] = (ENDOFTEXT, UNK)) -> RegexTokenizer:
        """Build the vocabulary of ``text``: its distinct pieces, sorted, then ``special_tokens``.

        Args:
            text: the text (special tokens in it are not added as words).
            special_tokens: appended after the words, in this order. Default
                ``("<|endoftext|>", "<|unk|>")``; leave out ``<|unk|>`` to make unknown
                words an error instead.

        Raises:
            TypeError: ``text`` is not a str, or ``special_tokens`` not a sequence of strings.
            ValueError: a special token is the empty string.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        specials = _check_specials(special_tokens)
        words = sorted(set(_split(text, specials)) - set(specials))
        vocab = {tok: i for i, tok in enumerate(words + specials)}
        return cls(vocab, specials)

    @property
    def vocab_size(self) -> int:
        return len(self.str_to_int)

    def __len__(self) -> int:
        return len(self.str_to_int)

    def __repr__(self) -> str:
        return f"RegexTokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"

    def tokenize(self, text: str) -> list[str]:
        """The pieces ``encode`` gives ids to (before unknown words are replaced)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return _split(text, self.special_tokens)

    def encode(self, text: str) -> list[int]:
        """Ids of the pieces of ``text``; unknown pieces become ``<|unk|>``.

        A special token written in the text (``"a<|endoftext|>b"``) is read as that token.

        Raises:
            ValueError: a piece is not in the vocabulary and there is no ``<|unk|>``.
        """
        unk = self.str_to_int.get(UNK)
        ids = []
        for piece in self.tokenize(text):
            i = self.str_to_int.get(piece, unk)
            if i is None:
                raise ValueError(f"{piece!r} is not in the vocabulary and the tokenizer has no {UNK!r} "
                                 f"token; build it with RegexTokenizer.from_text(text) (which adds {UNK!r})")
            ids.append(i)
        return ids

    def encode_documents(self, documents: Iterable[str]) -> list[int]:
        """Encode several documents with ``<|endoftext|>`` between them.

        Raises:
            ValueError: the vocabulary has no ``<|endoftext|>``.
            TypeError: ``documents`` is not an iterable of strings (one string, ``None``).
        """
        if isinstance(documents, str):
            raise TypeError("documents must be a list of strings, not one string")
        if not isinstance(documents, Iterable):
            raise TypeError(f"documents must be a list of strings, got {type(documents).__name__}")
        if ENDOFTEXT not in self.str_to_int:
            raise ValueError(f"the vocabulary has no {ENDOFTEXT!r} to put between documents")
        eot = self.str_to_int[ENDOFTEXT]
        ids: list[int] = []
        for k, doc in enumerate(documents):
            if k:
                ids.append(eot)
            ids += self.encode(doc)
        return ids

    @staticmethod
    def join_documents(documents: Iterable[str]) -> str:
        """``" <|endoftext|> ".join(documents)``: one text whose encoding separates the documents."""
        if isinstance(documents, str):
            raise TypeError("documents must be a list of strings, not one string")
        return f" {ENDOFTEXT} ".join(documents)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, punctuation re-attached (see the module docstring for the rules).

        Raises:
            ValueError: an id is not in the vocabulary.
            TypeError: ``ids`` is not a flat sequence of integers (``None``, a float such as
                ``1.0``, a bool, a float tensor).
        """
        ids = _token_id_list(ids)
        try:
            tokens = [self.int_to_str[i] for i in ids]
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]!r} is not in the vocabulary "
                             f"(ids run from 0 to {self.vocab_size - 1})") from None
        return join_tokens(tokens)


def join_tokens(tokens: Sequence[str]) -> str:
    """Join word and punctuation tokens into text, the way :meth:`RegexTokenizer.decode` does."""
    n = len(tokens)
    glue_left = [False] * n    # no space before token i
    glue_right = [False] * n   # no space after token i
    is_open = {q: False for q in _PAIRED}
    for i, tok in enumerate(tokens):
        if tok in _NO_SPACE_BEFORE:
            glue_left[i] = True
        elif tok in _NO_SPACE_AFTER:
            glue_right[i] = True
        elif tok == "--":
            glue_left[i] = glue_right[i] = True
        elif tok == "'" and 0 < i < n - 1 and _is_word(tokens[i - 1]) and _is_word(tokens[i + 1]):
            glue_left[i] = glue_right[i] = True      # an apostrophe inside a word: don't, Jack's
        elif tok in _PAIRED:
            if is_open[tok]:
                glue_left[i] = True                  # closing mark
            else:
                glue_right[i] = True                 # opening mark
            is_open[tok] = not is_open[tok]
    out = []
    for i, tok in enumerate(tokens):
        if i and not (glue_right[i - 1] or glue_left[i]):
            out.append(" ")
        out.append(tok)
    return "".join(out)
