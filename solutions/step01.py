"""Step 1 — reference solutions to ``exercises/step01.py``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import torch


def count_parameters(vocab_size: int, context_length: int, emb_dim: int, n_layers: int,
                     qkv_bias: bool = True, tied: bool = True) -> int:
    d = emb_dim
    embeddings = vocab_size * d + context_length * d
    attention = 3 * d * d + (3 * d if qkv_bias else 0) + d * d + d
    feed_forward = d * 4 * d + 4 * d + 4 * d * d + d
    norms = 2 * 2 * d
    head = 0 if tied else vocab_size * d
    return embeddings + n_layers * (attention + feed_forward + norms) + 2 * d + head


def bigram_counts(tokens: Sequence[Hashable]) -> dict[tuple[Hashable, Hashable], int]:
    return dict(Counter(zip(tokens, tokens[1:])))


def next_token_probs(counts: dict[tuple[Hashable, Hashable], int], prev: Hashable) -> dict[Hashable, float]:
    row = {nxt: c for (first, nxt), c in counts.items() if first == prev}
    total = sum(row.values())
    if total == 0:
        raise ValueError(f"{prev!r} never starts a pair in the counts")
    return {nxt: c / total for nxt, c in row.items()}


def sample_with_temperature(probs: torch.Tensor, temperature: float,
                            generator: torch.Generator | None = None) -> int:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return int(torch.argmax(probs))
    reshaped = torch.softmax(torch.log(probs) / temperature, dim=-1)
    return int(torch.multinomial(reshaped, 1, generator=generator))
