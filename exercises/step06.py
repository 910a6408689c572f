"""Step 6 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(6)``) or from a terminal::

    course check 6

Each function's docstring says what it must do. You may use ``torch``, ``pandas`` and the
standard library, but not ``course_lib``: the point is to write the logic yourself (the checker
compares your answers with independent references: pandas counts, torch's own padding,
scikit-learn's confusion matrix, values worked out by hand).
"""

from __future__ import annotations

import torch


def balance_classes(df, seed: int = 123):
    """Undersample every class of ``df`` to the size of its rarest class.

    ``df`` is a pandas DataFrame with a ``label`` column (and any other columns). Count the rows
    of each label; let ``n`` be the smallest count. Return a new DataFrame holding, for every
    label, ``n`` of its rows drawn at random without replacement, with ``seed`` deciding which
    (``DataFrame.sample(n=..., random_state=seed)`` does one label's draw). The rarest class
    therefore keeps all its rows. Rows keep all their columns; their order and index do not
    matter. Do not modify ``df``. The same ``seed`` gives the same rows.

    Example: 5 ``ham`` and 2 ``spam`` rows give 2 ``ham`` rows (chosen by ``seed``) and both
    ``spam`` rows.
    """
    raise NotImplementedError


def pad_batch(token_lists, pad_id: int, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or cut) lists of token ids to one length, and keep each row's true length.

    ``token_lists`` is a list of lists of ints, each with at least one id. The row length ``L``
    is ``max_length`` if it is given, else the length of the longest list. A longer list keeps
    its first ``L`` ids; a shorter one is followed by ``pad_id`` up to ``L``.

    Returns ``(ids, lengths)``: ``ids`` a ``torch.long`` tensor ``[len(token_lists), L]``,
    ``lengths`` a ``torch.long`` tensor ``[len(token_lists)]`` holding the number of real
    (not pad) ids kept in each row. Do not modify the input lists.

    Example: ``pad_batch([[5, 6, 7], [8]], pad_id=0)`` gives ``ids`` ``[[5, 6, 7], [8, 0, 0]]``
    and ``lengths`` ``[3, 1]``; with ``max_length=2``: ``[[5, 6], [8, 0]]`` and ``[2, 1]``.
    """
    raise NotImplementedError


def freeze_all_but_last_blocks(model, n_blocks: int = 1) -> int:
    """Make only the top of a GPT trainable: its last ``n_blocks`` transformer blocks, its final
    norm and its output head. Return the number of trainable parameter values.

    ``model`` has the attributes of the course's ``GPTModel``: ``trf_blocks`` (a list of blocks),
    ``final_norm`` and ``out_head`` (besides its embeddings). Set ``requires_grad`` to ``False``
    on every parameter, then to ``True`` on every parameter of the last ``n_blocks`` blocks
    (none when ``n_blocks`` is 0), of ``final_norm`` and of ``out_head``. The model may arrive
    with any mix of frozen and trainable parameters.

    Returns the total number of values (``numel``) of the trainable parameters, as an int.
    Example: for the notebook's classifier, ``n_blocks=1`` is the library's
    ``trainable="last-block"``.
    """
    raise NotImplementedError


def confusion_over_loader(loader, model, num_classes: int = 2) -> torch.Tensor:
    """The confusion matrix of a classifier over every batch of a loader.

    ``loader`` yields ``(ids, labels)`` pairs: ``ids`` a ``[batch, tokens]`` tensor, ``labels`` a
    ``[batch]`` tensor of class ids in ``0 .. num_classes - 1``; batches may differ in size.
    ``model(ids)`` returns logits ``[batch, num_classes]``; the predicted class of a row is the
    position of its largest logit.

    Returns a ``torch.long`` tensor ``[num_classes, num_classes]`` whose entry ``[t, p]`` counts
    the rows of true class ``t`` that were predicted as class ``p`` (rows: the truth; columns:
    the prediction; a class never seen still has its row and column, of zeros). No gradients
    are needed (``torch.no_grad()``); leave the model's mode as it is.

    Example: true labels ``[0, 0, 1]`` predicted as ``[0, 1, 1]`` give ``[[1, 1], [0, 1]]``.
    """
    raise NotImplementedError
