"""Step 9 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(9)``) or from a terminal::

    course check 9

Each function's docstring says what it must do. You may use ``torch`` and the standard library
(``math``), but not ``course_lib``: the point is to write the logic yourself (the checker
compares your answers with independent references: values worked out by hand, ``F.linear``,
and the library's ``LoRALinear``, ``add_lora``, ``merge_lora`` and ``save_adapter``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """The factor an adapter's product is multiplied by: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.

    Shu 3: with AdamW the change of the layer is proportional to ``scale * lr``, so the scale
    decides how a learning rate carries over from one rank to another. Return a Python float.

    Examples: ``lora_scale(8, 16) == 2.0``; ``lora_scale(16, 16) == 1.0``;
    ``lora_scale(4, 8, rslora=True) == 4.0`` (``8 / sqrt(4)``).
    """
    raise NotImplementedError


def lora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, scale: float) -> torch.Tensor:
    """The output of a linear layer with a LoRA adapter: ``x W^T + b + scale * (x A^T) B^T``.

    Shapes: ``x [..., in]`` (any number of leading dimensions), ``weight [out, in]``,
    ``bias [out]`` or ``None`` (no bias), ``A [r, in]``, ``B [out, r]``. Returns ``[..., out]``.

    Do not form the ``[out, in]`` product ``B @ A``: multiply ``x`` by ``A^T`` first (``[..., r]``,
    cheap because ``r`` is small), then by ``B^T``. (``torch.nn.functional.linear`` computes
    ``x W^T + b``.)
    """
    raise NotImplementedError


def lora_parameter_count(cfg, rank: int, targets: Sequence[str]) -> int:
    """How many parameters train when a GPT gets LoRA adapters of rank ``rank`` on ``targets``.

    ``cfg`` has ``emb_dim`` (``d``), ``n_layers`` and ``vocab_size``. ``targets`` is a list of
    distinct names among these layers, each an ``nn.Linear`` ``in -> out``:

    - in every block: ``"W_query"``, ``"W_key"``, ``"W_value"``, ``"out_proj"`` (``d -> d``),
      ``"ff.layers.0"`` (``d -> 4d``), ``"ff.layers.2"`` (``4d -> d``);
    - once: ``"out_head"`` (``d -> vocab_size``).

    An adapter on a layer ``in -> out`` holds ``A [r, in]`` and ``B [out, r]``: ``r * (in + out)``
    numbers. Everything else is frozen. Return the total, an int (what ``add_lora(GPTModel(cfg),
    rank, alpha, targets).trainable`` reports).

    Example: ``d = 64``, ``n_layers = 2``, rank 8, the four attention projections:
    ``2 blocks * 4 layers * 8 * (64 + 64) = 8,192``.
    """
    raise NotImplementedError


def merge_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The merged weight ``W + scale * B @ A`` (``[out, in]``), as a new tensor.

    Shu 7: after merging, the layer computes ``x W_merged^T + b``, the base layer's cost, and
    the same outputs as the base layer plus its adapter. Leave ``weight`` unchanged (no in-place
    ``+=`` on it), so that the base weight can be restored.
    """
    raise NotImplementedError


def fuse_qkv(A_q: torch.Tensor, B_q: torch.Tensor, A_k: torch.Tensor, B_k: torch.Tensor, A_v: torch.Tensor,
             B_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter for GPT-2's fused ``c_attn`` from three query/key/value adapters of the same scale.

    GPT-2 computes ``[q | k | v]`` with one ``[d -> 3d]`` layer; our model has three ``d -> d`` layers,
    each with an adapter ``A_* [r, d]``, ``B_* [d, r]`` (the three ranks may differ: ``r_q``,
    ``r_k``, ``r_v``). Return ``(A_c, B_c)``:

    - ``A_c [r_q + r_k + r_v, d]``: the three A's stacked, query first (``torch.cat``);
    - ``B_c [3d, r_q + r_k + r_v]``: zeros, with ``B_q`` in rows ``0:d`` and columns ``0:r_q``,
      ``B_k`` in rows ``d:2d`` and the next ``r_k`` columns, ``B_v`` in rows ``2d:3d`` and the
      last ``r_v`` columns (a block diagonal).

    Then ``B_c @ A_c`` is ``[B_q A_q; B_k A_k; B_v A_v]`` stacked, exactly: each part's own update.
    (This is what ``save_adapter`` writes for PEFT, with the rank ``3r`` and alpha set so that the
    scale is unchanged.) Use the dtype and device of ``A_q``.
    """
    raise NotImplementedError
