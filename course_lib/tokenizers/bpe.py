"""Step 2 — byte-level BPE: a tokenizer trained from scratch, the way GPT-2's was.

Byte-pair encoding starts from the 256 possible bytes (so every string, in any script,
can be encoded) and learns *merges*: the most frequent adjacent pair of tokens becomes a
new token, again and again, until the vocabulary has the size asked for. Three pieces:

* **Pre-tokenization.** The text is first cut into pieces with GPT-2's regular expression
  (:data:`GPT2_SPLIT_PATTERN`: contractions, runs of letters, of digits, of other symbols,
  each with at most one leading space; runs of whitespace). Merges never cross a piece,
  so ``" dog"`` and ``" dog."`` share the token for ``" dog"``.
* **Training** (:meth:`BPETokenizer.train`). Count every adjacent pair inside every piece,
  weighted by how often the piece occurs. Merge the most frequent pair; on a tie the
  *lexicographically greatest pair of byte strings* wins (``(b"aa", b"a")`` beats
  ``(b"a", b"b")`` because ``b"aa" > b"a"``). Counts are then **updated incrementally**:
  only the pieces that contain the merged pair are rewritten, and only the pairs that
  changed are recounted. Recounting the whole corpus after every merge gives the same
  merges tens of times more slowly (about 35x for 300 merges on The Verdict).
* **Encoding.** Split the text the same way, turn each piece into bytes and replay the
  merges in the order they were learned (earliest first; on equal rank, leftmost first).

Special tokens (``<|endoftext|>`` …) are never produced by merges: at training time the
text is split on them first; at encoding time they are read as special tokens only when
``allowed_special`` allows it, exactly as tiktoken does (see :meth:`ByteLevelBPE.encode`).

Layout of the ids: ``0..255`` are the bytes, ``256 + i`` is the token made by merge ``i``,
then the special tokens in the order given. So ``vocab_size = 256 + len(merges) +
len(special_tokens)``.

:class:`ByteLevelBPE` holds what encoding and decoding need and is shared with
:class:`~course_lib.tokenizers.gpt2.GPT2Tokenizer`; :class:`BPETokenizer` adds training
and ``save``/``load``.
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import regex

from ..checks import boolean, integer
from ..files import atomic_write
from .regex_tokenizer import ENDOFTEXT, _token_id_list

__all__ = ["GPT2_SPLIT_PATTERN", "ByteLevelBPE", "BPETokenizer", "bytes_to_unicode"]

#: GPT-2's pre-tokenization pattern, as published with GPT-2 (``encoder.py``). Needs the
#: ``regex`` package for ``\p{L}`` (any letter) and ``\p{N}`` (any digit).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: tiktoken's spelling of GPT-2's pattern: the same splits as :data:`GPT2_SPLIT_PATTERN`,
#: written with possessive quantifiers so that the regex engine never backtracks.
TIKTOKEN_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# Patterns for which ByteLevelBPE._safe_cut's rule is proven (see its docstring).
_STREAMABLE_PATTERNS = frozenset({GPT2_SPLIT_PATTERN, TIKTOKEN_GPT2_PATTERN})
_WHITESPACE = regex.compile(r"\s")

_CACHE_MAX = 100_000  # pre-tokens remembered by one tokenizer before the cache is emptied
_FORMAT = "course_lib.BPETokenizer"


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable alphabet for bytes: byte value -> one visible character.

    Bytes that are printable characters stand for themselves (``b"a"`` -> ``"a"``); the
    others (space, control bytes, ...) are moved to unused code points from 256 up, so a
    space reads as ``"Ġ"`` and a newline as ``"Ċ"``. ``vocab.bpe``, ``encoder.json`` and
    :meth:`BPETokenizer.save` write tokens in this alphabet.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    moved = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + moved)
            moved += 1
    return table


def _to_printable(token: bytes) -> str:
    alphabet = bytes_to_unicode()
    return "".join(alphabet[b] for b in token)


def _from_printable(text: str, where: str) -> bytes:
    inverse = _printable_inverse()
    try:
        return bytes(inverse[c] for c in text)
    except KeyError as err:
        raise ValueError(f"{where}: {text!r} contains {err.args[0]!r}, which is not a character of "
                         f"GPT-2's byte alphabet (see bytes_to_unicode())") from None


@functools.lru_cache(maxsize=1)
def _printable_inverse() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


@functools.lru_cache(maxsize=64)
def _special_regex(tokens: frozenset[str]) -> re.Pattern:
    """A pattern matching any of ``tokens``; the longest wins where one is a prefix of another."""
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=lambda t: (-len(t), t))))


def _fix_surrogates(text: str) -> str:
    """What tiktoken does with text that is not valid Unicode: join surrogate pairs, replace lone ones."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_text(text: Any, name: str = "text") -> None:
    if not isinstance(text, str):
        hint = " (decode bytes first: data.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else ""
        raise TypeError(f"{name} must be a str, got {type(text).__name__}{hint}")


