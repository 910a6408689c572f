"""Step 8 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(8)``) or from a terminal::

    course check 8

Each function's docstring says what it must do. You may use ``torch`` and the standard library
(``math``), but not ``course_lib``: the point is to write the logic yourself (the checker
compares your answers with independent references: values worked out by hand,
``torch.nn.utils.clip_grad_norm_``, and the library's ``wsd_lr_at``, ``flops_per_token``,
``mfu``, ``ShardLoader`` and ``param_groups``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


def wsd_lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
              decay_steps: int, warmup_start_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (from 0) of a warmup-stable-decay (WSD) schedule.

    Shu 2 wrote warmup + cosine. WSD keeps the peak for most of the run and decays only at the end,
    so a run can be extended (or branched) before its decay starts. Four phases:

    - warmup, ``step < warmup_steps``: linear from ``warmup_start_lr`` (at step 0) towards
      ``max_lr``: ``warmup_start_lr + (max_lr - warmup_start_lr) * step / warmup_steps``;
    - stable, up to ``total_steps - decay_steps``: ``max_lr``;
    - decay, ``total_steps - decay_steps <= step < total_steps``: linear from ``max_lr`` down
      towards ``min_lr``: with ``t = (step - (total_steps - decay_steps)) / decay_steps``,
      ``min_lr + (max_lr - min_lr) * (1 - t)``;
    - after, ``step >= total_steps``: ``min_lr``.

    Return a Python float. Example, ``max_lr=1.0, min_lr=0.0, warmup_steps=2, total_steps=10,
    decay_steps=4``: steps 0..10 give ``0, 0.5, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0``.
    """
    raise NotImplementedError


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the gradients of ``parameters`` in place by their global norm; return the norm before.

    Shu 3 wrote the 2-norm. Here any ``norm_type`` (``2.0``, ``1.0``, ``3.0``, ``float("inf")``):

    1. keep only the parameters whose ``.grad`` is not ``None`` (``parameters`` may be a
       generator: turn it into a list first); with none, return ``torch.tensor(0.0)``;
    2. the **global** norm, as if all gradients were one long vector: for a finite ``p``,
       ``(sum over every gradient element of |g| ** p) ** (1 / p)``; for ``inf``, the largest
       ``|g|`` of all. (``torch.linalg.vector_norm`` of each gradient, then of those norms,
       gives the same);
    3. if ``max_norm / (norm + 1e-6)`` is below 1, multiply every gradient by it, in place
       (``p.grad.mul_(...)``); otherwise leave them as they are;
    4. return the norm of step 2 (the norm *before* clipping), as a tensor.

    The result must equal ``torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type)``,
    returned norm and clipped gradients both (the checker compares them; do not call it).
    """
    raise NotImplementedError


def mfu(tokens_per_second: float, cfg, peak_flops: float) -> float:
    """Model FLOPs utilisation of a GPT training run: the share of the hardware's peak it uses.

    ``cfg`` has ``vocab_size``, ``context_length``, ``emb_dim`` and ``n_layers`` (a ``GPTConfig``).
    With ``d = emb_dim``, ``L = n_layers``, ``T = context_length``:

    1. ``N``, the weights that multiply every token: ``12 * L * d * d`` in the blocks (attention
       ``4 d²``, feed-forward ``8 d²``) plus the output head's ``vocab_size * d``;
    2. FLOPs per token, forward: ``2 * N + 4 * L * T * d`` (a multiply-add is 2 FLOPs; the
       second term is attention's scores and weighted sum); training is forward + backward,
       **three times** that;
    3. return ``tokens_per_second * flops_per_token / peak_flops``, a float (0.4 means 40 %).

    Example: ``d = 64, L = 2, T = 64, vocab_size = 256``: N = 114,688, FLOPs per token
    3 * (229,376 + 32,768) = 786,432; at 1,000 tokens/s on a 1e9 FLOP/s peak, MFU = 0.786432.
    """
    raise NotImplementedError


def rank_window_starts(num_tokens: int, context_length: int, rank: int, world_size: int) -> list[int]:
    """Where rank ``rank`` of ``world_size`` processes reads its validation windows in one shard.

    A shard of ``num_tokens`` tokens is read in order, in non-overlapping windows: a window
    starting at ``s`` holds the inputs ``tokens[s : s + context_length]`` and the targets
    ``tokens[s + 1 : s + context_length + 1]``, so it needs ``context_length + 1`` tokens, and the
    next window starts ``context_length`` later. The windows start at ``0, context_length,
    2 * context_length, ...`` for as long as ``s + context_length + 1 <= num_tokens``.

    Under data parallelism every process must read *different* windows, and every process must
    read the *same number* of them (each batch ends in an all-reduce, which waits for all
    processes: one process with a batch more would wait for ever). So with ``n`` windows, each rank
    gets ``n // world_size`` of them, and the last ``n % world_size`` windows are left out. Rank
    ``r`` takes windows number ``r, r + world_size, r + 2 * world_size, ...`` (counting from 0).
    Return rank ``rank``'s start positions, in increasing order (a list of ints; empty if the
    shard is too short or there are fewer windows than ranks).

    Example: ``num_tokens=20, context_length=4``: windows start at ``0, 4, 8, 12`` (16 would
    need token 20). With ``world_size=2``, rank 0 reads ``[0, 8]`` and rank 1 ``[4, 12]``; with
    ``world_size=3``, ranks 0, 1, 2 read ``[0]``, ``[4]``, ``[8]`` (12 is left out).
    """
    raise NotImplementedError


def decay_param_names(model: nn.Module) -> set[str]:
    """The names of the parameters that get weight decay in a GPT (``model.named_parameters()``).

    AdamW's weight decay pulls weights towards 0. Production recipes give it only to the
    **weight matrices of the linear layers** (the ``weight`` of every ``nn.Linear``): those are
    the weights that multiply activations and can grow to over-fit. Not to:

    - biases, and the scale and shift of layer norms: few numbers each, that set offsets and
      scales; pulling them towards 0 only fights the normalisation;
    - embeddings (token and position tables): a row gets a gradient only when its token is in the
      batch, so decay would shrink rare tokens' rows step after step while they learn nothing.

    Walk ``model.named_modules()``; for each ``nn.Linear`` the name of its weight is
    ``module_name + ".weight"``. Return the set of those names. When the output head shares its
    matrix with the token embedding (``model.out_head.weight is model.tok_emb.weight``), that
    tensor is an embedding: leave it out.
    """
    raise NotImplementedError
