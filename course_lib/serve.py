"""Step 9 — deployment: your model behind an OpenAI-compatible server.

Any program written for OpenAI's API (the official ``openai`` client, LangChain, an IDE plugin)
talks to the learner's model by changing one base URL. The model runs in an
:class:`~course_lib.engine.Engine` (continuous batching, one adapter per request); this module is
only the HTTP layer over it.

* :func:`create_app` — the FastAPI app: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
  ``POST /v1/chat/completions`` (both streamed as server-sent events with ``"stream": true``); the
  request's ``model`` picks the base or an adapter; errors in OpenAI's shape.
* :func:`serve` — run it with uvicorn until Ctrl-C (``course serve``); :func:`running_server` — the
  same in a background thread for tests and notebooks (``with running_server(engine) as url: ...``).
* :func:`chat_prompt` — a chat's ``messages`` as one prompt in the step-7 template.
* :func:`chat`, :func:`engine_replier`, :func:`client_replier` — a terminal chat with streaming output
  and history (``course chat``), through an engine in this process or any OpenAI-compatible server.

Choices where OpenAI's API says nothing about a small local model:

* ``max_tokens`` defaults to 16 for ``/v1/completions`` (OpenAI's default) and, for chat, to the rest
  of the context. A prompt plus ``max_tokens`` past the context is not refused: the answer ends when the
  context is full, with ``finish_reason: "length"``. A prompt that leaves no room at all is a 400.
* ``n`` choices are ``n`` engine requests (decoded together); with a ``seed``, choice ``j`` uses
  ``seed + j``, so the choices differ and the whole reply is reproducible.
* ``top_k`` and ``ignore_eos`` are extra fields, as in vLLM (``top_k`` ``null``, ``0`` or ``-1``: no
  limit; ``ignore_eos: true`` decodes past ``<|endoftext|>``, for benchmarks). Fields this server
  does not do are a 400 naming the field when a request asks for them: for completions ``suffix``;
  for chat ``tools``, ``functions``, ``tool_choice``, ``response_format`` (other than text). Their
  default values (``null``, ``false``, ``""``, ``[]``) pass, as clients send them. Other unknown
  fields (``user``, ``metadata``, ...) are ignored.
* Completions' ``best_of`` (>= ``n``, not streamed): ``best_of`` completions are decoded (choice
  ``j`` with ``seed + j``) and the ``n`` with the highest mean log-probability per token are
  returned, best first; ``usage`` counts every token decoded, as OpenAI bills them.
* ``presence_penalty``, ``frequency_penalty`` (counted over the generated tokens) and ``logit_bias``
  are OpenAI's (:class:`~course_lib.engine.SamplingParams`): a small model's loops are what the
  penalties are for.
* Log-probabilities (completions ``logprobs: k``, chat ``logprobs: true`` with ``top_logprobs: k``,
  ``k`` up to 20) are the model's own distribution, before temperature, ``top_k`` and ``top_p`` (as
  vLLM's default), in OpenAI's shapes, streamed too. Completions list the sampled token's entry in
  ``top_logprobs`` as well when it is not among the ``k`` (OpenAI's rule: up to ``k + 1``);
  ``text_offset`` counts characters (Python's code points, not UTF-16 units) from the start of the
  completion (of the prompt with ``echo``). A token that is part of a UTF-8 character is named
  ``"bytes:\\xe2\\x80"``, its ``bytes`` given in chat. A stop token is not listed (it is not in
  the text); a stop string's tokens are, from the one it begins in to the one that completed it (the
  text ends inside the first; streamed, they go out before the stop string is seen), and
  unstreamed completions cap ``text_offset`` at the text's end.
* Completions' ``echo: true`` starts each choice with its prompt (and, with ``logprobs``, the prompt
  tokens' log-probabilities, the first ``null``); ``max_tokens: 0`` with it scores the prompt alone,
  the request evaluation harnesses send for a log-likelihood (``lm-evaluation-harness``'s
  ``local-completions``); the prompt may then fill the whole context. Scoring a prompt costs one more
  forward pass over it (its only one with ``max_tokens: 0``).
* Types are strict, as OpenAI's: ``"5"`` is no ``max_tokens``, ``true`` no token id. A body over
  :data:`MAX_BODY_BYTES` is a 413; a request to an engine that was shut down, a 503.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import ipaddress
import json
import logging
import math
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TextIO

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import (MAX_LOGPROBS, Delta, Engine, EngineClosed, EngineError, PromptTooLong, RequestFailed,
                     SamplingParams, TokenLogprob, UnknownModel)
from .instruction import ALPACA_PREAMBLE, STYLES, format_prompt

__all__ = [
    "create_app",
    "serve",
    "running_server",
    "chat_prompt",
    "chat_style",
    "chat_template",
    "chat",
    "engine_replier",
    "client_replier",
    "ContextFull",
    "is_loopback",
    "logger",
]

#: One line per request: ``POST /v1/chat/completions 200 model=base tokens=31+16 42 ms``.
logger = logging.getLogger("course_lib.serve")

#: The most choices per request (``n`` x prompts): each is a row of the engine's batch.
MAX_CHOICES = 64
#: The most entries of a request's ``logit_bias``.
MAX_LOGIT_BIAS = 300
#: The largest request body read (413 past it): far more than a context of text, even as token ids.
MAX_BODY_BYTES = 1 << 20
_ROUTES = "GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions"


# --------------------------------------------------------------------------- #
# Chat messages -> one prompt in the model's template
# --------------------------------------------------------------------------- #
def _content(message: Any, i: int) -> tuple[str, str]:
    """``(role, text)`` of ``messages[i]``; content is a string or a list of ``{"type": "text"}`` parts."""
    if not isinstance(message, dict):
        raise TypeError(f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "developer", "user", "assistant"):
        raise ValueError(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r} "
                         "(this server has no tools)")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ValueError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                             "understood by a text model")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise TypeError(f"messages[{i}].content must be a string, got {type(content).__name__}")
    return role, content


def chat_prompt(messages: Sequence[dict[str, Any]], style: str = "alpaca") -> str:
    """A chat as the one prompt an instruction-tuned model of step 7 reads.

    The step-7 templates hold one instruction, so the chat is folded into it:

    * system (and developer) messages open the instruction, then a blank line;
    * earlier turns follow as a transcript, a ``User: ...`` or ``Assistant: ...`` line each, then a
      blank line;
    * the last message, which must be the user's, ends the instruction. The ``input`` field stays empty.

    One user message alone gives exactly ``format_prompt({"instruction": text}, style)``.

    >>> chat_prompt([{"role": "user", "content": "Add 2 and 3."}], "phi3")
    '<|user|>\\nAdd 2 and 3.\\n<|assistant|>\\n'

    Args:
        messages: OpenAI chat messages (``role``: system, developer, user or assistant; ``content``: a
            string or a list of text parts).
        style: ``"alpaca"`` or ``"phi3"`` (:data:`~course_lib.instruction.STYLES`).

    Raises:
        TypeError, ValueError: no messages, a message that is not one of those, a last message that is
            not the user's, an empty instruction, an unknown ``style``.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; send at least one {'role': 'user', 'content': ...}")
    turns = [_content(m, i) for i, m in enumerate(messages)]
    if turns[-1][0] != "user":
        raise ValueError(f"the last message must be the user's (the model answers it), got role {turns[-1][0]!r}")
    system = [text for role, text in turns[:-1] if role in ("system", "developer")]
    history = [f"{'User' if role == 'user' else 'Assistant'}: {text}" for role, text in turns[:-1]
               if role in ("user", "assistant")]
    parts = [*system, *(["\n".join(history)] if history else []), turns[-1][1]]
    return format_prompt({"instruction": "\n\n".join(parts), "input": ""}, style)


