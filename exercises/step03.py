"""Step 3 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(3)``) or from a terminal::

    course check 3

Each function's docstring says what it must do. Use plain ``torch`` operations
(``@``, ``.transpose``, ``.view``/``.reshape``, ``torch.softmax``, ``torch.triu``, ...);
do not call ``torch.nn.functional.scaled_dot_product_attention`` or ``course_lib`` —
the checker compares your answers with them.
"""

from __future__ import annotations

import torch


def attention_weights_for_query(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The attention weights of ONE query over a sequence of keys.

    Args:
        query: shape ``[d]``.
        keys: shape ``[T, d]`` (one row per token).

    Returns:
        shape ``[T]``: ``softmax(keys @ query / sqrt(d))`` — non-negative, summing to 1.

    Example: with ``query = [1, 0]`` and ``keys = [[1, 0], [0, 1]]`` the scores are
    ``[1/sqrt(2), 0]`` and the weights ``[0.670, 0.330]``.
    """
    raise NotImplementedError


def causal_mask(num_tokens: int) -> torch.Tensor:
    """A boolean ``[num_tokens, num_tokens]`` mask that is ``True`` where a query may NOT look.

    Row ``i`` is query ``i``; column ``j`` is key ``j``. Token ``i`` may look at keys
    ``0..i`` (itself and the past), so ``mask[i, j]`` is ``True`` exactly when ``j > i``.

    Example: ``causal_mask(3)`` ->
    ``[[False, True, True], [False, False, True], [False, False, False]]``.
    """
    raise NotImplementedError


def causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Causal attention weights from raw scores.

    Args:
        scores: shape ``[..., T, T]`` (any leading dimensions), already scaled.

    Returns:
        the same shape: each row ``i`` is a softmax over keys ``0..i`` only; the weights of
        later keys are exactly 0 and every row sums to 1. Hint: put ``-inf`` in the masked
        places *before* the softmax (``masked_fill``).
    """
    raise NotImplementedError


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Split the last dimension into heads: ``[B, T, d] -> [B, num_heads, T, d // num_heads]``.

    Head ``h`` gets the columns ``h*D : (h+1)*D`` of ``x`` (``D = d // num_heads``).
    Raise ``ValueError`` if ``d`` is not divisible by ``num_heads``.
    Hint: ``view`` to ``[B, T, num_heads, D]``, then ``transpose``.
    """
    raise NotImplementedError


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`split_heads`: ``[B, H, T, D] -> [B, T, H * D]``.

    ``merge_heads(split_heads(x, h))`` must give back ``x``, and it must also work on a fresh,
    contiguous ``[B, H, T, D]`` tensor such as attention's output ``weights @ v``.
    Hint: after ``transpose`` the tensor is not contiguous; use ``.contiguous().view`` or ``.reshape``.
    """
    raise NotImplementedError


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal scaled dot-product attention, written out.

    Args:
        q, k, v: shape ``[..., T, D]`` (e.g. ``[B, H, T, D]``).

    Returns:
        shape ``[..., T, D]``: ``softmax(mask(q @ k^T / sqrt(D))) @ v`` where the mask hides
        later tokens. It must equal
        ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)``.
    """
    raise NotImplementedError
