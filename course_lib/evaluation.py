"""Step 7 — evaluating an instruction-tuned model: response loss, exact match, ROUGE-L, an LLM judge.

* :func:`response_loss` — mean cross-entropy (and perplexity) over the response tokens of a
  set of entries, the prompt ignored.
* :func:`normalize_text`, :func:`exact_match` — the same answer, up to case, whitespace and
  punctuation.
* :func:`rouge_l` — ROUGE-L F1: the longest common subsequence of words, written by hand
  (equal to the ``rouge-score`` package's ``rougeL`` F-measure, without stemming).
* :func:`mean_scores` — both metrics averaged over a set.
* :func:`parse_score`, :func:`judge`, :class:`JudgeResult` — a 0–100 score per response from
  another LLM, through any OpenAI-compatible endpoint (Ollama, llama.cpp's server, vLLM).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import boolean, describe, finite_number, non_negative_int, positive_int
from .instruction import IGNORE_INDEX, InstructionDataset, collate
from .training import perplexity

__all__ = [
    "response_loss",
    "normalize_text",
    "exact_match",
    "rouge_tokens",
    "lcs_length",
    "rouge_l",
    "mean_scores",
    "JUDGE_PROMPT",
    "parse_score",
    "JudgeResult",
    "judge",
]

# --------------------------------------------------------------------------- #
# 1. Response loss
# --------------------------------------------------------------------------- #
def response_loss(model: nn.Module, entries: Sequence[dict[str, str]], tokenizer, *, style: str = "alpaca",
                  batch_size: int = 8, allowed_max_length: int | None = None,
                  device: torch.device | str | None = None) -> dict[str, float | int]:
    """Cross-entropy of the reference responses given their prompts; the prompt tokens are ignored.

    Each entry becomes ``format_example(entry, style)`` plus one end-of-text
    (:class:`~course_lib.instruction.InstructionDataset`, then
    :func:`~course_lib.instruction.collate` with ``mask_prompt=True``), so the tokens scored are
    the response's and its end-of-text: the model is also judged on knowing when to stop.

    The loss is the mean over **all response tokens of the set** (the sum of their
    ``-log p`` divided by their number), not a mean of per-batch means, so it does not depend
    on ``batch_size`` and a long response weighs more than a short one.

    The model runs in ``eval()`` mode without gradients and is put back in its mode.

    Args:
        model: a GPT returning logits ``[B, T, vocab_size]`` for ids ``[B, T]``.
        entries: dicts with ``instruction``, ``input`` (may be empty) and ``output``.
        tokenizer: tiktoken's GPT-2 encoding or the course's ``GPT2Tokenizer``.
        style: the prompt template, ``"alpaca"`` or ``"phi3"``. Default ``"alpaca"``.
        batch_size: rows per forward pass. Default 8.
        allowed_max_length: positions kept per row; tokens past it are not scored. Default
            ``None``: the model's ``cfg.context_length`` (and never more than it).
        device: where the batches go; the model must already be there. Default: the model's device.

    Returns:
        ``{"loss": float, "perplexity": float, "tokens": int, "examples": int}`` — ``tokens``
        is the number of response tokens scored.

    Raises:
        TypeError, ValueError: not a model, an empty list, an entry without ``instruction`` or
            ``output`` (naming it), a bad ``batch_size``/``allowed_max_length``/``style``,
            or ``allowed_max_length`` so short that no response token is left to score.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. GPTModel), got {type(model).__name__}")
    batch_size = positive_int("batch_size", batch_size)
    allowed_max_length = positive_int("allowed_max_length", allowed_max_length, allow_none=True)
    context = getattr(getattr(model, "cfg", None), "context_length", None)
    if context is not None:
        allowed_max_length = context if allowed_max_length is None else min(allowed_max_length, context)
    dataset = InstructionDataset(entries, tokenizer, style=style)
    if device is None:
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("model has no parameters to say where it lives; pass device= (e.g. 'cpu')")
        device = first.device
    else:
        from .config import get_device

        device = get_device(device)                # "nonsense" or 5: named, not torch's error
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                inputs, targets = collate(batch, ignore_index=IGNORE_INDEX, allowed_max_length=allowed_max_length,
                                          mask_prompt=True, device=device)                       # [B, T] each
                logits = model(inputs)                                                           # [B, T, V]
                total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                         ignore_index=IGNORE_INDEX, reduction="sum").item()
                count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"no response token fits in allowed_max_length={allowed_max_length}: every prompt fills "
                         "it; pass a larger allowed_max_length (at most the model's context length)")
    loss = total / count
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": count, "examples": len(dataset)}