_JINJA_ENDS = {   # format_prompt's text before and after the instruction, as Jinja string literals
    "alpaca": ("'" + ALPACA_PREAMBLE.replace("'", "\\'") + "\\n\\n### Instruction:\\n'", "'\\n\\n### Response:\\n'"),
    "phi3": ("'<|user|>\\n'", "'\\n<|assistant|>\\n'"),
}


def chat_template(style: str = "alpaca") -> str:
    """:func:`chat_prompt` as a Jinja chat template, for runtimes that format chats themselves:
    ``chat_template`` in a Hugging Face ``tokenizer_config.json`` (``transformers``'
    ``apply_chat_template``, vLLM, TGI) and ``tokenizer.chat_template`` in a GGUF file
    (llama.cpp). ``course export`` writes it for an instruction-tuned model.

    The same folding as :func:`chat_prompt` (a test renders both with ``transformers``), for
    messages whose ``content`` is a string; the answer is always prompted for, as
    ``add_generation_prompt=True`` asks.

    Raises:
        ValueError: an unknown ``style``.
    """
    if style not in _JINJA_ENDS:
        raise ValueError(f"style must be one of {list(_JINJA_ENDS)}, got {style!r}")
    before, after = _JINJA_ENDS[style]
    return (
        "{%- set ns = namespace(parts=[], history=[]) -%}"
        "{%- for message in messages[:-1] -%}"
        "{%- if message['role'] in ['system', 'developer'] -%}"
        "{%- set ns.parts = ns.parts + [message['content']] -%}"
        "{%- elif message['role'] in ['user', 'assistant'] -%}"
        "{%- set ns.history = ns.history + [('User: ' if message['role'] == 'user' else 'Assistant: ') "
        "+ message['content']] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.history -%}{%- set ns.parts = ns.parts + [ns.history | join('\\n')] -%}{%- endif -%}"
        "{%- set ns.parts = ns.parts + [messages[-1]['content']] -%}"
        f"{{{{- {before} + ns.parts | join('\\n\\n') + {after} -}}}}"
    )


def chat_style(engine: Engine, model: str | None, default: str = "alpaca") -> str:
    """The template to write ``model``'s chats in: an adapter saved with a course chat template
    (``course finetune instruct --lora``: :func:`~course_lib.lora.save_adapter`'s ``chat_template``,
    read when the engine loaded the adapter) is chatted with in the style it was tuned with; the
    base, and adapters without one (or with another template), in ``default``."""
    read = getattr(engine, "adapter_chat_template", None)
    template = read(model) if model is not None and read is not None else None
    return next((s for s in _JINJA_ENDS if template is not None and chat_template(s) == template), default)


