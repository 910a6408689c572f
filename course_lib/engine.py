"""Step 9 — serving: a batching engine that decodes many requests together (continuous batching).

* :class:`Engine` — one background thread owns the model. Requests (:meth:`Engine.submit`) wait in
  a FIFO queue; those waiting at a token boundary are prefilled together (one forward pass, prompts
  right-padded) and join the running batch in free rows of one
  :class:`~course_lib.inference.KVCache`; every step decodes one token for all running
  rows in one forward pass; finished or cancelled rows leave and the last row moves into the gap,
  so the running rows are always rows ``0..n-1`` and a lone request decodes a batch of one.
* Rows may use different LoRA adapters in one forward pass (:func:`course_lib.lora.set_adapter`
  with one name per row), and each row has its own :class:`SamplingParams` and ``torch.Generator``.
* :class:`RequestHandle` — the request's stream of :class:`Delta` (``for`` or ``async for``),
  :meth:`~RequestHandle.cancel` and :meth:`~RequestHandle.result` (a :class:`Completion`).

Text is detokenized incrementally: an incomplete UTF-8 character, and text that may be the start
of a stop string, are held back until the next token decides. Greedy output equals
:func:`course_lib.inference.generate` with ``temperature=0`` for the same model and adapter (to
float rounding of the batched products). ``course serve`` (:mod:`course_lib.serve`) puts HTTP on top::

    with Engine(model, adapters={"spam": "runs/spam/adapter"}) as engine:
        for delta in engine.submit("Hello", SamplingParams(max_tokens=20), model="spam"):
            print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import codecs
import math
import os
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checks import boolean, positive_int
from .inference import KVCache, _takes_cache, fast_decoding, prefill, sample_next_token
from .lora import adapter_chat_template as _adapter_chat_template, load_adapter as _load_lora, lora_layers, set_adapter
from .model import GPTModel
from .text_data import encode_text

__all__ = ["SamplingParams", "Delta", "Completion", "TokenLogprob", "RequestHandle", "Engine", "EngineError",
           "UnknownModel", "PromptTooLong", "RequestFailed", "EngineClosed", "ENDOFTEXT_ID"]

ENDOFTEXT_ID = 50256    #: GPT-2's ``<|endoftext|>``
MAX_STOP = 4            #: stop strings per request, as OpenAI's API
MAX_LOGPROBS = 20       #: most likely tokens a request can ask for at each step, as OpenAI's chat API


# --------------------------------------------------------------------------- #
# Settings, events and errors
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded (OpenAI's parameters, plus ``top_k`` as vLLM).

    Args:
        max_tokens: new tokens at most; finish ``"length"`` when reached, or when prompt and
            new tokens fill the context. Default 16. 0 (with ``prompt_logprobs``) scores the
            prompt alone: nothing is generated, and the prompt may fill the whole context.
        temperature: in ``[0, 2]``; 0 is greedy. Default 1.0 (OpenAI's).
        top_p: in ``(0, 1]``. Default 1.0 (no filter).
        top_k: ``None`` or an integer >= 1. Default ``None``.
        stop: up to 4 non-empty strings (a single ``str`` is one); the text ends before the first
            that appears (it is not included), finish ``"stop"``. Default none.
        seed: ``None`` or an integer: the same prompt, settings and seed give the same tokens,
            whatever else is in the batch (a ``torch.Generator`` per request). Default ``None``.
        stop_token_ids: ids that end the request with finish ``"stop"``, left out of the text
            and ``token_ids``. Default ``(50256,)``, ``<|endoftext|>``.
        logprobs: ``None`` (default) or an integer in ``[0, 20]``: each Delta and the Completion
            carry, for each token of ``token_ids``, its log-probability and the ``logprobs`` most
            likely tokens at that step (:class:`TokenLogprob`). They are the model's own
            distribution (a log-softmax of the logits, before temperature, ``top_k`` and ``top_p``).
        prompt_logprobs: ``None`` (default) or an integer in ``[0, 20]``: the same for each token
            of the prompt, in ``Completion.prompt_logprobs`` and ``RequestHandle.prompt_logprobs``
            (the first token has none: ``None``). It costs one more forward pass over the prompt
            (with the output head at every position) when the request starts.
        presence_penalty, frequency_penalty: in ``[-2, 2]``, OpenAI's: before choosing each token,
            ``presence_penalty`` is taken from the logit of every token already generated and
            ``frequency_penalty`` times the number of times it was (the prompt's tokens do not
            count). Positive values discourage repeating. Default 0.
        logit_bias: ``{token_id: bias}``, each bias in ``[-100, 100]``, added to that token's logit
            before choosing (``-100`` bans it, ``100`` all but forces it). Default none.
            The penalties and the bias change the choice; ``logprobs`` stay the model's own.

    Raises:
        ValueError: any field out of its range (the message names the field and the range).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = (ENDOFTEXT_ID,)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        def bad(name, want, got):
            raise ValueError(f"{name} must be {want}, got {got!r}")

        scoring_only = self.max_tokens == 0 and self.prompt_logprobs is not None
        if not _is_int(self.max_tokens) or (self.max_tokens < 1 and not scoring_only):
            bad("max_tokens", "an integer >= 1 (0 only with prompt_logprobs: the prompt scored alone)", self.max_tokens)
        t = self.temperature
        if not _is_real(t) or not 0 <= t <= 2:
            bad("temperature", "a number in [0, 2] (0 = greedy)", t)
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1] (1 = no filter)", self.top_p)
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            bad("top_k", "None or an integer >= 1", self.top_k)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP or \
                not all(isinstance(s, str) and s for s in stop):
            bad("stop", f"a string or a list of at most {MAX_STOP} non-empty strings", self.stop)
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            bad("seed", "None or an integer in [-2**63, 2**64)", self.seed)
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            bad("stop_token_ids", "a list of token ids (integers >= 0)", ids)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2 <= v <= 2:
                bad(name, "a number in [-2, 2] (0 = none)", v)
            object.__setattr__(self, name, float(v))
        bias = self.logit_bias
        pairs = list(bias.items()) if isinstance(bias, dict) else bias
        if not isinstance(pairs, (list, tuple)) or not all(
                isinstance(pair, (list, tuple)) and len(pair) == 2 and _is_int(pair[0]) and pair[0] >= 0
                and _is_real(pair[1]) and -100 <= pair[1] <= 100 for pair in pairs):
            bad("logit_bias", "a dict {token_id: bias} of ids >= 0 and biases in [-100, 100]", bias)
        if len({int(t) for t, _ in pairs}) < len(pairs):
            bad("logit_bias", "one bias per token id", bias)
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in pairs)))
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
                bad(name, f"None or an integer in [0, {MAX_LOGPROBS}]", k)
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(self.top_p))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class EngineError(ValueError):
    """A request the engine cannot serve (the base of :class:`UnknownModel` and :class:`PromptTooLong`)."""


class UnknownModel(EngineError):
    """``model`` names neither the base nor a loaded adapter. Attributes: ``name``, ``available``."""

    def __init__(self, name: str, available: Sequence[str]):
        self.name, self.available = name, list(available)
        super().__init__(f"unknown model {name!r}; this engine serves {self.available}")


class PromptTooLong(EngineError):
    """The prompt leaves no room for a new token. Attributes: ``prompt_tokens``, ``limit`` (the context length)."""

    def __init__(self, prompt_tokens: int, limit: int):
        self.prompt_tokens, self.limit = prompt_tokens, limit
        super().__init__(f"the prompt has {prompt_tokens} tokens but the model's context length is {limit}, "
                         f"so a prompt may have at most {limit - 1}; shorten it")


class RequestFailed(RuntimeError):
    """The engine failed while serving this request (the cause is ``__cause__``), or was shut down."""


class EngineClosed(RuntimeError):
    """:meth:`Engine.submit` or :meth:`Engine.start` after :meth:`Engine.shutdown`: make a new Engine."""


@dataclass
class TokenLogprob:
    """A generated token's log-probability (natural log) and the ``top`` most likely tokens at its
    step, ``[(token_id, logprob), ...]`` from the most likely down (``SamplingParams.logprobs`` of them)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Delta:
    """One event of a running request: the text and token ids new since the previous one.

    ``text`` may be ``""`` while a possible stop string or a partial UTF-8 character is held
    back. ``finish_reason`` is ``None`` until the last Delta: ``"stop"``, ``"length"`` or ``"cancelled"``.
    ``logprobs``: one :class:`TokenLogprob` per id of ``token_ids`` when the request asked for
    them (``SamplingParams.logprobs``), else ``None``.
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """A finished request. ``completion_tokens`` counts every token generated, a stop token
    included (``token_ids`` leaves it out). ``logprobs``: as in :class:`Delta`, for all of ``token_ids``;
    ``prompt_logprobs``: one per prompt token, the first ``None`` (``SamplingParams.prompt_logprobs``)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