# --------------------------------------------------------------------------- #
# 2. Reference-based metrics
# --------------------------------------------------------------------------- #
def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {describe(value)}")
    return value


_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_text(text: str) -> str:
    """``text`` as :func:`exact_match` compares it.

    In order: Unicode NFKC (``"ﬁ"`` → ``"fi"``, one form for ``"é"``), case folded
    (``str.casefold``: ``"ß"`` → ``"ss"``), punctuation removed (ASCII ``string.punctuation``,
    as SQuAD's script, and every Unicode punctuation character: ``“ ” — …``), whitespace
    runs collapsed to one space and stripped. Unlike SQuAD's script, articles (*a*, *an*,
    *the*) are **kept**: our answers are sentences, not short spans, and a dropped article
    is a different sentence.

    >>> normalize_text("  The Capital,   is PARIS! ")
    'the capital is paris'

    Raises:
        TypeError: ``text`` is not a string.
    """
    text = unicodedata.normalize("NFKC", _check_str("text", text)).casefold()
    text = "".join(ch for ch in text
                   if ch not in _ASCII_PUNCTUATION and not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` and ``reference`` are equal after :func:`normalize_text`.

    >>> exact_match("Paris.", "paris")
    True

    Raises:
        TypeError: either is not a string.
    """
    _check_str("prediction", prediction)
    _check_str("reference", reference)
    return normalize_text(prediction) == normalize_text(reference)


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """The words ROUGE compares: ``text.lower()`` cut at every character outside ``a-z0-9``.

    ``rouge-score``'s tokenizer without stemming: anything else (accented letters, other
    scripts, punctuation) separates words and is dropped.

    >>> rouge_tokens("It's 5 o'clock, Café!")
    ['it', 's', '5', 'o', 'clock', 'caf']
    """
    return _ROUGE_TOKEN.findall(_check_str("text", text).lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (not necessarily contiguous).

    Dynamic programming, one row at a time: ``row[j]`` is the LCS of the part of ``a`` read
    so far and ``b[:j]``. Time ``O(len(a) * len(b))``, memory ``O(len(b))``.

    >>> lcs_length("the cat sat".split(), "the black cat".split())
    2

    Raises:
        TypeError: ``a`` or ``b`` is not a sequence (``None``, a number).
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, Sized) or not isinstance(value, Iterable):
            raise TypeError(f"{name} must be a sequence (e.g. a list of words from rouge_tokens), got "
                            f"{describe(value)}")
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference``, in ``[0, 1]``.

    With ``L`` the :func:`lcs_length` of the two :func:`rouge_tokens` lists, precision
    ``P = L / len(prediction tokens)``, recall ``R = L / len(reference tokens)`` and
    ``F1 = 2PR / (P + R)`` (0 when ``L`` is 0). As ``rouge-score``, a side with no tokens
    (an empty string, only punctuation) scores 0 — even when both are empty.

    >>> rouge_l("the cat sat on the mat", "the cat is on the mat")
    0.8333333333333334

    Raises:
        TypeError: either is not a string.
    """
    _check_str("prediction", prediction)
    _check_str("reference", reference)
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    common = lcs_length(ref, pred)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _check_texts(name: str, values: Any) -> list[str]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {describe(values)}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{name}[{i}] must be a string, got {describe(value)}")
    return list(values)


def mean_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """:func:`exact_match` (as a fraction) and :func:`rouge_l` averaged over pairs.

    Returns:
        ``{"exact_match": float, "rouge_l": float, "count": int}``, both means in ``[0, 1]``.

    Raises:
        TypeError: not lists of strings.
        ValueError: the lists differ in length, or are empty.
    """
    predictions, references = _check_texts("predictions", predictions), _check_texts("references", references)
    if len(predictions) != len(references):
        raise ValueError(f"predictions and references must pair up, got {len(predictions)} predictions and "
                         f"{len(references)} references")
    if not predictions:
        raise ValueError("predictions is empty: nothing to score")
    n = len(predictions)
    return {"exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
            "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
            "count": n}


# --------------------------------------------------------------------------- #
# 3. An LLM as judge
# --------------------------------------------------------------------------- #
#: The default judge prompt; ``{instruction}`` is the instruction, then its input when there is one.
JUDGE_PROMPT = """\
You are grading a model's response to an instruction. Compare it with the reference answer \
and rate how well it completes the instruction: 0 means wrong or unrelated, 100 means as good \
as the reference. Reply with a single integer from 0 to 100 and nothing else.

### Instruction:
{instruction}

### Reference answer:
{reference}

### Model response:
{response}"""

_FIELDS = ("instruction", "reference", "response")
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S | re.I)       # reasoning models' scratchpad
_SCALE = re.compile(r"\b0\s*(?:-|–|—|to)\s*100\b|\bbetween\s+0\s+and\s+100\b",   # "0-100", "0 to 100",
                    re.I)                                                           # "between 0 and 100": the scale
# a number, not glued to a word: the 4 of "GPT-4" (a sign right after a letter) is no score
_NUMBER = re.compile(r"(?<![\w.])(?<![\w.][-+])[-+]?\d+(?:\.\d+)?")
_AFTER_SCORE = re.compile(r"\bscores?\b(?:\s+(?:is|of|was)\b)?[\s:=*_\"'`]*(?=[-+]?\d)", re.I)  # "Score: ", "score of "


