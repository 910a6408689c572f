"""Step 7 — preference tuning (DPO): move the model towards chosen answers and away from rejected ones.

Direct Preference Optimization (Rafailov et al., 2023) trains a *policy* on pairs of answers to
one prompt, one ``chosen`` and one ``rejected``, against a frozen copy of itself (the
*reference*), with no reward model and no sampling during training.

* :func:`sequence_logprobs` — ``log p(response | prompt)``: the sum of the response tokens'
  log-probabilities, prompt and padding left out.
* :func:`dpo_loss` — ``-logsigmoid(beta * (chosen log-ratio - rejected log-ratio))``, with the
  implied rewards ``beta * (log p_policy - log p_reference)``.
* :func:`make_preference_pairs` — pairs from the instruction data: the reference answer is
  chosen, the model's own greedy answer rejected.
* :class:`PreferenceDataset`, :func:`collate_preference` — pairs tokenized once, and batched
  with step 7's :func:`~course_lib.instruction.collate` (prompt masked).
* :func:`dpo_batch_loss`, :func:`evaluate_dpo`, :func:`train_dpo`, :class:`DPOHistory`,
  :func:`plot_dpo` — a short loop that tracks the held-out reward margin and preference accuracy.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .checkpoint import NonFiniteError
from .checks import boolean, describe, integer, positive_int
from .config import DEFAULT_SEED, get_device
from .instruction import (IGNORE_INDEX, PAD_TOKEN_ID, _check_entry, _check_style, _encode, collate,
                          format_prompt, generate_responses)
from .training import _rng_untouched, _seed_epoch

__all__ = [
    "sequence_logprobs",
    "dpo_loss",
    "make_preference_pairs",
    "PreferenceDataset",
    "collate_preference",
    "dpo_batch_loss",
    "evaluate_dpo",
    "DPOHistory",
    "train_dpo",
    "plot_dpo",
]


# --------------------------------------------------------------------------- #
# The loss
# --------------------------------------------------------------------------- #
def sequence_logprobs(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The log-probability the model gives each row's targets: ``sum_t log p(targets[b, t] | inputs[b, :t+1])``.

    Positions whose target is ``ignore_index`` (the prompt and later pads, as
    :func:`collate_preference` builds them) contribute 0, so this is the log-probability of
    the response (and its end-of-text) given the prompt.

    Args:
        model: maps ``[B, T]`` ids to ``[B, T, V]`` logits (e.g. ``GPTModel``).
        inputs: ``[B, T]`` token ids. targets: ``[B, T]`` next-token ids or ``ignore_index``.
        ignore_index: the target id to skip. Default -100.

    Returns:
        ``[B]`` float tensor (differentiable through ``model``).

    Raises:
        TypeError, ValueError: ``inputs``/``targets`` not 2-D integer tensors of one shape;
            ``ignore_index`` not an integer; a target (other than ``ignore_index``) outside the
            model's vocabulary.
    """
    ignore_index = integer("ignore_index", ignore_index, hint=" (the target id to skip; collate uses -100)")
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point():
            raise TypeError(f"{name} must be a [batch, tokens] tensor of token ids, got "
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs and targets must have one shape, got {tuple(inputs.shape)} and "
                         f"{tuple(targets.shape)}")
    logp = F.log_softmax(model(inputs).float(), dim=-1)                       # [B, T, V]
    mask = targets != ignore_index                                            # [B, T]
    vocab = logp.shape[-1]
    if (mask & ((targets < 0) | (targets >= vocab))).any():
        scored = targets[mask]
        raise ValueError(f"targets must be token ids in [0, {vocab}) or ignore_index={ignore_index}: the largest "
                         f"target id is {scored.max().item()} (the smallest {scored.min().item()}) but the model's "
                         f"vocabulary size is {vocab}; were they made with another tokenizer or ignore_index?")
    picked = logp.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)   # [B, T]
    return (picked * mask).sum(dim=-1)                                        # [B]