def _prefill_last(model: nn.Module, prompts: list[list[int]]) -> tuple[KVCache, torch.Tensor]:
    """:func:`~course_lib.inference.prefill` of ``B`` prompts in one forward pass, with the output
    head on each prompt's last position only (``GPTModel.forward``'s steps): the head is most of a
    small model's work, and only the last position's logits choose a token. Prompts are
    right-padded to the longest and the padding is cropped from the cache (under causal attention
    no real token sees it). Returns ``(cache, logits [B, V])``; row ``b`` holds prompt ``b``."""
    lengths = [len(ids) for ids in prompts]
    longest = max(lengths)
    if type(model) is not GPTModel:
        return prefill(model, prompts, max_len=longest)
    cache = KVCache.for_model(model, len(prompts), longest)
    idx = torch.zeros(len(prompts), longest, dtype=torch.long)               # [B, T], padded with id 0
    for b, ids in enumerate(prompts):
        idx[b, :len(ids)] = torch.tensor(ids)
    idx = idx.to(cache.keys.device)
    x = model.drop_emb(model.embed(idx, 0))                                   # [B, T, d]
    for i, block in enumerate(model.trf_blocks):
        x = block(x, cache, i)
    cache.advance(longest)
    if min(lengths) < longest:
        cache.crop(lengths)
    last = torch.tensor(lengths, device=x.device) - 1                        # [B]
    x = x[torch.arange(len(prompts), device=x.device), last]                  # [B, d]
    return cache, model.out_head(model.final_norm(x))                         # [B, V]


