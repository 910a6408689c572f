"""Step 2 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(2)``) or from a terminal::

    course check 2

Each function's docstring says what it must do. You may import anything from ``torch``, ``re``
and the standard library; the point is to write the logic yourself, not to call ``course_lib``
(the checker compares your answers with hand-worked examples and with independent references).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def decode_words(ids: Sequence[int], int_to_str: dict[int, str]) -> str:
    r"""Turn the ids of a word-level tokenizer back into text.

    Look up each id in ``int_to_str``, join the tokens with single spaces, then put the
    punctuation back where it belongs:

    - remove the space *before* each of ``, . : ; ? ! )``
    - remove the space *after* ``(``

    Example: the tokens ``["Hello", ",", "world", ".", "Is", "this", "(", "really", ")", "it", "?"]``
    decode to ``"Hello, world. Is this (really) it?"``.
    Hint: ``re.sub(r"\s+([,.:;?!)])", r"\1", text)`` handles the first rule; write one for ``(``.
    """
    raise NotImplementedError


def count_pairs(ids: Sequence[int]) -> dict[tuple[int, int], int]:
    """Count every pair of neighbouring ids: the statistic BPE uses to choose its next merge.

    Example: the bytes of ``"aaab"`` are ``[97, 97, 97, 98]``; its pairs are (97, 97) twice and
    (97, 98) once, so the answer is ``{(97, 97): 2, (97, 98): 1}``. Fewer than two ids have no
    pairs: return ``{}``.
    """
    raise NotImplementedError


def merge_pair(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id`` — one BPE merge.

    Walk from left to right; where ``ids[i], ids[i + 1] == pair``, emit ``new_id`` and jump
    over both, otherwise emit ``ids[i]`` and move on by one. So occurrences never overlap:
    ``merge_pair([97, 97, 97], (97, 97), 256)`` is ``[256, 97]``, not ``[256, 256]``.
    Return a new list; do not change ``ids``.
    """
    raise NotImplementedError


def window_starts(num_tokens: int, max_length: int, stride: int) -> list[int]:
    """Where the sliding windows over ``num_tokens`` tokens start.

    A window starting at ``s`` uses ``ids[s : s + max_length]`` as inputs and
    ``ids[s + 1 : s + max_length + 1]`` as targets, so it needs ``s + max_length + 1 <= num_tokens``.
    Windows start at ``0, stride, 2 * stride, ...`` as long as they fit.

    Example: ``window_starts(9, max_length=4, stride=2)`` is ``[0, 2, 4]``
    (a window at 6 would need a target at index 10). Too few tokens: ``[]``.
    """
    raise NotImplementedError


def sliding_windows(ids: Sequence[int], max_length: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(inputs, targets)`` windows of ``ids``, stacked: two ``torch.long`` tensors of shape
    ``[num_windows, max_length]``, with ``targets`` the inputs shifted one token to the right.

    Example: ``ids = [10, 11, 12, 13, 14, 15, 16, 17, 18]``, ``max_length=4``, ``stride=2``::

        inputs  = [[10, 11, 12, 13],      targets = [[11, 12, 13, 14],
                   [12, 13, 14, 15],                 [13, 14, 15, 16],
                   [14, 15, 16, 17]]                 [15, 16, 17, 18]]

    Raise a ``ValueError`` when ``ids`` has fewer than ``max_length + 1`` tokens (no window fits).
    """
    raise NotImplementedError


def one_hot_embed(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Embed ``ids`` the long way: build the one-hot matrix and multiply it by ``weight``.

    ``ids`` holds integer token ids of any shape ``[...]``; ``weight`` is ``[vocab_size, emb_dim]``.
    Make a ``[..., vocab_size]`` tensor of zeros with a 1 at each id (``torch.nn.functional.one_hot``,
    converted to ``weight``'s dtype), then ``@ weight`` gives ``[..., emb_dim]``: the same numbers
    as ``torch.nn.Embedding`` with that weight returns.
    """
    raise NotImplementedError
