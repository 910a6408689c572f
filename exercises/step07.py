"""Step 7 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(7)``) or from a terminal::

    course check 7

Each function's docstring says what it must do. You may use ``torch`` and the standard library,
but not ``course_lib``: the point is to write the logic yourself (the checker compares your
answers with independent references: strings and values worked out by hand, and the library's
own ``format_prompt``, ``collate``, ``lcs_length``, ``sequence_logprobs`` and ``dpo_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def format_prompt_phi3(entry: dict) -> str:
    """The prompt of ``entry`` in the Phi-3 chat style (Shu 2 wrote the Alpaca style).

    ``entry`` is a dict with ``"instruction"`` and, optionally, ``"input"`` (which may be
    missing, ``None`` or ``""``: then there is no input). The prompt is::

        "<|user|>\\n" + instruction                     then, only when input is not empty,
        "\\n" + input                                   and always at the end
        "\\n<|assistant|>\\n"

    Example: ``{"instruction": "Add 2 and 3.", "input": ""}`` →
    ``"<|user|>\\nAdd 2 and 3.\\n<|assistant|>\\n"``; with ``"input": "Be brief."`` →
    ``"<|user|>\\nAdd 2 and 3.\\nBe brief.\\n<|assistant|>\\n"``. Byte for byte: no extra spaces,
    nothing stripped.
    """
    raise NotImplementedError


def collate_masked(batch: Sequence[tuple[Sequence[int], int]], pad_token_id: int = 50256,
                   ignore_index: int = -100, allowed_max_length: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shu 3's collate function, with the prompt masked: only the response (and its end) is learned.

    ``batch`` is a list of ``(ids, prompt_length)`` pairs: ``ids`` a list of token ids (prompt
    then response), whose first ``prompt_length`` ids are the prompt. Build, for each row:

    1. ``ids`` + one ``pad_token_id`` (the end-of-text), then more ``pad_token_id`` up to the
       longest row's length + 1 (so every row has the same length, ``width``);
    2. ``inputs`` = that padded row without its last position, ``targets`` = it without its
       first (both ``width - 1`` long): ``targets[t]`` is the token that follows ``inputs[t]``;
    3. in ``targets``, keep the **first** end-of-text of the row (position ``len(ids) - 1``)
       and set every later position to ``ignore_index``;
    4. set to ``ignore_index`` the targets that are **prompt tokens**: positions
       ``0 .. prompt_length - 2`` (``targets[t]`` is token ``t + 1``, so position
       ``prompt_length - 1`` predicts the first response token and stays);
    5. if ``allowed_max_length`` is given, keep only the first ``allowed_max_length`` positions
       of ``inputs`` and ``targets``.

    Return ``(inputs, targets)``, two ``torch.long`` tensors of shape ``[len(batch), width - 1]``
    (or ``[len(batch), allowed_max_length]`` when that is shorter).

    Example, with ``pad_token_id=0``: ``[([5, 6, 7, 8], 2), ([9, 4], 1)]`` →
    inputs ``[[5, 6, 7, 8], [9, 4, 0, 0]]``, targets ``[[-100, 7, 8, 0], [4, 0, -100, -100]]``.
    """
    raise NotImplementedError


def lcs_words(a: Sequence, b: Sequence) -> list:
    """One longest common subsequence of ``a`` and ``b`` (lists of words): the words themselves.

    Shu 7 computed only the *length* of the LCS, for ROUGE-L. Here return the words, in order:
    which parts of the reference did the model's answer get? Fill the dynamic-programming table
    ``table[i][j]`` = length of the LCS of ``a[:i]`` and ``b[:j]``, then walk back from
    ``table[len(a)][len(b)]``: where ``a[i-1] == b[j-1]`` that word is in the LCS (go to
    ``i-1, j-1``); otherwise move to the neighbour (``i-1, j`` or ``i, j-1``) with the larger
    value. Collect the words and reverse them.

    When several subsequences are equally long, any one of them is right.
    Example: ``lcs_words("the cat sat on the mat".split(), "the cat is on the mat".split())``
    → ``["the", "cat", "on", "the", "mat"]``. Empty input → ``[]``. Return a ``list``.
    """
    raise NotImplementedError


def response_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The log-probability of each row's response: what DPO compares between policy and reference.

    ``logits`` is ``[B, T, V]`` (a model's output), ``targets`` ``[B, T]`` token ids in which
    the prompt and the padding are ``ignore_index`` (as ``collate(..., mask_prompt=True)``
    builds them). Return the ``[B]`` tensor whose row ``b`` is
    ``sum over t with targets[b, t] != ignore_index of log_softmax(logits[b, t])[targets[b, t]]``.

    A row with no target left counts 0. Careful: ``ignore_index`` (-100) is not a valid index,
    so replace it (by 0, say) before picking with ``gather`` and zero those positions afterwards.
    Keep it differentiable (no ``.item()``, no ``torch.no_grad()``): DPO trains through it.
    Example: logits all equal over ``V`` tokens, 3 targets kept → every row is ``3 * log(1 / V)``.
    """
    raise NotImplementedError


def dpo_loss_smoothed(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                      ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """The DPO loss for labels that may be wrong ("conservative DPO", Mitchell, 2023).

    Our pairs are made by a rule (the reference answer is chosen), so sometimes the "rejected"
    answer is in fact as good. With ``h = beta * ((policy_chosen - ref_chosen) -
    (policy_rejected - ref_rejected))`` (all four are ``[B]`` tensors of log-probabilities)
    and ``e = label_smoothing`` (the share of pairs we believe are the wrong way round),
    return the scalar mean over the batch of::

        -(1 - e) * logsigmoid(h) - e * logsigmoid(-h)

    With ``e = 0`` it is Shu 8's DPO loss; for any ``e`` it is ``log 2`` when the policy equals
    the reference. Use ``torch.nn.functional.logsigmoid`` (``log(sigmoid(h))`` overflows for
    large margins). Example: ``beta = 1``, the chosen log-ratio ``log 3``, the rejected 0,
    ``e = 0`` → ``-log(3/4) = 0.2877``.
    """
    raise NotImplementedError