def _scores(logp: torch.Tensor, chosen: list[int], k: int) -> list[TokenLogprob]:
    """A :class:`TokenLogprob` per row of ``logp [N, V]`` (log-probabilities): ``chosen[n]``'s and the top ``k``."""
    picked = logp.gather(1, torch.tensor(chosen, device=logp.device)[:, None])[:, 0].tolist()
    if k == 0:
        return [TokenLogprob(t, lp, []) for t, lp in zip(chosen, picked)]
    top = logp.topk(k, dim=-1)
    return [TokenLogprob(t, lp, list(zip(ids, vals)))
            for t, lp, ids, vals in zip(chosen, picked, top.indices.tolist(), top.values.tolist())]


def _prompt_scores(model: nn.Module, ids: list[int], k: int, device) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (and the top ``k``): one
    forward pass of the whole prompt. The first token has nothing before it: ``None``."""
    logits = model(torch.tensor([ids], device=device))[0, :-1]                # [T-1, V]: position t predicts t+1
    return [None, *_scores(torch.log_softmax(logits.float(), dim=-1), ids[1:], k)]


# --------------------------------------------------------------------------- #
# Incremental detokenizing
# --------------------------------------------------------------------------- #
class _Detokenizer:
    """Token ids in, text out, holding back an incomplete UTF-8 character and any end of the
    text that may begin a stop string.

    ``add(id)`` returns ``(new_text, stopped)``; ``flush()`` the held-back text at the end.
    ``text`` is the text so far (cut before a stop string once one appeared).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.by_bytes = hasattr(tokenizer, "decode_bytes")
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0                       # text[:sent] has been handed out

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        if self.by_bytes:
            self.text += self.utf8.decode(self.tokenizer.decode_bytes([token]))
        else:                               # any tokenizer with decode(ids) -> str
            self.text = self.tokenizer.decode(self.ids)
        return self._emit(final=False)

    def flush(self) -> str:
        if self.by_bytes:
            self.text += self.utf8.decode(b"", final=True)
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, bool]:
        text, sent = self.text, self.sent
        hits = [i for i in (text.find(s, sent) for s in self.stop) if i >= 0]
        if hits:                                                    # the earliest stop string ends it
            end = min(hits)
            self.text, self.sent = text[:end], end
            return text[sent:end], True
        hold = 0 if final else max((k for s in self.stop for k in range(1, len(s))
                                    if len(text) - k >= sent and text.endswith(s[:k])), default=0)
        if not final and not self.by_bytes:                         # decode() marks a partial character
            hold = max(hold, len(text) - max(sent, len(text.rstrip("\ufffd"))))
        end = len(text) - hold
        self.sent = end
        return text[sent:end], False


