"""Step 2 — token ids become vectors: token embeddings and position encodings.

A model cannot multiply an id. An embedding layer keeps one learned row of ``emb_dim``
numbers per token id and looks it up: ``weight[ids]``. That lookup is exactly the product
of a one-hot matrix with the weight (:func:`one_hot_embedding` shows it), only without
building the one-hot matrix.

Attention (step 3) treats its input as a set, so the order of the tokens must be put into
the vectors themselves. Two ways:

* **learned absolute positions** (GPT-2): a second embedding table with one row per
  position ``0 .. context_length - 1``, added to the token vectors
  (:class:`GPTEmbedding`);
* **sinusoidal positions** (Vaswani et al., 2017, "Attention Is All You Need", §3.5):
  fixed, not learned (:func:`sinusoidal_positions`)::

      PE[pos, 2i]     = sin(pos / base^(2i / emb_dim))
      PE[pos, 2i + 1] = cos(pos / base^(2i / emb_dim))        base = 10000

  Every pair of columns is a sine/cosine at one frequency, from one turn every 2π
  positions (``i = 0``) to one turn every ~2π·10000 positions (the last pair).

Choices worth knowing:

* :class:`GPTEmbedding` initialises both tables from N(0, 0.02), as GPT-2 does (PyTorch's
  default N(0, 1) makes the logits of a tied output layer enormous; see the course design).
* Ids outside ``[0, vocab_size)`` and sequences longer than ``context_length`` are
  ``ValueError`` s that say what to change, not an index error deep inside torch (or a
  device-side assert on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import finite_number, positive_int, probability

__all__ = ["GPTEmbedding", "sinusoidal_positions", "one_hot_embedding"]


def _check_ids(ids, vocab_size: int, name: str = "ids") -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer token ids, got {type(ids).__name__}; "
                        "wrap a list with torch.tensor(...)")
    if ids.dtype not in (torch.long, torch.int32):  # what nn.Embedding takes; smaller types wrap large ids
        raise TypeError(f"{name} must hold integer token ids of dtype torch.long (or int32), got {ids.dtype}; "
                        f"use {name}.long()")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contains the id {bad}, outside [0, {vocab_size}) for vocab_size="
                             f"{vocab_size}; was the text encoded with a different tokenizer?")


# --------------------------------------------------------------------------- #
# One-hot product == lookup
# --------------------------------------------------------------------------- #
def one_hot_embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Embed ``ids`` the long way: ``one_hot(ids) @ weight``.

    Gives the same numbers as ``nn.Embedding`` with that ``weight`` (``weight[ids]``) while
    building a ``[..., vocab_size]`` matrix of zeros and ones; the lookup is the shortcut.

    Args:
        ids: ``[...]`` integer token ids in ``[0, vocab_size)``.
        weight: ``[vocab_size, emb_dim]``.

    Returns:
        ``[..., emb_dim]``.

    Raises:
        TypeError: ``ids`` not a tensor of ``torch.long`` (or ``int32``) ids.
        ValueError: ``weight`` not a 2-D tensor, or an id out of range.
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a [vocab_size, emb_dim] tensor, got {got}")
    _check_ids(ids, weight.shape[0])
    one_hot = F.one_hot(ids.long(), num_classes=weight.shape[0]).to(weight.dtype)  # [..., vocab_size]
    return one_hot @ weight  # [..., emb_dim]


# --------------------------------------------------------------------------- #
# Sinusoidal positions
# --------------------------------------------------------------------------- #
def sinusoidal_positions(context_length: int, emb_dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed position table of Vaswani et al. (2017): sines in even columns, cosines in odd.

    ``PE[pos, 2i] = sin(pos / base^(2i/emb_dim))``, ``PE[pos, 2i+1] = cos(pos / base^(2i/emb_dim))``.
    An odd ``emb_dim`` ends with a sine column.

    Args:
        context_length: number of positions (rows).
        emb_dim: width (columns).
        base: the wavelength scale; 10000 in the paper.

    Returns:
        ``[context_length, emb_dim]`` float32, values in ``[-1, 1]``; row 0 is ``0, 1, 0, 1, ...``.

    Raises:
        ValueError: sizes below 1, or ``base`` not a finite number > 1 (NaN, inf, a string;
            NumPy numbers are fine).
    """
    context_length = positive_int("context_length", context_length)
    emb_dim = positive_int("emb_dim", emb_dim)
    hint = " (10000 in the paper)"
    base = finite_number("base", base, hint=hint)
    if base <= 1:
        raise ValueError(f"base must be a number > 1{hint}, got {base!r}")
    pos = torch.arange(context_length, dtype=torch.float64).unsqueeze(1)  # [T, 1]
    two_i = torch.arange(0, emb_dim, 2, dtype=torch.float64)  # [ceil(D/2)]: 0, 2, 4, ...
    angle = pos / base ** (two_i / emb_dim)  # [T, ceil(D/2)]
    pe = torch.empty(context_length, emb_dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : emb_dim // 2])
    return pe.float()


# --------------------------------------------------------------------------- #
# Token + learned position embedding (GPT-2's input layer)
# --------------------------------------------------------------------------- #
class GPTEmbedding(nn.Module):
    """Token embedding plus learned absolute position embedding, then dropout.

    ``out[b, t] = tok_emb.weight[ids[b, t]] + pos_emb.weight[t]``.

    Args:
        vocab_size: number of token ids (rows of ``tok_emb``).
        emb_dim: vector width.
        context_length: the most tokens a sequence may have (rows of ``pos_emb``).
        dropout: dropout probability on the sum. Default 0.0.

    Shape:
        ``ids``: ``[batch, tokens]`` integer ids, ``tokens <= context_length``;
        output: ``[batch, tokens, emb_dim]``.

    Raises:
        ValueError: non-positive sizes, ``dropout`` outside ``[0, 1)``; in ``forward``,
            an input that is not ``[batch, tokens]``, too many tokens, or an id out of range.
        TypeError: ``ids`` not a tensor of ``torch.long`` (or ``int32``) ids.
    """

    def __init__(self, vocab_size: int, emb_dim: int, context_length: int, dropout: float = 0.0):
        super().__init__()
        self.vocab_size = positive_int("vocab_size", vocab_size)
        self.emb_dim = positive_int("emb_dim", emb_dim)
        self.context_length = positive_int("context_length", context_length)
        self.tok_emb = nn.Embedding(self.vocab_size, self.emb_dim)
        self.pos_emb = nn.Embedding(self.context_length, self.emb_dim)
        self.drop = nn.Dropout(probability("dropout", dropout, hint="; use 0.0 to turn it off"))
        for table in (self.tok_emb, self.pos_emb):
            nn.init.normal_(table.weight, mean=0.0, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _check_ids(ids, self.vocab_size)
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape [batch, tokens], got {tuple(ids.shape)}; "
                             "add a batch dimension with ids.unsqueeze(0)")
        T = ids.shape[1]
        if T > self.context_length:
            raise ValueError(f"the sequence has {T} tokens but context_length is {self.context_length}; "
                             f"keep only the last {self.context_length} tokens (ids[:, -{self.context_length}:]) "
                             "or build the layer with a larger context_length")
        pos = torch.arange(T, device=ids.device)  # [T]
        x = self.tok_emb(ids) + self.pos_emb(pos)  # [B, T, D] + [T, D] -> [B, T, D]
        return self.drop(x)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, emb_dim={self.emb_dim}, context_length={self.context_length}"
