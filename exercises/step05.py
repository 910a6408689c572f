"""Step 5 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(5)``) or from a terminal::

    course check 5

Each function's docstring says what it must do. You may use anything from ``torch`` (for
example ``torch.nn.functional.cross_entropy``, ``torch.argmax``) and the standard library
(``math``), but not ``course_lib``: the point is to write the logic yourself (the checker
compares your answers with independent references).
"""

from __future__ import annotations

import torch


def perplexity_from_loader(data_loader, model, device) -> float:
    """The perplexity of ``model`` over every token a loader holds, each token counted once.

    ``data_loader`` yields ``(inputs, targets)`` pairs of ``[batch, tokens]`` token ids;
    ``model(inputs)`` returns logits ``[batch, tokens, vocab]``. The notebook averaged the
    *batch* losses; here the batches may differ in size (a short last batch), so weight each by
    its number of target tokens: add up the cross-entropy of every token (``reduction="sum"``),
    divide by the number of tokens, and return ``exp`` of that mean, as a Python float.

    Move the batches to ``device``; no gradients are needed (``torch.no_grad()``). A loader with
    no batches returns ``float("nan")``.
    Example: a model that gives every one of ``V`` tokens the same logit has perplexity ``V``.
    """
    raise NotImplementedError


def lr_at_step(step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (counting from 0): a linear warmup, then a cosine decay.

    - warmup, ``step < warmup_steps``: ``max_lr * (step + 1) / warmup_steps`` (so the first step
      already moves, and step ``warmup_steps - 1`` reaches ``max_lr``);
    - decay, ``warmup_steps <= step < total_steps``: with
      ``progress = (step - warmup_steps) / (total_steps - warmup_steps)`` (0 to almost 1), return
      ``min_lr + 0.5 * (max_lr - min_lr) * (1 + cos(pi * progress))``;
    - after, ``step >= total_steps``: ``min_lr``.

    Example: ``lr_at_step(0, 1.0, 4, 10)`` is 0.25; ``lr_at_step(4, 1.0, 4, 10)`` is 1.0;
    ``lr_at_step(7, 1.0, 4, 10)`` is 0.5 (half-way through the decay).
    """
    raise NotImplementedError


def generate_until_eos(model, idx: torch.Tensor, max_new_tokens: int, context_size: int,
                       eos_id: int) -> torch.Tensor:
    """Greedy generation that stops at an end-of-text token.

    ``idx`` is one prompt, ``[1, tokens]`` ids; ``model(ids)`` returns logits ``[1, tokens, vocab]``
    and must never see more than ``context_size`` tokens at once. Repeat up to ``max_new_tokens``
    times: feed the last ``context_size`` tokens, take the most likely next token of the last
    position, append it. Stop as soon as the appended token is ``eos_id`` (keep it in the output).

    Returns ``[1, tokens + n]`` ids, ``n <= max_new_tokens``. Use ``torch.no_grad()``.
    """
    raise NotImplementedError
