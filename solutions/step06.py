"""Step 6 — reference solutions to ``exercises/step06.py``."""

from __future__ import annotations

import pandas as pd
import torch


def balance_classes(df, seed: int = 123):
    n = int(df["label"].value_counts().min())
    parts = [rows.sample(n=n, random_state=seed) for _, rows in df.groupby("label", sort=True)]
    return pd.concat(parts)


def pad_batch(token_lists, pad_id: int, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max_length if max_length is not None else max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    lengths = torch.zeros(len(token_lists), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        kept = list(tokens[:width])
        ids[row, :len(kept)] = torch.tensor(kept, dtype=torch.long)
        lengths[row] = len(kept)
    return ids, lengths


def freeze_all_but_last_blocks(model, n_blocks: int = 1) -> int:
    for p in model.parameters():
        p.requires_grad_(False)
    top = list(model.trf_blocks)[len(model.trf_blocks) - n_blocks:] if n_blocks > 0 else []
    for module in [*top, model.final_norm, model.out_head]:
        for p in module.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def confusion_over_loader(loader, model, num_classes: int = 2) -> torch.Tensor:
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for ids, labels in loader:
            predicted = model(ids).argmax(dim=-1).cpu()                   # [B]
            for t, p in zip(labels.tolist(), predicted.tolist()):
                matrix[t, p] += 1
    return matrix
