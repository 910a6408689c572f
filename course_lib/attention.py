"""Step 3 — attention, from a weighted average to multi-head causal attention.

The progression the notebook walks through, one small class per idea:

* :class:`SimplifiedSelfAttention` — no weights: every token's new vector is a
  softmax-weighted average of all token vectors, weighted by dot products.
* :class:`SelfAttentionParams` — trainable query/key/value matrices held as
  ``nn.Parameter``, scores scaled by ``1/sqrt(d_out)``.
* :class:`SelfAttention` — the same with ``nn.Linear`` layers (better initialisation,
  optional bias).
* :class:`CausalAttention` — a token may only look at itself and earlier tokens
  (mask with ``-inf`` *before* the softmax), plus dropout on the attention weights.
* :class:`MultiHeadAttentionWrapper` — ``num_heads`` independent causal heads whose
  outputs are concatenated.
* :class:`MultiHeadAttention` — the efficient version used by the GPT model in step 4:
  one projection per Q/K/V for all heads, heads split with ``view``/``transpose``,
  an output projection ``out_proj``. It computes with
  :func:`torch.nn.functional.scaled_dot_product_attention` (``use_sdpa=True``, the
  default) or with the explicit math (``use_sdpa=False``); with dropout off both give
  the same result.

Every module takes ``x`` of shape ``[batch, tokens, d_in]`` and returns
``[batch, tokens, d_out]`` (the simplified one keeps the width: ``d_out == d_in``).

Choices worth knowing:

* The causal mask is a boolean buffer ``mask`` (``True`` = "may not look"), built once
  for ``context_length`` tokens and sliced to the sequence length, so shorter sequences
  work. It is registered with ``persistent=False``: it moves with ``.to(device)`` but is
  not saved in ``state_dict()`` (it holds no learned numbers, and checkpoints stay
  loadable whatever ``context_length`` the mask was built for).
* A sequence longer than ``context_length``, or ``d_out`` not divisible by
  ``num_heads``, is a ``ValueError`` that says what to change.
* :class:`MultiHeadAttentionWrapper` gives each head ``d_out // num_heads`` columns, so
  its output is ``d_out`` wide like :class:`MultiHeadAttention`'s (it has no output
  projection); with ``out_proj`` set to the identity the two compute the same thing.
* ``MultiHeadAttention.forward`` takes an optional ``kv_cache`` (``None`` in steps 3 and
  4): step 5's :class:`course_lib.inference.KVCache`, which keeps the keys and values of
  the tokens already seen while a model writes text.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import positive_int, probability

__all__ = [
    "SimplifiedSelfAttention",
    "SelfAttentionParams",
    "SelfAttention",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "causal_mask",
]


# --------------------------------------------------------------------------- #
# Argument checks shared by the classes (clear errors instead of torch tracebacks)
# --------------------------------------------------------------------------- #
_DROPOUT_HINT = "; use 0.0 to turn it off"


def _check_input(x, d_in: int, context_length: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [batch, tokens, d_in], got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x must have shape [batch, tokens, d_in={d_in}], got {tuple(x.shape)}; "
                         "add a batch dimension with x.unsqueeze(0)")
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but this layer was built "
                         f"with d_in={d_in}")
    if context_length is not None and x.shape[1] > context_length:
        raise ValueError(f"the sequence has {x.shape[1]} tokens but context_length is {context_length}; "
                         f"truncate the input to its last {context_length} tokens or build the layer "
                         "with a larger context_length")


def causal_mask(context_length: int, device=None) -> torch.Tensor:
    """Boolean ``[context_length, context_length]`` mask, ``True`` above the diagonal.

    ``mask[i, j]`` is ``True`` where query ``i`` must not see key ``j`` (``j > i``).
    """
    positive_int("context_length", context_length)
    ones = torch.ones(context_length, context_length, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


# --------------------------------------------------------------------------- #
# 1. No weights at all
# --------------------------------------------------------------------------- #
class SimplifiedSelfAttention(nn.Module):
    """Self-attention without trainable weights.

    ``scores = x @ x^T`` (every pair of tokens), ``weights = softmax(scores)`` row by row,
    ``context = weights @ x``. No scaling, no mask: it shows the mechanism and nothing else.

    Shape:
        x: ``[batch, tokens, d]`` (or ``[tokens, d]``) -> same shape.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim not in (2, 3):
            raise ValueError("x must be a tensor of shape [tokens, d] or [batch, tokens, d]")
        scores = x @ x.transpose(-2, -1)       # [.., T, T]
        weights = torch.softmax(scores, dim=-1)  # each row sums to 1
        return weights @ x                     # [.., T, d]