def _compile_pattern(pattern: Any) -> regex.Pattern:
    """``pattern`` compiled with ``regex``; a clear error naming ``pattern`` if it is not one."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str (a regular expression such as GPT2_SPLIT_PATTERN), "
                        f"got {type(pattern).__name__}")
    if not pattern:  # it matches only empty strings: every text would encode to []
        raise ValueError("pattern is empty, so no text would ever be split into pieces and every text "
                         "would encode to []; leave pattern out for GPT-2's (GPT2_SPLIT_PATTERN)")
    try:
        return regex.compile(pattern)
    except regex.error as err:
        raise ValueError(f"pattern {pattern[:60]!r} is not a valid regular expression ({err}); fix it or "
                         f"leave pattern out for GPT-2's (GPT2_SPLIT_PATTERN)") from None


def _as_special_set(value: Any, name: str) -> frozenset[str]:
    if isinstance(value, str):
        raise TypeError(f"{name} must be 'all' or a collection of strings, e.g. {{{value!r}}}; "
                        f"got the string {value!r}")
    try:
        tokens = frozenset(value)
    except TypeError:
        raise TypeError(f"{name} must be 'all' or a collection of strings, got {type(value).__name__}") from None
    bad = [t for t in tokens if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{name} must contain strings only, got {bad[0]!r}")
    return tokens


class ByteLevelBPE:
    """Encoding and decoding with a byte-level BPE vocabulary (shared by our tokenizers).

    Args:
        vocab: id -> bytes for every token, special tokens included (as their UTF-8 bytes).
        byte_ids: ``byte_ids[b]`` is the id of the one-byte token ``bytes([b])`` (256 entries).
        pair_merges: ``(left id, right id) -> (rank, merged id)``: which adjacent pairs merge,
            lowest rank first.
        special_tokens: special token string -> id.
        pattern: the pre-tokenization pattern (``regex`` syntax).

    Attributes:
        vocab (dict[int, bytes]): id -> the bytes it stands for.
        special_tokens (dict[str, int]): e.g. ``{"<|endoftext|>": 50256}``.
        pattern (str): the pre-tokenization pattern.
    """

    def __init__(self, vocab: dict[int, bytes], byte_ids: Sequence[int],
                 pair_merges: dict[tuple[int, int], tuple[int, int]],
                 special_tokens: dict[str, int], pattern: str = GPT2_SPLIT_PATTERN):
        if len(byte_ids) != 256:
            raise ValueError(f"byte_ids must have 256 entries (one per byte), got {len(byte_ids)}")
        self.vocab = vocab
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        self._pat = _compile_pattern(pattern)
        self._byte_ids = list(byte_ids)
        self._pair_merges = pair_merges
        self._cache: dict[str, list[int]] = {}
        self._n_vocab = max(vocab) + 1

    # ------------------------------------------------------------------ sizes
    @property
    def n_vocab(self) -> int:
        """Largest id + 1 (tiktoken's name): the rows a model's embedding table needs."""
        return self._n_vocab

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return len(self.vocab)

    @property
    def special_tokens_set(self) -> set[str]:
        return set(self.special_tokens)

    def __len__(self) -> int:
        return len(self.vocab)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, "
                f"special_tokens={list(self.special_tokens)})")

    # ------------------------------------------------------------------ encoding
    def _bpe(self, piece: bytes) -> list[int]:
        """Token ids of one pre-token: merge the lowest-ranked adjacent pair until none is left.

        The parts form a linked list over the byte positions and the candidate pairs sit in
        a heap keyed by ``(rank, position)``, so a long piece (a run of 10,000 spaces) costs
        ``O(n log n)`` instead of ``O(n²)``. A heap entry is stale once either of its parts
        has changed; it is then skipped (the changed pair was pushed again when it changed).
        """
        ids: list[int | None] = [self._byte_ids[b] for b in piece]
        n = len(ids)
        if n < 2:
            return ids  # type: ignore[return-value]
        merges = self._pair_merges
        nxt = list(range(1, n + 1))    # position of the next live part (n = none)
        prv = list(range(-1, n - 1))   # position of the previous live part (-1 = none)
        heap = []
        for i in range(n - 1):
            m = merges.get((ids[i], ids[i + 1]))
            if m is not None:
                heap.append((m[0], i, m[1]))
        heapq.heapify(heap)
        while heap:
            rank, i, new = heapq.heappop(heap)
            j = nxt[i]
            if ids[i] is None or j >= n or merges.get((ids[i], ids[j])) != (rank, new):
                continue  # stale: one of the two parts changed since this entry was pushed
            ids[i], ids[j] = new, None          # part j joins part i
            nxt[i] = k = nxt[j]
            if k < n:
                prv[k] = i
                m = merges.get((new, ids[k]))
                if m is not None:
                    heapq.heappush(heap, (m[0], i, m[1]))
            p = prv[i]
            if p >= 0:
                m = merges.get((ids[p], new))
                if m is not None:
                    heapq.heappush(heap, (m[0], p, m[1]))
        return [t for t in ids if t is not None]

    def _encode_chunk(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self._cache
        for piece in self._pat.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece.encode("utf-8"))
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text``, reading special-token strings as ordinary text.

        Same as ``encode(text, disallowed_special=())``.
        """
        _check_text(text)
        try:
            return self._encode_chunk(text)
        except UnicodeEncodeError:  # lone surrogates: clean up exactly as tiktoken does
            return self._encode_chunk(_fix_surrogates(text))

    def _resolve_special(self, allowed_special, disallowed_special) -> tuple[frozenset[str], frozenset[str]]:
        known = frozenset(self.special_tokens)
        allowed = known if allowed_special == "all" else _as_special_set(allowed_special, "allowed_special")
        if disallowed_special == "all":
            disallowed = known - allowed
        else:
            disallowed = _as_special_set(disallowed_special, "disallowed_special")
        # Like tiktoken, strings that are not special tokens of this vocabulary are ignored
        # in allowed_special (so encode(text, allowed_special={"<|endoftext|>"}) works for a
        # tokenizer trained without it).
        return allowed & known, disallowed

    def encode(self, text: str, *, allowed_special: Literal["all"] | Collection[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Token ids of ``text``, with tiktoken's rules for special tokens.

        Args:
            text: the text.
            allowed_special: special tokens to read as such where their text appears, or
                ``"all"``. Default: none.
            disallowed_special: special tokens whose text must not appear, or ``"all"``
                (default): every special token not in ``allowed_special``. Pass ``()`` to
                encode special-token text as ordinary text instead.

        Returns:
            ``list[int]``, one id per token.

        Raises:
            ValueError: ``text`` contains a disallowed special token (the message says how
                to allow it or to encode it as text).
            TypeError: ``text`` is not a str, or the special arguments are not ``"all"``
                or collections of strings.

        Example::

            tok.encode("hi<|endoftext|>")                                   # ValueError
            tok.encode("hi<|endoftext|>", allowed_special={"<|endoftext|>"})  # [..., eot id]
            tok.encode("hi<|endoftext|>", disallowed_special=())            # as plain text
        """
        _check_text(text)
        allowed, disallowed = self._resolve_special(allowed_special, disallowed_special)
        if disallowed:
            found = _special_regex(disallowed).search(text)
            if found:
                token = found.group()
                raise ValueError(
                    f"text contains the special token {token!r} at character {found.start()}, which "
                    f"is disallowed. To encode it as the special token pass allowed_special={{{token!r}}} "
                    f"(or 'all'); to encode it as ordinary text pass disallowed_special=()."
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for m in _special_regex(allowed).finditer(text):
            ids += self.encode_ordinary(text[start:m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def _safe_cut(self, buf: str, specials: frozenset[str]) -> int:
        """A position ``c`` with ``encode(buf[:c]) + encode(buf[c:] + more) == encode(buf + more)``
        whatever text ``more`` follows (0 when no such position is known yet).

        Never cut inside a special token, nor where one may be starting at the end of
        ``buf``; right after a complete special token is always safe. Otherwise, with
        GPT-2's pattern, cut at the start ``c`` of a pre-token such that

        * the character before ``c`` is not whitespace: how ``\\s+(?!\\S)`` splits a run of
          whitespace depends on the character after the *whole* run (``" \\xa0"`` is one
          pre-token at the end of the text, two before a digit), so no run may touch the
          cut;
        * at least two characters follow ``c``: a run of letters, digits or symbols that
          ends at ``c`` is only known to end once the next character is seen, and a lone
          ``'`` just before ``c`` may still become ``'ll``, ``'re`` or ``'ve``.

        Then every pre-token before ``c`` was decided by characters of ``buf`` and is the
        same in ``buf[:c]``. For any other pattern no such rule is known, and
        only the cuts after special tokens are used.
        """
        end = len(buf)
        for tok in specials:  # a special token may begin in the last len(tok) - 1 characters
            for k in range(min(len(tok) - 1, len(buf)), 0, -1):
                if buf.endswith(tok[:k]):
                    end = min(end, len(buf) - k)
                    break
        start = 0
        if specials:
            for m in _special_regex(specials).finditer(buf, 0, end):
                start = m.end()
        if self.pattern not in _STREAMABLE_PATTERNS:
            return start
        last = end - 2
        cut = start
        for m in self._pat.finditer(buf, start, end):
            c = m.start()
            if c > last:
                break
            if c > start and not _WHITESPACE.match(buf, c - 1):
                cut = c
        return cut

    def encode_iterable(self, iterable: Iterable[str], *,
                        allowed_special: Literal["all"] | Collection[str] = frozenset(),
                        disallowed_special: Literal["all"] | Collection[str] = "all",
                        buffer_chars: int = 1 << 16) -> Iterator[int]:
        """Yield the ids of the concatenation of ``iterable``'s strings, in bounded memory.

        Made for files: ``with open(path) as f: ids = tok.encode_iterable(f)`` streams a
        file of any size line by line. The result equals ``encode("".join(iterable))``:
        text is held back until it can be cut where no pre-token or special token crosses
        the cut, whatever text comes next (about ``buffer_chars`` characters are kept; more
        while no such cut is known, e.g. inside a long run of whitespace). With a
        pre-tokenization pattern other than GPT-2's, text is cut only after special tokens.

        Raises:
            ValueError: a disallowed special token appears (see :meth:`encode`); ids before
                it have already been yielded. ``buffer_chars`` not a positive int.
            TypeError: ``iterable`` is not an iterable of str (bytes, a number).
        """
        if isinstance(iterable, (bytes, bytearray)):
            raise TypeError("iterable must yield str; open the file in text mode (open(path, encoding='utf-8'))")
        if isinstance(iterable, str):  # one string is one chunk, not a stream of characters
            iterable = [iterable]
        if isinstance(buffer_chars, bool) or not isinstance(buffer_chars, int) or buffer_chars < 1:
            raise ValueError(f"buffer_chars must be a positive int, got {buffer_chars!r}")
        try:
            iterable = iter(iterable)
        except TypeError:
            raise TypeError(f"iterable must be an iterable of str (a list of strings or an open text file), "
                            f"got {type(iterable).__name__}") from None
        allowed, disallowed = self._resolve_special(allowed_special, disallowed_special)
        watch = allowed | disallowed   # every special token whose text changes the result
        kwargs = dict(allowed_special=allowed, disallowed_special=disallowed)
        parts: list[str] = []
        size, threshold = 0, buffer_chars
        for chunk in iterable:
            _check_text(chunk, "each item of iterable")
            parts.append(chunk)
            size += len(chunk)
            if size < threshold:
                continue
            buf = "".join(parts)
            cut = self._safe_cut(buf, watch)
            if cut == 0:           # one huge pre-token: wait for twice as much text
                parts, threshold = [buf], 2 * size
                continue
            yield from self.encode(buf[:cut], **kwargs)
            rest = buf[cut:]
            parts, size, threshold = [rest], len(rest), buffer_chars
        yield from self.encode("".join(parts), **kwargs)

    # ------------------------------------------------------------------ decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for, joined (a tensor or array of ids works too).

        Raises:
            ValueError: an id is not in the vocabulary.
            TypeError: ``ids`` is not a flat sequence of ints (a float such as ``104.0``, a bool,
                a float tensor, ``None`` or a batch are refused).
        """
        ids = _token_id_list(ids)
        vocab = self.vocab
        try:
            return b"".join([vocab[i] for i in ids])
        except KeyError as err:
            raise ValueError(f"token id {err.args[0]!r} is not in the vocabulary "
                             f"(ids run from 0 to {self.n_vocab - 1})") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text of ``ids``. Bytes that are not valid UTF-8 (a character cut between two
        ids, e.g. half an emoji) become U+FFFD "�" with the default ``errors="replace"``,
        as in tiktoken; pass ``errors="strict"`` to raise instead.

        Raises:
            ValueError: an id is not in the vocabulary.
            TypeError: ``ids`` is not a flat sequence of ints (see :meth:`decode_bytes`).
        """
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_tokens_bytes(self, ids: Iterable[int]) -> list[bytes]:
        """One ``bytes`` per id: where the token boundaries fall."""
        ids = _token_id_list(ids)
        return [self.decode_bytes([i]) for i in ids]


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def _merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    """``word`` with every non-overlapping ``(a, b)``, left to right, replaced by ``new``."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _descending(token: bytes) -> tuple[int, ...]:
    """A key that sorts byte strings in *reverse* lexicographic order (``b"a" < b"aa"`` flips).

    ``heapq`` pops the smallest entry; with this key the greatest pair of byte strings
    comes out first among pairs of equal count. 256 ends the key: a prefix sorts after
    the longer strings it begins.
    """
    return (*(255 - b for b in token), 256)


def _is_tokenizer_file(path: Path) -> bool:
    """Whether ``path`` starts like a file :meth:`BPETokenizer.save` wrote (its first bytes only)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(200)
    except OSError:
        return False
    return head.startswith(b"{") and f'"format": "{_FORMAT}"'.encode() in head


def _check_special_tokens(special_tokens: Any) -> list[str]:
    if isinstance(special_tokens, str):
        raise TypeError(f"special_tokens must be a sequence of strings, e.g. ({special_tokens!r},), "
                        f"not a single string")
    if special_tokens is None:
        return []
    tokens = list(special_tokens)
    for t in tokens:
        if not isinstance(t, str) or not t:
            raise TypeError(f"special_tokens must be non-empty strings, got {t!r}")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"special_tokens has duplicates: {tokens}")
    return tokens


class BPETokenizer(ByteLevelBPE):
    """A byte-level BPE tokenizer: 256 byte tokens, learned merges, special tokens.

    Usually made by :meth:`train` or :meth:`load`; the constructor rebuilds one from its
    merges.

    Args:
        merges: the merges in the order they were learned, each a pair of byte strings
            that are tokens by then (the 256 bytes or earlier merges).
        special_tokens: strings that get their own ids after the merges, in this order.
            Default ``("<|endoftext|>",)``.
        pattern: pre-tokenization pattern. Default :data:`GPT2_SPLIT_PATTERN`.

    Attributes:
        merges (list[tuple[bytes, bytes]]): in learned order; merge ``i`` made id ``256 + i``.
        vocab (dict[int, bytes]): id -> bytes (special tokens as their UTF-8 bytes).
        special_tokens (dict[str, int]): special token -> id.

    Raises:
        ValueError: a merge uses something that is not yet a token; ``pattern`` is not a
            valid regular expression, or is empty.
        TypeError: ``merges`` is not a sequence of pairs of bytes.
    """

    def __init__(self, merges: Sequence[tuple[bytes, bytes]],
                 special_tokens: Sequence[str] = (ENDOFTEXT,),
                 pattern: str = GPT2_SPLIT_PATTERN):
        specials = _check_special_tokens(special_tokens)
        if isinstance(merges, (str, bytes)) or not isinstance(merges, Iterable):
            raise TypeError(f"merges must be a sequence of (bytes, bytes) pairs, got {type(merges).__name__}")
        vocab = {b: bytes([b]) for b in range(256)}
        first_id = {tok: i for i, tok in vocab.items()}  # bytes -> its (first) id
        pair_merges: dict[tuple[int, int], tuple[int, int]] = {}
        clean: list[tuple[bytes, bytes]] = []
        for rank, pair in enumerate(merges):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(x, (bytes, bytearray)) for x in pair)):
                raise TypeError(f"merges[{rank}] must be a pair of bytes, got {pair!r}")
            a, b = bytes(pair[0]), bytes(pair[1])
            if a not in first_id or b not in first_id:
                missing = a if a not in first_id else b
                raise ValueError(f"merges[{rank}] = {(a, b)!r}: {missing!r} is not a token yet "
                                 f"(neither a byte nor made by an earlier merge)")
            new_id = 256 + rank
            vocab[new_id] = a + b
            first_id.setdefault(a + b, new_id)
            # Tokens are identified by their bytes: if two merges ever make the same bytes,
            # the later id is never produced by encode (it decodes the same anyway).
            pair_merges.setdefault((first_id[a], first_id[b]), (rank, first_id[a + b]))
            clean.append((a, b))
        special_ids = {}
        for k, tok in enumerate(specials):
            special_ids[tok] = 256 + len(clean) + k
            vocab[special_ids[tok]] = tok.encode("utf-8")
        super().__init__(vocab, list(range(256)), pair_merges, special_ids, pattern)
        self.merges = clean

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Sequence[str] = (ENDOFTEXT,), *,
              pattern: str = GPT2_SPLIT_PATTERN, verbose: bool = False,
              callback: Callable[[int, tuple[bytes, bytes], int, int], None] | None = None,
              progress: bool = False) -> BPETokenizer:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        Args:
            text: the training text. Special tokens in it cut it into separate documents
                and are not counted.
            vocab_size: size of the finished vocabulary: 256 bytes + merges + special tokens.
            special_tokens: default ``("<|endoftext|>",)``.
            pattern: pre-tokenization pattern. Default :data:`GPT2_SPLIT_PATTERN`.
            verbose: print each merge as it is made.
            callback: called after each merge as ``callback(i, (left, right), new_id, count)``
                (to show or record training live).
            progress: show a tqdm progress bar.

        Returns:
            a new :class:`BPETokenizer`. When the text runs out of pairs first (every
            pre-token is a single token) training stops early with a warning, and the
            vocabulary is smaller than asked.

        Raises:
            ValueError: ``vocab_size`` has no room for the 256 bytes and the special tokens,
                or ``pattern`` is not a valid regular expression (or is empty).
            TypeError: ``text`` or ``pattern`` is not a str, ``vocab_size`` not an int,
                ``verbose`` or ``progress`` not ``True``/``False``, ``callback`` not callable.

        Example::

            tok = BPETokenizer.train(text, vocab_size=1000)
            tok.merges[:3]   # [(b' ', b't'), (b'h', b'e'), ...]
        """
        _check_text(text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: clean up as encode() does
            text = _fix_surrogates(text)
        specials = _check_special_tokens(special_tokens)
        pat = _compile_pattern(pattern)
        verbose, progress = boolean("verbose", verbose), boolean("progress", progress)  # "no" would read as True
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be None or a function called as callback(i, (left, right), new_id, "
                            f"count), got {type(callback).__name__}")
        smallest = 256 + len(specials)
        vocab_size = integer("vocab_size", vocab_size, minimum=smallest,
                             hint=f" (256 bytes + {len(specials)} special token(s))")
        n_merges = vocab_size - smallest

        # 1. Pre-tokenize each document and count how often each piece occurs.
        docs = _special_regex(frozenset(specials)).split(text) if specials else [text]
        piece_counts: Counter[str] = Counter()
        for doc in docs:
            piece_counts.update(pat.findall(doc))
        words: list[list[int]] = []   # each distinct piece as a list of token ids
        counts: list[int] = []        # how often it occurs
        for piece, c in piece_counts.items():
            b = piece.encode("utf-8")
            if len(b) >= 2:
                words.append(list(b))
                counts.append(c)

        # 2. Count every adjacent pair once, and remember which words contain it.
        pair_counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (word, c) in enumerate(zip(words, counts)):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += c
                where[pair].add(w)
        vocab = {i: bytes([i]) for i in range(256)}
        key = {i: _descending(vocab[i]) for i in range(256)}
        # Max-heap by count, then by the greatest (left bytes, right bytes); stale entries
        # (whose count has changed since) are skipped when popped.
        heap = [(-c, key[a], key[b], (a, b)) for (a, b), c in pair_counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[bytes, bytes]] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_merges, desc="BPE merges", unit="merge")
        while len(merges) < n_merges:
            # 3. The most frequent pair (skipping stale heap entries).
            while heap:
                neg, _, _, pair = heapq.heappop(heap)
                if pair_counts.get(pair, 0) == -neg:
                    break
            else:
                break
            a, b = pair
            count = -neg
            new = 256 + len(merges)
            vocab[new] = vocab[a] + vocab[b]
            key[new] = _descending(vocab[new])
            merges.append((vocab[a], vocab[b]))

            # 4. Rewrite only the words that contain the pair; collect how pair counts change.
            delta: dict[tuple[int, int], int] = defaultdict(int)
            for w in where.pop(pair):
                word = words[w]
                merged = _merge_word(word, a, b, new)
                if len(merged) == len(word):
                    continue  # the pair left this word in an earlier merge
                c = counts[w]
                for p in zip(word, word[1:]):
                    delta[p] -= c
                for p in zip(merged, merged[1:]):
                    delta[p] += c
                    if new in p:
                        where[p].add(w)
                words[w] = merged
            for p, d in delta.items():
                if d:
                    c = pair_counts[p] + d
                    if c > 0:
                        pair_counts[p] = c
                        heapq.heappush(heap, (-c, key[p[0]], key[p[1]], p))
                    else:
                        del pair_counts[p]
            pair_counts.pop(pair, None)

            if verbose:
                print(f"merge {len(merges)}/{n_merges}: {vocab[a]!r} + {vocab[b]!r} -> "
                      f"{new} {vocab[new]!r} (count {count})")
            if callback is not None:
                callback(len(merges) - 1, merges[-1], new, count)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if len(merges) < n_merges:
            warnings.warn(f"the text ran out of pairs to merge after {len(merges)} merges; the "
                          f"vocabulary has {256 + len(merges) + len(specials)} tokens, not {vocab_size}",
                          stacklevel=2)
        return cls(merges, specials, pattern)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the tokenizer as readable JSON, atomically (:func:`course_lib.files.atomic_write`).

        The file holds the pattern, the special tokens with their ids and the merges,
        one per line, written in GPT-2's printable byte alphabet (a space is ``"Ġ"``, a
        newline ``"Ċ"``; see :func:`bytes_to_unicode`), as in GPT-2's ``vocab.bpe``.

        Args:
            path: the file to write; missing parent folders are created.
            overwrite: replace whatever file is at ``path``. Default ``False``: a tokenizer
                file written earlier by :meth:`save` is still replaced (so a notebook cell can be
                run again), but any other existing file is refused rather than destroyed.

        Returns:
            the path written.

        Raises:
            IsADirectoryError: ``path`` is a folder.
            FileExistsError: ``path`` exists, is not a tokenizer file written by :meth:`save`,
                and ``overwrite`` is ``False``.
            TypeError: ``overwrite`` is not ``True``/``False``.
        """
        path = Path(path)
        overwrite = boolean("overwrite", overwrite)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give a file name, e.g. {path / 'tokenizer.json'}")
        if not overwrite and path.exists() and not _is_tokenizer_file(path):
            raise FileExistsError(f"{path} already exists and is not a tokenizer file written by "
                                  f"BPETokenizer.save, so it was not overwritten; pass overwrite=True to "
                                  f"replace it, or choose another file name")
        header = {"format": _FORMAT, "version": 1, "byte_alphabet": "gpt2-bytes-to-unicode",
                  "pattern": self.pattern, "special_tokens": self.special_tokens}
        head = json.dumps(header, ensure_ascii=False, indent=2)[:-2]  # drop the closing "\n}"
        merges = ",\n".join("    " + json.dumps([_to_printable(a), _to_printable(b)], ensure_ascii=False)
                            for a, b in self.merges)
        body = f'{head},\n  "merges": [\n{merges}\n  ]\n}}\n' if merges else f'{head},\n  "merges": []\n}}\n'
        return atomic_write(path, lambda fh: fh.write(body.encode("utf-8")), overwrite=True)  # checked above

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            IsADirectoryError: ``path`` is a folder.
            ValueError: the file is not a tokenizer saved by :meth:`save` (not UTF-8 text,
                not JSON, another format), or is damaged (a merge that is not a pair of
                strings, special tokens that are not ``{token: id}``, an invalid pattern):
                the message names the file and the entry.
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder; give the tokenizer's file, e.g. {path / 'tokenizer.json'}")
        damaged = f"{path} is a damaged BPETokenizer file"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text, so not a file written by BPETokenizer.save") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); was it written by BPETokenizer.save?") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a BPETokenizer file (no \"format\": \"{_FORMAT}\")")
        if data.get("version") != 1:
            raise ValueError(f"{path} has version {data.get('version')!r}; this course_lib reads version 1")
        missing = [k for k in ("pattern", "special_tokens", "merges") if k not in data]
        if missing:
            raise ValueError(f"{damaged}: missing {missing}")
        raw_merges, raw_specials, pattern = data["merges"], data["special_tokens"], data["pattern"]
        if not isinstance(raw_merges, list):
            raise ValueError(f"{damaged}: \"merges\" must be a list of [left, right] pairs")
        merges = []
        for i, pair in enumerate(raw_merges):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ValueError(f"{damaged}: merge {i} is {json.dumps(pair, ensure_ascii=False)[:40]}, "
                                 f"not a [left, right] pair of strings")
            merges.append((_from_printable(pair[0], f"{path}: merge {i}"),
                           _from_printable(pair[1], f"{path}: merge {i}")))
        if not (isinstance(raw_specials, dict) and all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in raw_specials.values())):
            raise ValueError(f"{damaged}: \"special_tokens\" must be an object {{token: id}}, "
                             f"got {json.dumps(raw_specials, ensure_ascii=False)[:40]}")
        specials = sorted(raw_specials.items(), key=lambda kv: kv[1])
        try:
            tok = cls(merges, [s for s, _ in specials], pattern)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{damaged}: {err}") from None
        if tok.special_tokens != raw_specials:
            raise ValueError(f"{path}: special token ids {raw_specials} do not follow the "
                             f"{len(merges)} merges (expected {tok.special_tokens})")
        return tok
