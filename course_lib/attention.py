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

Step 5 adds :class:`KVCache`: when a model generates one token at a time, the keys and
values of the tokens already seen do not change, so they are kept (in tensors allocated
once) and only the new token's are computed. ``MultiHeadAttention.forward(x, kv_cache,
layer)`` writes the new keys and values into the cache and attends over everything in it.
It also adds :class:`Linear`, ``nn.Linear`` with a quicker route for the one-row products
of token-by-token decoding (:func:`few_rows_linear` says why; :func:`few_rows_route`
switches it off to compare).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SimplifiedSelfAttention",
    "SelfAttentionParams",
    "SelfAttention",
    "CausalAttention",
    "MultiHeadAttentionWrapper",
    "MultiHeadAttention",
    "causal_mask",
    "KVCache",
    "Linear",
    "few_rows_linear",
    "FEW_ROWS",
    "FEW_ROWS_MIN_SIZE",
    "few_rows_route",
]


# --------------------------------------------------------------------------- #
# Argument checks shared by the classes (clear errors instead of torch tracebacks)
# --------------------------------------------------------------------------- #
def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _dropout_p(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {value!r}; use 0.0 to turn it off")
    return float(value)


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
    _positive_int("context_length", context_length)
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
        self.d_in, self.d_out = _positive_int("d_in", d_in), _positive_int("d_out", d_out)
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
        self.d_in, self.d_out = _positive_int("d_in", d_in), _positive_int("d_out", d_out)
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
        self.d_in, self.d_out = _positive_int("d_in", d_in), _positive_int("d_out", d_out)
        self.context_length = _positive_int("context_length", context_length)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(_dropout_p(dropout))
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
        _positive_int("d_out", d_out)
        self.num_heads = _positive_int("num_heads", num_heads)
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}); try num_heads "
                             f"in {[h for h in range(1, min(d_out, 64) + 1) if d_out % h == 0]}")
        self.heads = nn.ModuleList(
            CausalAttention(d_in, d_out // num_heads, context_length, dropout, qkv_bias) for _ in range(num_heads)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(x) for head in self.heads], dim=-1)  # [B, T, d_out]


# --------------------------------------------------------------------------- #
# The KV cache (step 5): keys and values of earlier tokens, kept between calls
# --------------------------------------------------------------------------- #
class KVCache:
    """Preallocated keys and values for every attention layer of a model.

    When a GPT generates text, token ``t`` attends to the keys and values of tokens
    ``0..t``, and those of tokens ``0..t-1`` are the same as at the previous step. The cache
    keeps them, so each step computes queries, keys and values for the new token only:
    ``O(T)`` work per token instead of ``O(T^2)``.

    The tensors are allocated once, ``[n_layers, batch, num_heads, max_len, head_dim]`` for
    keys and the same for values, and filled from the left; ``pos`` counts the positions
    filled. Layer ``i`` calls :meth:`update` with the new tokens' keys and values and gets
    back everything cached so far; the model calls :meth:`advance` once all its layers have
    seen the new tokens. :meth:`reset` empties the cache for the next prompt (the memory is
    kept).

    Args:
        n_layers, batch_size, num_heads, head_dim: the model's shape.
        max_len: the most positions the cache holds (at most the model's context length).
        device, dtype: where and how the tensors live (match the model's).

    Raises:
        ValueError: a size that is not a positive integer; (in :meth:`update`) more tokens
            than ``max_len`` in all, or keys of the wrong shape.
    """

    def __init__(self, n_layers: int, batch_size: int, num_heads: int, head_dim: int, max_len: int,
                 device=None, dtype: torch.dtype = torch.float32):
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("max_len", max_len)):
            _positive_int(name, value)
        shape = (n_layers, batch_size, num_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)    # [L, B, H, max_len, D]
        self.values = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, H, max_len, D]
        self.pos = 0  # positions filled, in every layer

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def reset(self) -> None:
        """Forget every cached position (the next call starts at position 0)."""
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys and values ``[B, H, T, D]`` of ``T`` new tokens at positions ``pos..pos+T-1``
        of ``layer``; return the keys and values of positions ``0..pos+T-1`` (views, no copy)."""
        B, H, T, D = k.shape
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions and {self.pos} are filled, so "
                             f"{T} more do not fit; reset() it, or crop the sequence to the context length")
        if (B, H, D) != (self.keys.shape[1], self.keys.shape[2], self.keys.shape[4]):
            raise ValueError(f"keys of shape {tuple(k.shape)} do not fit a cache built for batch "
                             f"{self.keys.shape[1]}, {self.keys.shape[2]} heads of {self.keys.shape[4]}")
        self.keys[layer, :, :, self.pos:end] = k
        self.values[layer, :, :, self.pos:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]  # [B, H, pos+T, D]

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more positions as filled (the model calls this after its last layer)."""
        self.pos += num_tokens

    def __repr__(self) -> str:
        L, B, H, M, D = self.keys.shape
        return f"KVCache(layers={L}, batch={B}, heads={H}, head_dim={D}, filled={self.pos}/{M})"


