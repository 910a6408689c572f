"""Step 5 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(5)``) or from a terminal::

    course check 5

Each function's docstring says what it must do. You may use anything from ``torch`` (for
example ``torch.nn.functional.cross_entropy``, ``torch.softmax``, ``torch.topk``) and the
standard library, but not ``course_lib``: the point is to write the logic yourself (the
checker compares your answers with independent references).
"""

from __future__ import annotations

import torch


def calc_loss_loader(data_loader, model, device, num_batches=None) -> float:
    """The average cross-entropy loss of ``model`` over the first ``num_batches`` batches.

    ``data_loader`` yields ``(inputs, targets)`` pairs of ``[batch, tokens]`` token ids;
    ``model(inputs)`` returns logits ``[batch, tokens, vocab]``. For each batch:

    1. move both tensors to ``device``;
    2. compute the mean cross-entropy between the logits and the targets (flatten the logits
       to ``[batch * tokens, vocab]`` and the targets to ``[batch * tokens]``);
    3. add the loss (as a Python float, ``.item()``) to a running total.

    Return the total divided by the number of batches used. ``num_batches=None`` means every
    batch; a ``num_batches`` larger than the loader means every batch too. A loader with no
    batches returns ``float("nan")``. No gradients are needed: use ``torch.no_grad()``.
    """
    raise NotImplementedError


def softmax_with_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Turn logits into probabilities, sharpened or flattened by ``temperature``.

    Divide the logits by ``temperature`` (a positive number), then apply the softmax over the
    last dimension. ``temperature = 1`` gives the model's own distribution; below 1 the most
    likely tokens get more of the probability, above 1 the distribution gets flatter.

    Shapes: ``logits`` is ``[..., vocab]``; the result has the same shape and each row sums to 1.
    Example: ``softmax_with_temperature(torch.tensor([0., 0.]), 5.0)`` is ``[0.5, 0.5]``.
    """
    raise NotImplementedError


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits in each row and set every other one to ``-inf``.

    After this, a softmax gives probability 0 to all but the ``k`` most likely tokens. Work on the
    last dimension, for any number of leading dimensions (``[vocab]``, ``[batch, vocab]``). If
    ``k`` is at least the vocabulary size, return the logits unchanged. Do not modify the tensor
    you were given.

    Example: ``top_k_filter(torch.tensor([1., 3., 2.]), 2)`` is ``[-inf, 3., 2.]``.
    Hint: ``torch.topk(logits, k).values[..., -1:]`` is the k-th largest value of each row.
    """
    raise NotImplementedError
