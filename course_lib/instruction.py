"""Step 7 — instruction tuning: the same weights, trained on prompts and the answers to them.

* :func:`format_prompt`, :func:`format_example` — an entry (``instruction``, ``input``,
  ``output``) as the text the model reads, in the ``alpaca`` or ``phi3`` template.
* :func:`load_instruction_data`, :func:`split_instruction_data` — the 1,100 examples and the
  book's 85 / 10 / 5 split (train, test, validation), seeded.
* :class:`InstructionDataset` — each example tokenized once, with where its response starts.
* :func:`collate` — a batch of id lists → ``(inputs, targets)``: one end-of-text appended,
  padded, shifted by one; later pads (and, with ``mask_prompt``, the prompt) ignored.
* :func:`generate_response`, :func:`generate_responses` — the model's answer, and only the
  answer, stopping at end-of-text.
* :data:`INSTRUCTION_RECIPES`, :func:`finetune_instructions` — the whole recipe per profile
  (``course finetune instruct``), on step 5's training loop.
"""

from __future__ import annotations

import numbers
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .checks import boolean, describe, integer, positive_float, positive_int
from .training import History, train

__all__ = [
    "STYLES",
    "ALPACA_PREAMBLE",
    "PAD_TOKEN_ID",
    "IGNORE_INDEX",
    "TEMPLATE_MARKERS",
    "format_prompt",
    "format_example",
    "load_instruction_data",
    "split_instruction_data",
    "InstructionDataset",
    "collate",
    "generate_response",
    "generate_responses",
    "InstructionRecipe",
    "INSTRUCTION_RECIPES",
    "InstructResult",
    "finetune_instructions",
]

#: The prompt templates :func:`format_prompt` knows.
STYLES = ("alpaca", "phi3")
#: The first line of every Alpaca prompt.
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
#: GPT-2's ``<|endoftext|>``: the end of every response, and the pad.
PAD_TOKEN_ID = 50256
#: The target id ``torch.nn.functional.cross_entropy`` skips (its default ``ignore_index``).
IGNORE_INDEX = -100
#: Template text a finished response should never contain.
TEMPLATE_MARKERS = ("### Instruction:", "### Input:", "### Response:", "<|user|>", "<|assistant|>")


# --------------------------------------------------------------------------- #
# Templates
# --------------------------------------------------------------------------- #
def _check_entry(entry: Any, where: str = "entry", need_output: bool = False) -> None:
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be a dict with 'instruction', 'input' and 'output', got {type(entry).__name__}")
    keys = ("instruction", "output") if need_output else ("instruction",)
    for key in keys:
        if key not in entry:
            raise ValueError(f"{where} has no {key!r}; every entry needs 'instruction' (and 'output' to train "
                             f"on), got the keys {sorted(entry)}")
    # 'instruction' (and 'output' when needed) must be text; 'input' may be None or missing (no input)
    for key in keys + ("input",):
        if (entry.get(key) is not None or key in keys) and not isinstance(entry[key], str):
            hint = " (null in the JSON file?)" if entry[key] is None else ""
            raise TypeError(f"{where}[{key!r}] must be a string, got {describe(entry[key])}{hint}")
    if not entry["instruction"].strip():
        raise ValueError(f"{where}['instruction'] is empty")


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES} ('alpaca': '### Instruction:' / '### Response:' headers; "
                         f"'phi3': '<|user|>' / '<|assistant|>'), got {style!r}")
    return style


def format_prompt(entry: dict[str, str], style: str = "alpaca") -> str:
    """Everything the model reads before its answer.

    ``alpaca``::

        Below is an instruction that describes a task. Write a response that appropriately completes the request.

        ### Instruction:
        <instruction>

        ### Input:          (only when ``input`` is not empty)
        <input>

        ### Response:
        (the answer starts here, on a new line)

    ``phi3``: ``"<|user|>\\n" + instruction (+ "\\n" + input) + "\\n<|assistant|>\\n"``.

    >>> format_prompt({"instruction": "Add 2 and 3.", "input": ""}, "phi3")
    '<|user|>\\nAdd 2 and 3.\\n<|assistant|>\\n'

    Raises:
        TypeError, ValueError: not a dict, no (or an empty) ``instruction``, an unknown ``style``.
    """
    _check_entry(entry)
    _check_style(style)
    instruction, extra = entry["instruction"], entry.get("input") or ""
    if style == "alpaca":
        text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        if extra:
            text += f"\n\n### Input:\n{extra}"
        return text + "\n\n### Response:\n"
    return f"<|user|>\n{instruction}" + (f"\n{extra}" if extra else "") + "\n<|assistant|>\n"