# --------------------------------------------------------------------------- #
# Requests (pydantic models; a field that does not fit is a 400 naming it)
# --------------------------------------------------------------------------- #
class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Request(BaseModel):
    # strict: "5" is not a max_tokens, true is not a token id, "yes" is not a stream (OpenAI refuses them too)
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**64)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: _StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops


    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        if value is not None and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(value)} entries; at most {MAX_LOGIT_BIAS}")
        seen = set()
        for key, bias in (value or {}).items():
            if not re.fullmatch(r"[0-9]{1,9}", key):
                raise ValueError(f"logit_bias' keys are token ids written as strings (e.g. \"50256\"), "
                                 f"got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias' values are in [-100, 100], got {bias!r} for token {key}")
            if int(key) in seen:
                raise ValueError(f"logit_bias names token {int(key)} twice")
            seen.add(int(key))
        return value

    # Fields of OpenAI's API that this server does not do. A value that asks for one is a 400 naming it
    # (ignoring it would answer another request than the one sent); the values clients send by default pass.
    @field_validator("suffix", "tools", "functions", "tool_choice", "response_format", check_fields=False)
    @classmethod
    def _not_supported(cls, value, info):
        name = info.field_name
        neutral = _NEUTRAL[name]
        if any(value == v and type(value) is type(v) for v in neutral if v is not None) or value is None:
            return value
        shown = json.dumps(next(v for v in neutral if v is not None))
        raise ValueError(f"this server (the course's own engine) does not support {name}; leave it out or send "
                         f"{shown}")


_NEUTRAL = {"suffix": (None, ""),
            "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
            "response_format": (None, {"type": "text"})}


class CompletionRequest(_Request):
    """The body of ``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids, or lists of ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)       # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: Any = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value, info):
        n = info.data.get("n", 1)
        if value is not None and value < n:
            raise ValueError(f"best_of must be at least n ({n}): it is how many completions the n are chosen from")
        if value is not None and value > n and info.data.get("stream"):
            raise ValueError("best_of above n cannot be streamed (the best are known only at the end), as at OpenAI")
        return value

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, value):   # some clients send false for "none" (OpenAI takes it too)
        return None if value is False else value

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    def wanted_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


class ChatRequest(_Request):
    """The body of ``POST /v1/chat/completions``."""

    messages: list[Any] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    response_format: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError('top_logprobs needs "logprobs": true as well')
        return value

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def wanted_prompt_logprobs(self) -> int | None:
        return None


class _APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, kind, param, code), status_code=status)


#: What a field of several forms takes (pydantic names the first form that failed, not all of them).
_FORMS = {"prompt": "a string, a list of strings, a list of token ids (integers) or a list of lists of token ids",
          "stop": "a string or a list of at most 4 non-empty strings"}


def _validation_message(err: RequestValidationError, content_type: str = "application/json") -> tuple[str, str | None]:
    """``(message, param)`` of FastAPI's first validation error of a request sent with ``content_type``."""
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'cannot parse it')})", None
    raw = [str(x) for x in first.get("loc", ()) if x != "body"]
    loc = [x for x in raw if x not in ("str", "int") and not x.startswith("list[")]   # union branches pydantic names
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")    # a validator's own message
    if param is None and "json" not in content_type:
        return (f"send the body as a JSON object with the header 'Content-Type: application/json' "
                f"(got {content_type or 'no Content-Type'!r})"), None
    if param is None:
        return ('the request body must be a JSON object, e.g. {"model": "NAME", "prompt": "Hello"}; '
                f"got {first.get('input')!r:.80}"), None
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    if raw != loc and param in _FORMS:
        return f"invalid {param!r}: it must be {_FORMS[param]} (got {first.get('input')!r:.80})", param
    return f"invalid {param!r}: {msg} (got {first.get('input')!r:.80})", param