def parse_score(reply: str | None) -> int | None:
    """The score in a judge's reply: the number right after the word "score" if there is one,
    else its first number, if it lies in ``[0, 100]``; else ``None``.

    A ``<think>…</think>`` block and mentions of the scale (``"0-100"``, ``"0 to 100"``,
    ``"between 0 and 100"``) are skipped first; a number glued to a word (the 4 of ``"GPT-4"``)
    is not one. A decimal is rounded half up. ``None`` when there is no number or the one
    chosen is out of range (a judge that says ``150`` or ``-5`` has not given a score).

    >>> parse_score("Score: 85/100"), parse_score("85."), parse_score("**92.5**")
    (85, 85, 93)
    >>> parse_score("I cannot grade this."), parse_score("150") is None
    (None, True)
    >>> parse_score("Step 1: compare with GPT-4's answer. Score: 85")
    85
    """
    if not isinstance(reply, str):
        return None
    text = _SCALE.sub(" ", _THINK.sub(" ", reply))
    after = _AFTER_SCORE.search(text)
    found = _NUMBER.match(text, after.end()) if after is not None else None
    found = found or _NUMBER.search(text)
    if found is None:
        return None
    value = float(found.group())
    if not 0 <= value <= 100:
        return None
    return int(math.floor(value + 0.5))


@dataclass
class JudgeResult:
    """What :func:`judge` returns; item ``i`` of each list belongs to response ``i``.

    Attributes:
        scores: the score, or ``None`` when missing (no usable number, or the request failed).
        replies: the judge's raw reply, or ``None`` when the request failed.
        errors: why the request failed (``"HTTP 500: ..."``), or ``None``.
    """

    scores: list[int | None]
    replies: list[str | None]
    errors: list[str | None]

    @property
    def count(self) -> int:
        """How many responses were scored."""
        return sum(s is not None for s in self.scores)

    @property
    def mean(self) -> float:
        """Mean over the scored responses; ``nan`` when none was."""
        scored = [s for s in self.scores if s is not None]
        return sum(scored) / len(scored) if scored else math.nan

    @property
    def failed(self) -> int:
        """How many requests failed (a server error, a timeout)."""
        return sum(e is not None for e in self.errors)

    @property
    def unparsed(self) -> int:
        """How many replies came back without a usable score."""
        return sum(e is None and s is None for s, e in zip(self.scores, self.errors))

    def as_dict(self) -> dict[str, Any]:
        """``{"mean", "count", "total", "failed", "unparsed"}``, JSON-ready: ``mean`` is ``None``
        when nothing was scored."""
        return {"mean": self.mean if self.count else None, "count": self.count, "total": len(self.scores),
                "failed": self.failed, "unparsed": self.unparsed}