# --------------------------------------------------------------------------- #
# Requests
# --------------------------------------------------------------------------- #
def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    """Set the ``asyncio.Event`` of every ``(loop, event)`` from this (another) thread: one
    ``call_soon_threadsafe`` per event loop, so a step's tokens for 16 streams of one server wake
    its loop once, not 16 times (each wake-up writes to the loop's socket)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
    for loop, ready in waiters:
        by_loop.setdefault(loop, []).append(ready)
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, events)
        except RuntimeError:                # that event loop is closed: nobody listens
            pass


def _set_all(events: list[asyncio.Event]) -> None:
    for ready in events:
        ready.set()


class RequestHandle:
    """A submitted request: iterate it (``for`` / ``async for``) for its :class:`Delta` events,
    :meth:`cancel` it, or wait for its :meth:`result`.

    Every iterator sees every Delta from the first; it ends after the one with a
    ``finish_reason``, or raises :class:`RequestFailed`. Leaving an iterator before the end
    (``break``, a client that disconnected) cancels the request.

    Attributes:
        id: ``"cmpl-..."``, unique. prompt_tokens: the prompt's length. prompt_ids: its token ids.
        model: the name served. params: the :class:`SamplingParams`. prompt_logprobs: see
        ``SamplingParams.prompt_logprobs`` (``None`` until the request starts, or when not asked).
    """

    def __init__(self, engine: "Engine", ids: list[int], params: SamplingParams, model: str, adapter: str | None):
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.prompt_tokens, self.model, self.params = len(ids), model, params
        self._engine, self._ids, self._adapter = engine, ids, adapter
        self.prompt_ids = tuple(ids)
        self._cond = threading.Condition()
        self._events: list[Delta | BaseException] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._completion: Completion | None = None
        self.cancelled = False
        self.done = False
        # Decoding state, used by the engine's thread only.
        self._detok: _Detokenizer | None = None
        self._generator: torch.Generator | None = None
        self._next: int = 0                 # the token to feed at the next decode step
        self._count = 0                     # tokens generated
        self._logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []  # of token_ids
        #: with ``params.prompt_logprobs``: one entry per prompt token (the first ``None``), set before
        #: the first Delta is sent
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        #: with a penalty or a bias: what to add to the logits before choosing the next token [V]
        self._shift: torch.Tensor | None = None
        self._seen: dict[int, int] = {}     # generated token -> times (for the penalties)

    # -- producer side (the engine's thread) --------------------------------- #
    def _push(self, event: Delta | BaseException, wake: list | None = None) -> None:
        """Record ``event`` and wake its readers; the asyncio ones are added to ``wake`` when given
        (the engine wakes each event loop once per step, :func:`_wake`), else woken now."""
        with self._cond:
            if self.done:
                return
            self._events.append(event)
            if isinstance(event, BaseException) or event.finish_reason is not None:
                self.done = True
            self._cond.notify_all()
            # a waiter still set has not read the events yet (it clears under this lock when it
            # finds none left): it will take this one with them, no need to wake its loop again
            waiters = [w for w in self._waiters if not w[1].is_set()]
        if wake is None:
            _wake(waiters)
        else:
            wake += waiters

    def _finish(self, end: Delta) -> None:
        """Send the last Delta ``end``, after recording the :class:`Completion`."""
        detok = self._detok
        full = detok.text if detok is not None else ""
        ids = list(detok.ids) if detok is not None else []
        logprobs = None if self._logprobs is None else list(self._logprobs)
        self._completion = Completion(full, ids, end.finish_reason, self.prompt_tokens, self._count, logprobs,
                                      self.prompt_logprobs)
        if self._logprobs is not None and end.logprobs is None:
            end = Delta(end.text, end.token_ids, end.finish_reason, [])
        self._push(end)

    def _penalize(self, token: int) -> None:
        """``token`` was generated: OpenAI's penalties, ``presence`` once, ``frequency`` every time."""
        p = self.params
        self._seen[token] = self._seen.get(token, 0) + 1
        self._shift[token] -= p.frequency_penalty + (p.presence_penalty if self._seen[token] == 1 else 0.0)

    # -- consumer side ------------------------------------------------------ #
    def __iter__(self) -> Iterator[Delta]:
        i, finished = 0, False
        try:
            while True:
                with self._cond:
                    while i == len(self._events):
                        self._cond.wait()
                    event = self._events[i]
                i += 1
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = event.finish_reason is not None
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Delta]:
        ready = asyncio.Event()
        waiter = (asyncio.get_running_loop(), ready)
        with self._cond:
            self._waiters.append(waiter)
        i, finished = 0, False
        try:
            while True:
                with self._cond:
                    new = self._events[i:]
                    if not new:
                        ready.clear()       # under the lock: a later _push sets it again
                if not new:
                    await ready.wait()
                    continue
                for event in new:
                    i += 1
                    if isinstance(event, BaseException):
                        finished = True
                        raise event
                    finished = event.finish_reason is not None
                    yield event
                    if finished:
                        return
        finally:
            with self._cond:
                self._waiters.remove(waiter)
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        """Stop the request: its row is freed at the next token boundary (finish ``"cancelled"``).
        Does nothing once it has finished."""
        self._engine._cancel(self)

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end and return the :class:`Completion`.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            RequestFailed: the engine failed on this request, or was shut down.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            last = self._events[-1]
        if isinstance(last, BaseException):
            raise last
        return self._completion

    def __repr__(self) -> str:
        state = "done" if self.done else "cancelling" if self.cancelled else "pending"
        return f"RequestHandle(id={self.id!r}, model={self.model!r}, prompt_tokens={self.prompt_tokens}, {state})"


