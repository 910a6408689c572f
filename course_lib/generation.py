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

Step 5 adds sampling with temperature, top-k and top-p, and a KV cache, in ``generate``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

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
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {idx.dtype}; use {name}.long()")
    if idx.ndim != 2:
        hint = f" add a batch dimension with {name}.unsqueeze(0)" if idx.ndim == 1 else ""
        raise ValueError(f"{name} must have shape [batch, tokens], got {tuple(idx.shape)};{hint}")
    if idx.shape[1] == 0:
        raise ValueError(f"{name} has no tokens; give the model a prompt of at least one token")


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
        TypeError: ``model`` is not an ``nn.Module``, or ``idx`` not an integer tensor.
        ValueError: ``idx`` not 2-D or empty, ``max_new_tokens`` negative, ``context_size``
            not a positive integer (or missing for a model without ``cfg``), or a model
            output that is not ``[batch, tokens, vocab]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. GPTModel), got {type(model).__name__}")
    _check_ids(idx)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if context_size is None:
        cfg = getattr(model, "cfg", None)
        context_size = getattr(cfg, "context_length", None)
        if context_size is None:
            raise ValueError("context_size is required for a model without cfg.context_length; "
                             "pass the longest sequence the model accepts")
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise ValueError(f"context_size must be a positive integer, got {context_size!r}")

    device = _model_device(model)
    if device is not None:
        idx = idx.to(device)
    was_training = model.training
    model.eval()  # no dropout: the same prompt always gives the same continuation
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                idx_cond = idx[:, -context_size:]               # [B, <=context_size]
                logits = model(idx_cond)                        # [B, T, V]
                if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
                    raise ValueError("the model must return logits of shape [batch, tokens, vocab], got "
                                     f"{getattr(logits, 'shape', type(logits).__name__)}")
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
        TypeError: ``text`` is not a string, or ``tokenizer`` has no ``encode`` method.
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
        TypeError: ``ids`` is not a tensor or list of integers, or ``tokenizer`` has no
            ``decode`` method.
        ValueError: a batch of more than one row (decode ``ids[i]`` for each row), or more
            than two dimensions.
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
        if any(isinstance(i, bool) or not isinstance(i, int) for i in flat):
            raise TypeError("ids must be a list of int token ids")
    else:
        raise TypeError(f"ids must be a tensor or a list of token ids, got {type(ids).__name__}")
    tokenizer = _default_tokenizer() if tokenizer is None else tokenizer
    decode = getattr(tokenizer, "decode", None)
    if not callable(decode):
        raise TypeError(f"tokenizer must have a decode(ids) method, got {type(tokenizer).__name__}")
    return decode(flat)