# --------------------------------------------------------------------------- #
# Decoding speed (step 5): nn.Linear, with a faster route for a few rows at a time
# --------------------------------------------------------------------------- #
FEW_ROWS = 64
"""Inputs with at most this many rows take :func:`few_rows_linear` in :class:`Linear`."""
FEW_ROWS_MIN_SIZE = 2**18
"""... and weights of at least this many numbers (1 MB in float32). Smaller matrices stay in
the CPU's cache, where the matrix-vector route is as fast and the extra steps cost more than
they save."""


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``weight @ x.T``, for inputs of a few rows.

    When a GPT generates text with a KV cache, every layer sees one new token: each matmul
    is *one row* times a weight matrix, and its time is the time to read the weights from
    memory. On CPU, PyTorch's BLAS (MKL on x86) runs that case as a matrix-vector product
    that reads them at roughly half the speed it reaches in ``weight @ x.T`` — the same
    numbers, with the weight on the left and at least two columns on the right. So a single
    row is duplicated (the extra column costs nothing: the time is in reading ``weight``),
    the product taken that way round, and the first column kept. For GPT-2 small this makes
    each generated token about 1.8x faster; see ``benchmarks/README.md``, step 5.

    Args:
        x: ``[..., in_features]``.
        weight: ``[out_features, in_features]``, as in ``nn.Linear``.
        bias: ``[out_features]`` or ``None``.

    Returns:
        ``[..., out_features]``, contiguous, equal to ``F.linear(x, weight, bias)`` up to
        float rounding (the sums are taken in a different order).
    """
    rows = x.numel() // x.shape[-1] if x.ndim and x.shape[-1] else 0
    if rows == 0 or x.shape[-1] != weight.shape[1]:
        return F.linear(x, weight, bias)      # nothing to gain; F.linear gives its usual errors
    x2 = x.reshape(rows, x.shape[-1])         # [N, in]
    if rows == 1:
        x2 = torch.cat([x2, x2])              # two columns: BLAS's matrix-matrix route
    y = (weight @ x2.t())[:, :rows].t()       # [out, N] -> [N, out]
    if bias is not None:
        y = y + bias
    return y.contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear``, faster for a few rows when no gradient is needed.

    Same arguments, parameters, ``state_dict`` and results as ``nn.Linear``. On CPU, in
    float32, for an input of at most :data:`FEW_ROWS` rows, a weight of at least
    :data:`FEW_ROWS_MIN_SIZE` numbers and no gradient wanted (text generation, evaluation of a
    single prompt), it computes with :func:`few_rows_linear`; everything else — training, long
    inputs, small layers, GPUs, other dtypes, autocast, ``torch.compile`` — is
    ``nn.Linear.forward`` itself. The attention and feed-forward layers of steps 3 and 4 and
    the model's output head use it.

    Shape:
        x: ``[..., in_features]`` -> ``[..., out_features]``.
    """

    def _takes_few_rows(self, x) -> bool:
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return (x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and 0 < x.numel() <= FEW_ROWS * self.in_features and self.weight.numel() >= FEW_ROWS_MIN_SIZE
                and not wants_grad and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and self._takes_few_rows(x):
            return few_rows_linear(x, self.weight, self.bias)
        return super().forward(x)


@contextlib.contextmanager
def few_rows_route(enabled: bool = True):
    """Turn :class:`Linear`'s few-rows route on or off inside a ``with`` block (to compare)::

        with few_rows_route(False):     # every Linear runs nn.Linear.forward
            generate(model, idx, 50)
    """
    global FEW_ROWS
    saved = FEW_ROWS
    FEW_ROWS = saved if enabled else 0
    try:
        yield
    finally:
        FEW_ROWS = saved


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
        W_query, W_key, W_value: ``nn.Linear(d_in, d_out, bias=qkv_bias)`` (as
            :class:`Linear`, which is ``nn.Linear`` with a faster route for generation).
        out_proj: ``nn.Linear(d_out, d_out)`` (likewise).
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
        self.d_in, self.d_out = _positive_int("d_in", d_in), _positive_int("d_out", d_out)
        self.context_length = _positive_int("context_length", context_length)
        self.num_heads = _positive_int("num_heads", num_heads)
        if d_out % num_heads:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads}); try num_heads "
                             f"in {[h for h in range(1, min(d_out, 64) + 1) if d_out % h == 0]}")
        self.head_dim = d_out // num_heads
        self.W_query = Linear(d_in, d_out, bias=qkv_bias)  # nn.Linear, faster when generating
        self.W_key = Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = Linear(d_out, d_out)
        self.dropout = nn.Dropout(_dropout_p(dropout))
        self.register_buffer("mask", causal_mask(context_length), persistent=False)
        self.use_sdpa = bool(use_sdpa)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Attend causally over ``x`` ``[B, T, d_in]``; with a ``kv_cache``, ``x`` holds the next
        ``T`` tokens after the ``kv_cache.pos`` already cached (stored in slot ``layer``)."""
        start = 0 if kv_cache is None else kv_cache.pos
        _check_input(x, self.d_in, self.context_length)
        if start + x.shape[1] > self.context_length:
            raise ValueError(f"the KV cache already holds {start} positions, so {x.shape[1]} more tokens would "
                             f"exceed context_length={self.context_length}; reset the cache and feed the last "
                             f"{self.context_length} tokens instead")
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        # project, then split d_out into H heads of D: [B, T, d_out] -> [B, H, T, D]
        q = self.W_query(x).view(B, T, H, D).transpose(1, 2)
        k = self.W_key(x).view(B, T, H, D).transpose(1, 2)
        v = self.W_value(x).view(B, T, H, D).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)       # [B, H, S, D]: all S = start + T positions so far
        S = start + T
        # query i sits at position start + i and may look at keys 0..start + i
        mask = self.mask[start:S, :S]                 # [T, S], True = may not look
        if self.use_sdpa:
            p = self.dropout.p if self.training else 0.0
            if start == 0:    # a fresh sequence: the usual triangle
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)    # [B, H, T, D]
            elif T == 1:      # one new token sees every cached one: no mask at all
                ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:             # several new tokens after a cached prefix
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask, dropout_p=p)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(D)                # [B, H, T, S]
            scores = scores.masked_fill(mask, float("-inf"))               # no looking ahead
            weights = self.dropout(torch.softmax(scores, dim=-1))          # rows sum to 1 (before dropout)
            ctx = weights @ v                                              # [B, H, T, D]
        # merge the heads back: [B, H, T, D] -> [B, T, H*D]
        ctx = ctx.transpose(1, 2).contiguous().view(B, T, self.d_out)
        return self.out_proj(ctx)                                          # [B, T, d_out]

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, context_length={self.context_length}, "
                f"use_sdpa={self.use_sdpa}")
