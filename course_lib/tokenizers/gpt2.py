"""Step 2 — GPT-2's tokenizer, read from OpenAI's two files, equal to tiktoken's ``gpt2``.

GPT-2 ships its byte-level BPE as two files:

* ``encoder.json``: token -> id for all 50,257 tokens (256 bytes, 50,000 merges,
  ``<|endoftext|>`` = 50256), each token written in GPT-2's printable byte alphabet
  (:func:`~course_lib.tokenizers.bpe.bytes_to_unicode`: ``"Ġthe"`` is ``b" the"``);
* ``vocab.bpe``: the 50,000 merges in the order they were learned, one ``left right`` per
  line. Merge ``i`` made the token with id ``256 + i``, so an id is also a merge rank.

:class:`GPT2Tokenizer` encodes with the same rule as tiktoken: inside each pre-token, merge
the adjacent pair of parts **whose concatenation has the lowest id**, leftmost first on a
tie, until no adjacent concatenation is a token. GPT-2's original ``encoder.py`` ranks the
*pairs* listed in ``vocab.bpe`` instead (tiktoken would also merge ``a + bc`` where only
``ab + c`` is listed); the two rules give the same ids on every corpus the course stages,
and we follow tiktoken, the reference our tests compare with.

:func:`tiktoken_gpt2` builds tiktoken's own ``Encoding`` for GPT-2 from the same two files
of the course's data registry, so nothing depends on tiktoken's download cache.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .bpe import GPT2_SPLIT_PATTERN, TIKTOKEN_GPT2_PATTERN, ByteLevelBPE, _from_printable
from .regex_tokenizer import ENDOFTEXT

if TYPE_CHECKING:  # pragma: no cover
    import tiktoken

__all__ = ["GPT2Tokenizer", "tiktoken_gpt2", "TIKTOKEN_GPT2_PATTERN"]


class GPT2Tokenizer(ByteLevelBPE):
    """GPT-2's byte-level BPE: ``encode``/``decode`` give the same ids and strings as
    ``tiktoken.get_encoding("gpt2")``.

    Args:
        encoder: token (GPT-2 byte alphabet) -> id, as in ``encoder.json``.
        bpe_merges: ``(left, right)`` pairs in learned order, as in ``vocab.bpe``.
        pattern: pre-tokenization pattern. Default :data:`GPT2_SPLIT_PATTERN`.

    Attributes:
        vocab (dict[int, bytes]): id -> bytes, 50,257 entries.
        merges (list[tuple[bytes, bytes]]): the 50,000 merges in order.
        special_tokens (dict[str, int]): ``{"<|endoftext|>": 50256}``.

    Raises:
        ValueError: the two files do not belong together (a merge's token has another id in
            ``encoder.json`` than its line in ``vocab.bpe`` says), or a byte is missing.
        TypeError: ``encoder`` is not a dict token -> int id, or ``bpe_merges`` not a sequence
            of ``(left, right)`` pairs of strings (read the files with :meth:`from_files`).

    Example::

        tok = GPT2Tokenizer.from_pretrained()
        tok.encode("Hello, world")             # [15496, 11, 995]
        tok.decode([15496, 11, 995])           # 'Hello, world'
    """

    def __init__(self, encoder: dict[str, int], bpe_merges: Sequence[tuple[str, str]],
                 pattern: str = GPT2_SPLIT_PATTERN):
        how = "; read OpenAI's files with GPT2Tokenizer.from_files(encoder_json, vocab_bpe) or from_pretrained()"
        if not isinstance(encoder, dict):
            raise TypeError(f"encoder must be a dict token -> id (encoder.json), got {type(encoder).__name__}{how}")
        bad = next(((t, i) for t, i in encoder.items() if not isinstance(t, str) or isinstance(i, bool)
                    or not isinstance(i, int)), None)
        if bad is not None:
            raise TypeError(f"encoder must map token strings to int ids, got {bad[0]!r}: {bad[1]!r}{how}")
        if isinstance(bpe_merges, (str, bytes)) or not isinstance(bpe_merges, Iterable):
            raise TypeError(f"bpe_merges must be a sequence of (left, right) pairs of strings (vocab.bpe), "
                            f"got {type(bpe_merges).__name__}{how}")
        ranks: dict[bytes, int] = {}     # token bytes -> id (= merge rank)
        specials: dict[str, int] = {}
        for text, i in encoder.items():
            if text == ENDOFTEXT:
                specials[text] = i
            else:
                ranks[_from_printable(text, "encoder.json")] = i
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"encoder.json has no token for byte(s) {missing[:5]}: every byte needs one")
        merges = []
        for k, pair in enumerate(bpe_merges):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise TypeError(f"bpe_merges[{k}] must be a (left, right) pair of strings, got {pair!r}{how}")
            left, right = pair
            a, b = _from_printable(left, "vocab.bpe"), _from_printable(right, "vocab.bpe")
            got = ranks.get(a + b)
            if got != 256 + k:
                raise ValueError(f"vocab.bpe line {k + 2} ({left} {right}) makes {a + b!r}, which has id "
                                 f"{got} in encoder.json instead of {256 + k}: the files do not belong together")
            merges.append((a, b))
        # tiktoken's rule: any two adjacent parts may merge if their concatenation is a token,
        # the lower its id the sooner. List every way each token splits into two tokens.
        pair_merges: dict[tuple[int, int], tuple[int, int]] = {}
        for token, r in ranks.items():
            for k in range(1, len(token)):
                left, right = ranks.get(token[:k]), ranks.get(token[k:])
                if left is not None and right is not None:
                    pair_merges[(left, right)] = (r, r)
        vocab = {i: t for t, i in ranks.items()}
        vocab.update({i: s.encode("utf-8") for s, i in specials.items()})
        super().__init__(vocab, [ranks[bytes([b])] for b in range(256)], pair_merges, specials, pattern)
        self.merges = merges
        self.name = "gpt2"

    @classmethod
    def from_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> GPT2Tokenizer:
        """Read OpenAI's ``encoder.json`` and ``vocab.bpe``.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: a file is not what its name says, or the two do not match.
        """
        try:
            encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"encoder_json {str(encoder_json)!r} is not JSON ({err}); "
                             f"pass GPT-2's encoder.json") from None
        if not isinstance(encoder, dict) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                    for i in encoder.values()):
            raise ValueError(f"encoder_json {str(encoder_json)!r} must hold a JSON object token -> id")
        try:
            lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as err:
            raise ValueError(f"vocab_bpe {str(vocab_bpe)!r} is not UTF-8 text ({err}); pass GPT-2's vocab.bpe") from None
        if not lines[0].startswith("#version"):
            raise ValueError(f"vocab_bpe {str(vocab_bpe)!r} does not start with '#version': pass GPT-2's vocab.bpe "
                             f"(did you swap the two arguments?)")
        merges = []
        for n, line in enumerate(lines[1:], start=2):
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"vocab_bpe line {n} should be 'left right', got {line!r}")
            merges.append((parts[0], parts[1]))
        return cls(encoder, merges)

    @classmethod
    def from_pretrained(cls) -> GPT2Tokenizer:
        """GPT-2's tokenizer from the course's data registry (``fetch("gpt2-encoder")`` and
        ``fetch("gpt2-vocab-bpe")``). Built once per process; later calls return the same object."""
        return _pretrained() if cls is GPT2Tokenizer else _load_pretrained(cls)

    @property
    def eot_token(self) -> int:
        """The id of ``<|endoftext|>`` (50256)."""
        return self.special_tokens[ENDOFTEXT]


def _load_pretrained(cls):
    from ..data import fetch

    return cls.from_files(fetch("gpt2-encoder"), fetch("gpt2-vocab-bpe"))


@functools.lru_cache(maxsize=1)
def _pretrained() -> GPT2Tokenizer:
    return _load_pretrained(GPT2Tokenizer)


@contextlib.contextmanager
def _tiktoken_cache_off():
    """tiktoken copies every file it reads into its cache folder; ours are already local."""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


@functools.lru_cache(maxsize=1)
def tiktoken_gpt2() -> tiktoken.Encoding:
    """tiktoken's production GPT-2 encoding, built offline from the registry's two files.

    Same ids as ``tiktoken.get_encoding("gpt2")`` but needs neither the network nor
    ``TIKTOKEN_CACHE_DIR``: the files come from :func:`course_lib.data.fetch` (cache, mirror
    or download, checked by sha256). Built once per process.
    """
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from ..data import fetch

    encoder_json, vocab_bpe = fetch("gpt2-encoder"), fetch("gpt2-vocab-bpe")
    with _tiktoken_cache_off():
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    return tiktoken.Encoding(name="gpt2", pat_str=TIKTOKEN_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)