def format_example(entry: dict[str, str], style: str = "alpaca") -> str:
    """:func:`format_prompt` followed by the entry's ``output``: what the model is trained on."""
    _check_entry(entry, need_output=True)
    return format_prompt(entry, style) + entry["output"]


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def load_instruction_data(path: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """The instruction examples: a list of ``{"instruction", "input", "output"}`` dicts.

    Args:
        path: a JSON file holding such a list. Default :func:`course_lib.data.fetch`
            ``("instruction-data")``: the book's 1,100 examples (checked by sha256).

    Raises:
        FileNotFoundError, ValueError: no such file; not UTF-8 text; not a JSON list of entries
            (naming the first bad one).
        TypeError: an entry's ``instruction``, ``input`` or ``output`` is not a string (``null``
            included), naming the entry.
    """
    import json

    from .data import fetch

    path = fetch("instruction-data") if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path} is not a file; pass a JSON list of instruction entries, or None")
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save the file as "
                             "UTF-8 JSON") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of entries, got a {type(data).__name__}")
    for i, entry in enumerate(data):
        _check_entry(entry, f"{path}: entry {i}", need_output=True)
    return data


def split_instruction_data(entries: Sequence[dict[str, str]], fractions: Sequence[float] = (0.85, 0.10, 0.05),
                           seed: int = 123) -> tuple[list, list, list]:
    """Shuffle (seeded) and cut into **train, test, validation**, in that order (the book's).

    The first ``int(n * fractions[0])`` shuffled entries train, the next ``int(n * fractions[1])``
    test, the rest validate (1,100 → 935 / 110 / 55).

    Raises:
        TypeError, ValueError: not a list of entries, an empty list, bad fractions, an empty split.
    """
    import math

    if isinstance(entries, (str, bytes, dict)) or not isinstance(entries, Sequence):
        raise TypeError(f"entries must be a list of instruction dicts, got {type(entries).__name__}")
    if len(entries) == 0:
        raise ValueError("entries is empty; load_instruction_data() gives the course's 1,100 examples")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    try:
        fr = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise TypeError(f"fractions must be three numbers (train, test, validation), got {fractions!r}") from None
    if len(fr) != 3 or any(not f > 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be three positive numbers summing to 1 (train, test, validation), "
                         f"e.g. (0.85, 0.10, 0.05); got {tuple(fractions)}")
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    shuffled = [entries[i] for i in order]
    n_train, n_test = int(len(shuffled) * fr[0]), int(len(shuffled) * fr[1])
    parts = shuffled[:n_train], shuffled[n_train:n_train + n_test], shuffled[n_train + n_test:]
    for name, part in zip(("train", "test", "validation"), parts):
        if not part:
            raise ValueError(f"the {name} split is empty ({len(entries)} entries, fractions {tuple(fractions)}); "
                             "give more entries or larger fractions")
    return parts


def _encode(tokenizer, text: str) -> list[int]:
    """Ordinary-text ids (template markers such as ``<|user|>`` are text, never special tokens)."""
    if hasattr(tokenizer, "encode_ordinary"):
        return list(tokenizer.encode_ordinary(text))
    return list(tokenizer.encode(text))


