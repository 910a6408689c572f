"""Step 8 — reference solutions to ``exercises/step08.py``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


def wsd_lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
              decay_steps: int, warmup_start_lr: float = 0.0) -> float:
    decay_start = total_steps - decay_steps
    if step < warmup_steps:
        return warmup_start_lr + (max_lr - warmup_start_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr
    if step < decay_start:
        return max_lr
    t = (step - decay_start) / decay_steps                 # 0 -> 1 over the decay
    return min_lr + (max_lr - min_lr) * (1 - t)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads])   # one norm per tensor
    total = torch.linalg.vector_norm(norms, norm_type)                              # the global norm
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return total


def mfu(tokens_per_second: float, cfg, peak_flops: float) -> float:
    d, L, T = cfg.emb_dim, cfg.n_layers, cfg.context_length
    n = 12 * L * d * d + cfg.vocab_size * d                  # matmul weights: blocks + output head
    flops_per_token = 3 * (2 * n + 4 * L * T * d)           # forward, x3 for forward + backward
    return tokens_per_second * flops_per_token / peak_flops


def rank_window_starts(num_tokens: int, context_length: int, rank: int, world_size: int) -> list[int]:
    starts = range(0, num_tokens - context_length, context_length)   # s + context_length + 1 <= num_tokens
    per_rank = len(starts) // world_size                               # equal counts: the rest is left out
    return list(starts[rank::world_size][:per_rank])


def decay_param_names(model: nn.Module) -> set[str]:
    tied = getattr(getattr(model, "tok_emb", None), "weight", None)
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.weight is not tied}
