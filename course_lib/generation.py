"""Step 4 — turning a GPT's logits into text, one token at a time.

* :func:`generate_text_simple` — greedy decoding: feed the ids, take the most likely
  next token, append it, repeat. The context is cropped to the model's last
  ``context_size`` tokens, so generation can run past the context length.
* :func:`text_to_token_ids` / :func:`token_ids_to_text` — a string to a ``[1, tokens]``
  batch of ids and back, with GPT-2's tokenizer unless another is given.

Choices worth knowing:

* Generation runs under ``torch.no_grad()`` and in ``eval()`` mode (dropout off), then
  puts the model back in the mode it was in: greedy decoding is deterministic, and a
  model in the middle of training can be sampled without side effects.
* The ids are moved to the model's device, so ``text_to_token_ids(...)`` (on the CPU)
  can be passed straight to a model on a GPU; the result lives on the model's device.
* ``<|endoftext|>`` in a prompt is read as GPT-2's special token (id 50256), as in the
  training data of step 2.
* Logits that are NaN or inf are an error naming the step: a diverged model would
  otherwise "choose" token 0 again and again.

Sampling (temperature, top-k, top-p), the KV cache and fast decoding are step 5's, in
:mod:`course_lib.inference`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .checks import integer, non_negative_int, positive_int
from .model import _ID_DTYPES

__all__ = ["generate_text_simple", "text_to_token_ids", "token_ids_to_text"]


def _default_tokenizer():
    from .tokenizers import tiktoken_gpt2  # step 2; imported late to keep this module light
    return tiktoken_gpt2()


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    return None


def _check_ids(idx, name: str = "idx") -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids with shape [batch, tokens], got "
                        f"{type(idx).__name__}; text_to_token_ids(text) makes one")
    if idx.dtype not in _ID_DTYPES:  # uint8 and friends would also wrap the generated ids around
        small = "" if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool else \
            " (too small for a vocabulary: ids above its maximum wrap around)"
        raise TypeError(f"{name} must hold integer token ids of dtype torch.long (or int32), got {idx.dtype}"
                        f"{small}; use {name}.long()")
    if idx.ndim != 2:
        hint = f" add a batch dimension with {name}.unsqueeze(0)" if idx.ndim == 1 else ""
        raise ValueError(f"{name} must have shape [batch, tokens], got {tuple(idx.shape)};{hint}")
    if idx.shape[1] == 0:
        raise ValueError(f"{name} has no tokens; give the model a prompt of at least one token")


def _check_logits(logits: torch.Tensor, where: str) -> None:
    """Refuse next-token logits ``[batch, vocab]`` that no token can be chosen from: NaN or
    ``+inf`` anywhere, or a row that is all ``-inf`` (``-inf`` alone just rules a token out)."""
    if bool(torch.isfinite(logits.sum())):  # the usual case, in one reduction: NaN and inf carry into a sum
        return
    bad_rows = (logits.isnan() | logits.isposinf()).any(dim=-1) | logits.isneginf().all(dim=-1)  # [B]
    if bool(bad_rows.any()):
        rows = bad_rows.nonzero().flatten().tolist()
        raise ValueError(f"{where}: the model's logits are not finite (NaN or inf) for batch row(s) {rows[:5]}, "
                         "so no next token can be chosen. The model has most likely diverged (NaN weights "
                         "after a training step blew up, e.g. too high a learning rate): check "
                         "all(p.isfinite().all() for p in model.parameters()) and reload a good checkpoint")


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
                         context_size: int | None = None) -> torch.Tensor:
    """Extend ``idx`` by ``max_new_tokens`` tokens, always choosing the most likely one (greedy).

    Each step feeds the last ``context_size`` tokens to the model, takes the logits of the
    last position, and appends their ``argmax``.

    Args:
        model: maps ``[batch, tokens]`` ids to ``[batch, tokens, vocab]`` logits
            (e.g. :class:`~course_lib.model.GPTModel`).
        idx: the prompt, ``[batch, tokens]`` integer ids.
        max_new_tokens: how many tokens to add (0 returns ``idx`` unchanged).
        context_size: the most tokens the model sees at once; default the model's
            ``cfg.context_length`` (required for models without a ``cfg``).

    Returns:
        ``[batch, tokens + max_new_tokens]`` ids on the model's device: the prompt, then the
        generated tokens.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``idx`` not a tensor of
            ``torch.long`` (or ``torch.int32``) ids.
        ValueError: ``idx`` not 2-D or empty, ``max_new_tokens`` negative, ``context_size``
            not a positive integer (or missing for a model without ``cfg``), a model
            output that is not ``[batch, tokens, vocab]``, or logits that are NaN or inf
            (a diverged model; the message names the step).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. GPTModel), got {type(model).__name__}")
    _check_ids(idx)
    non_negative_int("max_new_tokens", max_new_tokens)
    if context_size is None:
        cfg = getattr(model, "cfg", None)
        context_size = getattr(cfg, "context_length", None)
        if context_size is None:
            raise ValueError("context_size is required for a model without cfg.context_length; "
                             "pass the longest sequence the model accepts")
    positive_int("context_size", context_size)

    device = _model_device(model)
    if device is not None:
        idx = idx.to(device)
    was_training = model.training
    model.eval()  # no dropout: the same prompt always gives the same continuation
    try:
        with torch.no_grad():
            for step in range(max_new_tokens):
                idx_cond = idx[:, -context_size:]               # [B, <=context_size]
                logits = model(idx_cond)                        # [B, T, V]
                if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
                    raise ValueError("the model must return logits of shape [batch, tokens, vocab], got "
                                     f"{getattr(logits, 'shape', type(logits).__name__)}")
                _check_logits(logits[:, -1, :], f"generate_text_simple, new token {step + 1} of {max_new_tokens}")
                next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # [B, 1]: most likely next token
                idx = torch.cat([idx, next_id.to(idx.dtype)], dim=1)     # [B, T+1]
    finally:
        model.train(was_training)
    return idx