# --------------------------------------------------------------------------- #
# The app
# --------------------------------------------------------------------------- #
class _Access:
    """ASGI middleware: the API key (401 before anything else), a body of at most ``max_body`` bytes
    (413), then one log line per request."""

    def __init__(self, app, api_key: str | None, max_body: int = MAX_BODY_BYTES):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        state = scope.setdefault("state", {})

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            problem = self._key_problem(scope)
            if problem is not None:
                await _error_response(401, problem, code="invalid_api_key")(scope, receive, send_status)
                return
            body = await self._read_body(scope, receive)
            if body is None:
                too_big = f"the request body is larger than this server takes ({self.max_body} bytes)"
                await _error_response(413, too_big, code="request_too_large")(scope, receive, send_status)
                return
            sent = False

            async def replay():   # the body read above, then the client's own messages (a disconnect)
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send_status)
        finally:
            tokens = (f" tokens={state['prompt_tokens']}+{state.get('completion_tokens', 0)}"
                      if "prompt_tokens" in state else "")
            model = f" model={state['model']}" if "model" in state else ""
            logger.info("%s %s %d%s%s %.0f ms", scope["method"], scope["path"], status[0], model, tokens,
                        1000 * (time.perf_counter() - started))

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole request body, or ``None`` when it is longer than ``max_body`` bytes."""
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:
            return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":           # the client went away
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            more = message.get("more_body", False)
        return b"".join(chunks)

    def _key_problem(self, scope) -> str | None:
        if self.api_key is None or scope["path"] == "/health":
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not auth:
            return "no API key: send it as the header 'Authorization: Bearer <key>' (the key `course serve` got)"
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            return "incorrect API key: send the key `course serve --api-key` got, as 'Authorization: Bearer <key>'"
        return None


def _coalesce(items: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Join the text of a choice's deltas that arrived together: under load the engine writes tokens
    faster than the event loop sends them, and one chunk per backlog (not per token) keeps up.
    Each choice's text stays in order; errors and ends (``None``) stay after that choice's deltas.

    >>> _coalesce([(0, Delta("a", [1])), (1, Delta("b", [2])), (0, Delta("c", [3], "stop")), (0, None)])
    [(0, Delta(text='ac', token_ids=[1, 3], finish_reason='stop', logprobs=None)), (1, Delta(text='b', token_ids=[2], finish_reason=None, logprobs=None)), (0, None)]
    """
    out: list[tuple[int, Any]] = []
    last: dict[int, int] = {}                       # choice -> its open (unfinished) Delta's place in out
    for i, item in items:
        j = last.pop(i, None)
        if isinstance(item, Delta) and j is not None:
            prev = out[j][1]
            logprobs = None if item.logprobs is None else (prev.logprobs or []) + item.logprobs
            item = Delta(prev.text + item.text, prev.token_ids + item.token_ids, item.finish_reason, logprobs)
            out[j] = (i, item)
        else:
            j = len(out)
            out.append((i, item))
        if isinstance(item, Delta) and item.finish_reason is None:
            last[i] = j
    return out


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def create_app(engine: Engine, *, api_key: str | None = None, style: str | None = None) -> FastAPI:
    """The OpenAI-compatible FastAPI app over ``engine`` (which the caller keeps and shuts down).

    Args:
        engine: the :class:`~course_lib.engine.Engine` that decodes; its ``models()`` are the names a
            request's ``model`` may give (the base, and each adapter on it).
        api_key: when given, every route but ``/health`` wants ``Authorization: Bearer <api_key>``
            (401 otherwise). Default ``None``: no key.
        style: the template that chat messages are written into (:func:`chat_prompt`): the one the
            model was tuned with (:func:`~course_lib.export.load_model` gives it). Default ``None``:
            ``"alpaca"``, as ``course generate`` does for a model that records none; a base model
            answers chats poorly whatever the template, and ``/v1/completions`` gives it raw text.
            An adapter saved with its own template is chatted with in that one (:func:`chat_style`).

    Returns:
        a :class:`fastapi.FastAPI`; run it with :func:`serve`, :func:`running_server` or uvicorn.

    Raises:
        TypeError, ValueError: ``engine`` without ``submit``/``models``; an empty ``api_key``; an unknown ``style``.
    """
    if not all(hasattr(engine, a) for a in ("submit", "models", "context_length")):
        raise TypeError(f"engine must be a course_lib.engine.Engine, got {type(engine).__name__}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError(f"api_key must be a non-empty string or None, got {api_key!r}")
    style = "alpaca" if style is None else style
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES} or None (alpaca), got {style!r}")
    created = int(time.time())
    app = FastAPI(title="course serve", description="An OpenAI-compatible server for a course model")
    app.state.engine, app.state.style = engine, style

    @app.exception_handler(_APIError)
    async def api_error(request: Request, err: _APIError):
        return _error_response(err.status, err.message, err.kind, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        message, param = _validation_message(err, request.headers.get("content-type", ""))
        return _error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            message = f"unknown URL ({request.method} {request.url.path}); this server has {_ROUTES}"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; this server has {_ROUTES}"
        elif err.status_code == 400:    # a body FastAPI could not parse (not UTF-8, ...)
            message = f"the request body could not be read ({err.detail}): send a JSON object, in UTF-8"
        else:
            message = str(err.detail)
        return _error_response(err.status_code, message, code="unknown_url" if err.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        return _error_response(500, f"the server failed: {type(err).__name__}: {err}", "server_error")

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "course",
                "parent": None if name == engine.name else engine.name, "max_model_len": engine.context_length}

    @app.get("/health")
    async def health():
        closed = getattr(engine, "closed", False)
        body = {"status": "shut down" if closed else "ok", "models": engine.models(), **engine.stats()}
        return JSONResponse(body, status_code=503 if closed else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in engine.models()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _check_model(engine, name)
        return model_card(name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.max_tokens == 0 and not body.echo:
            raise _APIError(400, 'max_tokens 0 generates nothing: send "echo": true with it to score the prompt '
                                 "(with logprobs), or max_tokens >= 1", param="max_tokens")
        prompts = _prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        asked = body
        if body.best_of is not None and body.best_of > body.n:     # best_of candidates, scored by their logprobs
            if len(prompts) * body.best_of > MAX_CHOICES:
                raise _APIError(400, f"{len(prompts)} prompts x best_of={body.best_of} is more than {MAX_CHOICES} "
                                     "completions in one request", param="best_of")
            body = body.model_copy(update={"n": body.best_of, "logprobs": body.logprobs or 0,
                                           "echo": body.echo and body.logprobs is not None})
        handles = await _submit_in_thread(engine, request, body, prompts, max_tokens, "prompt")
        echo = _echoes(engine, handles) if asked.echo else None
        kind = "text_completion"
        if body.stream:
            return _streaming(request, engine, body, handles, "cmpl", kind, chat=False, echo=echo)
        results = await _results(request, engine, handles)
        kept = _best(results, body.n, asked.n) if body is not asked else range(len(results))
        choices = []
        for index, i in enumerate(kept):
            text, finish, _, lp = results[i]
            if asked.logprobs is None:
                lp = None
            if echo is not None:
                text = echo[i] + text
                lp = None if lp is None else _prompt_entries(handles[i]) + lp
            choices.append({"index": index, "text": text, "finish_reason": finish,
                            "logprobs": None if lp is None else _completion_logprobs(engine.tokenizer, lp,
                                                                                      end=len(text))})
        return _reply(request, "cmpl", kind, body.model, choices, results)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        try:
            prompt = chat_prompt(body.messages, chat_style(engine, body.model, app.state.style))
        except (TypeError, ValueError) as err:
            raise _APIError(400, str(err), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.context_length
        handles = await _submit_in_thread(engine, request, body, [prompt], max_tokens, "messages")
        kind = "chat.completion"
        if body.stream:
            return _streaming(request, engine, body, handles, "chatcmpl", kind + ".chunk", chat=True)
        results = await _results(request, engine, handles)
        choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None if lp is None else _chat_logprobs(engine.tokenizer, lp), "finish_reason": finish}
                   for i, (text, finish, _, lp) in enumerate(results)]
        return _reply(request, "chatcmpl", kind, body.model, choices, results)

    app.add_middleware(_Access, api_key=api_key)   # outermost: before FastAPI reads the body
    return app


def _check_model(engine: Engine, name: str) -> None:
    if name not in engine.models():
        raise _APIError(404, f"the model {name!r} does not exist here; this server has {engine.models()} "
                             "(GET /v1/models lists them)", param="model", code="model_not_found")


def _prompts(prompt) -> list:
    """A request's ``prompt`` as a list of prompts (strings or id lists); ``""`` is ``<|endoftext|>``, as at OpenAI."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts or any(isinstance(p, list) and not p for p in prompts):
        raise _APIError(400, "prompt is empty; send a string, a list of strings or a list of token ids", param="prompt")
    return [[50256] if p == "" else p for p in prompts]


def _params(body: _Request, max_tokens: int, choice: int) -> SamplingParams:
    top_k = body.top_k if body.top_k not in (None, 0, -1) else None
    try:   # choice j's seed: seed + j, wrapped into the generator's [0, 2**64) as the engine does
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, stop=tuple(body.stop or ()),
                              seed=None if body.seed is None else (body.seed + choice) % 2**64,
                              logprobs=body.wanted_logprobs(),
                              prompt_logprobs=0 if max_tokens == 0 and body.wanted_prompt_logprobs() is None
                              else body.wanted_prompt_logprobs(),   # max_tokens 0: the engine scores, alone
                              presence_penalty=body.presence_penalty or 0.0,
                              frequency_penalty=body.frequency_penalty or 0.0,
                              logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
                              **({"stop_token_ids": ()} if body.ignore_eos else {}))
    except (TypeError, ValueError) as err:   # the message starts with the field's name
        name = str(err).split(" ", 1)[0]
        raise _APIError(400, str(err), param=name if name in type(body).model_fields else None) from None


def _submit(engine: Engine, request: Request, body: _Request, prompts: list, max_tokens: int, param: str) -> list:
    """``n`` engine requests per prompt, in the order of the choices (prompt by prompt)."""
    request.state.model = body.model
    _check_model(engine, body.model)
    if body.stream_options is not None and not body.stream:
        raise _APIError(400, 'stream_options is only allowed with "stream": true', param="stream_options")
    if len(prompts) * body.n > MAX_CHOICES:
        raise _APIError(400, f"{len(prompts)} prompts x n={body.n} is more than {MAX_CHOICES} choices in one request",
                        param="n")
    outside = [k for k in (body.logit_bias or {}) if int(k) >= engine.vocab_size]
    if outside:
        raise _APIError(400, f"logit_bias names token {outside[0]}, outside this model's vocabulary of "
                             f"{engine.vocab_size:,} tokens", param="logit_bias")
    params = [_params(body, max_tokens, j) for j in range(body.n)]
    handles = []
    try:
        for prompt in prompts:
            for j in range(body.n):
                handles.append(engine.submit(prompt, params[j], model=body.model))
    except UnknownModel as err:
        _cancel(handles)
        raise _APIError(404, str(err), param="model", code="model_not_found") from None
    except PromptTooLong as err:
        _cancel(handles)
        raise _APIError(400, f"this model's context is {err.limit} tokens and the prompt has {err.prompt_tokens}, "
                             f"which leaves no room for an answer: shorten it to at most {err.limit - 1} tokens",
                        param=param, code="context_length_exceeded") from None
    except (EngineError, TypeError, ValueError) as err:
        _cancel(handles)
        raise _APIError(400, str(err), param=param) from None
    except EngineClosed:
        _cancel(handles)
        raise _APIError(503, "the model's engine is shut down: restart the server", kind="server_error",
                        code="engine_shut_down") from None
    request.state.prompt_tokens = sum(h.prompt_tokens for h in handles[::body.n])
    request.state.completion_tokens = 0
    return handles


async def _submit_in_thread(*args) -> list:
    """:func:`_submit` in a worker thread: tokenizing a long prompt (about a second for 1 MiB of
    text) on the event loop would stall every other stream meanwhile. If the request is cancelled
    while it runs, the requests it submits are cancelled as they come back."""
    future = asyncio.get_running_loop().run_in_executor(None, _submit, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or _cancel(f.result()))
        raise


def _cancel(handles) -> None:
    for h in handles:
        h.cancel()


async def _results(request: Request, engine: Engine, handles: list) -> list[tuple[str, str, int]]:
    """:func:`_collect` of every handle; a client that goes away cancels them (their rows are freed);
    an engine that fails or is shut down meanwhile is a 500 or 503 in OpenAI's shape."""
    gathered = asyncio.ensure_future(asyncio.gather(*(_collect(h) for h in handles)))
    try:
        while not (await asyncio.wait({gathered}, timeout=0.2))[0]:
            if await request.is_disconnected():
                _cancel(handles)            # the rows leave at the next token; the results are nobody's
        return gathered.result()
    except RequestFailed as err:
        _cancel(handles)
        closed = getattr(engine, "closed", False)
        raise _APIError(503 if closed else 500, f"the engine failed: {err}", kind="server_error",
                        code="engine_shut_down" if closed else None) from None
    finally:
        if not gathered.done():             # this handler was cancelled (the server stops)
            gathered.cancel()


async def _collect(handle) -> tuple[str, str, int, list[TokenLogprob] | None]:
    """``(text, finish_reason, completion tokens, logprobs)`` of one request, without blocking the event loop."""
    pieces, finish = [], None
    async for delta in handle:   # leaving early (a cancelled task) cancels the request
        pieces.append(delta.text)
        finish = delta.finish_reason or finish
    done = handle.result(timeout=0)
    return "".join(pieces), finish or "stop", done.completion_tokens, done.logprobs


# --------------------------------------------------------------------------- #
# Log-probabilities in OpenAI's two shapes
# --------------------------------------------------------------------------- #
def _token_bytes(tokenizer, token_id: int) -> bytes:
    if hasattr(tokenizer, "decode_bytes"):
        return tokenizer.decode_bytes([token_id])
    return tokenizer.decode([token_id]).encode("utf-8")


def _token_name(raw: bytes) -> str:
    """A token's text; a piece of a UTF-8 character as OpenAI names it: ``"bytes:\\xe2\\x80"``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class _Offsets:
    """Where each token's text starts in a completion, in characters: an incremental UTF-8 decoder
    counts them (a token that ends in part of a character starts where that character starts)."""

    def __init__(self):
        self.decoder, self.at = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0

    def next(self, raw: bytes) -> int:
        start = self.at
        if self.decoder.getstate()[0] and raw and not 0x80 <= raw[0] <= 0xBF:
            start += 1           # the unfinished character held back becomes one U+FFFD before this token
        self.at += len(self.decoder.decode(raw))
        return start


def _completion_logprobs(tokenizer, entries: list[TokenLogprob], offsets: _Offsets | None = None,
                         end: int | None = None) -> dict:
    """``/v1/completions``' ``logprobs`` object for ``entries``; ``offsets`` carries the text
    offsets on from one streamed chunk to the next; ``end`` (the text's length) caps them: a stop
    string cuts the text inside the last token, whose entry stays (as at OpenAI)."""
    offsets = _Offsets() if offsets is None else offsets
    tokens, starts, tops = [], [], []
    for e in entries:
        raw = _token_bytes(tokenizer, e.token_id)
        name = _token_name(raw)
        tokens.append(name)
        start = offsets.next(raw)
        starts.append(start if end is None else min(start, end))
        if e.top is None:                                 # an echoed prompt's first token
            tops.append(None)
            continue
        top = {_token_name(_token_bytes(tokenizer, t)): lp for t, lp in e.top}
        if e.token_id not in {t for t, _ in e.top}:      # the sampled token is always there (k + 1 at most)
            top[name] = e.logprob
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": starts}


def _best(results: list, candidates: int, n: int) -> list[int]:
    """For each prompt's ``candidates`` results (in order), the indices of the ``n`` with the
    highest mean log-probability per token (OpenAI's ``best_of``), best first; a completion
    without a token comes last."""
    kept = []
    for start in range(0, len(results), candidates):
        group = range(start, start + candidates)
        mean = {i: sum(e.logprob for e in results[i][3]) / len(results[i][3]) if results[i][3] else -math.inf
                for i in group}
        kept += sorted(group, key=lambda i: -mean[i])[:n]
    return kept


def _echoes(engine: Engine, handles: list) -> list[str]:
    """The prompt text each choice starts with under ``echo``: its tokens decoded (the text the
    tokens of its log-probabilities spell; an empty prompt is ``<|endoftext|>``, as it was read)."""
    return [engine.tokenizer.decode(list(h.prompt_ids)) for h in handles]


def _prompt_entries(handle) -> list[TokenLogprob]:
    """The prompt's entries for ``_completion_logprobs``: the first token has no log-probability."""
    first = TokenLogprob(handle.prompt_ids[0], None, None)       # OpenAI's null logprob and top_logprobs
    return [first, *handle.prompt_logprobs[1:]]


def _chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """``/v1/chat/completions``' ``logprobs`` object for ``entries``."""
    def item(token_id: int, logprob: float) -> dict:
        raw = _token_bytes(tokenizer, token_id)
        return {"token": _token_name(raw), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def _reply(request: Request, prefix: str, kind: str, model: str, choices: list, results: list) -> dict:
    completion_tokens = sum(r[2] for r in results)
    request.state.completion_tokens = completion_tokens
    prompt_tokens = request.state.prompt_tokens
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model,
            "choices": choices, "system_fingerprint": None,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _streaming(request: Request, engine: Engine, body: _Request, handles: list, prefix: str, kind: str,
               chat: bool, echo: list[str] | None = None) -> StreamingResponse:
    """Server-sent events: one chunk per piece of text, a last one per choice with its finish_reason,
    a usage chunk (``stream_options.include_usage``), then ``data: [DONE]``. A client that goes away
    cancels the requests still running (their rows are freed at the next token). With ``echo``
    (completions), each choice's first chunk is its prompt (and the prompt's log-probabilities)."""
    ident, created, state = f"{prefix}-{uuid.uuid4().hex}", int(time.time()), request.state
    usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list, **use) -> str:
        obj = {"id": ident, "object": kind, "created": created, "model": body.model, "choices": choices,
               "system_fingerprint": None}
        return _sse({**obj, "usage": use.get("usage")} if usage else obj)

    offsets = [_Offsets() for _ in handles]         # completions' text_offset, per choice

    def choice(i: int, text: str | None, finish: str | None, role: bool = False,
               entries: list[TokenLogprob] | None = None) -> dict:
        scores, entries = None, entries or None        # no tokens in this chunk: null, as OpenAI's
        if entries is not None and not chat:
            scores = _completion_logprobs(engine.tokenizer, entries, offsets[i])
        elif entries is not None:
            scores = _chat_logprobs(engine.tokenizer, entries)
        if not chat:
            return {"index": i, "text": text or "", "logprobs": scores, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": i, "delta": delta, "logprobs": scores, "finish_reason": finish}

    async def events() -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()
        running = set(range(len(handles)))

        async def pump(i: int, handle) -> None:
            try:
                async for delta in handle:
                    await queue.put((i, delta))
            except Exception as err:  # noqa: BLE001 (reported to the client as an error event)
                await queue.put((i, err))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            if chat:
                for i in range(len(handles)):
                    yield chunk([choice(i, None, None, role=True)])
            left = len(handles)
            while left:
                items = [await queue.get()]
                while not queue.empty():            # what came meanwhile goes out together (see _coalesce)
                    items.append(queue.get_nowait())
                for i, item in _coalesce(items):
                    if item is None:
                        left -= 1
                    elif isinstance(item, Exception):
                        yield _sse(_error_body(f"the engine failed: {type(item).__name__}: {item}", "server_error"))
                        left = 0
                        break
                    else:
                        if echo is not None and echo[i] is not None:
                            entries = None if item.logprobs is None else _prompt_entries(handles[i])
                            yield chunk([choice(i, echo[i], None, entries=entries)])
                            echo[i] = None
                        if item.finish_reason:
                            running.discard(i)
                            state.completion_tokens += handles[i].result(timeout=0).completion_tokens
                        if not chat and (item.text or item.finish_reason or item.logprobs):
                            yield chunk([choice(i, item.text, item.finish_reason, entries=item.logprobs)])
                        if chat and (item.text or item.logprobs):
                            yield chunk([choice(i, item.text, None, entries=item.logprobs)])
                        if chat and item.finish_reason:
                            yield chunk([choice(i, None, item.finish_reason)])
            if usage:
                total = state.prompt_tokens + state.completion_tokens
                yield chunk([], usage={"prompt_tokens": state.prompt_tokens,
                                       "completion_tokens": state.completion_tokens, "total_tokens": total})
            yield _sse("[DONE]")
        finally:
            _cancel(handles[i] for i in running)
            for t in tasks:
                t.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------- #
# Running it
# --------------------------------------------------------------------------- #
def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port=0``: a free port the system picks)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535 (0: any free port), got {port!r}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise ValueError(f"host {host!r} is not an address of this machine ({err}); use 127.0.0.1") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"host {host!r} is not an address of this machine; use 127.0.0.1 (this machine "
                             "only) or 0.0.0.0 (the network)") from None
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror} (another server there? give another "
                      "--port)") from None
    sock.listen(128)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def _uvicorn_server(app: FastAPI):
    import uvicorn

    # log_config=None: uvicorn's default runs logging.config.dictConfig, which closes every logging handler
    # the program already has (a notebook's, pytest's, absl's on the real stderr): we log through our own logger.
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            lifespan="off", log_config=None)
    return uvicorn.Server(config)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
          style: str | None = None, out: TextIO | None = None) -> None:
    """Serve ``engine`` on ``http://host:port/v1`` until Ctrl-C, then shut the engine down.

    Args:
        engine: what answers (:class:`~course_lib.engine.Engine`).
        host: the address to listen on. Default ``"127.0.0.1"``: this machine only. Another address
            (``0.0.0.0``) without ``api_key`` is served with a warning: anyone on the network can use it.
        port: default 8000; 0 picks a free port (the line printed at start says which).
        api_key, style: as in :func:`create_app`.
        out: where the start line and the request log go. Default ``sys.stderr``.

    Raises:
        ValueError: a bad ``port`` or ``host``; OSError: the port is taken.
    """
    out = out or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    sock = None
    try:
        app = create_app(engine, api_key=api_key, style=style)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        if not is_loopback(host) and api_key is None:
            logger.warning("warning: listening on %s without --api-key: anyone who can reach this machine can "
                           "use the model", host)
        sock = _bind(host, port)
        print(f"serving {', '.join(engine.models())} at {_url(sock)} (Ctrl-C stops)", file=out, flush=True)
        try:
            _uvicorn_server(app).run(sockets=[sock])
        except KeyboardInterrupt:   # uvicorn stops gracefully on Ctrl-C, then raises it again
            pass
        print("stopped", file=out, flush=True)
    finally:
        logger.removeHandler(handler)
        if sock is not None:
            sock.close()
        engine.shutdown()