class InstructionDataset(Dataset):
    """Examples tokenized once: ``dataset[i]`` → ``(ids, prompt_length)``.

    ``ids`` (a list of ints) is :func:`format_example` encoded; its first ``prompt_length``
    tokens are the prompt (:func:`format_prompt`), the rest the response.

    Args:
        entries: dicts with ``instruction``, ``input`` (may be empty) and ``output``.
        tokenizer: has ``encode_ordinary`` (tiktoken, the course's ``GPT2Tokenizer``) or ``encode``.
        style: the template. Default ``"alpaca"``.

    Raises:
        TypeError, ValueError: an entry without ``instruction``/``output`` (naming it), an
            empty list, an unknown style.
    """

    def __init__(self, entries: Sequence[dict[str, str]], tokenizer, style: str = "alpaca"):
        _check_style(style)
        if isinstance(entries, dict) or not isinstance(entries, Sequence):
            raise TypeError(f"entries must be a list of instruction dicts, got {type(entries).__name__}")
        if len(entries) == 0:
            raise ValueError("entries is empty; an InstructionDataset needs at least one example")
        self.style = style
        self.items: list[tuple[list[int], int]] = []
        for i, entry in enumerate(entries):
            _check_entry(entry, f"entries[{i}]", need_output=True)
            prompt = _encode(tokenizer, format_prompt(entry, style))
            response = _encode(tokenizer, entry["output"])
            self.items.append((prompt + response, len(prompt)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.items[i]


def _check_ids(ids: Any, where: str) -> list[int]:
    """``ids`` (a list, tuple or 1-D tensor of token ids) as a list of ``int``; refuses floats and bools."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise TypeError(f"{where} must be a 1-D tensor (or list) of token ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Sequence):
        raise TypeError(f"{where} must be a list of token ids (or an (ids, prompt_length) pair), got {describe(ids)}")
    ids = list(ids)
    if all(type(x) is int and x >= 0 for x in ids):   # the usual case, fast
        return ids
    for j, x in enumerate(ids):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{where}[{j}] must be an integer token id, got {describe(x)}; token ids are never "
                            "rounded: encode the text with the tokenizer")
        if x < 0:
            raise ValueError(f"{where}[{j}] must be a token id >= 0, got {x}")
    return [int(x) for x in ids]


def collate(batch: Sequence, *, pad_token_id: int = PAD_TOKEN_ID, ignore_index: int = IGNORE_INDEX,
            allowed_max_length: int | None = None, mask_prompt: bool = False,
            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a batch of token-id lists into ``(inputs, targets)``, each ``[B, T]``.

    Each row gets one ``pad_token_id`` (end-of-text) appended and is padded with it to the
    longest row plus one; ``inputs`` are all positions but the last, ``targets`` all but the
    first (the next token at every position). In the targets the **first** end-of-text of a
    row stays — the model learns to stop — and every later pad becomes ``ignore_index``.
    ``mask_prompt=True`` also sets the targets that predict prompt tokens to
    ``ignore_index``, so only the response (and its end) is learned.

    >>> collate([[1, 2, 3], [4]], pad_token_id=0)
    (tensor([[1, 2, 3],
            [4, 0, 0]]), tensor([[   2,    3,    0],
            [   0, -100, -100]]))

    Args:
        batch: lists of ids, or the ``(ids, prompt_length)`` pairs :class:`InstructionDataset`
            yields (needed with ``mask_prompt``).
        pad_token_id: appended once, then pads. Default 50256. ignore_index: default -100.
        allowed_max_length: keep only the first this many positions of inputs and targets
            (they stay aligned). Default ``None``: all.
        mask_prompt: ignore the prompt's targets. Default ``False``.
        device: where the tensors go. Default CPU.

    Raises:
        TypeError, ValueError: an empty batch or row, a token id that is not an integer >= 0
            (``1.7``), ``pad_token_id`` not an integer >= 0, ``allowed_max_length`` not positive,
            ``mask_prompt`` without prompt lengths, a prompt length that is not an integer
            (``True``) or is longer than its row.
    """
    allowed_max_length = positive_int("allowed_max_length", allowed_max_length, allow_none=True)
    mask_prompt = boolean("mask_prompt", mask_prompt)
    pad_token_id = integer("pad_token_id", pad_token_id, minimum=0, hint=" (a token id; GPT-2's end-of-text is 50256)")
    ignore_index = integer("ignore_index", ignore_index, hint=" (cross_entropy's default is -100)")
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or len(batch) == 0:
        raise ValueError("batch must be a non-empty list of token-id lists (or (ids, prompt_length) pairs)")
    rows, prompt_lengths = [], []
    for i, item in enumerate(batch):
        if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], numbers.Integral)
                and isinstance(item[0], (list, tuple, torch.Tensor))):   # (ids, prompt_length), not two ids
            ids, prompt_length = item
            prompt_length = integer(f"batch[{i}]'s prompt_length", prompt_length, minimum=0,
                                    hint=" (the number of prompt tokens, as InstructionDataset gives)")
        else:
            ids, prompt_length = item, None
        ids = _check_ids(ids, f"batch[{i}]")
        if not ids:
            raise ValueError(f"batch[{i}] has no tokens")
        if mask_prompt and prompt_length is None:
            raise ValueError("mask_prompt=True needs (ids, prompt_length) pairs, as InstructionDataset yields; "
                             f"batch[{i}] is a plain list")
        if prompt_length is not None and prompt_length > len(ids):
            raise ValueError(f"batch[{i}]'s prompt_length {prompt_length} is longer than its row ({len(ids)} "
                             "tokens): the prompt length must be at most the row's length, or every target is "
                             "masked and the loss is nan")
        rows.append(ids)
        prompt_lengths.append(prompt_length)
    width = max(len(r) for r in rows) + 1
    inputs = torch.full((len(rows), width - 1), pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), ignore_index, dtype=torch.long)
    for b, (ids, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        n = len(ids)
        padded = torch.tensor(ids + [pad_token_id] * (width - n), dtype=torch.long)   # [width]
        inputs[b] = padded[:-1]
        targets[b, :n] = padded[1:n + 1]          # the row's next tokens, then its first end-of-text
        if mask_prompt:
            targets[b, :max(prompt_length - 1, 0)] = ignore_index   # positions that predict prompt tokens
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    from .config import get_device

    device = get_device(device) if device is not None else torch.device("cpu")
    return inputs.to(device), targets.to(device)


# --------------------------------------------------------------------------- #
# Generating answers
# --------------------------------------------------------------------------- #
def generate_response(model: nn.Module, tokenizer, entry: dict[str, str], *, style: str = "alpaca",
                      max_new_tokens: int = 256, eos_id: int = PAD_TOKEN_ID, **generate_kwargs) -> str:
    """The model's answer to ``entry``: only the new text, up to (not including) end-of-text.

    The prompt (:func:`format_prompt`) is cut from the left to fit the model's context with
    room for ``max_new_tokens``; generation (:func:`course_lib.inference.generate`, greedy by
    default; ``temperature``, ``top_k``, ``top_p`` pass through) stops at ``eos_id``. The
    model is used in ``eval()`` mode and put back in its mode.

    Returns:
        the response text, stripped of surrounding whitespace.
    """
    _check_entry(entry)
    return generate_responses(model, tokenizer, [entry], style=style, max_new_tokens=max_new_tokens,
                              eos_id=eos_id, progress=False, **generate_kwargs)[0]


def generate_responses(model: nn.Module, tokenizer, entries: Sequence[dict[str, str]], *, style: str = "alpaca",
                       max_new_tokens: int = 256, eos_id: int = PAD_TOKEN_ID, progress: bool = True,
                       stats: dict | None = None, **generate_kwargs) -> list[str]:
    """:func:`generate_response` for each entry, with a progress bar.

    ``stats``, if a dict, receives ``"stopped"``: how many responses ended with ``eos_id``
    before ``max_new_tokens``.

    Raises:
        TypeError, ValueError: ``entries`` not a list of entries (a single dict: use
            :func:`generate_response`), an entry without ``instruction`` (naming it), ``stats``
            not a dict or ``None``, ``max_new_tokens`` not positive or leaving no room for the prompt.
    """
    from tqdm.auto import tqdm

    from .inference import generate

    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        single = " (for a single entry use generate_response, or pass [entry])" if isinstance(entries, Mapping) else ""
        raise TypeError(f"entries must be a list of instruction dicts, got {describe(entries)}{single}")
    for i, entry in enumerate(entries):
        _check_entry(entry, f"entries[{i}]")
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict (it receives 'stopped') or None, got {describe(stats)}")
    positive_int("max_new_tokens", max_new_tokens)
    context = model.cfg.context_length
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in the model's context "
                         f"({context} tokens); pass a smaller max_new_tokens")
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    out, stopped = [], 0
    try:
        for i, entry in enumerate(tqdm(entries, desc="responses", disable=not progress, dynamic_ncols=True)):
            prompt = _encode(tokenizer, format_prompt(entry, style))[-(context - max_new_tokens):]
            idx = torch.tensor([prompt], dtype=torch.long, device=device)
            with torch.no_grad():
                new = generate(model, idx, max_new_tokens, eos_id=eos_id, **generate_kwargs)[0, len(prompt):].tolist()
            if eos_id in new:
                new, stopped = new[:new.index(eos_id)], stopped + 1
            out.append(tokenizer.decode(new).strip())
    finally:
        model.train(was_training)
    if stats is not None:
        stats["stopped"] = stopped
    return out