def _check_beta(beta: Any) -> float:
    if not isinstance(beta, numbers.Real) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive number (how far the policy may move from the reference; "
                         f"0.1 is usual), got {beta!r}")
    return float(beta)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of a batch of pairs, and the rewards it implies.

    ``loss = mean(-logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))))``;
    it is ``log 2`` when the policy equals the reference, and falls as the policy raises the
    chosen answers' probability relative to the rejected ones'.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` :func:`sequence_logprobs` of the
            policy (with gradients).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the frozen reference.
        beta: the temperature; larger keeps the policy closer to the reference. Default 0.1.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: a scalar, and two ``[B]`` tensors
        ``beta * (policy - ref)``, detached.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: the four are not 1-D of one shape, or are empty; ``beta`` not a positive number.
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    values = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    for name, t in zip(names, values):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a [batch] tensor of log-probabilities, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D ([batch], one log-probability per response), got shape "
                             f"{tuple(t.shape)}")
    shapes = {name: tuple(t.shape) for name, t in zip(names, values)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the four log-probability tensors must have one shape, got {shapes}")
    if policy_chosen_logps.numel() == 0:
        raise ValueError("the log-probability tensors are empty (a batch of 0 pairs): the mean loss would be nan; "
                         "pass at least one pair")
    beta = _check_beta(beta)
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()
    return loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def make_preference_pairs(entries: Sequence[dict[str, str]], model: nn.Module, tokenizer, *, style: str = "alpaca",
                          max_new_tokens: int = 128, progress: bool = True) -> list[dict[str, str]]:
    """Preference pairs from instruction data: the reference ``output`` chosen, the model's own answer rejected.

    Each entry's answer is generated greedily (:func:`~course_lib.instruction.generate_responses`).
    A pair whose two answers are equal after stripping whitespace is **dropped** (the model
    already says what the reference says; DPO has nothing to move), so the result may be
    shorter than ``entries``.

    Args:
        entries: dicts with ``instruction``, ``input`` (may be empty) and ``output``.
        model, tokenizer: the model whose answers are rejected, and its tokenizer.
        style: the prompt template. Default ``"alpaca"``.
        max_new_tokens: the most tokens per generated answer. Default 128.
        progress: show a progress bar. Default ``True``.

    Returns:
        a list of ``{"instruction", "input", "chosen", "rejected"}`` dicts.

    Raises:
        TypeError, ValueError: not a list of entries, an empty list, an entry without
            ``instruction``/``output``, an unknown style.
    """
    _check_style(style)
    progress = boolean("progress", progress)
    if isinstance(entries, (str, bytes, dict)) or not isinstance(entries, Sequence):
        raise TypeError(f"entries must be a list of instruction dicts, got {type(entries).__name__}")
    if len(entries) == 0:
        raise ValueError("entries is empty; pass instruction entries (e.g. a split of load_instruction_data())")
    for i, entry in enumerate(entries):
        _check_entry(entry, f"entries[{i}]", need_output=True)
    responses = generate_responses(model, tokenizer, entries, style=style, max_new_tokens=max_new_tokens,
                                   progress=progress)
    return [{"instruction": e["instruction"], "input": e.get("input") or "", "chosen": e["output"], "rejected": r}
            for e, r in zip(entries, responses) if e["output"].strip() != r.strip()]


def _check_pair(pair: Any, where: str) -> None:
    if not isinstance(pair, dict):
        raise TypeError(f"{where} must be a dict with 'instruction', 'input', 'chosen' and 'rejected', "
                        f"got {type(pair).__name__}")
    for key in ("instruction", "chosen", "rejected"):
        if key not in pair:
            raise ValueError(f"{where} has no {key!r}; a preference pair needs 'instruction', 'chosen' and "
                             f"'rejected' (make_preference_pairs builds them), got the keys {sorted(pair)}")
        if not isinstance(pair[key], str):
            raise TypeError(f"{where}[{key!r}] must be a string, got {type(pair[key]).__name__}")
    _check_entry(pair, where)


class PreferenceDataset(Dataset):
    """Preference pairs tokenized once: ``dataset[i]`` → ``{"prompt", "chosen", "rejected"}``, lists of ids.

    ``prompt`` is :func:`~course_lib.instruction.format_prompt` encoded; ``chosen`` and
    ``rejected`` are the two answers alone (without the prompt or an end-of-text, which
    :func:`collate_preference` appends).

    Args:
        pairs: dicts with ``instruction``, ``input`` (may be missing or empty), ``chosen`` and ``rejected``.
        tokenizer: has ``encode_ordinary`` (tiktoken) or ``encode``.
        style: the template. Default ``"alpaca"``.

    Raises:
        TypeError, ValueError: not a list, an empty list, a pair without ``instruction``,
            ``chosen`` or ``rejected`` (naming it), an unknown style.
    """

    def __init__(self, pairs: Sequence[dict[str, str]], tokenizer, style: str = "alpaca"):
        _check_style(style)
        if isinstance(pairs, (str, bytes, dict)) or not isinstance(pairs, Sequence):
            raise TypeError(f"pairs must be a list of preference dicts, got {type(pairs).__name__}")
        if len(pairs) == 0:
            raise ValueError("pairs is empty; a PreferenceDataset needs at least one pair "
                             "(make_preference_pairs drops the pairs whose answers are equal)")
        self.style = style
        self.items: list[dict[str, list[int]]] = []
        for i, pair in enumerate(pairs):
            _check_pair(pair, f"pairs[{i}]")
            self.items.append({"prompt": _encode(tokenizer, format_prompt(pair, style)),
                               "chosen": _encode(tokenizer, pair["chosen"]),
                               "rejected": _encode(tokenizer, pair["rejected"])})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


def collate_preference(batch: Sequence[dict[str, list[int]]], *, pad_token_id: int = PAD_TOKEN_ID,
                       ignore_index: int = IGNORE_INDEX, allowed_max_length: int | None = None,
                       device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """A batch of :class:`PreferenceDataset` items → the chosen and the rejected ``(inputs, targets)``.

    Each side is prompt + answer through :func:`~course_lib.instruction.collate` with
    ``mask_prompt=True``: one end-of-text appended, padded, shifted, and every target but the
    answer's (and its end-of-text) set to ``ignore_index``. The two sides are padded separately.

    Args:
        batch: items with ``prompt``, ``chosen`` and ``rejected`` id lists.
        pad_token_id: default 50256. ignore_index: default -100.
        allowed_max_length: keep only the first this many positions (an answer cut off
            entirely then counts 0 on its side). Default ``None``: all.
        device: where the tensors go. Default CPU.

    Returns:
        ``{"chosen_inputs", "chosen_targets", "rejected_inputs", "rejected_targets"}``, each ``[B, T_side]``.

    Raises:
        TypeError, ValueError: an empty batch, an item without the three id lists,
            ``allowed_max_length`` not positive.
    """
    if isinstance(batch, (str, bytes, dict)) or not isinstance(batch, Sequence) or len(batch) == 0:
        raise ValueError("batch must be a non-empty list of PreferenceDataset items")
    for i, item in enumerate(batch):
        if not isinstance(item, dict) or not {"prompt", "chosen", "rejected"} <= set(item):
            raise TypeError(f"batch[{i}] must be a PreferenceDataset item (a dict with 'prompt', 'chosen' and "
                            f"'rejected' id lists), got {type(item).__name__}")
    out = {}
    for side in ("chosen", "rejected"):
        rows = [(list(item["prompt"]) + list(item[side]), len(item["prompt"])) for item in batch]
        out[f"{side}_inputs"], out[f"{side}_targets"] = collate(
            rows, pad_token_id=pad_token_id, ignore_index=ignore_index, allowed_max_length=allowed_max_length,
            mask_prompt=True, device=device)
    return out


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
_BATCH_KEYS = ("chosen_inputs", "chosen_targets", "rejected_inputs", "rejected_targets")


def _check_batch(batch: Any) -> None:
    needs = ", ".join(repr(k) for k in _BATCH_KEYS)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict with {needs} (as collate_preference makes), got {describe(batch)}")
    for key in _BATCH_KEYS:
        if key not in batch:
            raise ValueError(f"batch has no {key!r}; a batch needs {needs} (as collate_preference makes), got the "
                             f"keys {sorted(map(str, batch))}")
        if not isinstance(batch[key], torch.Tensor):
            raise TypeError(f"batch[{key!r}] must be a tensor (as collate_preference makes), got "
                            f"{describe(batch[key])}")


def _check_module(name: str, m: Any) -> None:
    if not isinstance(m, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module (e.g. GPTModel), got {type(m).__name__}")


def dpo_batch_loss(batch: dict[str, torch.Tensor], policy: nn.Module, reference: nn.Module, beta: float = 0.1,
                   device: torch.device | str | None = None, ignore_index: int = IGNORE_INDEX
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dpo_loss` of one :func:`collate_preference` batch: the policy with gradients, the reference without.

    Returns ``(loss, chosen_rewards, rejected_rewards)`` (a scalar and two ``[B]``).

    Raises:
        TypeError, ValueError: ``batch`` not a dict of the four tensors :func:`collate_preference`
            makes (naming the missing one), ``policy``/``reference`` not a model.
    """
    _check_batch(batch)
    _check_module("policy", policy)
    _check_module("reference", reference)
    device = get_device(device) if device is not None else next(policy.parameters()).device
    b = {k: v.to(device) for k, v in batch.items()}
    policy_chosen = sequence_logprobs(policy, b["chosen_inputs"], b["chosen_targets"], ignore_index)
    policy_rejected = sequence_logprobs(policy, b["rejected_inputs"], b["rejected_targets"], ignore_index)
    with torch.no_grad():
        ref_chosen = sequence_logprobs(reference, b["chosen_inputs"], b["chosen_targets"], ignore_index)
        ref_rejected = sequence_logprobs(reference, b["rejected_inputs"], b["rejected_targets"], ignore_index)
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def evaluate_dpo(policy: nn.Module, reference: nn.Module, loader, beta: float = 0.1,
                 device: torch.device | str | None = None, eval_iter: int | None = None) -> dict[str, float]:
    """The DPO loss, reward margin and preference accuracy over ``eval_iter`` batches, in ``eval()`` mode.

    ``margin`` is the mean of ``chosen_rewards - rejected_rewards``; ``accuracy`` the fraction
    of pairs with ``chosen_reward > rejected_reward`` (0 when the policy equals the reference).
    Averages are over pairs. The policy is put back in its mode; a loader with no batches gives ``nan``.

    Returns:
        ``{"loss", "margin", "accuracy"}``.

    Raises:
        TypeError, ValueError: ``policy``/``reference`` not a model, a bad batch (see
            :func:`dpo_batch_loss`), ``eval_iter`` not positive.
    """
    _check_module("policy", policy)
    _check_module("reference", reference)
    eval_iter = positive_int("eval_iter", eval_iter, allow_none=True)
    was_training = policy.training
    policy.eval()
    losses, margins = [], []
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if eval_iter is not None and i >= eval_iter:
                    break
                loss, chosen, rejected = dpo_batch_loss(batch, policy, reference, beta, device)
                losses.append(loss.item() * len(chosen))
                margins.append((chosen - rejected).cpu())
    finally:
        policy.train(was_training)
    if not margins:
        return {"loss": float("nan"), "margin": float("nan"), "accuracy": float("nan")}
    margin = torch.cat(margins)
    return {"loss": sum(losses) / len(margin), "margin": margin.mean().item(),
            "accuracy": (margin > 0).float().mean().item()}


@dataclass
class DPOHistory:
    """What :func:`train_dpo` measured: lists of equal length, one entry per evaluation.

    Attributes:
        steps: optimizer steps taken at each evaluation (the first is 0: before training).
        train_losses, val_losses: the DPO loss (``eval_iter`` batches each, ``eval()`` mode).
        train_margins, val_margins: mean ``chosen_reward - rejected_reward``.
        val_accuracies: fraction of validation pairs with ``chosen_reward > rejected_reward``.
        step: steps taken in all. seconds: wall-clock time of the run.
    """

    steps: list[int] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    train_margins: list[float] = field(default_factory=list)
    val_margins: list[float] = field(default_factory=list)
    val_accuracies: list[float] = field(default_factory=list)
    step: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_models(policy, reference) -> None:
    for name, m in (("policy", policy), ("reference", reference)):
        _check_module(name, m)
    if policy is reference:
        raise ValueError("policy and reference are the same model; pass a frozen copy as the reference, "
                         "e.g. reference = copy.deepcopy(policy)")
    ref_params = {id(p) for p in reference.parameters()}
    if any(id(p) in ref_params for p in policy.parameters()):
        raise ValueError("policy and reference share weights; pass an independent copy as the reference, "
                         "e.g. reference = copy.deepcopy(policy)")


def _check_optimizer(optimizer: Any, policy: nn.Module) -> None:
    example = "e.g. torch.optim.AdamW(policy.parameters(), lr=5e-6)"
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer over the policy's parameters ({example}), "
                        f"got {describe(optimizer)}")
    trainable = {id(p) for p in policy.parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("policy has no parameter that requires grad (it is frozen), so DPO cannot train it; "
                         "unfreeze it with policy.requires_grad_(True) (or add an adapter) before train_dpo")
    if not any(id(p) in trainable for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(f"optimizer holds none of policy's parameters that require grad, so training would "
                         f"change nothing (was it built on the reference?); build it on the policy, {example}")


def _check_loader(name: str, loader: Any) -> None:
    if isinstance(loader, Iterator) or not hasattr(loader, "__len__") or not hasattr(loader, "__iter__"):
        raise TypeError(f"{name} must be a DataLoader or a list of collate_preference batches (it is read once "
                        f"per epoch and per evaluation, and needs a length), got {describe(loader)}")


def train_dpo(policy: nn.Module, reference: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer,
              device: torch.device | str | None = None, *, beta: float = 0.1, num_epochs: int = 1,
              eval_freq: int = 10, eval_iter: int | None = None, seed: int = DEFAULT_SEED, progress: bool = True,
              verbose: bool = True) -> DPOHistory:
    """Train ``policy`` with :func:`dpo_loss` against the frozen ``reference``.

    ``reference`` is frozen here (``requires_grad_(False)``, ``eval()``) and only ever run under
    ``torch.no_grad()``. One step: ``zero_grad`` → :func:`dpo_batch_loss` (policy in ``train()``
    mode) → ``backward`` → ``optimizer.step``. Both loaders are evaluated (:func:`evaluate_dpo`)
    before the first step, every ``eval_freq`` steps and after the last. As in step 5's
    :func:`~course_lib.training.train`, a shuffling loader's order is a function of
    ``(seed, epoch)``, and evaluation leaves the random state (global and the loaders') alone.

    Args:
        policy, optimizer: the model to tune (on ``device``) and its optimizer.
        reference: a copy of the policy before tuning (``copy.deepcopy(policy)``), on the same device.
        train_loader, val_loader: loaders of :func:`collate_preference` batches.
        device: where batches go. Default the policy's device.
        beta: as in :func:`dpo_loss`. Default 0.1.
        num_epochs: passes over ``train_loader``. Default 1.
        eval_freq: evaluate every this many steps. Default 10.
        eval_iter: batches per evaluation, per loader (``None``: all). Default ``None``.
        seed: seeds the batch order (``seed + epoch``). Default 123.
        progress: a ``tqdm`` progress bar. verbose: print each evaluation.

    Returns:
        a :class:`DPOHistory`. The policy is left in ``eval()`` mode.

    Raises:
        TypeError, ValueError: ``policy`` is ``reference`` (or shares its weights), a model on
            another device, an empty ``train_loader``, a loader that is not a DataLoader or list
            (a generator), a non-positive count or ``beta``, ``optimizer`` not an optimizer or
            holding none of the policy's parameters, a frozen policy.
        course_lib.checkpoint.NonFiniteError: the loss became ``nan``/``inf`` (before that
            update; the history so far is ``err.history``).
    """
    from tqdm.auto import tqdm

    _check_models(policy, reference)
    _check_optimizer(optimizer, policy)
    _check_loader("train_loader", train_loader)
    _check_loader("val_loader", val_loader)
    beta = _check_beta(beta)
    num_epochs, eval_freq = positive_int("num_epochs", num_epochs), positive_int("eval_freq", eval_freq)
    eval_iter = positive_int("eval_iter", eval_iter, allow_none=True)
    seed = integer("seed", seed)
    progress, verbose = boolean("progress", progress), boolean("verbose", verbose)
    device = get_device(device) if device is not None else next(policy.parameters()).device
    ref_device = next(reference.parameters()).device
    if ref_device != next(policy.parameters()).device:
        raise ValueError(f"reference is on {ref_device} but policy on {next(policy.parameters()).device}; "
                         "move it with reference.to(device)")
    if len(train_loader) == 0:
        raise ValueError("train_loader has no batches; give it at least one preference pair per batch")
    reference.requires_grad_(False)
    reference.eval()
    history, total = DPOHistory(), num_epochs * len(train_loader)
    bar = tqdm(total=total, desc="DPO", unit="step", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()

    def evaluate_and_record() -> None:
        with _rng_untouched(device, (train_loader, val_loader)):
            tr = evaluate_dpo(policy, reference, train_loader, beta, device, eval_iter)
            va = evaluate_dpo(policy, reference, val_loader, beta, device, eval_iter)
        history.steps.append(history.step)
        history.train_losses.append(tr["loss"])
        history.val_losses.append(va["loss"])
        history.train_margins.append(tr["margin"])
        history.val_margins.append(va["margin"])
        history.val_accuracies.append(va["accuracy"])
        bar.set_postfix(val_loss=f"{va['loss']:.3f}", margin=f"{va['margin']:.3f}")
        if verbose:
            text = (f"step {history.step:>5,} | train loss {tr['loss']:.3f} | val loss {va['loss']:.3f} | "
                    f"val margin {va['margin']:.3f} | val accuracy {va['accuracy']:.2f}")
            tqdm.write(text) if progress else print(text)

    try:
        evaluate_and_record()
        policy.train()
        for epoch in range(num_epochs):
            _seed_epoch(train_loader, seed, epoch)
            for batch in train_loader:
                optimizer.zero_grad(set_to_none=True)
                loss, _, _ = dpo_batch_loss(batch, policy, reference, beta, device)
                if not torch.isfinite(loss):
                    err = NonFiniteError(f"the DPO loss is {loss.item()} at step {history.step + 1:,} (epoch "
                                         f"{epoch + 1}); training stopped before that update. Lower the learning "
                                         "rate or beta, and start again from the reference weights")
                    err.history = history
                    raise err
                loss.backward()
                optimizer.step()
                history.step += 1
                bar.update(1)
                if history.step % eval_freq == 0:
                    evaluate_and_record()
        if history.steps[-1] != history.step:
            evaluate_and_record()
    finally:
        bar.close()
        history.seconds = time.perf_counter() - started
        policy.eval()
    if progress:  # a saved notebook keeps only a widget's first text: say where the run ended
        print(f"DPO: {history.step:,}/{total:,} steps, {history.seconds:.1f} s")
    return history


def plot_dpo(history: DPOHistory, ax=None, title: str | None = None):
    """The validation reward margin (left axis) and the DPO losses (right axis) against steps.

    A dotted line marks ``log 2``, the loss before training. Returns the margin's matplotlib ``Axes``.
    """
    import matplotlib.pyplot as plt

    if not isinstance(history, DPOHistory):
        raise TypeError(f"history must be the DPOHistory returned by train_dpo(), got {type(history).__name__}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history.steps, history.val_margins, color="C2", marker="o", label="val reward margin")
    ax.set_xlabel("steps")
    ax.set_ylabel("reward margin (chosen - rejected)")
    right = ax.twinx()
    right.plot(history.steps, history.train_losses, color="C0", label="training loss")
    right.plot(history.steps, history.val_losses, color="C1", linestyle="--", label="validation loss")
    right.axhline(math.log(2), color="0.5", linestyle=":", label="log 2 (policy = reference)")
    right.set_ylabel("DPO loss")
    handles, labels = ax.get_legend_handles_labels()
    more_handles, more_labels = right.get_legend_handles_labels()
    ax.legend(handles + more_handles, labels + more_labels, loc="center right")
    ax.set_title(title or "DPO: the margin grows as the loss falls")
    return ax