@contextlib.contextmanager
def running_server(app_or_engine: FastAPI | Engine, *, host: str = "127.0.0.1", port: int = 0,
                   api_key: str | None = None, style: str | None = None, timeout: float = 20.0) -> Iterator[str]:
    """Serve in a background thread for the ``with`` block; yields the base URL (``http://127.0.0.1:PORT/v1``).

    >>> with running_server(engine) as url:                                 # doctest: +SKIP
    ...     openai.OpenAI(base_url=url, api_key="x").models.list()

    Args:
        app_or_engine: an app from :func:`create_app`, or an engine (then ``api_key`` and ``style``
            go to :func:`create_app`). The engine is not shut down at the end: it is the caller's.
        host: default ``"127.0.0.1"``. port: default 0, a free port.
        timeout: seconds to wait for the server to start, and to stop. Default 20.

    Raises:
        RuntimeError: the server did not start in time.
    """
    app = app_or_engine if isinstance(app_or_engine, FastAPI) else create_app(app_or_engine, api_key=api_key,
                                                                              style=style)
    sock = _bind(host, port)
    server = _uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="course-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        if not server.started:
            raise RuntimeError(f"the server did not start within {timeout} s")
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


# --------------------------------------------------------------------------- #
# A chat in the terminal
# --------------------------------------------------------------------------- #
class ContextFull(Exception):
    """The chat no longer fits the model's context (:func:`chat` then forgets its oldest turn)."""