# --------------------------------------------------------------------------- #
# 2. Trainable query, key and value matrices
# --------------------------------------------------------------------------- #
class SelfAttentionParams(nn.Module):
    """Scaled dot-product self-attention with ``W_query``, ``W_key``, ``W_value`` as raw
    ``nn.Parameter`` matrices of shape ``[d_in, d_out]`` (initialised uniform in [0, 1),
    as a first try; :class:`SelfAttention` does better with ``nn.Linear``).

    Shape:
        x: ``[batch, tokens, d_in]`` -> ``[batch, tokens, d_out]``.
    """

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.d_in, self.d_out = positive_int("d_in", d_in), positive_int("d_out", d_out)
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.d_in)
        q, k, v = x @ self.W_query, x @ self.W_key, x @ self.W_value  # [B, T, d_out]
        scores = q @ k.transpose(-2, -1)                              # [B, T, T]
        weights = torch.softmax(scores / math.sqrt(self.d_out), dim=-1)
        return weights @ v                                            # [B, T, d_out]


class SelfAttention(nn.Module):
    """Scaled dot-product self-attention with ``nn.Linear`` projections.

    Same computation as :class:`SelfAttentionParams`; ``nn.Linear`` stores the matrix
    transposed (``[d_out, d_in]``) and initialises it with a sensible scale.

    Args:
        d_in: width of each input token vector.
        d_out: width of the queries, keys, values and of the output.
        qkv_bias: add a bias to the three projections (default ``False``).

    Shape:
        x: ``[batch, tokens, d_in]`` -> ``[batch, tokens, d_out]``.
    """

    def __init__(self, d_in: int, d_out: int, qkv_bias: bool = False):
        super().__init__()
        self.d_in, self.d_out = positive_int("d_in", d_in), positive_int("d_out", d_out)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.d_in)
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)  # [B, T, d_out]
        scores = q @ k.transpose(-2, -1)                           # [B, T, T]
        weights = torch.softmax(scores / math.sqrt(self.d_out), dim=-1)
        return weights @ v                                         # [B, T, d_out]


