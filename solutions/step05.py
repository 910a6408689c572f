"""Step 5 — reference solutions to ``exercises/step05.py``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def perplexity_from_loader(data_loader, model, device) -> float:
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for inputs, targets in data_loader:
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)                                                 # [B, T, V]
            total_loss += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            total_tokens += targets.numel()
    if total_tokens == 0:
        return float("nan")
    return math.exp(total_loss / total_tokens)


def lr_at_step(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def generate_until_eos(model, idx: torch.Tensor, max_new_tokens: int, context_size: int,
                       eos_id: int) -> torch.Tensor:
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]                       # [1, V]
        next_id = logits.argmax(dim=-1, keepdim=True)                               # [1, 1]
        idx = torch.cat([idx, next_id], dim=1)
        if next_id.item() == eos_id:
            break
    return idx
