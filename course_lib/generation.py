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

Step 5 adds:

* :func:`generate` — the full decoder: greedy or sampled (temperature, top-k, top-p), an
  end-of-text stop, and a KV cache (``use_cache=True``, the default).
* :func:`top_k_filter`, :func:`top_p_filter`, :func:`sample_next_token` — the sampling
  steps on their own, for the notebook and for anyone building a decoder.

Choices worth knowing (``generate``):

* **Temperature 0 means greedy** (``argmax``; ``top_k``/``top_p`` then change nothing).
  Otherwise the logits are divided by the temperature, filtered by top-k and then top-p
  (in that order), and the next token is drawn from the softmax with ``torch.multinomial``
  — from PyTorch's global generator (``torch.manual_seed`` makes it repeat) or from
  ``generator=``. A tiny temperature (``1e-45``) approaches greedy decoding instead of
  overflowing (see :func:`sample_next_token`).
* **Logits that are NaN or inf are an error** naming the step, in both decoders: a
  diverged model would otherwise "choose" token 0 again and again.
* **Top-k keeps ties**: every token whose logit equals the k-th largest survives.
  **Top-p** keeps the smallest set of most likely tokens whose probabilities add up to at
  least ``top_p`` (always at least the most likely one).
* **The KV cache** (:class:`~course_lib.attention.KVCache`) is allocated once per call
  for ``min(context_size, prompt + max_new_tokens)`` positions, so nothing carries over
  from one prompt to the next. Models without ``new_kv_cache`` are run without it.
* **Past the context length** the cache cannot be reused: the model's positions are
  absolute (learned per position), so when the window slides by one token every cached key
  belongs to a different position. ``generate`` then does what ``generate_text_simple``
  does — re-encodes the last ``context_size`` tokens for each new token — which keeps the
  output identical with and without the cache, at the speed of no cache beyond that point.
* **End of text**: with ``eos_id``, a sequence that produces it stops; in a batch the
  finished rows are padded with ``eos_id`` until every row has finished (or
  ``max_new_tokens`` is reached). The ``eos_id`` token is kept in the output.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .model import _ID_DTYPES

__all__ = ["generate_text_simple", "text_to_token_ids", "token_ids_to_text", "generate", "top_k_filter",
           "top_p_filter", "sample_next_token"]


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


# --------------------------------------------------------------------------- #
# Step 5 — sampling
# --------------------------------------------------------------------------- #
def _check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0 \
            or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy, 1 = the model's own "
                         f"distribution), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None (no limit) or an integer >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a probability in (0, 1] (e.g. 0.9), got {top_p!r}")