def _check_judge_inputs(entries: Any, responses: Any) -> list[str]:
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        raise TypeError(f"entries must be a list of dicts with 'instruction', 'input' and 'output', "
                        f"got {describe(entries)}")
    responses = _check_texts("responses", responses)
    if len(entries) != len(responses):
        raise ValueError(f"entries and responses must pair up, got {len(entries)} entries and "
                         f"{len(responses)} responses")
    if not entries:
        raise ValueError("entries is empty: nothing to judge")
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise TypeError(f"entries[{i}] must be a dict with 'instruction', 'input' and 'output', "
                            f"got {describe(entry)}")
        for key in ("instruction", "output"):
            if key not in entry:
                raise ValueError(f"entries[{i}] has no {key!r} (the judge needs the instruction and the reference "
                                 f"answer 'output'), got the keys {sorted(entry)}")
            if not isinstance(entry[key], str):
                raise TypeError(f"entries[{i}][{key!r}] must be a string, got {describe(entry[key])}")
        if entry.get("input") is not None and not isinstance(entry["input"], str):
            raise TypeError(f"entries[{i}]['input'] must be a string, got {describe(entry['input'])}")
    return responses


def _check_template(template: Any) -> str:
    if template is None:
        return JUDGE_PROMPT
    if not isinstance(template, str):
        raise TypeError(f"prompt_template must be a string or None, got {describe(template)}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        template.format(**{f: "" for f in _FIELDS})
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"prompt_template must use only the fields {{instruction}}, {{reference}} and {{response}} "
                         f"(write a literal brace as {{{{ or }}}}); formatting it failed: {err!r}") from None
    missing = [f for f in _FIELDS if f not in fields]
    if missing:
        raise ValueError(f"prompt_template must contain {', '.join('{' + f + '}' for f in missing)}: "
                         "the judge has to see the instruction, the reference answer and the response")
    return template


def _prompt(template: str, entry: Mapping[str, str], response: str) -> str:
    instruction = entry["instruction"]
    if entry.get("input"):
        instruction += f"\n\n### Input:\n{entry['input']}"
    return template.format(instruction=instruction, reference=entry["output"], response=response)