# --------------------------------------------------------------------------- #
# The whole recipe (the notebook's last cells, `course finetune instruct`, the benchmark)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class InstructionRecipe:
    """How :func:`finetune_instructions` fine-tunes one profile's model.

    Attributes:
        base: ``"profile"`` (the profile's base model, :func:`~course_lib.base_model.load_base_model`)
            or a name :func:`~course_lib.pretrained.load_gpt2` knows (``"gpt2-medium"``).
        style, mask_prompt: the template, and whether only the response is learned.
        num_epochs, batch_size, lr, weight_decay: the run (AdamW).
        allowed_max_length: positions kept per row (``None``: the model's context).
        max_train: use only this many training examples (``None``: all), for CI's ``tiny``.
        max_eval: how many test examples get a generated response (``None``: all).
        max_new_tokens: the most tokens per generated response.
        eval_freq, eval_iter: as in :func:`~course_lib.training.train`. seed: split, order, dropout.
    """

    base: str
    style: str
    mask_prompt: bool
    num_epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    allowed_max_length: int | None = None
    max_train: int | None = None
    max_eval: int | None = None
    max_new_tokens: int = 128
    eval_freq: int = 50
    eval_iter: int = 5
    seed: int = 123


#: One recipe per profile; ``gpu`` is the book's chapter 7 (GPT-2 medium, two epochs at 5e-5).
INSTRUCTION_RECIPES: dict[str, InstructionRecipe] = {
    "tiny": InstructionRecipe("profile", "alpaca", False, num_epochs=1, batch_size=8, lr=1e-3,
                              allowed_max_length=64, max_train=96, max_eval=8, max_new_tokens=16, eval_freq=6,
                              eval_iter=2),
    "cpu": InstructionRecipe("profile", "alpaca", False, num_epochs=3, batch_size=8, lr=3e-4),
    "gpu": InstructionRecipe("gpt2-medium", "alpaca", False, num_epochs=2, batch_size=8, lr=5e-5,
                             max_new_tokens=256),
}


