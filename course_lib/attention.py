"""Step 3 — causal multi-head self-attention, the layer step 4's GPT is built on.

It teaches how a token mixes in the tokens before it: scores ``Q K^T / sqrt(D)``, the future
masked to ``-inf`` before the softmax, weights (rows sum to 1) times values, in ``num_heads``
heads at once. Notebook 03 builds the way there in front of the learner (weightless attention,
trainable projections, a causal head, heads side by side in a wrapper, split heads) and checks
each step against this module or torch; the library holds only the production pieces:

* :class:`MultiHeadAttention` — ``x [B, T, d_in] -> [B, T, d_out]``; heads split as
  ``[B, T, d_out] -> [B, H, T, D]`` with ``D = d_out // H``, merged back, mixed by ``out_proj``.
* :func:`causal_mask` — ``[T, T]`` boolean, ``True`` above the diagonal ("may not look").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import boolean, positive_int, probability

__all__ = ["MultiHeadAttention", "causal_mask"]


# --------------------------------------------------------------------------- #
# Argument checks (clear errors instead of torch tracebacks)
# --------------------------------------------------------------------------- #
_DROPOUT_HINT = "; use 0.0 to turn it off"


def _weight_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype of ``layer``'s weight (an ``nn.Linear``'s), or of its first parameter (a wrapper
    such as LoRA's); ``None`` for a layer without parameters."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor):
        w = next(layer.parameters(), None)
    return None if w is None else w.dtype


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _check_dtype(x: torch.Tensor, expected: torch.dtype | None, what: str, reduced_ok: bool = False) -> None:
    """A TypeError naming ``expected`` (the layer's parameter dtype) unless torch can compute ``x``
    with it: the same dtype; under autocast, any float16/bfloat16/float32 mix; with ``reduced_ok``
    (``F.layer_norm``), float16/bfloat16 input with float32 parameters. One comparison when the
    dtypes agree, the usual case."""
    if x.dtype == expected or expected is None:
        return
    if x.is_floating_point() and torch.float64 not in (x.dtype, expected) and (
            (reduced_ok and expected == torch.float32) or _autocast_on(x.device.type)):
        return
    fix = (f"convert the input with x.to({expected}), or the layer with .to({x.dtype})" if x.is_floating_point()
           else f"convert the input with x.to({expected}) (token ids go through the model's embedding first)")
    raise TypeError(f"{what} expects an input of dtype {expected} (its parameters' dtype), but x has dtype "
                    f"{x.dtype}; {fix}")


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
    """The causal mask: ``mask[i, j]`` is ``True`` where query ``i`` may not see key ``j`` (``j > i``).

    Args:
        context_length: number of positions.
        device: where to build it. Default: ``None`` (the default device).

    Returns:
        Boolean tensor ``[context_length, context_length]``, ``True`` above the diagonal.

    Raises:
        ValueError: ``context_length`` is not a positive integer.
    """
    positive_int("context_length", context_length)
    ones = torch.ones(context_length, context_length, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


# --------------------------------------------------------------------------- #
# The layer: one matmul for all heads, then split
# --------------------------------------------------------------------------- #
class MultiHeadAttention(nn.Module):
    """Multi-head causal self-attention, as in GPT-2.

    ``W_query``, ``W_key``, ``W_value`` project all heads at once; their ``d_out`` columns are
    split into ``num_heads`` heads of ``head_dim = d_out // num_heads``; each head computes
    ``softmax(Q K^T / sqrt(head_dim) + causal mask) V``; the heads are concatenated and mixed
    by ``out_proj``. With ``d_in == d_out`` it equals :class:`torch.nn.MultiheadAttention`
    (``batch_first=True``, same weights, causal ``attn_mask``).

    Args:
        d_in: width of each input token vector.
        d_out: width of the output; split across the heads.
        context_length: the longest sequence accepted (size of the causal mask).
        dropout: probability of zeroing an attention weight in ``train()`` mode, in [0, 1).
        num_heads: number of heads; must divide ``d_out``.
        qkv_bias: add a bias to ``W_query``, ``W_key``, ``W_value`` (GPT-2 has one).
            ``out_proj`` always has a bias. Default: ``False``.
        use_sdpa: compute with :func:`torch.nn.functional.scaled_dot_product_attention`;
            ``False`` runs the explicit math (scores, mask, softmax, dropout, weights @ values).
            Same result with dropout off. A plain attribute: ``mha.use_sdpa = False`` switches
            an existing module. Default: ``True``.

    Attributes:
        W_query, W_key, W_value: ``nn.Linear(d_in, d_out, bias=qkv_bias)``.
        out_proj: ``nn.Linear(d_out, d_out)``.
        mask: :func:`causal_mask` ``(context_length)``, a buffer with ``persistent=False``:
            moves with ``.to(device)``, not saved in ``state_dict()``.

    Shape:
        - Input ``x``: ``[batch, tokens, d_in]`` with ``tokens <= context_length``.
        - Output: ``[batch, tokens, d_out]``.

    Raises:
        ValueError: at construction, a size that is not a positive integer, ``d_out`` not
            divisible by ``num_heads``, or ``dropout`` outside [0, 1); at call time, ``x`` not
            3-D, its last dimension not ``d_in``, or more tokens than ``context_length``
            (cached ones included).
        TypeError: at construction, ``qkv_bias`` or ``use_sdpa`` not ``True``/``False`` (a
            string such as ``"False"`` would read as True); at call time, ``x`` not a tensor, or
            of another dtype than the layer's parameters (a ``torch.long`` or ``float64`` input
            to a float32 layer), or ``kv_cache`` without an ``update`` method.
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
        qkv_bias = boolean("qkv_bias", qkv_bias)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(probability("dropout", dropout, hint=_DROPOUT_HINT))
        self.register_buffer("mask", causal_mask(context_length), persistent=False)
        self.use_sdpa = boolean("use_sdpa", use_sdpa)

    def forward(self, x: torch.Tensor, kv_cache=None, layer: int = 0) -> torch.Tensor:
        """Attend causally over ``x`` ``[B, T, d_in]`` -> ``[B, T, d_out]``.

        Args:
            x: ``[B, T, d_in]``.
            kv_cache: ``None`` (steps 3 and 4; default), or a cache of the keys and values of
                earlier tokens (step 5, :class:`course_lib.inference.KVCache`): ``x`` then holds
                the next tokens. ``kv_cache.update(layer, k, v)`` stores the new keys and values
                ``[B, H, T, D]`` and returns all of them ``[B, H, S, D]`` with an attention
                mask: ``None`` when the ``T`` queries are the last ``T`` of the ``S``
                positions (the causal mask applies), else a boolean ``[B, 1, T, S]``,
                ``True`` = may look.
            layer: the slot of this layer in ``kv_cache``. Default: ``0``.
        """
        _check_input(x, self.d_in, self.context_length)
        _check_dtype(x, _weight_dtype(self.W_query), "MultiHeadAttention")
        if kv_cache is not None and not callable(getattr(kv_cache, "update", None)):
            raise TypeError(f"kv_cache must be None or a course_lib.inference.KVCache, got {type(kv_cache).__name__}")
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
