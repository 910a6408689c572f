"""Step 9 — reference solutions to ``exercises/step09.py``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, scale: float) -> torch.Tensor:
    return F.linear(x, weight, bias) + (x @ A.T) @ B.T * scale           # [.., r] -> [.., out]


def lora_parameter_count(cfg, rank: int, targets: Sequence[str]) -> int:
    d = cfg.emb_dim
    per_block = {"W_query": (d, d), "W_key": (d, d), "W_value": (d, d), "out_proj": (d, d),
                 "ff.layers.0": (d, 4 * d), "ff.layers.2": (4 * d, d)}
    total = 0
    for t in targets:
        if t == "out_head":
            total += rank * (d + cfg.vocab_size)
        else:
            n_in, n_out = per_block[t]
            total += cfg.n_layers * rank * (n_in + n_out)
    return total


def merge_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    return weight + scale * (B @ A)


def fuse_qkv(A_q: torch.Tensor, B_q: torch.Tensor, A_k: torch.Tensor, B_k: torch.Tensor, A_v: torch.Tensor,
             B_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A_c = torch.cat([A_q, A_k, A_v])                                     # [r_q + r_k + r_v, d]
    d = B_q.shape[0]
    B_c = torch.zeros(3 * d, A_c.shape[0], dtype=A_q.dtype, device=A_q.device)
    col = 0
    for j, B in enumerate((B_q, B_k, B_v)):
        r = B.shape[1]
        B_c[j * d:(j + 1) * d, col:col + r] = B
        col += r
    return A_c, B_c