@dataclass
class InstructResult:
    """What :func:`finetune_instructions` returns: the ``model``, its ``history``, the test
    ``responses`` (entries with a ``model_response``), the ``metrics`` and the ``splits``."""

    model: nn.Module
    history: History
    responses: list[dict[str, str]]
    metrics: dict[str, Any]
    splits: tuple


def finetune_instructions(profile: str | None = None, *, style: str | None = None, mask_prompt: bool | None = None,
                          num_epochs: int | None = None, lr: float | None = None, device: Any = None,
                          base_model: nn.Module | None = None, checkpoint_path: str | os.PathLike | None = None, resume: bool = False,
                          prepare_model: Callable[[nn.Module], Any] | None = None,
                          progress: bool = True, verbose: bool = True) -> InstructResult:
    """Instruction-tune the profile's model, then answer the test split and score the answers.

    The steps of notebook 07 in one call: :func:`load_instruction_data`,
    :func:`split_instruction_data`, :class:`InstructionDataset` and :func:`collate`,
    :func:`~course_lib.training.train`, then on the test split: the response loss (prompt
    ignored) of the model before and after, generated responses, exact match and ROUGE-L.

    Args:
        profile: ``tiny``, ``cpu`` or ``gpu``; default the active one (:data:`INSTRUCTION_RECIPES`).
        style, mask_prompt, num_epochs, lr: override the recipe's.
        device: where to train. Default :func:`~course_lib.config.get_device`.
        base_model: start from this GPT instead of the recipe's base (it is modified).
        checkpoint_path, resume: as in :func:`~course_lib.training.train`.
        prepare_model: called once with the model (on ``device``) before the base model is
            evaluated and the optimizer built; it may change the model in place and which
            parameters train (e.g. step 9's ``lambda m: add_lora(m, rank=8)``: a fresh adapter
            changes no output). Only parameters with ``requires_grad`` are optimized. Its return
            value is ignored. Default ``None``.
        progress, verbose: progress bars; evaluations printed.

    Returns:
        an :class:`InstructResult`.

    Raises:
        TypeError: ``prepare_model`` is not callable.
    """
    import time
    from dataclasses import asdict

    from torch.utils.data import DataLoader

    from .base_model import load_base_model
    from .config import get_device, get_profile, seed_everything
    from .evaluation import mean_scores, response_loss
    from .pretrained import load_gpt2
    from .tokenizers import tiktoken_gpt2

    prof = get_profile(profile)
    recipe = INSTRUCTION_RECIPES[prof.name]
    changes = {k: v for k, v in (("style", style), ("mask_prompt", mask_prompt), ("num_epochs", num_epochs),
                                 ("lr", lr)) if v is not None}
    recipe = replace(recipe, **changes)
    _check_style(recipe.style)
    positive_int("num_epochs", recipe.num_epochs)
    positive_float("lr", recipe.lr)
    if prepare_model is not None and not callable(prepare_model):
        raise TypeError(f"prepare_model must be a function of the model or None, got {type(prepare_model).__name__}")
    device = get_device(device)
    train_set, test_set, val_set = split_instruction_data(load_instruction_data(), seed=recipe.seed)
    if recipe.max_train is not None:
        train_set = train_set[:recipe.max_train]
    eval_set = test_set[:recipe.max_eval] if recipe.max_eval is not None else test_set
    if base_model is not None:
        model, base_name = base_model, "the model given"
    elif recipe.base == "profile":
        model, base_name = load_base_model(prof.name, verbose=verbose), f"{prof.model} (course base model, {prof.name})"
    else:
        model, base_name = load_gpt2(recipe.base), f"{recipe.base} (OpenAI)"
    model.to(device)
    if prepare_model is not None:
        prepare_model(model)
    tokenizer = tiktoken_gpt2()
    max_len = recipe.allowed_max_length or model.cfg.context_length
    collate_fn = partial(collate, allowed_max_length=max_len, mask_prompt=recipe.mask_prompt)
    seed_everything(recipe.seed)
    train_loader = DataLoader(InstructionDataset(train_set, tokenizer, recipe.style), batch_size=recipe.batch_size,
                              shuffle=True, drop_last=True, collate_fn=collate_fn,
                              generator=torch.Generator().manual_seed(recipe.seed))
    val_loader = DataLoader(InstructionDataset(val_set, tokenizer, recipe.style), batch_size=recipe.batch_size,
                            collate_fn=collate_fn)
    loss_kwargs = dict(style=recipe.style, batch_size=recipe.batch_size, allowed_max_length=max_len, device=device)
    before = response_loss(model, test_set, tokenizer, **loss_kwargs)
    base_stats: dict[str, int] = {}
    base_texts = generate_responses(model, tokenizer, eval_set, style=recipe.style,
                                    max_new_tokens=recipe.max_new_tokens, progress=progress, stats=base_stats)
    base_scores = mean_scores(base_texts, [e["output"] for e in eval_set])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    started = time.perf_counter()
    history = train(model, train_loader, val_loader, optimizer, device, num_epochs=recipe.num_epochs,
                    eval_freq=recipe.eval_freq, eval_iter=recipe.eval_iter, seed=recipe.seed,
                    checkpoint_path=checkpoint_path, resume=resume, progress=progress, verbose=verbose)
    seconds = time.perf_counter() - started
    if history.interrupted:  # Ctrl-C: hand back what was trained, without the minutes of evaluation
        return InstructResult(model, history, [], {"interrupted": True, "seconds": seconds, "profile": prof.name},
                              (train_set, test_set, val_set))
    after = response_loss(model, test_set, tokenizer, **loss_kwargs)
    stats: dict[str, int] = {}
    texts = generate_responses(model, tokenizer, eval_set, style=recipe.style, max_new_tokens=recipe.max_new_tokens,
                               progress=progress, stats=stats)
    responses = [{**entry, "model_response": text, "base_response": base}
                 for entry, text, base in zip(eval_set, texts, base_texts)]
    scores = mean_scores(texts, [e["output"] for e in eval_set])
    with_markers = sum(any(m in t for m in TEMPLATE_MARKERS) for t in texts)
    metrics = {
        "response_loss": after["loss"], "response_perplexity": after["perplexity"],
        "base_response_loss": before["loss"], "base_response_perplexity": before["perplexity"],
        "loss_reduction": 1 - after["loss"] / before["loss"],
        "exact_match": scores["exact_match"], "rouge_l": scores["rouge_l"],
        "base_exact_match": base_scores["exact_match"], "base_rouge_l": base_scores["rouge_l"],
        "base_stopped_at_end_of_text": base_stats["stopped"] / max(len(base_texts), 1),
        "responses": len(texts), "stopped_at_end_of_text": stats["stopped"] / max(len(texts), 1),
        "with_template_markers": with_markers / max(len(texts), 1),
        "seconds": seconds, "base_model": base_name, "profile": prof.name, "device": str(device),
        "recipe": asdict(recipe),
        "examples": {"train": len(train_set), "test": len(test_set), "validation": len(val_set)},
    }
    return InstructResult(model, history, responses, metrics, (train_set, test_set, val_set))
