"""Step 5 — making a trained model write fast: the KV cache, sampling and fast decoding.

* :class:`KVCache`, :func:`prefill`, :func:`decode_step` — keys and values kept between
  forward passes, so each new token costs one token's work; rows may hold different lengths.
* :func:`generate` — prefill, then one decode step per token, greedy or sampled.
* :func:`top_k_filter`, :func:`top_p_filter`, :func:`sample_next_token` — the sampling steps.
* :func:`fast_decoding`, :class:`Linear`, :func:`few_rows_linear`, :func:`few_rows_route` —
  a quicker CPU route for the few-row matrix products of decoding, with each attention
  layer's Q, K and V products fused into one (``benchmarks/README.md``, step 5).

Design: the model of step 4 knows nothing of this module. ``model(idx, kv_cache=cache)``
starts ``idx`` at ``cache.pos`` and each attention layer calls ``cache.update``; fast
decoding swaps the class of the model's ``nn.Linear`` layers while it is on and back
afterwards, so training always runs plain ``nn.Linear``. A server drives it as::

    model.eval(); fast_decoding(model)
    cache, logits = prefill(model, [ids_a, ids_b], max_len=256)
    while ...:
        next_ids = sample_next_token(logits, temperature=0.8)   # [B, 1]
        logits = decode_step(model, cache, next_ids)            # [B, vocab]
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import boolean, finite_number, non_negative_int, positive_int
from .generation import _check_ids, _check_logits, _model_device

__all__ = [
    "KVCache",
    "prefill",
    "decode_step",
    "generate",
    "top_k_filter",
    "top_p_filter",
    "sample_next_token",
    "fast_decoding",
    "Linear",
    "few_rows_linear",
    "few_rows_route",
    "FEW_ROWS",
    "FEW_ROWS_MIN_SIZE",
]


# --------------------------------------------------------------------------- #
# The KV cache: keys and values of earlier tokens, kept between calls
# --------------------------------------------------------------------------- #
class KVCache:
    """Preallocated keys and values for every attention layer of a model, row by row.

    Token ``t`` attends to the keys and values of tokens ``0..t``, and those of ``0..t-1``
    are the ones computed at the previous step: the cache keeps them, so each step computes
    queries, keys and values for the new tokens only.

    Every row has its own length (``lengths``). While the rows agree (one prompt, or prompts
    of one length) :attr:`pos` is an ``int`` and the attention uses its causal mask, as in
    training; once they differ :attr:`pos` is the ``[batch_size]`` tensor ``lengths``, each
    row takes its own positions and :meth:`update` returns a mask that hides every row's
    unused slots. So rows at different points of their text decode together, one forward
    pass per token for the whole batch: :func:`prefill` right-pads prompts of different
    lengths and crops each row back to its prompt (:meth:`crop`), and a later request
    joins a running batch in a free row (:meth:`load_row`).

    Args:
        n_layers, batch_size, num_heads, head_dim: the model's shape.
        max_len: the most positions a row holds (at most the model's context length).
        device, dtype: where and how the tensors live (match the model's).

    Attributes:
        keys, values: ``[n_layers, batch_size, num_heads, max_len, head_dim]``; row ``b`` of
            layer ``i`` is filled from the left up to ``lengths[b]``.
        lengths: ``[batch_size]`` ``torch.long``: the positions each row holds.

    Raises:
        ValueError: a size that is not a positive integer; (in :meth:`update`) more
            positions than ``max_len`` in a row, or keys of the wrong shape.
    """

    def __init__(self, n_layers: int, batch_size: int, num_heads: int, head_dim: int, max_len: int,
                 device=None, dtype: torch.dtype = torch.float32):
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size), ("num_heads", num_heads),
                            ("head_dim", head_dim), ("max_len", max_len)):
            positive_int(name, value)
        shape = (n_layers, batch_size, num_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)    # [L, B, H, max_len, D]
        self.values = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, H, max_len, D]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.keys.device)  # [B]
        self._pos: int | None = 0   # the rows' common length, None while they differ
        self._longest = 0           # the longest row, as a Python int (no device sync)
        self._where = None          # (rows, slots, mask) of the current forward pass, rows that differ

    @classmethod
    def for_model(cls, model: nn.Module, batch_size: int, max_len: int | None = None) -> "KVCache":
        """An empty cache for ``model`` (a :class:`~course_lib.model.GPTModel`: anything whose
        ``cfg`` gives ``n_layers``, ``n_heads``, ``head_dim`` and ``context_length``), on its
        device and in its dtype, for ``max_len`` positions (default and most: the context length).

        Raises:
            TypeError: ``model`` has no such ``cfg``.
            ValueError: ``batch_size`` or ``max_len`` out of range.
        """
        cfg = getattr(model, "cfg", None)
        if not _has_shape(cfg):
            raise TypeError(f"model must have a cfg with n_layers, n_heads, head_dim and context_length (a "
                            f"GPTModel), got {type(model).__name__}")
        max_len = cfg.context_length if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= cfg.context_length:
            raise ValueError(f"max_len must be an integer in [1, context_length={cfg.context_length}], got {max_len!r}")
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        return cls(cfg.n_layers, batch_size, cfg.n_heads, cfg.head_dim, max_len,
                   device=None if weight is None else weight.device,
                   dtype=torch.float32 if weight is None else weight.dtype)

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def pos(self) -> int | torch.Tensor:
        """Where the next tokens go: an ``int`` while every row holds the same number of
        positions, else ``lengths`` (``[batch_size]``)."""
        return self._pos if self._pos is not None else self.lengths

    def reset(self) -> None:
        """Forget every cached position (the next call starts at position 0; the memory is kept)."""
        self._set_lengths([0] * self.batch_size)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the keys and values ``[B, H, T, D]`` of ``T`` new tokens per row in slot ``layer``.

        Returns:
            ``(keys, values, mask)``: the keys and values of every position held,
            ``[B, H, S, D]`` (views, no copy), and ``None`` when all rows are at one position
            (the new tokens are the last ``T`` of the ``S``: the causal mask applies), else a
            boolean ``[B, 1, T, S]`` mask, ``True`` where a new token may look.
        """
        B, H, T, D = k.shape
        if (B, H, D) != (self.keys.shape[1], self.keys.shape[2], self.keys.shape[4]):
            raise ValueError(f"keys of shape {tuple(k.shape)} do not fit a cache built for batch "
                             f"{self.keys.shape[1]}, {self.keys.shape[2]} heads of {self.keys.shape[4]}")
        end = self._longest + T
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions and {self._longest} are filled, so "
                             f"{T} more do not fit; reset() it, or crop the sequence to the context length")
        if self._pos is not None:  # every row at the same position: one slice
            self.keys[layer, :, :, self._pos:end] = k
            self.values[layer, :, :, self._pos:end] = v
            return self.keys[layer, :, :, :end], self.values[layer, :, :, :end], None
        if self._where is None or self._where[1].shape[1] != T:  # once per forward pass, for every layer
            rows = torch.arange(B, device=k.device).view(B, 1)                   # [B, 1]
            slots = self.lengths.view(B, 1) + torch.arange(T, device=k.device)   # [B, T]: row b's new positions
            mask = torch.arange(end, device=k.device).view(1, 1, 1, end) <= slots.view(B, 1, T, 1)  # [B, 1, T, S]
            self._where = (rows, slots, mask)
        rows, slots, mask = self._where
        self.keys[layer][rows, :, slots] = k.transpose(1, 2)      # [B, T, H, D] into row b's own slots
        self.values[layer][rows, :, slots] = v.transpose(1, 2)
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end], mask

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more positions as filled in every row (the model calls this
        after its last layer).

        Raises:
            ValueError: ``num_tokens`` not an integer >= 0, or more than the cache has room for.
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0 \
                or self._longest + num_tokens > self.max_len:
            raise ValueError(f"num_tokens must be an integer in [0, {self.max_len - self._longest}] (the positions "
                             f"left in the cache), got {num_tokens!r}")
        self.lengths += num_tokens
        self._longest += num_tokens
        if self._pos is not None:
            self._pos += num_tokens
        self._where = None

    def crop(self, lengths: Sequence[int] | torch.Tensor) -> None:
        """Keep only the first ``lengths[b]`` positions of each row ``b`` (e.g. a prompt padded
        on the right: its padding is forgotten and overwritten by the next tokens).

        Raises:
            ValueError: not one length per row, or a length below 0 or above what the row holds.
        """
        new = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
        held = self.lengths.tolist()
        if len(new) != len(held) or any(isinstance(n, bool) or not isinstance(n, int) for n in new):
            raise ValueError(f"lengths must be {len(held)} integers, one per row, got {lengths!r}")
        for row, (n, h) in enumerate(zip(new, held)):
            if not 0 <= n <= h:
                raise ValueError(f"row {row} holds {h} positions, so it cannot be cropped to {n}; "
                                 f"give a length in [0, {h}]")
        self._set_lengths(new)

    def load_row(self, row: int, source: "KVCache", source_row: int = 0) -> None:
        """Copy row ``source_row`` of ``source`` (its keys, values and length) into ``row``:
        how a request prefilled on its own joins a batch that is already decoding.

        Raises:
            TypeError: ``source`` is not a :class:`KVCache`.
            ValueError: a row out of range, a cache of another shape, or a source row longer
                than ``max_len``.
        """
        if not isinstance(source, KVCache):
            raise TypeError(f"source must be a KVCache, got {type(source).__name__}")
        for name, value, size in (("row", row, self.batch_size), ("source_row", source_row, source.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
                raise ValueError(f"{name} must be an integer in [0, {size}), got {value!r}")
        mine, theirs = self.keys.shape, source.keys.shape
        if (mine[0], mine[2], mine[4]) != (theirs[0], theirs[2], theirs[4]):
            raise ValueError(f"source holds {theirs[0]} layers of {theirs[2]} heads of {theirs[4]}, "
                             f"this cache {mine[0]} of {mine[2]} of {mine[4]}: make both for the same model")
        n = int(source.lengths[source_row])
        if n > self.max_len:
            raise ValueError(f"source row {source_row} holds {n} positions, more than this cache's "
                             f"max_len={self.max_len}")
        self.keys[:, row, :, :n] = source.keys[:, source_row, :, :n]
        self.values[:, row, :, :n] = source.values[:, source_row, :, :n]
        lengths = self.lengths.tolist()
        lengths[row] = n
        self._set_lengths(lengths)

    def first_rows(self, n: int) -> "KVCache":
        """A cache over rows ``0..n-1`` of this one, sharing its memory (no copy): a server
        keeps its running requests in the first rows and decodes only those. What the view
        stores (keys, values, ``lengths``) lands in this cache; call :meth:`load_row` or
        :meth:`crop` here, or take a new view, after decoding through it.

        Raises:
            ValueError: ``n`` not an integer in ``[1, batch_size]``.
        """
        if not isinstance(n, numbers.Integral) or isinstance(n, (bool, np.bool_)) or not 1 <= n <= self.batch_size:
            raise ValueError(f"n must be an integer in [1, batch_size={self.batch_size}], got {n!r}")
        n = int(n)
        view = KVCache.__new__(KVCache)
        view.keys, view.values = self.keys[:, :n], self.values[:, :n]   # [L, n, H, max_len, D] views
        view.lengths = self.lengths[:n]                                  # a view: advance() updates ours
        lengths = view.lengths.tolist()
        view._longest = max(lengths)
        view._pos = lengths[0] if all(k == lengths[0] for k in lengths) else None
        view._where = None
        return view

    def _set_lengths(self, lengths: list[int]) -> None:
        self.lengths.copy_(torch.tensor(lengths, dtype=torch.long))
        self._longest = max(lengths)
        self._pos = lengths[0] if all(n == lengths[0] for n in lengths) else None
        self._where = None

    def __repr__(self) -> str:
        L, B, H, M, D = self.keys.shape
        filled = self._pos if self._pos is not None else self.lengths.tolist()
        return f"KVCache(layers={L}, batch={B}, heads={H}, head_dim={D}, filled={filled}/{M})"


def _has_shape(cfg) -> bool:
    return all(hasattr(cfg, name) for name in ("n_layers", "n_heads", "head_dim", "context_length"))


def _takes_cache(model: nn.Module) -> bool:
    """Whether ``model(idx, kv_cache=...)`` is supported: a ``cfg`` with the shape and a
    ``forward`` that takes ``kv_cache``."""
    if not _has_shape(getattr(model, "cfg", None)):
        return False
    try:
        return "kv_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- #
# Prefill and decode: the two phases, for a batch driven step by step
# --------------------------------------------------------------------------- #
def _last_logits(logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise ValueError("the model must return logits of shape [batch, tokens, vocab], got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    return logits[:, -1, :]


def _check_eval(model, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. GPTModel), got {type(model).__name__}")
    if model.training:
        raise ValueError(f"{where} needs the model in eval mode (dropout off); call model.eval() first")


def _prompt_ids(row: int, prompt) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool or prompt.ndim > 1:
            raise TypeError(f"prompt {row} must be a 1-D tensor of integer token ids, got {prompt.dtype} of shape "
                            f"{tuple(prompt.shape)}")
        return prompt.long()
    if not isinstance(prompt, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in prompt):
        raise TypeError(f"prompt {row} must be a 1-D tensor or a list of int token ids, got {type(prompt).__name__}")
    return torch.tensor(prompt, dtype=torch.long)


@torch.no_grad()
def prefill(model: nn.Module, prompts, max_len: int | None = None) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts through ``model`` once, keeping their keys and values.

    Args:
        model: a :class:`~course_lib.model.GPTModel` in ``eval()`` mode.
        prompts: ``[batch, tokens]`` ids, or a list of ``batch`` prompts of different
            lengths, each a 1-D tensor or a list of ids (right-padded for one forward pass;
            the padding is cropped from the cache).
        max_len: the positions each row of the cache holds, prompt and new tokens
            together; default and most: the model's context length.

    Returns:
        ``(cache, logits)``: a :class:`KVCache` whose row ``b`` holds prompt ``b``, and the
        logits of each prompt's last token, ``[batch, vocab]``.

    Raises:
        TypeError: ``model`` is not a module that takes a KV cache, ids of the wrong type.
        ValueError: the model in training mode, an empty prompt, a prompt longer than
            ``max_len``, or ids the model refuses.
    """
    _check_eval(model, "prefill")
    if not _takes_cache(model):
        raise TypeError(f"{type(model).__name__} does not take a KV cache (forward(idx, kv_cache=...) and a cfg "
                        "with its shape); use generate(..., use_cache=False)")
    device = _model_device(model)
    if isinstance(prompts, torch.Tensor):
        _check_ids(prompts, "prompts")
        ids, lengths = prompts.to(device), None
    else:
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError("prompts must be a [batch, tokens] tensor of ids or a non-empty list of prompts")
        rows = [_prompt_ids(b, p) for b, p in enumerate(prompts)]
        lengths = [row.numel() for row in rows]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} has no tokens; give every prompt at least one")
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)        # [B, longest], padded with id 0
        for b, row in enumerate(rows):
            ids[b, :row.numel()] = row
        ids = ids.to(device)
    cache = KVCache.for_model(model, ids.shape[0], max_len)
    if ids.shape[1] > cache.max_len:
        raise ValueError(f"a prompt of {ids.shape[1]} tokens does not fit a cache of max_len={cache.max_len}; "
                         "keep its last tokens or raise max_len")
    logits = model(ids, kv_cache=cache)                                     # [B, T, V]
    if lengths is None or len(set(lengths)) == 1:
        return cache, _last_logits(logits)
    cache.crop(lengths)                                                     # forget the padding
    last = torch.tensor(lengths, device=logits.device) - 1
    return cache, logits[torch.arange(len(lengths), device=logits.device), last]  # [B, V]


@torch.no_grad()
def decode_step(model: nn.Module, cache: KVCache, next_ids: torch.Tensor) -> torch.Tensor:
    """Feed one new token per row, ``next_ids`` ``[batch]`` or ``[batch, 1]``, after what
    ``cache`` holds (it stores their keys and values); return the logits of the token
    after each, ``[batch, vocab]``.

    Raises:
        TypeError: ``cache`` is not a :class:`KVCache`, ids of the wrong type.
        ValueError: the model in training mode, ids not one per row, a full row, a cache made for
            a model with another number of layers.
    """
    _check_eval(model, "decode_step")
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be the KVCache that prefill returned, got {type(cache).__name__}")
    if not isinstance(next_ids, torch.Tensor) or next_ids.numel() != cache.batch_size or next_ids.ndim > 2:
        got = tuple(next_ids.shape) if isinstance(next_ids, torch.Tensor) else type(next_ids).__name__
        raise ValueError(f"next_ids must be one token id per row, [{cache.batch_size}] or [{cache.batch_size}, 1], "
                         f"got {got}")
    layers = getattr(getattr(model, "cfg", None), "n_layers", None)
    if layers is not None and cache.keys.shape[0] != layers:
        raise ValueError(f"the cache was made for a model of {cache.keys.shape[0]} layers and this one has {layers}; "
                         "decode with the model that prefilled it (or KVCache.for_model(model, ...))")
    return _last_logits(model(next_ids.reshape(-1, 1), kv_cache=cache))   # [B, V]


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #
def _check_sampling(temperature, top_k, top_p) -> None:
    """NumPy numbers are numbers here too (``np.float32(0.7)``); ``bool`` is not."""
    finite_number("temperature", temperature, minimum=0,
                  hint=" (0 = greedy, 1 = the model's own distribution)")
    positive_int("top_k", top_k, allow_none=True, hint=" (None: no limit)")
    if top_p is not None and (not _real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a probability in (0, 1] (e.g. 0.9), got {top_p!r}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_logits_tensor(logits, name: str = "logits", two_d: bool = False) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = f"dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"{name} must be a float tensor [..., vocab], got {got}; e.g. torch.tensor([1., 3., 2.])")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a last dimension of one score per token [..., vocab], got shape "
                         f"{tuple(logits.shape)}")
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

    One :func:`prefill` over the prompt fills a new :class:`KVCache` for
    ``min(context_size, tokens + max_new_tokens)`` positions, then each new token is one
    :func:`decode_step`. Nothing carries over from one call to the next. A model runs with
    the cache when its ``forward`` takes ``kv_cache`` and its ``cfg`` gives the shape
    (``n_layers``, ``n_heads``, ``head_dim``, ``context_length``), as
    :class:`~course_lib.model.GPTModel` does; any other model, or ``use_cache=False``,
    re-encodes the last ``context_size`` tokens for each new token.

    Past the context length the cache cannot be reused (positions are absolute, so when
    the window slides every cached key belongs to another position): the last
    ``context_size`` tokens are then re-encoded for each new token, as
    :func:`~course_lib.generation.generate_text_simple` does. The output is the same with
    and without the cache.

    The model runs in ``eval()`` mode (its mode is restored afterwards), without gradients,
    and with :func:`fast_decoding` on for the call (a model switched on by hand stays on).

    Args:
        model: maps ``[batch, tokens]`` ids to ``[batch, tokens, vocab]`` logits.
        idx: the prompts, ``[batch, tokens]`` ids of dtype ``torch.long`` or ``torch.int32``;
            a prompt longer than ``context_size`` is cut to its last ``context_size`` tokens.
        max_new_tokens: the most tokens to add (0 returns ``idx``).
        context_size: the most tokens the model sees at once. Default: ``cfg.context_length``.
        temperature: 0 (default) is greedy: ``argmax``, and ``top_k``/``top_p`` change
            nothing. Above 0 the logits are divided by it (below 1 sharper, above 1 flatter),
            filtered by ``top_k`` then ``top_p`` (:func:`sample_next_token`), and the token is
            drawn with ``torch.multinomial``.
        top_k: sample only among the ``k`` largest logits, ties with the k-th kept
            (:func:`top_k_filter`). Default ``None``: no limit.
        top_p: sample only among the smallest set of most likely tokens whose probabilities
            reach ``top_p``, never fewer than one (:func:`top_p_filter`). Default ``None``.
        eos_id: the end-of-text id (e.g. 50256, ``<|endoftext|>``). A row that produces it
            stops, keeps it, and is padded with ``eos_id`` until every row has stopped.
            Default ``None``: always ``max_new_tokens`` tokens.
        use_cache: decode with a KV cache. Default ``True``.
        generator: the ``torch.Generator`` to sample from; default PyTorch's global one
            (``torch.manual_seed`` makes it repeat).

    Returns:
        ``[batch, tokens + n]`` ids, ``idx`` first, in ``idx``'s dtype on the model's device;
        ``n = max_new_tokens``, or fewer when every row has produced ``eos_id``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``idx`` not a tensor of ``torch.long``
            (or ``torch.int32``) ids, ``use_cache`` not a bool or ``generator`` not a
            ``torch.Generator``.
        ValueError: ``temperature < 0``, ``top_k < 1``, ``top_p`` outside ``(0, 1]``, a negative
            ``max_new_tokens``, a ``context_size`` above ``cfg.context_length`` (or missing
            for a model without a ``cfg``), an ``eos_id`` outside the vocabulary, ``idx`` not
            2-D, or logits that are NaN or inf (a diverged model; the message names the step).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. GPTModel), got {type(model).__name__}")
    _check_ids(idx)
    non_negative_int("max_new_tokens", max_new_tokens)
    _check_sampling(temperature, top_k, top_p)
    _check_generator(generator)
    boolean("use_cache", use_cache)
    cfg = getattr(model, "cfg", None)
    model_context = getattr(cfg, "context_length", None)
    if context_size is None:
        context_size = model_context
        if context_size is None:
            raise ValueError("context_size is required for a model without cfg.context_length; "
                             "pass the longest sequence the model accepts")
    positive_int("context_size", context_size)
    if model_context is not None and context_size > model_context:
        raise ValueError(f"context_size ({context_size}) is larger than the model's context_length "
                         f"({model_context}); leave it out or lower it")
    vocab = getattr(cfg, "vocab_size", None)
    if eos_id is not None and (not _real(eos_id) or not isinstance(eos_id, numbers.Integral) or eos_id < 0
                               or (vocab is not None and eos_id >= vocab)):
        raise ValueError(f"eos_id must be None or a token id in [0, {vocab or 'vocab_size'}), got {eos_id!r}")
    eos_id = None if eos_id is None else int(eos_id)

    device = _model_device(model)
    if device is not None:
        idx = idx.to(device)
    if max_new_tokens == 0:
        return idx
    B, start = idx.shape
    out = torch.empty(B, start + max_new_tokens, dtype=idx.dtype, device=idx.device)  # [B, T + new], filled below
    out[:, :start] = idx
    finished = torch.zeros(B, 1, dtype=torch.bool, device=idx.device) if eos_id is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _fast_decoding_during(model):
            window = idx[:, -context_size:]
            cache = None
            if use_cache and _takes_cache(model):   # prefill: the prompt's keys and values, once
                cache, logits = prefill(model, window, max_len=min(context_size, window.shape[1] + max_new_tokens))
            else:
                logits = _last_logits(model(window))                                # [B, V]
            end = start
            for step in range(max_new_tokens):
                _check_logits(logits, f"generate, new token {step + 1} of {max_new_tokens}")
                next_id = _sample(logits, temperature, top_k, top_p, generator)      # [B, 1]
                if finished is not None:
                    next_id = next_id.masked_fill(finished, eos_id)                 # finished rows: padding
                    finished |= next_id == eos_id
                out[:, end:end + 1] = next_id
                end += 1
                if end == out.shape[1] or (finished is not None and bool(finished.all())):
                    break
                if cache is not None and cache.pos < cache.max_len:
                    logits = _last_logits(model(next_id, kv_cache=cache))          # decode: the new token only
                else:                     # no cache, or the window slides: re-encode it
                    cache = None
                    logits = _last_logits(model(out[:, max(0, end - context_size):end]))
    finally:
        model.train(was_training)
    return out if end == out.shape[1] else out[:, :end].clone()


# --------------------------------------------------------------------------- #
# Fast decoding: nn.Linear with a quicker route for a few rows at a time (CPU)
# --------------------------------------------------------------------------- #
FEW_ROWS = 64
"""Inputs with at most this many rows take :func:`few_rows_linear` in :class:`Linear`, and
the fused query/key/value product of :func:`fast_decoding` (0 turns both off)."""
FEW_ROWS_MIN_SIZE = 2**18
"""... and weights of at least this many numbers (1 MB in float32): smaller matrices stay in
the CPU's cache, where the matrix-vector route is as fast."""


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    contiguous: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``weight @ x.T``, for inputs of a few rows.

    On CPU, PyTorch's BLAS (MKL on x86) runs a one-row product as a matrix-vector product
    that reads the weights at about half the speed of ``weight @ x.T`` with two or more
    columns. A single row is therefore duplicated (the time is in reading ``weight``), the
    product taken that way round, and the first column kept.

    Args:
        x: ``[..., in_features]``.
        weight: ``[out_features, in_features]``, as in ``nn.Linear``.
        bias: ``[out_features]`` or ``None``.
        contiguous: ``False``: return the product as computed, a transposed view (its last
            dimension has a stride of the number of rows) instead of copying it into
            ``F.linear``'s layout: for an output head, whose logits are only reduced over the
            vocabulary, the copy of ``[rows, vocab]`` is a sixth of a decode step. Default ``True``.

    Returns:
        ``[..., out_features]``, equal to ``F.linear(x, weight, bias)`` up to float rounding
        (the sums are taken in another order); contiguous unless ``contiguous=False``.
    """
    rows = x.numel() // x.shape[-1] if x.ndim and x.shape[-1] else 0
    if rows == 0 or x.shape[-1] != weight.shape[1]:
        return F.linear(x, weight, bias)      # nothing to gain; F.linear gives its usual errors
    x2 = x.reshape(rows, x.shape[-1])         # [N, in]
    if rows == 1:
        x2 = torch.cat([x2, x2])              # two columns: BLAS's matrix-matrix route
    y = (weight @ x2.t())[:, :rows].t()       # [out, N] -> [N, out]
    if bias is not None:
        y = y + bias
    return (y.contiguous() if contiguous else y).view(*x.shape[:-1], weight.shape[0])


def _plain_product_needed(x: torch.Tensor, params) -> bool:
    """Whether a product of ``x`` with ``params()`` must be ``nn.Linear``'s own: a gradient
    wanted, autocast on, or a ``torch.compile`` trace."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params())):
        return True
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda") or torch.compiler.is_compiling()


class Linear(nn.Linear):
    """``nn.Linear`` with :func:`few_rows_linear` for a few rows when no gradient is needed.

    Same arguments, parameters, ``state_dict``, ``repr`` and (to float rounding) results as
    ``nn.Linear``. The route is taken on CPU, in float32, for at most :data:`FEW_ROWS` rows,
    a weight of at least :data:`FEW_ROWS_MIN_SIZE` numbers and no gradient wanted;
    everything else — training, long inputs, small layers, GPUs, other dtypes, autocast,
    ``torch.compile`` — is ``nn.Linear.forward`` itself. :func:`fast_decoding` switches a
    model's ``nn.Linear`` layers to this class and back.

    Shape:
        x: ``[..., in_features]`` -> ``[..., out_features]``.

    Attributes:
        contiguous_output: ``few_rows_linear``'s ``contiguous`` (default ``True``);
            :func:`fast_decoding` sets it to ``False`` on a model's ``out_head``.
    """

    contiguous_output: bool = True

    def _takes_few_rows(self, x: torch.Tensor) -> bool:
        weight = self.weight
        return (0 < x.numel() <= FEW_ROWS * self.in_features and weight.numel() >= FEW_ROWS_MIN_SIZE
                and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
                and not _plain_product_needed(x, self.parameters))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and self._takes_few_rows(x):
            return few_rows_linear(x, self.weight, self.bias, self.contiguous_output)
        return super().forward(x)


# --------------------------------------------------------------------------- #
# Fast decoding: one product for an attention layer's queries, keys and values
# --------------------------------------------------------------------------- #
_QKV_NAMES = ("W_query", "W_key", "W_value")


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version   # tensors made under inference_mode keep no count


class _FusedQKV:
    """The query, key and value projections of one attention layer as one product.

    ``weight`` and ``bias`` are the three layers' concatenated (``[3 * d_out, d_in]`` and
    ``[3 * d_out]``): a copy, built on first use and rebuilt whenever one of the six
    parameters has been replaced, moved or changed in place since (its ``_version``). The
    first of the three layers called on an input computes all three outputs; the other two
    take theirs when called on the same tensor (unchanged since).
    """

    def __init__(self, parts: Sequence[nn.Linear]):
        self.parts = list(parts)
        self.sizes = [part.out_features for part in parts]
        self.clear()

    def clear(self) -> None:
        """Forget the fused weight and any outputs not yet taken."""
        self.weight = self.bias = None
        self._source: list[torch.Tensor] = []             # the parameters the fused copy was made of ...
        self._stamp: tuple = ()                           # ... and their (_version, data_ptr) then
        self._x, self._x_version, self._pending = None, None, [None] * len(self.parts)

    def _params(self) -> list[torch.Tensor]:
        return [part.weight for part in self.parts] + [part.bias for part in self.parts if part.bias is not None]

    def _fused(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        stamp = tuple((_version(p), p.data_ptr()) for p in params)
        if stamp != self._stamp or any(a is not b for a, b in zip(params, self._source)):
            self.weight = self.bias = None
            first = params[0]
            if len(params) not in (3, 6) or any(p.device != first.device or p.dtype != first.dtype for p in params):
                return None   # mixed biases, devices or dtypes: each layer on its own
            with torch.no_grad():
                self.weight = torch.cat([p.detach() for p in params[:3]])                       # [3 * d_out, d_in]
                self.bias = torch.cat([p.detach() for p in params[3:]]) if len(params) == 6 else None
            self._source, self._stamp = params, stamp
        return None if self.weight is None else (self.weight, self.bias)

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Layer ``index``'s output for ``x`` (``None``: let the layer compute it itself)."""
        if _plain_product_needed(x, self._params):
            return None
        pending = self._pending
        if x is self._x and pending[index] is not None and _version(x) == self._x_version:
            out, pending[index] = pending[index], None
            if all(p is None for p in pending):
                self._x = None
            return out
        fused = self._fused(self._params())
        if fused is None:
            return None
        weight, bias = fused
        if (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
                and weight.numel() >= FEW_ROWS_MIN_SIZE):
            y = few_rows_linear(x, weight, bias)                                   # [..., 3 * d_out]
        else:
            y = F.linear(x, weight, bias)
        outs = [part.contiguous() for part in y.split(self.sizes, dim=-1)]       # 3 x [..., d_out]
        out, outs[index] = outs[index], None
        self._x, self._x_version, self._pending = x, _version(x), outs
        return out


class _QKVLinear(Linear):
    """:class:`Linear` as one of an attention layer's ``W_query``, ``W_key``, ``W_value``:
    for at most :data:`FEW_ROWS` rows and no gradient wanted, the three are one product
    (:class:`_FusedQKV`, held in ``_qkv`` with this layer's index)."""

    _qkv: tuple[_FusedQKV, int]

    def _get_name(self) -> str:
        return "Linear"     # the same repr as nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and 0 < x.numel() <= FEW_ROWS * self.in_features:
            group, index = self._qkv
            out = group.output(index, x)
            if out is not None:
                return out
        return super().forward(x)


def _fusable(parts) -> bool:
    return (all(type(p) is nn.Linear for p in parts) and len({id(p) for p in parts}) == len(parts)
            and len({p.in_features for p in parts}) == 1 and len({p.bias is None for p in parts}) == 1)


def _switch_on(model: nn.Module) -> list[nn.Module]:
    """Switch ``model``'s Q/K/V triples to :class:`_QKVLinear` and its other ``nn.Linear``
    layers to :class:`Linear`; return the layers switched."""
    switched = []
    for module in model.modules():
        parts = [module._modules.get(name) for name in _QKV_NAMES]
        if _fusable(parts):
            group = _FusedQKV(parts)
            for index, part in enumerate(parts):
                part.__class__ = _QKVLinear
                part._qkv = (group, index)
            switched += parts
    for module in model.modules():
        if type(module) is nn.Linear:    # exactly nn.Linear: subclasses keep their forward
            module.__class__ = Linear
            switched.append(module)
    head = getattr(model, "out_head", None)
    for module in head.modules() if isinstance(head, nn.Module) else ():
        if type(module) is Linear:       # the head, or the base layer of a LoRA-adapted head
            module.contiguous_output = False
    return switched


def _switch_off(module: nn.Module) -> None:
    if type(module) is _QKVLinear:
        module._qkv[0].clear()
        del module._qkv
    module.__dict__.pop("contiguous_output", None)
    module.__class__ = nn.Linear


def fast_decoding(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch ``model``'s ``nn.Linear`` layers to :class:`Linear` (``enabled=False``: back).

    In place, like ``model.train()``, and returns ``model``. Parameters, ``state_dict``,
    ``repr`` and training are unchanged; inference gets faster:

    * every layer takes :func:`few_rows_linear` where :class:`Linear` says; the output head's
      logits come as a transposed view (not contiguous for more than one row: ``.contiguous()``
      them where a layout matters), which saves copying ``[rows, vocab]``;
    * the ``W_query``, ``W_key`` and ``W_value`` layers of each attention module (three
      ``nn.Linear`` of the same input width, all with a bias or none) become one product
      for inputs of at most :data:`FEW_ROWS` rows when no gradient is wanted: the first
      called computes all three outputs and the other two take theirs when given the same
      input tensor, as an attention layer does. The concatenated weight is a copy (a third
      more memory for those layers while switched on), built on first use and rebuilt when
      a parameter is replaced, moved or changed in place (``optimizer.step()``,
      ``load_state_dict``). A change made through ``.data`` is not seen: call
      ``fast_decoding(model)`` again, which drops every fused copy.

    :func:`generate` switches the model on for the length of each call; switch it on once
    for a model driven with :func:`prefill` and :func:`decode_step`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``enabled`` not a bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if boolean("enabled", enabled):
        for module in model.modules():
            if type(module) is _QKVLinear:
                module._qkv[0].clear()
        _switch_on(model)
    else:
        for module in model.modules():
            if type(module) in (Linear, _QKVLinear):
                _switch_off(module)
    return model


@contextlib.contextmanager
def _fast_decoding_during(model: nn.Module):
    """:func:`fast_decoding` inside the block, then back for the layers it switched.
    A compiled model is left alone (its layers never take the route, and a class switch
    would make it recompile)."""
    switched = [] if hasattr(model, "_orig_mod") else _switch_on(model)
    try:
        yield
    finally:
        for module in switched:
            _switch_off(module)


@contextlib.contextmanager
def few_rows_route(enabled: bool = True):
    """Turn fast decoding's routes on or off inside a ``with`` block (to compare)::

        with few_rows_route(False):     # every Linear runs nn.Linear.forward, Q/K/V unfused
            generate(model, idx, 50)

    It sets :data:`FEW_ROWS` to 0 in the block, and restores it afterwards.
    """
    global FEW_ROWS
    enabled = boolean("enabled", enabled)
    saved = FEW_ROWS
    FEW_ROWS = saved if enabled else 0
    try:
        yield
    finally:
        FEW_ROWS = saved