def engine_replier(engine: Engine, *, model: str | None = None, style: str | None = None,
                   params: SamplingParams | None = None) -> Callable[[list[dict]], Iterator[str]]:
    """``reply(messages)`` for :func:`chat`: the pieces of the answer of ``engine`` (in this process).

    Args:
        model: the base or an adapter (``engine.models()``). Default the base.
        style: the template (:func:`chat_prompt`). Default ``"alpaca"``; an adapter saved with its
            own template uses that one (:func:`chat_style`).
        params: sampling settings. Default ``SamplingParams(max_tokens=256, temperature=0.7)``.
    """
    style = chat_style(engine, model, style or "alpaca")
    params = params or SamplingParams(max_tokens=256, temperature=0.7)

    def reply(messages: list[dict]) -> Iterator[str]:
        try:
            handle = engine.submit(chat_prompt(messages, style), params, model=model)
        except PromptTooLong as err:
            raise ContextFull(f"{err.prompt_tokens} prompt tokens, context {err.limit}") from None
        try:
            for delta in handle:
                if delta.text:
                    yield delta.text
        finally:
            handle.cancel()

    return reply


def client_replier(base_url: str, *, api_key: str | None = None, model: str | None = None,
                   max_tokens: int | None = 256, temperature: float | None = 0.7,
                   seed: int | None = None, frequency_penalty: float = 0.0) -> Callable[[list[dict]], Iterator[str]]:
    """``reply(messages)`` for :func:`chat` through any OpenAI-compatible server, streamed;
    ``reply.model`` is the model's name there.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000/v1"``. api_key: default ``"not-needed"``.
        model: the model's name there. Default the first one ``GET /v1/models`` lists.

    Raises:
        ConnectionError: the server cannot be reached (when ``model`` is looked up).
    """
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=1)
    if model is None:
        try:
            model = client.models.list().data[0].id
        except openai.APIConnectionError as err:
            raise ConnectionError(f"cannot reach {base_url}: {err}; is the server running?") from None
        except IndexError:
            raise ValueError(f"{base_url} serves no models") from None

    def reply(messages: list[dict]) -> Iterator[str]:
        try:
            extra = {"frequency_penalty": frequency_penalty} if frequency_penalty else {}
            stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                    max_tokens=max_tokens, temperature=temperature, seed=seed,
                                                    **extra)
        except openai.BadRequestError as err:
            if "context" in str(err):
                raise ContextFull(str(err)) from None
            raise
        with stream:
            for part in stream:
                if part.choices and part.choices[0].delta.content:
                    yield part.choices[0].delta.content

    reply.model = model
    return reply


