"""Step 1 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(1)``) or from a terminal::

    course check 1

Each function's docstring says what it must do. You may import anything from ``torch``
and the standard library; the point is to write the logic yourself, not to call
``course_lib`` (the checker compares your answers with independent references).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def count_parameters(vocab_size: int, context_length: int, emb_dim: int, n_layers: int,
                     qkv_bias: bool = True, tied: bool = True) -> int:
    """Count the parameters of a GPT-2-style model by hand.

    The model has: a token embedding (vocab_size x emb_dim); a position embedding
    (context_length x emb_dim); ``n_layers`` blocks, each with
      - LayerNorm (a scale and a shift vector of emb_dim each),
      - attention: query, key and value projections (emb_dim x emb_dim each, plus a bias of
        emb_dim each if ``qkv_bias``) and an output projection (emb_dim x emb_dim plus a bias),
      - a second LayerNorm,
      - a feed-forward network: emb_dim -> 4*emb_dim -> emb_dim, both linear layers with biases;
    a final LayerNorm; and an output head (emb_dim -> vocab_size, no bias) that shares the token
    embedding's weights when ``tied`` is True (so it adds nothing) and has its own otherwise.

    Example: GPT-2 small (50257, 1024, 768, 12 layers, qkv_bias=True, tied) has 124,439,808.
    """
    raise NotImplementedError


def bigram_counts(tokens: Sequence[Hashable]) -> dict[tuple[Hashable, Hashable], int]:
    """Count how often each token is followed by each other token.

    Example: ``bigram_counts(list("abab"))`` -> ``{("a", "b"): 2, ("b", "a"): 1}``.
    Only pairs that occur appear in the result.
    """
    raise NotImplementedError


def next_token_probs(counts: dict[tuple[Hashable, Hashable], int], prev: Hashable) -> dict[Hashable, float]:
    """Turn bigram counts into ``P(next | prev)``: the counts of pairs starting with ``prev``,
    divided by their total. Return ``{next_token: probability}`` (the values sum to 1).

    Raise a ``ValueError`` if ``prev`` never starts a pair in ``counts``.
    Example: with the counts of ``list("abac")``, ``next_token_probs(counts, "a")`` is
    ``{"b": 0.5, "c": 0.5}``.
    """
    raise NotImplementedError


def sample_with_temperature(probs: torch.Tensor, temperature: float,
                            generator: torch.Generator | None = None) -> int:
    """Draw one index from the distribution ``probs`` (a 1-D tensor summing to 1) after
    re-shaping it with ``temperature``:

        p_i^(1/T) / sum_j p_j^(1/T)

    - ``temperature == 0`` means greedy: return the index of the largest probability.
    - ``temperature < 0`` is an error: raise ``ValueError``.
    - Otherwise draw with ``torch.multinomial(..., 1, generator=generator)``.
    Hint: compute ``log(p) / T`` and apply a softmax, so tiny probabilities do not underflow.
    Return a plain Python ``int``.
    """
    raise NotImplementedError
