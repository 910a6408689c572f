"""Step 2 — from a long text to training batches: sliding windows of token ids.

A GPT learns to predict the next token. One training example is a window of
``max_length`` token ids (the *inputs*) and the same window moved one token to the
right (the *targets*): at every position the target is the token that came next::

    ids     : 10 11 12 13 14 15 16 17 18
    window 0: inputs  [10 11 12 13]      (max_length = 4, stride = 2)
              targets [11 12 13 14]
    window 1: inputs        [12 13 14 15]
              targets       [13 14 15 16]
    window 2: inputs              [14 15 16 17]
              targets             [15 16 17 18]

Windows start every ``stride`` tokens. ``stride == max_length`` tiles the text without
overlap (every token is a target exactly once, the usual choice for training);
``stride < max_length`` overlaps windows (more examples, more repetition, which can
help overfit small texts); ``stride > max_length`` skips tokens.

* :func:`window_starts` — where each window starts (plain arithmetic, no tensors).
* :class:`GPTDataset` — a ``torch.utils.data.Dataset`` of ``(inputs, targets)``
  pairs, each ``[max_length]`` long. The text is tokenized **once**, in ``__init__``;
  ``__getitem__`` only slices one tensor.
* :func:`create_dataloader` — text → tokenizer → dataset → ``DataLoader`` of
  ``[batch_size, max_length]`` batches, shuffled reproducibly with ``seed``.
* :func:`split_text` — cut a text into a training part and a validation part.

Choices worth knowing:

* The default tokenizer is GPT-2's (:func:`course_lib.tokenizers.tiktoken_gpt2`), and
  ``<|endoftext|>`` in the text is read as the special token (id 50256), since that is
  how documents are joined in a training corpus. Any object with an ``encode``
  method works: one that takes tiktoken's ``allowed_special`` argument gets
  ``{"<|endoftext|>"}``; one whose ``encode`` takes only the text is called with it.
* A text with fewer than ``max_length + 1`` tokens has no complete window and is a
  ``ValueError`` (windows are never padded).
* With ``drop_last=True`` a loader that would yield no batch at all (fewer windows than
  ``batch_size``) is a ``ValueError`` too, rather than an empty loop that trains
  nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .checks import boolean, describe, finite_number, integer, non_negative_int
from .tokenizers import ENDOFTEXT, tiktoken_gpt2

__all__ = ["GPTDataset", "create_dataloader", "window_starts", "split_text", "encode_text"]

_STRIDE_HINT = " (the step between window starts; use stride=max_length for windows that do not overlap)"


def window_starts(num_tokens: int, max_length: int, stride: int) -> list[int]:
    """Start positions of the complete windows over ``num_tokens`` tokens.

    A window starting at ``s`` reads inputs ``ids[s : s + max_length]`` and targets
    ``ids[s + 1 : s + max_length + 1]``, so it needs ``s + max_length + 1 <= num_tokens``.
    The starts are ``0, stride, 2*stride, ...`` while that holds: there are
    ``(num_tokens - max_length - 1) // stride + 1`` of them (none if
    ``num_tokens <= max_length``).

    Example:
        >>> window_starts(9, max_length=4, stride=2)
        [0, 2, 4]

    Raises:
        ValueError: ``max_length`` or ``stride`` below 1, or a negative ``num_tokens``.
    """
    max_length = integer("max_length", max_length, minimum=1)
    stride = integer("stride", stride, minimum=1, hint=_STRIDE_HINT)
    num_tokens = non_negative_int("num_tokens", num_tokens)
    return list(range(0, num_tokens - max_length, stride))


def encode_text(text: str, tokenizer: Any = None) -> list[int]:
    """Token ids of ``text``, with ``<|endoftext|>`` read as a special token where supported.

    Args:
        text: the text.
        tokenizer: anything with ``encode``; default GPT-2's
            (:func:`course_lib.tokenizers.tiktoken_gpt2`). If ``encode`` accepts
            ``allowed_special`` (tiktoken, :class:`~course_lib.tokenizers.GPT2Tokenizer`,
            :class:`~course_lib.tokenizers.BPETokenizer`: a parameter of that name) it is
            called with ``allowed_special={"<|endoftext|>"}``, otherwise with the text alone
            (:class:`~course_lib.tokenizers.RegexTokenizer`, which reads special tokens
            written in the text by itself).

    Raises:
        TypeError: ``text`` is not a string, ``tokenizer`` is not a tokenizer object with
            an ``encode`` method (a name such as ``"gpt2"`` or a tokenizer class is refused), or
            its ``encode`` returned something other than a sequence of integers (a float id such
            as ``1.7`` is refused, never truncated).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if tokenizer is None:
        tokenizer = tiktoken_gpt2()
    encode = _tokenizer_method(tokenizer, "encode")
    if _accepts_allowed_special(encode):
        ids = encode(text, allowed_special={ENDOFTEXT})
    else:
        ids = encode(text)
    return _returned_ids(ids)


