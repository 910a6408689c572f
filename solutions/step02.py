"""Step 2 — reference solutions for the Ha exercises (same names as ``exercises/step02.py``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def decode_words(ids: Sequence[int], int_to_str: dict[int, str]) -> str:
    """Ids of a word-level tokenizer back to text, punctuation re-attached."""
    text = " ".join(int_to_str[i] for i in ids)
    text = re.sub(r"\s+([,.:;?!)])", r"\1", text)  # "world ." -> "world."
    return re.sub(r"\(\s+", "(", text)  # "( really" -> "(really"


def count_pairs(ids: Sequence[int]) -> dict[tuple[int, int], int]:
    """How often each pair of neighbouring ids occurs."""
    counts: dict[tuple[int, int], int] = {}
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge_pair(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Every non-overlapping occurrence of ``pair`` (left to right) replaced by ``new_id``."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def window_starts(num_tokens: int, max_length: int, stride: int) -> list[int]:
    """Starts ``0, stride, ...`` of the windows with ``s + max_length + 1 <= num_tokens``."""
    return list(range(0, num_tokens - max_length, stride))


def sliding_windows(ids: Sequence[int], max_length: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked ``(inputs, targets)``, each ``[num_windows, max_length]``."""
    if len(ids) < max_length + 1:
        raise ValueError(f"{len(ids)} tokens are too few: max_length={max_length} needs {max_length + 1}")
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    starts = window_starts(len(ids), max_length, stride)
    inputs = torch.stack([ids[s:s + max_length] for s in starts])
    targets = torch.stack([ids[s + 1:s + max_length + 1] for s in starts])
    return inputs, targets


def one_hot_embed(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``one_hot(ids) @ weight``: ``[...] -> [..., emb_dim]``."""
    one_hot = F.one_hot(ids.long(), num_classes=weight.shape[0]).to(weight.dtype)  # [..., vocab_size]
    return one_hot @ weight
