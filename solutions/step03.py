"""Step 3 — reference solutions to the Ha exercises (same names as ``exercises/step03.py``)."""

from __future__ import annotations

import math

import torch


def attention_weights_for_query(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``softmax(keys @ query / sqrt(d))``: shape ``[T]``."""
    scores = keys @ query / math.sqrt(query.shape[-1])  # [T]
    return torch.softmax(scores, dim=-1)


def causal_mask(num_tokens: int) -> torch.Tensor:
    """``True`` above the diagonal (``j > i``): shape ``[T, T]``."""
    return torch.triu(torch.ones(num_tokens, num_tokens, dtype=torch.bool), diagonal=1)


def causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over keys ``0..i`` for each query row ``i``."""
    T = scores.shape[-1]
    mask = causal_mask(T).to(scores.device)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, T, d] -> [B, H, T, d // H]``."""
    B, T, d = x.shape
    if d % num_heads:
        raise ValueError(f"the last dimension ({d}) must be divisible by num_heads ({num_heads})")
    return x.view(B, T, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D] -> [B, T, H * D]``."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(mask(q k^T / sqrt(D))) v``."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [..., T, T]
    return causal_softmax(scores) @ v                          # [..., T, D]