def _returned_ids(ids: Any) -> list[int]:
    """What ``tokenizer.encode`` returned, as a list of ints; a TypeError for anything that is not
    an integer id (``int(1.7)`` would silently make it 1)."""
    if hasattr(ids, "tolist"):  # a tensor or NumPy array
        ids = ids.tolist()
    if isinstance(ids, (str, bytes, bytearray)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"tokenizer.encode must return a list of int token ids, got {describe(ids)}")
    ids = list(ids)
    if {*map(type, ids)} <= {int}:  # the usual case, checked in one pass
        return ids
    for k, i in enumerate(ids):
        # NumPy integers are fine; a float (even 2.0) or a bool is not a token id
        integer("token id", i, hint=f" (tokenizer.encode returned it at position {k}; token ids must be integers)")
    return [int(i) for i in ids]


def _tokenizer_method(tokenizer: Any, name: str):
    """``tokenizer.encode`` or ``.decode``; a TypeError that says what to pass instead."""
    example = ("tiktoken.get_encoding('gpt2'), course_lib.tokenizers.tiktoken_gpt2() or "
               "course_lib.tokenizers.GPT2Tokenizer.from_pretrained()")
    if isinstance(tokenizer, (str, bytes, bytearray)):  # str.encode / bytes.decode exist, but are not tokenizers
        raise TypeError(f"tokenizer must be a tokenizer object with .{name}(), such as {example}; "
                        f"got the {type(tokenizer).__name__} {tokenizer[:30]!r}")
    if isinstance(tokenizer, type):
        raise TypeError(f"tokenizer must be a tokenizer object, not the class {tokenizer.__name__} itself; "
                        f"make one first, e.g. GPT2Tokenizer.from_pretrained()")
    method = getattr(tokenizer, name, None)
    if not callable(method):
        raise TypeError(f"tokenizer must have a {name}() method, such as {example}; "
                        f"got {type(tokenizer).__name__}")
    return method


def _accepts_allowed_special(encode) -> bool:
    try:
        params = inspect.signature(encode).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume text only
        return False
    # Only a parameter *named* allowed_special counts: a catch-all **kwargs (Hugging Face's encode)
    # would accept the argument and ignore it, or warn about it.
    return any(p.name == "allowed_special" and p.kind is not inspect.Parameter.POSITIONAL_ONLY for p in params)


def _as_id_tensor(token_ids: Any) -> torch.Tensor:
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids
    else:
        try:
            ids = torch.as_tensor(token_ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError("token_ids_or_text must be a str or a 1-D sequence of integer token ids, "
                            f"got {type(token_ids).__name__}") from err
    if ids.numel() == 0:
        ids = ids.reshape(0).long()
    if ids.ndim != 1:
        raise ValueError(f"token ids must be 1-D (one long sequence), got shape {tuple(ids.shape)}; "
                         "flatten them or join the documents with <|endoftext|> first")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"token ids must be >= 0, got {int(ids.min())}")
    return ids.detach().to("cpu", torch.long).contiguous()


# --------------------------------------------------------------------------- #
# The dataset
# --------------------------------------------------------------------------- #
class GPTDataset(Dataset):
    """Sliding windows over one long token sequence: ``(inputs, targets)`` pairs.

    Args:
        token_ids_or_text: a ``str`` (tokenized here, once) or a 1-D sequence of
            token ids (list, tuple, NumPy array or tensor).
        max_length: tokens per window (the model's context length in training).
        stride: tokens between the starts of consecutive windows.
        tokenizer: used when a string is given; see :func:`encode_text`.
            Default GPT-2's tokenizer.

    Item ``i`` is ``(inputs, targets)``, two ``torch.long`` tensors of shape
    ``[max_length]`` with ``targets[j] == inputs[j + 1]`` for ``j < max_length - 1``.
    ``len(dataset) == (num_tokens - max_length - 1) // stride + 1``.

    Attributes:
        token_ids: ``[num_tokens]`` the whole tokenized text.
        starts: the start of each window (see :func:`window_starts`).

    Raises:
        ValueError: ``max_length < 1``, ``stride < 1``, or fewer than ``max_length + 1``
            tokens (the message says how many there are).
        TypeError: non-integer sizes or token ids, or a tokenizer without ``encode``.
    """

    def __init__(self, token_ids_or_text: str | Sequence[int] | torch.Tensor, max_length: int,
                 stride: int, tokenizer: Any = None):
        max_length = integer("max_length", max_length, minimum=1)
        stride = integer("stride", stride, minimum=1, hint=_STRIDE_HINT)
        if isinstance(token_ids_or_text, str):
            ids = encode_text(token_ids_or_text, tokenizer)  # the only call to the tokenizer
            what = "the text has"
        else:
            ids = token_ids_or_text
            what = "there are"
        self.token_ids = _as_id_tensor(ids)  # [num_tokens]
        n = self.token_ids.numel()
        if n < max_length + 1:
            raise ValueError(
                f"{what} {n} tokens, too few for one window: max_length={max_length} needs at least "
                f"{max_length + 1} (the inputs plus one more token for the last target). "
                f"Use a longer text or a max_length of at most {max(n - 1, 0)}")
        self.max_length = max_length
        self.stride = stride
        self.starts = window_starts(n, max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]  # IndexError past the end, as a Dataset should
        x = self.token_ids[s : s + self.max_length]  # [max_length]
        y = self.token_ids[s + 1 : s + self.max_length + 1]  # [max_length], shifted by one
        return x, y

    def __repr__(self) -> str:
        return (f"GPTDataset({len(self)} windows, max_length={self.max_length}, stride={self.stride}, "
                f"{self.token_ids.numel()} tokens)")


