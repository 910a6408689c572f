"""Step 5 — reference solutions to ``exercises/step05.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def calc_loss_loader(data_loader, model, device, num_batches=None) -> float:
    if len(data_loader) == 0:
        return float("nan")
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    with torch.no_grad():
        for i, (inputs, targets) in enumerate(data_loader):
            if i >= n:
                break
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)                                                # [B, T, V]
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    return total / n


def softmax_with_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.shape[-1]:
        return logits.clone()
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                        # [..., 1]
    return logits.masked_fill(logits < kth, float("-inf"))