def text_to_token_ids(text: str, tokenizer: Any = None) -> torch.Tensor:
    """Encode ``text`` as a batch of one: ``[1, tokens]`` ``torch.long`` ids.

    Args:
        text: the text; ``<|endoftext|>`` is read as the special token where the tokenizer
            supports it.
        tokenizer: anything with ``encode`` (tiktoken's ``Encoding``, the tokenizers of
            step 2); default GPT-2's (:func:`course_lib.tokenizers.tiktoken_gpt2`).

    Raises:
        TypeError: ``text`` is not a string, ``tokenizer`` is not a tokenizer object with
            an ``encode`` method (a name such as ``"gpt2"`` is refused), or its ``encode``
            returned ids that are not integers (``1.7`` is refused, never truncated to 1).
    """
    from .text_data import encode_text  # step 2: handles allowed_special for every tokenizer kind

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = encode_text(text, _default_tokenizer() if tokenizer is None else tokenizer)
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)   # [1, T]


def token_ids_to_text(ids: torch.Tensor | list[int], tokenizer: Any = None) -> str:
    """Decode token ids back to a string.

    Args:
        ids: ``[1, tokens]`` (a batch of one, as :func:`generate_text_simple` returns for one
            prompt), ``[tokens]``, or a list of ints.
        tokenizer: anything with ``decode``; default GPT-2's.

    Raises:
        TypeError: ``ids`` is not a tensor or list of integers (NumPy integers are fine; a float
            or bool id is refused), or ``tokenizer`` is not a tokenizer object with a ``decode`` method.
        ValueError: a batch of more than one row (decode ``ids[i]`` for each row), more
            than two dimensions, or an id outside the tokenizer's vocabulary (below 0 or
            from its ``n_vocab`` up; the message names the id).
    """
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids must be integer token ids, got dtype {ids.dtype}")
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"ids is a batch of {ids.shape[0]} sequences; decode one at a time, "
                                 "e.g. [token_ids_to_text(row) for row in ids]")
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(f"ids must have shape [1, tokens] or [tokens], got {tuple(ids.shape)}")
        flat = ids.tolist()
    elif isinstance(ids, (list, tuple)):
        flat = list(ids)
        if not {*map(type, flat)} <= {int}:  # NumPy integers are fine; floats and bools are not token ids
            flat = [integer(f"ids[{k}]", i, hint="; ids must be a list of int token ids") for k, i in enumerate(flat)]
    else:
        raise TypeError(f"ids must be a tensor or a list of token ids, got {type(ids).__name__}")
    from .text_data import _tokenizer_method  # step 2, as in text_to_token_ids

    tokenizer = _default_tokenizer() if tokenizer is None else tokenizer
    decode = _tokenizer_method(tokenizer, "decode")
    n_vocab = getattr(tokenizer, "n_vocab", None)  # tiktoken's and ours: largest id + 1
    hint = ("decode with the tokenizer that made the ids (a model whose vocab_size is larger than its "
            "tokenizer's can generate ids the tokenizer does not have)")
    if isinstance(n_vocab, int) and not isinstance(n_vocab, bool):
        bad = next((i for i in flat if not 0 <= i < n_vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is not in the tokenizer's vocabulary of {n_vocab} ids "
                             f"(0 to {n_vocab - 1}); {hint}")
    try:
        return decode(flat)
    except (KeyError, IndexError, OverflowError) as err:  # tiktoken: KeyError, OverflowError
        raise ValueError(f"ids could not be decoded ({type(err).__name__}: {err}); {hint}") from None