def chat(reply: Callable[[list[dict]], Iterator[str]], *, system: str | None = None, name: str = "model",
         stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """A chat in the terminal: read a line, stream the answer, keep the history; returns 0.

    Each answer is written as it comes (``name> ...``). ``/reset`` forgets the history, ``/exit``
    or the end of input (Ctrl-D) ends the chat. When the history no longer fits the context, the
    oldest turns are forgotten (a note says so); a message too long on its own is skipped.

    Args:
        reply: ``reply(messages) -> pieces of text`` (:func:`engine_replier`, :func:`client_replier`).
        system: a system message put first in every request. name: the answer's label.
        stdin, stdout: default the terminal.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    opening = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history.clear()
            print("(history forgotten)", file=stdout, flush=True)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        while True:
            pieces: list[str] = []
            try:
                print(f"{name}> ", end="", file=stdout, flush=True)
                for piece in reply(opening + history):
                    pieces.append(piece)
                    print(piece, end="", file=stdout, flush=True)
                print(file=stdout, flush=True)
                history.append({"role": "assistant", "content": "".join(pieces)})
                break
            except ContextFull as err:
                print(file=stdout)
                if len(history) > 1:
                    del history[:2]   # the oldest exchange
                    print("(the oldest turn was forgotten: the chat no longer fits the model's context)",
                          file=stdout, flush=True)
                    continue
                history.clear()
                print(f"(that message alone is too long for the model's context: {err})", file=stdout, flush=True)
                break