def _check_logits_tensor(logits, name: str = "logits", two_d: bool = False) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = f"dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"{name} must be a float tensor [..., vocab], got {got}; e.g. torch.tensor([1., 3., 2.])")
    if two_d and logits.ndim not in (1, 2):
        raise ValueError(f"{name} must be [batch, vocab] (the last position's logits, logits[:, -1, :]), "
                         f"got shape {tuple(logits.shape)}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits in each row, set the others to ``-inf``.

    Shape: ``[..., vocab]`` -> same. Ties with the k-th largest value are kept.

    Raises:
        ValueError: ``k`` not an integer >= 1 (a ``k`` above the vocabulary keeps everything).
        TypeError: ``logits`` not a float tensor.
    """
    _check_sampling(1.0, k, None)
    _check_logits_tensor(logits)
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]          # [..., 1]: the k-th largest
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probabilities reach ``p``.

    In each row the tokens are sorted by probability; a token is kept if the probability of
    the tokens *before* it adds up to less than ``p`` (so the most likely token always stays).

    Shape: ``[..., vocab]`` -> same, with the dropped logits set to ``-inf``.

    Raises:
        ValueError: ``p`` outside ``(0, 1]``.
        TypeError: ``logits`` not a float tensor.
    """
    _check_sampling(1.0, None, p)
    _check_logits_tensor(logits)
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = probs.cumsum(dim=-1) - probs                           # mass of the tokens ranked above
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the next token from the last position's logits ``[batch, vocab]`` -> ``[batch, 1]``.

    ``temperature == 0`` is ``argmax``; otherwise scale by ``1/temperature``, apply
    :func:`top_k_filter` and :func:`top_p_filter`, and draw from the softmax. ``-inf``
    logits rule tokens out.

    The scaling is ``(logits - max) / temperature`` in float32 (the same softmax), so a tiny
    temperature cannot overflow: it approaches greedy decoding, with exact ties drawn
    uniformly. Temperatures below float32's smallest normal number (about ``1.2e-38``)
    are raised to it, which is already greedy in effect.

    Raises:
        ValueError: ``temperature < 0``, ``top_k < 1`` or ``top_p`` outside ``(0, 1]``;
            logits not ``[batch, vocab]``, with NaN or ``+inf``, or a row of only ``-inf``
            (a diverged model).
        TypeError: ``logits`` not a float tensor, ``generator`` not a ``torch.Generator``.
    """
    _check_sampling(temperature, top_k, top_p)
    _check_generator(generator)
    _check_logits_tensor(logits, two_d=True)
    _check_logits(logits, "sample_next_token")
    return _sample(logits, temperature, top_k, top_p, generator)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
                        f"got {type(generator).__name__}; to seed PyTorch's global generator call torch.manual_seed")


def _sample(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    temperature = max(float(temperature), torch.finfo(torch.float32).tiny)
    # Shifted so that the largest is 0: dividing by a tiny temperature then gives 0 and
    # -huge (or -inf), never +inf, whose softmax would be NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # [B, 1]


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend ``idx`` by up to ``max_new_tokens`` tokens, greedily or by sampling.

    Args:
        model: maps ``[batch, tokens]`` ids to ``[batch, tokens, vocab]`` logits; a
            :class:`~course_lib.model.GPTModel` (anything with ``new_kv_cache``) uses the
            KV cache.
        idx: the prompt, ``[batch, tokens]`` integer ids.
        max_new_tokens: the most tokens to add.
        context_size: the most tokens the model sees at once; default ``cfg.context_length``.
        temperature: 0 (default) picks the most likely token; above 0, sample from
            ``softmax(logits / temperature)`` — below 1 sharper, above 1 flatter.
        top_k: sample only among the ``k`` most likely tokens. Default ``None``.
        top_p: sample only among the most likely tokens that together reach probability
            ``top_p``. Default ``None``.
        eos_id: stop a sequence when it produces this id (e.g. 50256, ``<|endoftext|>``).
        use_cache: keep keys and values between steps (see the module docstring). The
            output is the same either way; the cache is faster.
        generator: a ``torch.Generator`` for the samples; default PyTorch's global one.

    Returns:
        ``[batch, tokens + n]`` ids on the model's device, ``n <= max_new_tokens`` (fewer when
        every sequence met ``eos_id``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``idx`` not a tensor of ``torch.long``
            (or ``torch.int32``) ids, ``use_cache`` not a bool or ``generator`` not a
            ``torch.Generator``.
        ValueError: ``temperature < 0``, ``top_k < 1``, ``top_p`` outside ``(0, 1]``, a negative
            ``max_new_tokens``, a bad ``context_size`` or ``eos_id``, ``idx`` not 2-D, or
            logits that are NaN or inf (a diverged model; the message names the step).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. GPTModel), got {type(model).__name__}")
    _check_ids(idx)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    _check_generator(generator)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be True or False, got {use_cache!r}")
    cfg = getattr(model, "cfg", None)
    model_context = getattr(cfg, "context_length", None)
    if context_size is None:
        context_size = model_context
        if context_size is None:
            raise ValueError("context_size is required for a model without cfg.context_length; "
                             "pass the longest sequence the model accepts")
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise ValueError(f"context_size must be a positive integer, got {context_size!r}")
    if model_context is not None and context_size > model_context:
        raise ValueError(f"context_size ({context_size}) is larger than the model's context_length "
                         f"({model_context}); leave it out or lower it")
    vocab = getattr(cfg, "vocab_size", None)
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0
                               or (vocab is not None and eos_id >= vocab)):
        raise ValueError(f"eos_id must be None or a token id in [0, {vocab or 'vocab_size'}), got {eos_id!r}")

    device = _model_device(model)
    if device is not None:
        idx = idx.to(device)
    cached = bool(use_cache) and callable(getattr(model, "new_kv_cache", None))
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = None
            for step in range(max_new_tokens):
                if cached and step == 0:          # prefill: the prompt's keys and values, once
                    window = idx[:, -context_size:]
                    cache = model.new_kv_cache(idx.shape[0], min(context_size, window.shape[1] + max_new_tokens))
                    logits = model(window, kv_cache=cache)
                elif cache is not None and cache.pos < cache.max_len:
                    logits = model(idx[:, -1:], kv_cache=cache)  # only the newest token  [B, 1, V]
                else:                             # no cache, or the window slides: re-encode it
                    cache = None
                    logits = model(idx[:, -context_size:])
                if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
                    raise ValueError("the model must return logits of shape [batch, tokens, vocab], got "
                                     f"{getattr(logits, 'shape', type(logits).__name__)}")
                last = logits[:, -1, :]                                              # [B, V]
                _check_logits(last, f"generate, new token {step + 1} of {max_new_tokens}")
                next_id = _sample(last, temperature, top_k, top_p, generator)         # [B, 1]
                if eos_id is not None:
                    next_id = next_id.masked_fill(finished.unsqueeze(1), eos_id)  # finished rows: padding
                    finished |= next_id.squeeze(1) == eos_id
                idx = torch.cat([idx, next_id.to(idx.dtype)], dim=1)              # [B, T+1]
                if eos_id is not None and bool(finished.all()):
                    break
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
        TypeError: ``text`` is not a string, or ``tokenizer`` is not a tokenizer object with
            an ``encode`` method (a name such as ``"gpt2"`` is refused).
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
        TypeError: ``ids`` is not a tensor or list of integers, or ``tokenizer`` is not a
            tokenizer object with a ``decode`` method.
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
        if any(isinstance(i, bool) or not isinstance(i, int) for i in flat):
            raise TypeError("ids must be a list of int token ids")
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
