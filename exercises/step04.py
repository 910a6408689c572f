"""Step 4 — Ha exercises. Replace each ``raise NotImplementedError`` with your code.

Check your work from the notebook (``check(4)``) or from a terminal::

    course check 4

Each function's docstring says what it must do. You may use anything from ``torch`` and the
standard library; the point is to write the logic yourself, so do not call
``torch.nn.functional.layer_norm``, ``torch.nn.LayerNorm`` or ``course_lib`` (the checker
compares your answers with independent references).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Layer normalisation over the last dimension of ``x``, written out by hand.

    For every vector along the last dimension:

    1. subtract its mean;
    2. divide by ``sqrt(variance + eps)``, where the variance is the *biased* one
       (the mean of the squared deviations: divide by n, not n - 1);
    3. multiply by ``weight`` (the scale) and add ``bias`` (the shift), both of shape ``[n]``.

    Shapes: ``x`` is ``[..., n]``; the result has the same shape.
    Example: ``layer_norm(torch.tensor([[1., 3.]]), torch.ones(2), torch.zeros(2), eps=0.0)``
    is ``[[-1., 1.]]``.
    """
    raise NotImplementedError


def block_parameter_count(emb_dim: int, qkv_bias: bool = True, hidden_dim: int | None = None) -> int:
    """The number of parameters in one GPT-2 transformer block.

    The block holds:

    - two LayerNorms, each with a scale and a shift vector of ``emb_dim``;
    - attention: query, key and value projections (``emb_dim x emb_dim`` each, plus a bias of
      ``emb_dim`` each only if ``qkv_bias``) and an output projection (``emb_dim x emb_dim``
      plus a bias of ``emb_dim``, always);
    - a feed-forward network ``emb_dim -> hidden_dim -> emb_dim`` whose two linear layers both
      have biases; ``hidden_dim`` defaults to ``4 * emb_dim``.

    Example: a GPT-2 small block (``emb_dim=768``, ``qkv_bias=True``) has 7,087,872 parameters.
    """
    raise NotImplementedError


def transformer_block_forward(x: torch.Tensor, norm1: Callable, attention: Callable, norm2: Callable,
                              feed_forward: Callable, dropout: Callable | None = None) -> torch.Tensor:
    """Run one pre-norm transformer block with shortcut connections.

    The four callables each map ``[batch, tokens, emb_dim]`` to the same shape. Apply, in order:

    1. a shortcut around attention: ``x + dropout(attention(norm1(x)))``;
    2. a shortcut around the feed-forward network, on the result of step 1:
       ``x + dropout(feed_forward(norm2(x)))``.

    ``dropout`` defaults to doing nothing. The norms come *before* each sub-layer (pre-norm,
    as in GPT-2), and what is added back is the un-normalised input.
    """
    raise NotImplementedError


def generate_greedy(model: Callable, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """Greedy generation: append ``max_new_tokens`` tokens to ``idx``, one at a time.

    ``model`` maps ids ``[batch, tokens]`` to logits ``[batch, tokens, vocab]``. In each step:

    1. crop to the last ``context_size`` tokens (the model cannot read more);
    2. run the model (inside ``torch.no_grad()``: no training here);
    3. take the logits of the *last* position and pick the id with the largest logit;
    4. append it to ``idx`` (``torch.cat`` along the token dimension).

    Return ``[batch, tokens + max_new_tokens]``: the prompt followed by the new ids. Do not change
    the tensor you were given.
    """
    raise NotImplementedError
