"""Step 4 — reference solutions to ``exercises/step04.py``."""

from __future__ import annotations

from collections.abc import Callable

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)                     # [..., 1]
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)      # [..., 1], biased
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def block_parameter_count(emb_dim: int, qkv_bias: bool = True, hidden_dim: int | None = None) -> int:
    d = emb_dim
    h = 4 * d if hidden_dim is None else hidden_dim
    norms = 2 * (2 * d)
    attention = 3 * d * d + (3 * d if qkv_bias else 0) + d * d + d
    feed_forward = d * h + h + h * d + d
    return norms + attention + feed_forward


def transformer_block_forward(x: torch.Tensor, norm1: Callable, attention: Callable, norm2: Callable,
                              feed_forward: Callable, dropout: Callable | None = None) -> torch.Tensor:
    drop = dropout if dropout is not None else (lambda t: t)
    x = x + drop(attention(norm1(x)))
    x = x + drop(feed_forward(norm2(x)))
    return x


def generate_greedy(model: Callable, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])              # [B, T, V]
        next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # [B, 1]
        idx = torch.cat([idx, next_id], dim=1)                   # [B, T+1]
    return idx