# --------------------------------------------------------------------------- #
# The engine
# --------------------------------------------------------------------------- #
class Engine:
    """Serve one model (and its LoRA adapters) to many concurrent requests, decoded together.

    Args:
        model: a :class:`~course_lib.model.GPTModel` (changed in place: ``eval()``, moved to
            ``device``, :func:`~course_lib.inference.fast_decoding` with ``fast``, adapters loaded).
        tokenizer: ``encode``/``decode`` (and ideally tiktoken's ``decode_bytes``). Default
            GPT-2's (:func:`~course_lib.tokenizers.tiktoken_gpt2`).
        name: the base model's name in :meth:`models` and ``submit(model=...)``. Default ``"base"``.
        adapters: ``{name: PEFT adapter folder}`` to serve on the base (:func:`course_lib.lora.load_adapter`).
        max_batch: rows decoded together at most; more requests wait in a FIFO queue. Default 16.
        max_prefill_tokens: the most positions (requests x the longest prompt among them) one
            forward pass prefills; a longer prompt is prefilled alone. Default 4096.
        device: where to run. Default: the model's.
        fast: switch :func:`~course_lib.inference.fast_decoding` on. Default ``True``.

    Attributes:
        name, context_length, max_batch, max_prefill_tokens, device.

    The decode thread starts on the first :meth:`submit` (or :meth:`start`); :meth:`shutdown`
    (or leaving a ``with`` block) stops it. The KV cache for ``max_batch`` rows of the whole
    context is made here, once (GPT-2 small, 16 rows: 1.2 GB in float32).

    Raises:
        TypeError: ``model`` does not take a KV cache; a tokenizer without ``encode``/``decode``;
            ``adapters`` not a dict.
        ValueError: a bad ``max_batch`` or adapter name; an adapter that does not fit (see
            :func:`~course_lib.lora.load_adapter`). FileNotFoundError: no adapter in a folder.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, name: str = "base",
                 adapters: dict[str, str | os.PathLike] | None = None, max_batch: int = 16, device=None,
                 fast: bool = True, max_prefill_tokens: int = 4096):
        if not isinstance(model, nn.Module) or not _takes_cache(model):
            raise TypeError(f"model must be a GPTModel (a module that takes a KV cache), got {type(model).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string (e.g. 'base'), got {name!r}")
        if adapters is not None and not isinstance(adapters, dict):
            raise TypeError(f"adapters must be a dict of name -> adapter folder, got {type(adapters).__name__}")
        self.max_batch = positive_int("max_batch", max_batch)
        self.max_prefill_tokens = positive_int("max_prefill_tokens", max_prefill_tokens)
        self.fast = boolean("fast", fast)
        if tokenizer is None:
            from .tokenizers import tiktoken_gpt2
            tokenizer = tiktoken_gpt2()
        if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
            raise TypeError(f"tokenizer must have encode and decode methods (e.g. tiktoken's Encoding), got "
                            f"{type(tokenizer).__name__}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        if device is not None:
            model.to(device)
        model.eval()
        self.device = next(model.parameters()).device
        self.context_length: int = model.cfg.context_length
        self.vocab_size: int = model.cfg.vocab_size
        self._adapters: dict[str, Path] = {}
        self._templates: dict[str, str | None] = {}     # each adapter's chat template, read when loaded
        self._model_lock = threading.RLock()        # held by the thread while it runs the model
        self._cond = threading.Condition()          # guards the queue, the counters and _closed
        self._waiting: deque[RequestHandle] = deque()
        self._rows: list[RequestHandle] = []        # row i of the cache holds _rows[i]
        self._cache = KVCache.for_model(model, self.max_batch)      # [L, max_batch, H, context, D], made once
        self._active: Any = "unset"                 # the adapter choice last given to set_adapter
        self._has_lora = bool(lora_layers(model))   # set_adapter needs LoRA layers
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = dict(tokens_generated=0, prompt_tokens=0, steps=0, prefills=0, requests_finished=0,
                           requests_cancelled=0, requests_failed=0)
        for adapter, path in (adapters or {}).items():
            self.load_adapter(adapter, path)
        if fast:
            fast_decoding(model)

    # -- models ------------------------------------------------------------- #
    def models(self) -> list[str]:
        """The names :meth:`submit` accepts: the base, then every adapter."""
        with self._cond:
            return [self.name, *self._adapters]

    def adapter_chat_template(self, name: str) -> str | None:
        """The chat template adapter ``name`` was saved with (read when it was loaded:
        :func:`course_lib.lora.adapter_chat_template`), or ``None``."""
        with self._cond:
            return self._templates.get(name)

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Serve the PEFT adapter in folder ``path`` as model ``name`` (while running is fine).

        Raises:
            ValueError: ``name`` is the base's or taken, or not a word; the adapter does not fit the model.
            FileNotFoundError: no adapter in ``path``.
        """
        if name == self.name or name in self._adapters:
            raise ValueError(f"model name {name!r} is taken; this engine serves {self.models()}: choose another")
        template = _adapter_chat_template(path)     # read with the weights: what was loaded is what it describes
        with self._model_lock:                      # between two decode steps
            if self.fast:
                fast_decoding(self.model, False)    # wrap plain nn.Linear layers, then switch back on
            try:
                _load_lora(self.model, path, name=name, activate=False)
            finally:
                if self.fast:
                    fast_decoding(self.model)
            self._active, self._has_lora = "unset", True
        with self._cond:
            self._adapters[name] = Path(path)
            self._templates[name] = template

    # -- requests ----------------------------------------------------------- #
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               model: str | None = None) -> RequestHandle:
        """Queue a request; it starts decoding at the next token boundary with a free row. Thread-safe.

        Args:
            prompt: text, or token ids.
            params: default ``SamplingParams()``.
            model: ``None`` or the base's name: the base; an adapter's name: that adapter.

        Raises:
            UnknownModel: ``model`` is not served. PromptTooLong: ``len(prompt) >= context_length``.
            EngineError: an empty prompt, ids outside the vocabulary.
            TypeError: ``prompt`` or ``params`` of the wrong type. EngineClosed: the engine was shut down.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        served = model if model is not None else self.name
        with self._cond:
            known = [self.name, *self._adapters]
        if served not in known:
            raise UnknownModel(served, known)
        if isinstance(prompt, str):
            ids = encode_text(prompt, self.tokenizer)
        elif isinstance(prompt, (list, tuple)) and all(_is_int(i) for i in prompt):
            ids = [int(i) for i in prompt]
        else:
            raise TypeError(f"prompt must be a str or a list of int token ids, got {type(prompt).__name__}")
        if not ids:
            raise EngineError("the prompt has no tokens; give at least one (e.g. '<|endoftext|>' for GPT-2)")
        bad = [i for i in (*ids, *params.stop_token_ids, *(t for t, _ in params.logit_bias))
               if not 0 <= i < self.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the model's vocabulary [0, {self.vocab_size})")
        if len(ids) >= self.context_length + (params.max_tokens == 0):    # scoring alone needs no room after it
            raise PromptTooLong(len(ids), self.context_length)
        handle = RequestHandle(self, ids, params, served, None if served == self.name else served)
        self.start()
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shut down; make a new Engine")
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 model: str | None = None) -> Completion:
        """``submit(prompt, params, model).result()``."""
        return self.submit(prompt, params, model).result()

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cond:
            if handle.done or handle.cancelled:
                return
            handle.cancelled = True
            if handle in self._waiting:             # never started: end it now
                self._waiting.remove(handle)
                self._stats["requests_cancelled"] += 1
                handle._finish(Delta("", [], "cancelled"))
            self._cond.notify_all()

    def stats(self) -> dict:
        """``running``, ``waiting``, ``max_batch``, ``tokens_generated``, ``prompt_tokens``,
        ``steps`` (batched decode passes), ``prefills`` (prefill passes, each of one request or
        more), ``requests_finished``/``_cancelled``/``_failed``, ``models``."""
        with self._cond:
            return dict(running=len(self._rows), waiting=len(self._waiting), max_batch=self.max_batch,
                        **self._stats, models=[self.name, *self._adapters])

    # -- the thread --------------------------------------------------------- #
    def start(self) -> None:
        """Start the decode thread (:meth:`submit` does). Raises :class:`EngineClosed` after :meth:`shutdown`."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shut down; make a new Engine")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
                self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called (then :meth:`submit` raises :class:`EngineClosed`)."""
        return self._closed

    def shutdown(self) -> None:
        """Stop the decode thread and end every pending request (their iterators raise
        :class:`RequestFailed`). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            pending = list(self._waiting) + list(self._rows)
            self._waiting.clear()
            self._rows.clear()
            self._cache = None                      # give the memory back
        for handle in pending:
            handle._push(RequestFailed("the engine was shut down"))

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        s = self.stats()
        return (f"Engine(name={self.name!r}, models={s['models']}, running={s['running']}, "
                f"waiting={s['waiting']}, max_batch={self.max_batch})")

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._waiting or self._rows)
                if self._closed:
                    return
            try:
                with self._model_lock, torch.inference_mode():
                    self._admit()
                    if self._rows:
                        self._decode()
            except Exception as err:   # noqa: BLE001 — never let the thread die: fail the rows in flight
                self._fail_all(err)

    def _fail_all(self, err: Exception) -> None:
        with self._cond:
            rows, self._rows = self._rows, []
        self._active = "unset"                      # set_adapter may have stopped half-way
        for handle in rows:
            self._fail(handle, err)

    def _fail(self, handle: RequestHandle, err: BaseException) -> None:
        failure = RequestFailed(f"request {handle.id} failed: {type(err).__name__}: {err}")
        failure.__cause__ = err
        with self._cond:
            if handle.done:
                return
            self._stats["requests_failed"] += 1
        handle._push(failure)

    # -- one iteration: admit, then decode ----------------------------------- #
    def _use_adapters(self, names) -> None:
        """``set_adapter`` when the choice changed (a name, ``None``, or a tuple per row)."""
        if isinstance(names, tuple) and len(set(names)) == 1:
            names = names[0]                        # one adapter for all: the plain (cheaper) route
        if names == self._active:
            return
        if self._has_lora:
            set_adapter(self.model, names)
        self._active = names

    def _admit(self) -> None:
        """Prefill the waiting requests into the free rows, together: one forward pass for as many
        as fit (``max_batch`` rows, ``max_prefill_tokens`` padded positions), oldest first. If that
        pass fails, each request is prefilled alone, so that only the one at fault fails."""
        while len(self._rows) < self.max_batch:
            batch: list[RequestHandle] = []
            with self._cond:
                while self._waiting and not self._closed and len(self._rows) + len(batch) < self.max_batch:
                    longest = max([h.prompt_tokens for h in batch] + [self._waiting[0].prompt_tokens])
                    if batch and longest * (len(batch) + 1) > self.max_prefill_tokens:
                        break
                    handle = self._waiting.popleft()
                    self._stats["prompt_tokens"] += handle.prompt_tokens
                    batch.append(handle)
            if not batch:
                return
            scoring = [h for h in batch if h.params.max_tokens == 0]
            if scoring:
                batch = [h for h in batch if h.params.max_tokens > 0]
                try:
                    self._score_only(scoring)
                except Exception:   # noqa: BLE001 — each alone, so that only the one at fault fails
                    self._active = "unset"
                    for handle in scoring:
                        try:
                            self._score_only([handle])
                        except Exception as err:   # noqa: BLE001
                            self._active = "unset"
                            self._fail(handle, err)
                if not batch:
                    continue
            if len(batch) > 1:
                try:
                    started = self._start(batch)
                except Exception:   # noqa: BLE001 — find the request at fault: each alone, below
                    started, self._active = None, "unset"      # set_adapter may have stopped half-way
                if started is not None:
                    self._step_rows(*started)
                    continue
            for handle in batch:
                try:
                    logits, rows = self._start([handle])
                except Exception as err:   # noqa: BLE001 — this request fails alone
                    self._active = "unset"
                    self._fail(handle, err)
                    continue
                self._step_rows(logits, rows)

    def _start(self, batch: list[RequestHandle]) -> tuple[torch.Tensor, list[int]]:
        """Prefill ``batch`` in one forward pass (each on its adapter) into the next free rows of
        the cache; returns the logits of each prompt's last token ``[len(batch), V]`` and the rows.
        A request that wants its prompt's log-probabilities gets them first, in a pass of its own
        (one per prompt and adapter: the ``n`` choices of a request share it)."""
        self._score_prompts(batch)
        self._use_adapters(tuple(h._adapter for h in batch))
        prefilled, logits = _prefill_last(self.model, [h._ids for h in batch])     # logits [B, V]
        with self._cond:
            self._stats["prefills"] += 1
        for handle in batch:
            p = handle.params
            handle._detok = _Detokenizer(self.tokenizer, p.stop)
            if p.presence_penalty or p.frequency_penalty or p.logit_bias:
                handle._shift = torch.zeros(logits.shape[-1], device=logits.device)
                if p.logit_bias:                    # one write for all of them, however many
                    tokens, biases = zip(*p.logit_bias)
                    handle._shift[torch.tensor(tokens, device=logits.device)] = torch.tensor(
                        biases, device=logits.device)
            if p.temperature > 0:
                handle._generator = torch.Generator(device=self.device)
                if p.seed is None:
                    handle._generator.seed()
                else:
                    handle._generator.manual_seed(p.seed % 2**64)
        first = len(self._rows)
        for b in range(len(batch)):
            self._cache.load_row(first + b, prefilled, b)
        with self._cond:
            self._rows.extend(batch)
        return logits, list(range(first, first + len(batch)))

    def _score_prompts(self, batch: list[RequestHandle]) -> None:
        """Set ``prompt_logprobs`` of the requests in ``batch`` that ask for them."""
        done: dict[tuple, list] = {}
        for handle in batch:
            k = handle.params.prompt_logprobs
            if k is None:
                continue
            key = (handle.prompt_ids, handle._adapter, k)
            if key not in done:
                self._use_adapters(handle._adapter)
                done[key] = _prompt_scores(self.model, handle._ids, k, self.device)
            handle.prompt_logprobs = done[key]

    def _score_only(self, batch: list[RequestHandle]) -> None:
        """Requests with ``max_tokens`` 0: their prompts scored, and finished (no row of the cache)."""
        batch = [h for h in batch if not h.done]       # (when called again, one by one, after a failure)
        self._score_prompts(batch)
        for handle in batch:
            with self._cond:
                self._stats["requests_finished"] += 1
            handle._finish(Delta("", [], "length"))

    def _decode(self) -> None:
        """One token for every running row: rows ``0..n-1`` of the cache, one forward pass."""
        n = len(self._rows)
        with self._cond:
            self._stats["steps"] += 1
        self._use_adapters(tuple(h._adapter for h in self._rows))
        ids = torch.tensor([[h._next] for h in self._rows], device=self.device)     # [n, 1]
        view = self._cache.first_rows(n)
        logits = self.model(ids, kv_cache=view)[:, -1, :]                          # [n, V]
        self._step_rows(logits, list(range(n)))

    def _step_rows(self, logits: torch.Tensor, rows: list[int]) -> None:
        """Sample a token for each of ``rows`` from ``logits [len(rows), V]``, hand out the text,
        free the rows that finished, failed or were cancelled, then send their last events (so a
        caller woken by the end sees the row free in :meth:`stats`)."""
        ok = [math.isfinite(t) for t in logits.sum(dim=-1, dtype=torch.float32).tolist()]   # a NaN or inf in a row
        greedy = logits.max(dim=-1).indices.tolist()    # argmax's first maximum, in 3/4 of its time on CPU
        sampled = [j for j, row in enumerate(rows) if self._rows[row].params.temperature > 0]
        picked: dict[int, torch.Tensor] = {}
        if sampled:    # their rows, contiguous: fast decoding's head gives the logits as a transposed view
            picked = dict(zip(sampled, logits[sampled].contiguous().split(1)))     # j -> [1, V]
        shifted = [j for j, row in enumerate(rows) if self._rows[row]._shift is not None]
        if shifted:    # penalties and biases: these rows choose from their shifted logits
            moved = logits[shifted].float() + torch.stack([self._rows[rows[j]]._shift for j in shifted])
            for j, best, row_logits in zip(shifted, moved.max(dim=-1).indices.tolist(), moved.split(1)):
                greedy[j] = best
                if j in picked:
                    picked[j] = row_logits
        ends: dict[int, tuple] = {}                  # row -> (handle, Delta or error, counter)
        wake: list = []                              # the asyncio readers to wake, once per loop
        with self._cond:                             # counted before any reader gets its token
            self._stats["tokens_generated"] += sum(ok)
        tokens: dict[int, int] = {}                  # j -> the token chosen for rows[j]
        for j, row in enumerate(rows):
            handle = self._rows[row]
            try:
                if not ok[j]:
                    raise ValueError("the model's logits are not finite (NaN or inf): has the model diverged?")
                p = handle.params
                if p.temperature == 0:
                    tokens[j] = greedy[j]
                else:
                    try:
                        tokens[j] = int(sample_next_token(picked[j], p.temperature, p.top_k, p.top_p,
                                                          handle._generator))
                    except Exception:
                        with self._cond:             # no token after all
                            self._stats["tokens_generated"] -= 1
                        raise
            except Exception as err:   # noqa: BLE001 — this row fails alone
                ends[row] = (handle, err, "requests_failed")
        scores = self._scores(logits, rows, tokens)
        for j, token in tokens.items():
            row = rows[j]
            handle = self._rows[row]
            try:
                if handle._shift is not None:
                    handle._penalize(token)
                end = self._advance(handle, token, wake, scores.get(j))
                if end is not None:
                    ends[row] = (handle, end, "requests_finished")
            except Exception as err:   # noqa: BLE001 — this row fails alone
                ends[row] = (handle, err, "requests_failed")
        _wake(wake)
        for row, handle in enumerate(self._rows):
            if handle.cancelled and row not in ends:
                text = handle._detok.flush() if handle._detok is not None else ""
                ends[row] = (handle, Delta(text, [], "cancelled"), "requests_cancelled")
        if not ends:
            return
        self._free(sorted(ends, reverse=True))
        for handle, end, counter in ends.values():
            if isinstance(end, Exception):
                self._fail(handle, end)
                continue
            with self._cond:
                self._stats[counter] += 1
            handle._finish(end)

    def _scores(self, logits: torch.Tensor, rows: list[int], tokens: dict[int, int]) -> dict[int, TokenLogprob]:
        """``j -> TokenLogprob`` of ``tokens[j]`` for the rows that asked for log-probabilities: the
        model's own distribution (before temperature and filters), for all of them at once (one
        log-softmax, gather and top-k: a GPU is waited for once per step, not per row)."""
        wanted = [j for j in tokens if self._rows[rows[j]].params.logprobs is not None]
        if not wanted:
            return {}
        ks = [self._rows[rows[j]].params.logprobs for j in wanted]
        logp = torch.log_softmax(logits[wanted].float(), dim=-1)                  # [n, V]
        entries = _scores(logp, [tokens[j] for j in wanted], max(ks))
        return {j: TokenLogprob(e.token_id, e.logprob, e.top[:k]) for j, e, k in zip(wanted, entries, ks)}

    def _advance(self, handle: RequestHandle, token: int, wake: list,
                 scores: TokenLogprob | None = None) -> Delta | None:
        """Give ``token`` (and its ``scores`` when the request wants log-probabilities) to
        ``handle``: push its Delta (its asyncio readers added to ``wake``), or return the last one
        if it finished."""
        p = handle.params
        handle._count += 1
        if token in p.stop_token_ids:
            return Delta(handle._detok.flush(), [], "stop", None if scores is None else [])
        text, stopped = handle._detok.add(token)
        scored = None
        if scores is not None:
            handle._logprobs.append(scores)
            scored = [scores]
        if stopped:
            return Delta(text, [token], "stop", scored)
        if handle._count >= p.max_tokens or handle.prompt_tokens + handle._count >= self.context_length:
            return Delta(text + handle._detok.flush(), [token], "length", scored)
        handle._next = token
        handle._push(Delta(text, [token], None, scored), wake)
        return None

    def _free(self, rows: list[int]) -> None:
        """Free ``rows`` (in decreasing order): the last running row moves into each gap."""
        for row in rows:
            last = len(self._rows) - 1
            if row != last:
                self._cache.load_row(row, self._cache, last)
            with self._cond:
                self._rows[row] = self._rows[last]
                self._rows.pop()
