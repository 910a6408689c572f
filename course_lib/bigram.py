"""Step 1 — the smallest language model: bigram counts.

A language model is a probability distribution over the next token given the ones before.
A bigram model looks back one token only: ``P(next | prev) = count(prev, next) / count(prev)``.
It is trained by counting, sampled from like any GPT, and scored the same way (average
negative log-likelihood, perplexity) — which makes it the baseline every later model in the
course must beat.

Tokens can be any hashable symbols: characters (``list(text)``) or words (``text.split()``).
:func:`join_words` turns a list of word and punctuation tokens back into readable text.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from .checks import finite_number, non_negative_int

__all__ = ["BigramLM", "apply_temperature", "join_words"]


def apply_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Re-shape a distribution: ``p_i^(1/T) / Σ p_j^(1/T)``. ``T < 1`` sharpens, ``T > 1`` flattens.

    ``temperature = 0`` puts all mass on the most likely entry (greedy; the first one on ties).

    Args:
        probs: ``[..., V]`` probabilities (non-negative, summing to 1 on the last axis).
        temperature: ``>= 0``, finite (NumPy numbers are fine).

    Raises:
        ValueError: a temperature that is negative, NaN, infinite or not a number.
    """
    temperature = _temperature(temperature)
    if temperature == 0:
        out = torch.zeros_like(probs)
        return out.scatter_(-1, probs.argmax(dim=-1, keepdim=True), 1.0)
    # Work in log space so small probabilities raised to a large power do not underflow to 0/0.
    logits = torch.log(probs.clamp_min(0)) / temperature
    return torch.softmax(logits, dim=-1)


def _temperature(temperature) -> float:
    return finite_number("temperature", temperature, minimum=0,
                         hint=" (0 means greedy, 1 the model's own probabilities)")


# Punctuation that hugs the word before it ("end." not "end ."), and brackets that hug the word after.
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%")
_NO_SPACE_AFTER = frozenset("([{")


def join_words(tokens: Sequence[Hashable]) -> str:
    """Word-level tokens back into text: one space between words, none before punctuation.

    ``join_words(["Yes", ",", "I", "said", "so", "."]) == "Yes, I said so."`` — for ordinary prose,
    the reverse of splitting it into words and marks (``re.findall(r"[A-Za-z']+|[.,;!?]", text)``).
    A token made only of closing punctuation (``. , ; : ! ? ) ] } %``) joins the token before it;
    an opening bracket joins the token after it. Non-string tokens are written with ``str``.
    """
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of tokens (e.g. a list of words), not one string")
    out: list[str] = []
    for token in map(str, tokens):
        glue = not out or (token and set(token) <= _NO_SPACE_BEFORE) or out[-1][-1:] in _NO_SPACE_AFTER
        out.append(token if glue else " " + token)
    return "".join(out)


class BigramLM:
    """Counts of which token follows which, turned into next-token probabilities.

    Args:
        smoothing: added to every count (Laplace smoothing) so unseen pairs keep a little
            probability and held-out text has a finite perplexity. Default 1.0.

    Raises:
        ValueError: ``smoothing`` negative, NaN, infinite or not a number.

    Example:
        >>> lm = BigramLM().fit(list("hello world"))
        >>> lm.next_token_probs("l")      # {'l': ..., 'o': ..., 'd': ..., ...}
    """

    def __init__(self, smoothing: float = 1.0):
        self.smoothing = finite_number("smoothing", smoothing, minimum=0, hint=" (0 for raw counts, 1 for Laplace)")
        self.vocab: list[Hashable] = []
        self.index: dict[Hashable, int] = {}
        self.counts = torch.zeros(0, 0)

    # ----------------------------------------------------------------- training
    def fit(self, tokens: Sequence[Hashable]) -> "BigramLM":
        """Count every adjacent pair in ``tokens``. Returns ``self``."""
        if isinstance(tokens, str):
            raise TypeError("tokens must be a sequence of symbols; pass list(text) for characters "
                            "or text.split() for words")
        if len(tokens) < 2:
            raise ValueError(f"need at least 2 tokens to count a pair, got {len(tokens)}")
        self.vocab = sorted(set(tokens), key=lambda t: (str(type(t)), t))
        self.index = {t: i for i, t in enumerate(self.vocab)}
        ids = torch.tensor([self.index[t] for t in tokens])
        V = len(self.vocab)
        pair_ids = ids[:-1] * V + ids[1:]                               # [n-1]
        self.counts = torch.bincount(pair_ids, minlength=V * V).reshape(V, V).float()  # [V, V]
        return self

    @property
    def probs(self) -> torch.Tensor:
        """``[V, V]`` matrix: row ``i`` is ``P(next | vocab[i])``."""
        smoothed = self.counts + self.smoothing
        totals = smoothed.sum(dim=1, keepdim=True)
        # A token that was never followed by anything (only as the very last token, with no
        # smoothing) gets a uniform row instead of 0/0.
        return torch.where(totals > 0, smoothed / totals.clamp_min(1e-12), 1.0 / len(self.vocab))

    def _id(self, token: Hashable) -> int:
        if not self.vocab:
            raise RuntimeError("the model has not been fitted yet; call fit(tokens) first")
        if token not in self.index:
            raise ValueError(f"{token!r} never appeared in the training text, so the model has no row for it")
        return self.index[token]

    def next_token_probs(self, prev: Hashable) -> dict[Hashable, float]:
        """``{token: P(token | prev)}`` sorted from most to least likely.

        Raises:
            RuntimeError: the model has not been fitted yet.
            ValueError: ``prev`` never appeared in the training tokens.
        """
        i = self._id(prev)  # before self.probs: it says when the model is not fitted yet
        row = self.probs[i]
        order = torch.argsort(row, descending=True, stable=True)
        return {self.vocab[i]: row[i].item() for i in order.tolist()}

    # ----------------------------------------------------------------- sampling
    def sample(self, start: Hashable, n: int, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> list[Hashable]:
        """Generate ``n`` tokens after ``start``, one draw at a time (``temperature`` as in
        :func:`apply_temperature`). Returns ``[start, t1, ..., tn]``.

        Raises:
            RuntimeError: the model has not been fitted yet.
            ValueError: ``start`` never appeared in the training tokens, ``n`` not an integer
                >= 0, or ``temperature`` not a finite number >= 0.
        """
        n = non_negative_int("n", n)
        temperature = _temperature(temperature)
        current = self._id(start)  # before self.probs: it says when the model is not fitted yet
        probs = self.probs
        out = [start]
        for _ in range(n):
            dist = apply_temperature(probs[current], temperature)
            current = int(torch.multinomial(dist, 1, generator=generator))
            out.append(self.vocab[current])
        return out

    # ----------------------------------------------------------------- scoring
    def nll(self, tokens: Sequence[Hashable]) -> float:
        """Average negative log-likelihood (nats per token) of ``tokens[1:]`` given their predecessors.

        Symbols never seen in training raise a ``ValueError`` (the model has no row for them).
        """
        if len(tokens) < 2:
            raise ValueError("need at least 2 tokens to score")
        ids = torch.tensor([self._id(t) for t in tokens])
        p = self.probs[ids[:-1], ids[1:]]
        return float(-torch.log(p).mean())

    def perplexity(self, tokens: Sequence[Hashable]) -> float:
        """``exp(nll)``: the number of equally likely choices the model is, on average, torn between."""
        return math.exp(self.nll(tokens))
