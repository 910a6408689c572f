"""Step 7 — reference solutions to ``exercises/step07.py``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def format_prompt_phi3(entry: dict) -> str:
    text = "<|user|>\n" + entry["instruction"]
    if entry.get("input"):
        text += "\n" + entry["input"]
    return text + "\n<|assistant|>\n"


def collate_masked(batch: Sequence[tuple[Sequence[int], int]], pad_token_id: int = 50256,
                   ignore_index: int = -100, allowed_max_length: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch) + 1
    inputs, targets = [], []
    for ids, prompt_length in batch:
        padded = torch.tensor(list(ids) + [pad_token_id] * (width - len(ids)), dtype=torch.long)  # [width]
        x, y = padded[:-1], padded[1:].clone()                                                  # [width - 1]
        y[len(ids):] = ignore_index                      # keep the first end-of-text, ignore later pads
        y[:max(prompt_length - 1, 0)] = ignore_index     # the targets that are prompt tokens
        inputs.append(x)
        targets.append(y)
    inputs, targets = torch.stack(inputs), torch.stack(targets)
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def lcs_words(a: Sequence, b: Sequence) -> list:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    words, i, j = [], len(a), len(b)
    while i > 0 and j > 0:
        if a[i - 1] == b[j - 1]:
            words.append(a[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] >= table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words[::-1]


def response_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=-1)                                                # [B, T, V]
    keep = targets != ignore_index                                                      # [B, T]
    picked = logp.gather(-1, targets.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1)   # [B, T]
    return (picked * keep).sum(dim=-1)                                                  # [B]


def dpo_loss_smoothed(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                      ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    h = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses.mean()