# --------------------------------------------------------------------------- #
# 3. Causal: no peeking at later tokens, and dropout on the weights
# --------------------------------------------------------------------------- #
class CausalAttention(nn.Module):
    """One causal attention head.

    Scores above the diagonal are set to ``-inf`` before the softmax, so they get
    exactly zero weight and every row still sums to one. Dropout is applied to the
    attention weights (active in ``train()`` mode only).

    Args:
        d_in: width of each input token vector.
        d_out: width of the output (and of queries, keys, values).
        context_length: the longest sequence this head accepts (size of the mask).
        dropout: probability of zeroing an attention weight while training, in [0, 1).
        qkv_bias: add a bias to the three projections.

    Shape:
        x: ``[batch, tokens, d_in]`` with ``tokens <= context_length`` ->
        ``[batch, tokens, d_out]``.

    Raises:
        ValueError: a non-positive size, ``dropout`` outside [0, 1), or an input of the
            wrong shape or longer than ``context_length``.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float = 0.0,
                 qkv_bias: bool = False):
        super().__init__()
        self.d_in, self.d_out = positive_int("d_in", d_in), positive_int("d_out", d_out)
        self.context_length = positive_int("context_length", context_length)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(probability("dropout", dropout, hint=_DROPOUT_HINT))
        self.register_buffer("mask", causal_mask(context_length), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.d_in, self.context_length)
        T = x.shape[1]
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)     # [B, T, d_out]
        scores = q @ k.transpose(-2, -1)                              # [B, T, T]
        scores = scores.masked_fill(self.mask[:T, :T], float("-inf"))  # no looking ahead
        weights = torch.softmax(scores / math.sqrt(self.d_out), dim=-1)
        weights = self.dropout(weights)
        return weights @ v                                            # [B, T, d_out]


# --------------------------------------------------------------------------- #
# 4. Multi-head, the simple way: several heads side by side
# --------------------------------------------------------------------------- #
class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent :class:`CausalAttention` heads, outputs concatenated.

    Each head is ``d_out // num_heads`` wide so the result is ``d_out`` wide, like
    :class:`MultiHeadAttention` (which adds an output projection on top).

    Shape:
        x: ``[batch, tokens, d_in]`` -> ``[batch, tokens, d_out]``.

    Raises:
        ValueError: ``d_out`` not divisible by ``num_heads``, and as :class:`CausalAttention`.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False):
        super().__init__()
        positive_int("d_out", d_out)
        self.num_heads = positive_int("num_heads", num_heads)
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}); try num_heads "
                             f"in {[h for h in range(1, min(d_out, 64) + 1) if d_out % h == 0]}")
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out // num_heads, context_length, dropout, qkv_bias) for _ in range(num_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)  # [B, T, d_out]


# --------------------------------------------------------------------------- #
# 5. Multi-head, the efficient way: one matmul for all heads, then split
# --------------------------------------------------------------------------- #
class MultiHeadAttention(nn.Module):
    """Multi-head causal self-attention, as used in GPT.

    Queries, keys and values for all heads come from one ``nn.Linear`` each; the
    ``d_out`` columns are split into ``num_heads`` heads of ``head_dim = d_out // num_heads``
    with ``view`` and ``transpose``; each head attends causally; the heads are merged
    back and mixed by ``out_proj``.

    Args:
        d_in: width of each input token vector.
        d_out: width of the output; split across the heads.
        context_length: the longest sequence accepted (size of the causal mask).
        dropout: dropout probability on the attention weights while training, in [0, 1).
        num_heads: number of heads; must divide ``d_out``.
        qkv_bias: add a bias to ``W_query``, ``W_key``, ``W_value`` (GPT-2 has one).
            ``out_proj`` always has a bias.
        use_sdpa: compute with :func:`torch.nn.functional.scaled_dot_product_attention`
            (default, fast). ``False`` runs the explicit math (scores, mask, softmax,
            dropout, weighted values) for teaching. It is a plain attribute, so
            ``mha.use_sdpa = False`` switches an existing module.

    Attributes:
        W_query, W_key, W_value: ``nn.Linear(d_in, d_out, bias=qkv_bias)``.
        out_proj: ``nn.Linear(d_out, d_out)``.
        mask: boolean ``[context_length, context_length]`` buffer, ``True`` above the
            diagonal; not saved in ``state_dict()`` (``persistent=False``).

    Shape:
        x: ``[batch, tokens, d_in]`` with ``tokens <= context_length`` ->
        ``[batch, tokens, d_out]``.

    Raises:
        ValueError: ``d_out`` not divisible by ``num_heads``, a non-positive size,
            ``dropout`` outside [0, 1); at call time an input that is not 3-D, whose
            last dimension is not ``d_in``, or longer than ``context_length``.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
                 qkv_bias: bool = False, use_sdpa: bool = True):
        super().__init__()
        self.d_in, self.d_out = positive_int("d_in", d_in), positive_int("d_out", d_out)
        self.context_length = positive_int("context_length", context_length)
        self.num_heads = positive_int("num_heads", num_heads)
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}); try num_heads "
                             f"in {[h for h in range(1, min(d_out, 64) + 1) if d_out % h == 0]}")
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(probability("dropout", dropout, hint=_DROPOUT_HINT))
        self.register_buffer("mask", causal_mask(context_length), persistent=False)
        self.use_sdpa = bool(use_sdpa)

    def forward(self, x: torch.Tensor, kv_cache=None, layer: int = 0) -> torch.Tensor:
        """Attend causally over ``x`` ``[B, T, d_in]`` -> ``[B, T, d_out]``.

        Args:
            kv_cache: ``None`` (steps 3 and 4), or a cache of the keys and values of earlier
                tokens (step 5, :class:`course_lib.inference.KVCache`): ``x`` then holds the
                next tokens. ``kv_cache.update(layer, k, v)`` stores the new keys and values
                ``[B, H, T, D]`` and returns all of them ``[B, H, S, D]`` with an attention
                mask: ``None`` when the ``T`` queries are the last ``T`` of the ``S``
                positions (the causal mask applies), else a boolean ``[B, 1, T, S]``,
                ``True`` = may look.
            layer: the slot of this layer in ``kv_cache``.
        """
        _check_input(x, self.d_in, self.context_length)
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        # project, then split d_out into H heads of D: [B, T, d_out] -> [B, H, T, D]
        q = self.W_query(x).view(B, T, H, D).transpose(1, 2)
        k = self.W_key(x).view(B, T, H, D).transpose(1, 2)
        v = self.W_value(x).view(B, T, H, D).transpose(1, 2)
        visible = None                                # None: the usual causal mask
        if kv_cache is not None:
            k, v, visible = kv_cache.update(layer, k, v)  # [B, H, S, D]: earlier tokens' too
        S = k.shape[2]
        start = S - T                                 # the position of the first query
        if S > self.context_length:
            raise ValueError(f"the KV cache already holds {start} positions, so {T} more tokens would "
                             f"exceed context_length={self.context_length}; reset the cache and feed the last "
                             f"{self.context_length} tokens instead")
        if self.use_sdpa:
            p = self.dropout.p if self.training else 0.0
            if visible is not None:   # rows of a batch at different positions (step 5)
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=p)
            elif start == 0:          # a fresh sequence: the usual triangle
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)    # [B, H, T, D]
            elif T == 1:              # one new token sees every cached one: no mask at all
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:                     # several new tokens after a cached prefix
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=~self.mask[start:S, :S], dropout_p=p)
        else:
            hidden = self.mask[start:S, :S] if visible is None else ~visible  # True = may not look
            scores = q @ k.transpose(-2, -1) / math.sqrt(D)                # [B, H, T, S]
            scores = scores.masked_fill(hidden, float("-inf"))             # no looking ahead
            weights = self.dropout(torch.softmax(scores, dim=-1))          # rows sum to 1 (before dropout)
            ctx = weights @ v                                              # [B, H, T, D]
        # merge the heads back: [B, H, T, D] -> [B, T, H*D]
        ctx = ctx.transpose(1, 2).contiguous().view(B, T, self.d_out)
        return self.out_proj(ctx)                                          # [B, T, d_out]

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, context_length={self.context_length}, "
                f"use_sdpa={self.use_sdpa}")