# --------------------------------------------------------------------------- #
# The loader
# --------------------------------------------------------------------------- #
def create_dataloader(text: str | Sequence[int] | torch.Tensor, tokenizer: Any = None, batch_size: int = 4,
                      max_length: int = 256, stride: int = 128, shuffle: bool = True,
                      drop_last: bool = True, num_workers: int = 0, seed: int | None = None) -> DataLoader:
    """A ``DataLoader`` of ``(inputs, targets)`` batches, each ``[batch_size, max_length]``.

    Args:
        text: the training text (or its token ids already).
        tokenizer: see :func:`encode_text`; default GPT-2's.
        batch_size: windows per batch. Default 4.
        max_length: tokens per window. Default 256.
        stride: tokens between window starts. Default 128 (half-overlapping windows).
        shuffle: visit the windows in a random order each epoch. Default ``True``.
        drop_last: drop a last batch smaller than ``batch_size`` (keeps every batch
            the same shape). Default ``True``.
        num_workers: worker processes for loading (0: in this process; the windows are
            slices of one tensor, so workers rarely help). Default 0.
        seed: seeds the shuffle (a ``torch.Generator``), so the order of batches is the
            same run after run; ``None`` draws from PyTorch's global generator.

    Raises:
        ValueError: the errors of :class:`GPTDataset`; ``batch_size < 1``; negative
            ``num_workers``; or ``drop_last=True`` with fewer windows than ``batch_size``
            (the loader would yield nothing).
        TypeError: the errors of :class:`GPTDataset` (e.g. ``tokenizer="gpt2"``: pass a
            tokenizer object, not a name); ``shuffle`` or ``drop_last`` not a bool; ``seed``
            not an integer.
        ValueError: ``seed`` outside what ``torch.Generator.manual_seed`` takes
            (``-2**63`` to ``2**64 - 1``).
    """
    batch_size = integer("batch_size", batch_size, minimum=1)
    shuffle, drop_last = boolean("shuffle", shuffle), boolean("drop_last", drop_last)  # "no" would read as True
    num_workers = non_negative_int("num_workers", num_workers)
    seed = integer("seed", seed, allow_none=True)
    if seed is not None and not -2**63 <= seed < 2**64:  # torch: "Overflow when unpacking long long"
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1 (what torch.Generator.manual_seed "
                         f"takes), got {seed}; e.g. seed=123")
    dataset = GPTDataset(text, max_length=max_length, stride=stride, tokenizer=tokenizer)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(
            f"the text gives {len(dataset)} window(s) (max_length={max_length}, stride={stride}) but "
            f"batch_size={batch_size} and drop_last=True, so the loader would yield no batch at all. "
            "Use a smaller batch_size, a smaller stride, drop_last=False, or more text")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


def split_text(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """Cut ``text`` into ``(train, val)`` at character ``int(train_ratio * len(text))``.

    The cut is a plain character position: the first part trains, the rest is held out to
    measure how well the model does on text it has not seen. The split is not shuffled
    (neighbouring windows overlap, so shuffling before splitting would leak training text
    into validation). ``train + val == text``.

    Args:
        text: the whole text.
        train_ratio: the fraction for training, strictly between 0 and 1. Default 0.9.

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: ``train_ratio`` not a number (NumPy's are fine) or outside ``(0, 1)``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    hint = " strictly between 0 and 1 (e.g. 0.9)"
    train_ratio = finite_number("train_ratio", train_ratio, hint=f"; use a fraction{hint}")
    if not 0 < train_ratio < 1:
        raise ValueError(f"train_ratio must be a fraction{hint}, got {train_ratio!r}")
    cut = int(train_ratio * len(text))
    return text[:cut], text[cut:]