def judge(entries: Sequence[dict[str, str]], responses: Sequence[str], *, base_url: str, model: str,
          api_key: str | None = None, max_retries: int = 2, timeout: float = 60.0,
          prompt_template: str | None = None, progress: bool = True) -> JudgeResult:
    """Ask another LLM to score each response from 0 to 100 against the reference answer.

    One chat-completions request per response (``temperature=0``), through the official
    ``openai`` client, to any OpenAI-compatible server: Ollama (``http://localhost:11434/v1``),
    llama.cpp's ``llama-server`` (``http://localhost:8080/v1``), vLLM (``http://localhost:8000/v1``).
    The reply is read with :func:`parse_score`.

    Failures. The client retries connection errors, timeouts, 429 and 5xx answers
    ``max_retries`` times with back-off. A request that still fails is recorded (score
    ``None``, ``JudgeResult.errors``) and the run goes on. But while no request has reached
    the server yet, a failure that every later request would repeat stops the run at once:

    * the server cannot be reached or does not answer in time → ``ConnectionError`` naming
      ``base_url`` and what to start;
    * 401/403 (the key) or 404 (the model, or a ``base_url`` without ``/v1``) → ``ValueError``.

    Args:
        entries: dicts with ``instruction``, ``input`` (may be empty or absent) and ``output``
            (the reference answer).
        responses: the model's response to each entry, in order.
        base_url: the server's OpenAI-compatible root, e.g. ``"http://localhost:11434/v1"``.
        model: the judge model's name on that server, e.g. ``"llama3.1:8b"``.
        api_key: sent as ``Authorization: Bearer <key>``. Default ``None``: ``"not-needed"``
            (local servers ignore it).
        max_retries: retries per request. Default 2.
        timeout: seconds to wait for one reply. Default 60.
        prompt_template: a ``str.format`` template with ``{instruction}`` (followed by the
            input, when there is one), ``{reference}`` and ``{response}``. Default :data:`JUDGE_PROMPT`.
        progress: show a progress bar. Default ``True``.

    Returns:
        a :class:`JudgeResult`: ``scores`` (``int`` or ``None`` per response), ``mean`` over the
        scored ones, ``count`` scored, ``failed`` requests, ``unparsed`` replies.

    Raises:
        TypeError, ValueError: bad arguments (naming them): entries and responses of different
            lengths, an entry without ``instruction`` or ``output``, an empty ``base_url`` or
            ``model``, a template missing a field.
        ConnectionError: the server cannot be reached.
    """
    import openai
    from tqdm.auto import tqdm

    responses = _check_judge_inputs(entries, responses)
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a string such as 'http://localhost:11434/v1', got {describe(base_url)}")
    base_url = base_url.strip()
    if not base_url:
        raise ValueError("base_url is empty; pass the judge server's address, e.g. 'http://localhost:11434/v1' "
                         "(Ollama) or 'http://localhost:8080/v1' (llama.cpp's llama-server)")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r} "
                         "(e.g. 'http://localhost:11434/v1')")
    if not isinstance(model, str) or not model.strip():
        raise (TypeError if not isinstance(model, str) else ValueError)(
            f"model must be the judge model's name on the server (e.g. 'llama3.1:8b'), got {describe(model)}")
    if api_key is not None and not isinstance(api_key, str):
        raise TypeError(f"api_key must be a string or None, got {type(api_key).__name__}")
    max_retries = non_negative_int("max_retries", max_retries)
    timeout = finite_number("timeout", timeout, positive=True, hint=" (seconds to wait for one reply)")
    template = _check_template(prompt_template)
    progress = boolean("progress", progress)

    n = len(responses)
    scores: list[int | None] = [None] * n
    replies: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    reached = False  # has any request got an answer from the server?

    def ask(client, entry, response) -> tuple[str | None, str | None]:
        """``(reply, error)`` for one response; raises for what every later request would repeat."""
        nonlocal reached
        try:
            completion = client.chat.completions.create(
                model=model, temperature=0, messages=[{"role": "user", "content": _prompt(template, entry, response)}])
        except openai.APIConnectionError as err:           # includes APITimeoutError
            if not reached:
                raise ConnectionError(_unreachable(base_url, timeout, max_retries, err,
                                                   isinstance(err, openai.APITimeoutError))) from err
            return None, f"{type(err).__name__}: {err}"
        except openai.APIStatusError as err:
            if not reached and err.status_code in (401, 403, 404):
                raise ValueError(_refused(base_url, model, err)) from err
            reached = True
            return None, f"HTTP {err.status_code}: {_server_message(err)}"
        except openai.APIError as err:                     # an answer the client could not read
            reached = True
            return None, f"{type(err).__name__}: {err}"
        reached = True
        try:
            return completion.choices[0].message.content or "", None
        except (AttributeError, IndexError, TypeError):
            return None, f"a reply without choices[0].message: {str(completion)[:200]}"

    with openai.OpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=max_retries,
                       timeout=float(timeout)) as client, \
            tqdm(total=n, desc="judge", unit="response", disable=not progress, dynamic_ncols=True) as bar:
        for i, (entry, response) in enumerate(zip(entries, responses)):
            replies[i], errors[i] = ask(client, entry, response)
            scores[i] = parse_score(replies[i])
            scored = [s for s in scores if s is not None]
            if scored:
                bar.set_postfix(mean=f"{sum(scored) / len(scored):.1f}", refresh=False)
            bar.update(1)
    return JudgeResult(scores, replies, errors)


def _server_message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, Mapping):
        message = body.get("message") or body.get("error")
        if isinstance(message, Mapping):
            message = message.get("message")
        if message:
            return str(message)[:300]
    return str(getattr(err, "message", err))[:300]


def _unreachable(base_url: str, timeout: float, max_retries: int, err: Exception, timed_out: bool) -> str:
    tries = f"{max_retries + 1} {'try' if max_retries == 0 else 'tries'}"
    if timed_out:
        return (f"the judge at {base_url} did not answer within timeout={timeout:g} s ({tries}); a model "
                "loading for the first time can take minutes: pass a larger timeout")
    return (f"cannot reach a judge at {base_url} ({tries}: {err}). Start an OpenAI-compatible server first, "
            "e.g. `ollama serve` (then base_url='http://localhost:11434/v1') or "
            "`llama-server -m MODEL.gguf` (base_url='http://localhost:8080/v1'), and check the address and port")


def _refused(base_url: str, model: str, err: Any) -> str:
    detail = _server_message(err)
    if err.status_code == 404:
        return (f"the judge at {base_url} answered 404 for model={model!r} ({detail}): check the model name "
                f"(Ollama: `ollama pull {model}`; `ollama list` shows what is there) and that base_url ends "
                "with /v1")
    return (f"the judge at {base_url} refused the request with HTTP {err.status_code} ({detail}): check api_key "
            "(a local server needs none; a hosted one needs its key)")
