"""Step 6 — fine-tuning for classification: a spam filter from a pretrained GPT.

* :func:`load_sms_spam` — the SMS Spam Collection as a DataFrame (``label``, ``text``).
* :func:`split_dataset` — train / validation / test, deduplicated and balanced, seeded.
* :class:`SpamDataset` — token ids padded (or truncated) to one length, with true lengths.
* :class:`GPTClassifier`, :func:`add_classifier_head` — the LM head replaced by a
  ``num_classes``-wide layer, read at the last real token (or averaged over real tokens).
* :func:`classification_loss`, :func:`calc_accuracy_loader`, :func:`predict_loader`,
  :func:`train_classifier` — the loss, accuracy and training loop (step 5's :func:`train`).
* :func:`classify` — labels and probabilities for new texts.
* :func:`binary_metrics`, :func:`tfidf_baseline` — precision/recall/F1 and the bag-of-words
  baseline any ML engineer asks for (scikit-learn).
* :func:`finetune_classifier`, :data:`CLASSIFIER_RECIPES` — all of it in one call, per profile
  (``course finetune classify``); :func:`trim_padding` is its speed switch.

Padding and pooling. Rows are right-padded with ``pad_token_id`` (GPT-2's ``<|endoftext|>``,
50256). Texts are encoded as ordinary text (a literal ``"<|endoftext|>"`` in a message becomes
ordinary tokens), so the pad id never occurs inside a row, and the classifier finds each row's
last real token as its last non-pad position — the rule of Hugging Face's
``GPT2ForSequenceClassification``. Under causal attention no real token sees a pad, so a
padded row gives exactly the logits of the same row unpadded.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .checks import boolean, integer, positive_float, positive_int
from .config import GPTConfig, get_device
from .model import GPTModel, count_parameters
from .training import History, train

__all__ = [
    "LABELS",
    "PAD_TOKEN_ID",
    "TRAINABLE",
    "POOLING",
    "load_sms_spam",
    "split_dataset",
    "SpamDataset",
    "GPTClassifier",
    "add_classifier_head",
    "classification_loss",
    "calc_accuracy_loader",
    "predict_loader",
    "train_classifier",
    "Prediction",
    "classify",
    "binary_metrics",
    "tfidf_baseline",
    "TFIDF_GRID",
    "trim_padding",
    "ClassifierRecipe",
    "CLASSIFIER_RECIPES",
    "FinetuneResult",
    "finetune_classifier",
]

#: The class names of the SMS Spam Collection, in the order of their ids (ham = 0, spam = 1).
LABELS: tuple[str, str] = ("ham", "spam")
#: GPT-2's ``<|endoftext|>``, used to pad rows to one length.
PAD_TOKEN_ID = 50256
#: What :func:`add_classifier_head` can leave trainable.
TRAINABLE = ("head", "last-block", "all")
#: How :class:`GPTClassifier` turns a row's ``[T, C]`` logits into ``[C]``.
POOLING = ("last", "mean")


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def load_sms_spam(path: str | os.PathLike | None = None):
    """All 5,574 messages of the SMS Spam Collection as a DataFrame with columns ``label`` and ``text``.

    The file is tab-separated, one ``label<TAB>text`` per line. Its messages contain quote
    characters, so it is read with quoting disabled: ``pandas.read_csv``'s default quoting
    merges a few lines (and gives 5,572 rows). 4,827 are ``ham``, 747 ``spam``.

    Args:
        path: the ``SMSSpamCollection`` file. Default: :func:`course_lib.data.fetch`
            ``("sms-spam")`` (cache, mirror or download, checked by sha256).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line that is not ``ham``/``spam``, a tab and a text (named); a file that is
            not UTF-8 text.
    """
    import pandas as pd

    from .data import fetch

    path = fetch("sms-spam") if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path {path} is not a file; pass the SMSSpamCollection file, or None to fetch it")
    def extra_tab() -> ValueError:
        with open(path, encoding="utf-8") as fh:
            line = next((i for i, text in enumerate(fh, 1) if text.rstrip("\r\n").count("\t") > 1), "?")
        return ValueError(f"{path}, line {line}: expected 'ham' or 'spam', one tab and the text, got more than "
                          "one tab; is this the SMSSpamCollection file?")

    try:
        df = pd.read_csv(path, sep="\t", header=None, names=["label", "text"], quoting=csv.QUOTE_NONE,
                         dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); is this the "
                         "SMSSpamCollection file?") from None
    except pd.errors.ParserError:                   # a later line with more fields than the first
        raise extra_tab() from None
    if not isinstance(df.index, pd.RangeIndex):     # the first line had more: pandas made an index of a column
        raise extra_tab()
    bad = [i for i, label in enumerate(df["label"]) if label not in LABELS]
    if bad:
        raise ValueError(f"{path}, line {bad[0] + 1}: expected 'ham' or 'spam', a tab and the text, "
                         f"got label {df['label'].iloc[bad[0]]!r}; is this the SMSSpamCollection file?")
    return df


def _labels(labels: Any) -> tuple[str, ...]:
    """``labels`` as a tuple of distinct class names (a string would be read letter by letter)."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(f"labels must be a list of class names such as ('ham', 'spam'), got {labels!r}")
    names = tuple(labels)
    if len(set(names)) != len(names):
        raise ValueError(f"labels must name each class once (a name's position is its class id), got {names}")
    return names


def _check_frame(df, name: str = "df") -> None:
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame with columns 'label' and 'text', got {type(df).__name__}")
    missing = {"label", "text"} - set(df.columns)
    if missing:
        raise ValueError(f"{name} lacks the column(s) {sorted(missing)}; it needs 'label' and 'text' "
                         "(load_sms_spam() gives them)")


def split_dataset(df, *, fractions: Sequence[float] = (0.7, 0.1, 0.2), balance: bool = True, dedupe: bool = True,
                  seed: int = 123):
    """Split ``df`` into train, validation and test DataFrames (index reset), reproducibly.

    1. ``dedupe``: keep the first row of each text. 403 rows of the SMS collection are copies
       of an earlier message (94 of them spam; 281 distinct texts repeat): without this, copies of a test message can sit in the training
       set, and the test accuracy measures memory rather than generalisation.
    2. ``balance``: undersample every class to the size of the smallest (653 each after
       deduplication), drawing with ``seed``.
    3. Shuffle with ``seed`` and cut by ``fractions``: ``int(n * f)`` rows for train and
       validation, the rest for test.

    Args:
        df: a DataFrame with ``label`` and ``text`` columns (:func:`load_sms_spam`).
        fractions: train, validation and test fractions, positive and summing to 1.
        balance, dedupe: see above. Default ``True`` both.
        seed: the random seed. Default 123.

    Returns:
        ``(train, validation, test)`` DataFrames.

    Raises:
        TypeError, ValueError: not a DataFrame with the columns; no rows; ``balance`` with
            fewer than two classes; a seed outside ``[0, 2**32 - 1]``; bad fractions; a split
            that would be empty.
    """
    _check_frame(df)
    balance, dedupe = boolean("balance", balance), boolean("dedupe", dedupe)
    seed = integer("seed", seed, minimum=0)
    if seed > 2**32 - 1:
        raise ValueError(f"seed must be at most 2**32 - 1 (pandas' sampling takes 32 bits), got {seed}")
    if len(df) == 0:
        raise ValueError("df has no rows; give the messages to split (load_sms_spam() reads them)")
    if balance and df["label"].nunique() < 2:
        raise ValueError(f"balance=True undersamples every class to the smallest, but df has only the label "
                         f"{df['label'].iloc[0]!r}; a classifier needs rows of at least two classes")
    try:
        fr = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise TypeError(f"fractions must be three numbers (train, validation, test), got {fractions!r}") from None
    if len(fr) != 3 or any(not f > 0 for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be three positive numbers summing to 1, e.g. (0.7, 0.1, 0.2); "
                         f"got {tuple(fractions)}")
    if dedupe:
        df = df.drop_duplicates(subset="text", keep="first")
    if balance:
        smallest = df["label"].value_counts().min()
        df = df.groupby("label", sort=True, group_keys=False).sample(n=int(smallest), random_state=seed)
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n_train, n_val = int(len(df) * fr[0]), int(len(df) * fr[1])
    parts = df.iloc[:n_train], df.iloc[n_train:n_train + n_val], df.iloc[n_train + n_val:]
    for name, part in zip(("train", "validation", "test"), parts):
        if len(part) == 0:
            raise ValueError(f"the {name} split is empty ({len(df)} rows, fractions {tuple(fractions)}); "
                             "give more rows or larger fractions")
    return tuple(part.reset_index(drop=True) for part in parts)


def _encode(tokenizer, text: str) -> list[int]:
    """Ordinary-text ids: special tokens written in the text are not special (so no pad id)."""
    if hasattr(tokenizer, "encode_ordinary"):
        return list(tokenizer.encode_ordinary(text))
    return list(tokenizer.encode(text))


def _check_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where} is empty; a message needs at least one non-space character")
    return text


class SpamDataset(Dataset):
    """Labelled messages as token ids of one length: ``dataset[i]`` → ``(ids [max_length], label)``.

    Each text is encoded, cut to ``max_length`` tokens if longer (its beginning is kept) and
    right-padded with ``pad_token_id``. ``lengths[i]`` is the number of real tokens of row
    ``i``, ``truncated`` counts the rows that were cut.

    Args:
        df: a DataFrame with ``label`` (a name in ``labels``) and ``text`` columns.
        tokenizer: has ``encode_ordinary`` (tiktoken, the course's ``GPT2Tokenizer``) or ``encode``.
        max_length: the row length. Default ``None``: the longest encoded text (pass the
            training set's ``max_length`` to its validation and test sets).
        pad_token_id: the id that fills rows. Default 50256 (``<|endoftext|>``).
        context_length: the model's context. Rows are never longer: a ``max_length`` above
            it is an error, and the default is capped at it. Default ``None``: no cap.
        labels: the class names, in the order of their ids. Default ``("ham", "spam")``.

    Raises:
        TypeError, ValueError: not a DataFrame with the columns; an empty text (naming its
            row); a label not in ``labels``; ``max_length`` not positive or above
            ``context_length``.
    """

    def __init__(self, df, tokenizer, max_length: int | None = None, pad_token_id: int = PAD_TOKEN_ID, *,
                 context_length: int | None = None, labels: Sequence[str] = LABELS):
        _check_frame(df)
        positive_int("max_length", max_length, allow_none=True)
        context_length = positive_int("context_length", context_length, allow_none=True)
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative integer, got {pad_token_id!r}")
        if context_length is not None and max_length is not None and max_length > context_length:
            raise ValueError(f"max_length {max_length} is longer than the model's context ({context_length} tokens); "
                             f"pass max_length <= {context_length}, or None to use the longest text up to the context")
        self.labels = _labels(labels)
        index = {name: i for i, name in enumerate(self.labels)}
        unknown = sorted(set(df["label"]) - set(index))
        if unknown:
            raise ValueError(f"df has label(s) {unknown} not in labels={self.labels}; pass the class names as labels")
        encoded = [_encode(tokenizer, _check_text(t, f"the text of row {i}")) for i, t in enumerate(df["text"])]
        if max_length is None:
            max_length = max(len(e) for e in encoded) if encoded else 1
            if context_length is not None:
                max_length = min(max_length, context_length)
        self.max_length, self.pad_token_id = max_length, pad_token_id
        self.truncated = sum(len(e) > max_length for e in encoded)
        self.lengths = torch.tensor([min(len(e), max_length) for e in encoded], dtype=torch.long)
        self.ids = torch.full((len(encoded), max_length), pad_token_id, dtype=torch.long)
        for row, e in enumerate(encoded):
            self.ids[row, :len(e[:max_length])] = torch.tensor(e[:max_length], dtype=torch.long)
        self.targets = torch.tensor([index[name] for name in df["label"]], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[i], self.targets[i]

    def __repr__(self) -> str:
        return (f"SpamDataset({len(self)} rows, max_length={self.max_length}, truncated={self.truncated}, "
                f"pad_token_id={self.pad_token_id})")


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #
class GPTClassifier(nn.Module):
    """A GPT whose LM head is a ``num_classes``-wide linear layer, read once per row.

    ``forward(idx [B, T])`` → logits ``[B, num_classes]``: the GPT gives ``[B, T, num_classes]``,
    then ``pooling="last"`` takes each row's last real (non-pad) position, ``"mean"`` the mean
    over its real positions. Rows are right-padded with ``pad_token_id``.

    Build one with :func:`add_classifier_head`. Attributes: ``gpt`` (the model, its
    ``out_head`` replaced), ``cfg``, ``num_classes``, ``pooling``, ``pad_token_id``, ``labels``,
    ``trainable`` (what :func:`add_classifier_head` left trainable) and ``max_length`` (the
    row length it was trained on, which :func:`classify` reads by default; ``None``: the context).

    Raises (forward): ValueError for a row made only of pads.
    """

    def __init__(self, gpt: GPTModel, num_classes: int = 2, pooling: str = "last",
                 pad_token_id: int = PAD_TOKEN_ID, labels: Sequence[str] | None = None):
        super().__init__()
        if not isinstance(gpt, nn.Module) or not hasattr(gpt, "out_head") or not hasattr(gpt, "cfg"):
            raise TypeError(f"model must be a GPTModel (a module with cfg and out_head), got {type(gpt).__name__}")
        num_classes = positive_int("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (two classes: ham and spam), got {num_classes}")
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING} ('last': the last real token, 'mean': the average "
                             f"over real tokens), got {pooling!r}")
        labels = _labels(labels) if labels is not None else (LABELS if num_classes == 2 else
                                                             tuple(str(i) for i in range(num_classes)))
        pad_token_id = integer("pad_token_id", pad_token_id, minimum=0,
                               hint=" (the id rows are padded with: 50256, <|endoftext|>)")
        if len(labels) != num_classes:
            raise ValueError(f"labels has {len(labels)} names for num_classes={num_classes}")
        self.gpt, self.cfg = gpt, gpt.cfg
        self.num_classes, self.pooling, self.pad_token_id, self.labels = num_classes, pooling, pad_token_id, labels
        self.trainable: str | None = None
        self.max_length: int | None = None
        if getattr(gpt.out_head, "out_features", None) != num_classes:
            gpt.out_head = nn.Linear(gpt.cfg.emb_dim, num_classes).to(gpt.tok_emb.weight.device)
        gpt.tie_weights = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.gpt(idx)                                       # [B, T, C]
        real = idx != self.pad_token_id                              # [B, T]
        if not bool(real.any(dim=1).all()):
            raise ValueError("a row holds only pad tokens; every row needs at least one real token")
        if self.pooling == "last":
            positions = torch.arange(idx.shape[1], device=idx.device)
            last = (real * positions).argmax(dim=1)                  # [B] the last real position
            return logits[torch.arange(idx.shape[0], device=idx.device), last]
        weights = real.to(logits.dtype).unsqueeze(-1)                # [B, T, 1]
        return (logits * weights).sum(dim=1) / weights.sum(dim=1)    # [B, C]

    def architecture(self) -> dict[str, Any]:
        """What :func:`~course_lib.checkpoint.model_from_checkpoint` needs to rebuild this model."""
        return {"class": f"{__name__}.GPTClassifier",
                "args": {"num_classes": self.num_classes, "pooling": self.pooling,
                         "pad_token_id": self.pad_token_id, "labels": list(self.labels),
                         "trainable": self.trainable, "max_length": self.max_length}}

    @classmethod
    def from_architecture(cls, cfg: GPTConfig, tie_weights: bool = False, trainable: str | None = None,
                          max_length: int | None = None, **args) -> "GPTClassifier":
        """An untrained classifier of the stored shape, the same weights frozen (used by
        ``model_from_checkpoint``)."""
        clf = cls(GPTModel(cfg), **args)
        if trainable is not None:
            _set_trainable(clf, trainable)
        clf.max_length = positive_int("max_length", max_length, allow_none=True)
        return clf

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, pooling={self.pooling!r}, pad_token_id={self.pad_token_id}"


def _set_trainable(clf: GPTClassifier, trainable: str) -> GPTClassifier:
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE} ('head': only the new layer; 'last-block': the last "
                         f"transformer block, final norm and head; 'all': every weight), got {trainable!r}")
    gpt = clf.gpt
    train_now = {"head": [gpt.out_head], "last-block": [gpt.trf_blocks[-1], gpt.final_norm, gpt.out_head],
                 "all": [gpt]}[trainable]
    for p in gpt.parameters():
        p.requires_grad_(False)
    for module in train_now:
        for p in module.parameters():
            p.requires_grad_(True)
    clf.trainable = trainable
    return clf


def add_classifier_head(model: nn.Module, num_classes: int = 2, *, trainable: str = "last-block",
                        pooling: str = "last", pad_token_id: int = PAD_TOKEN_ID,
                        labels: Sequence[str] | None = None, verbose: bool = True) -> GPTClassifier:
    """Replace ``model``'s LM head with a ``num_classes``-wide linear layer and choose what trains.

    Args:
        model: a :class:`~course_lib.model.GPTModel` (modified in place and wrapped).
        num_classes: at least 2. Default 2.
        trainable: ``"head"`` (the new layer only), ``"last-block"`` (the last transformer
            block, the final norm and the head; default) or ``"all"``. The rest is frozen
            (``requires_grad=False``).
        pooling: ``"last"`` (the last real token of each row: under causal attention the only
            position that has read the whole message; default) or ``"mean"`` (over real tokens).
        pad_token_id: the id rows are padded with. Default 50256.
        labels: the class names. Default ``("ham", "spam")`` for two classes.
        verbose: print the trainable parameter count. Default ``True``.

    Returns:
        a :class:`GPTClassifier` around ``model``, on ``model``'s device, in ``train()`` mode.

    Raises:
        TypeError: ``model`` is not a GPT. ValueError: ``num_classes < 2``, an unknown
            ``trainable`` or ``pooling``.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE} ('head': only the new layer; 'last-block': the last "
                         f"transformer block, final norm and head; 'all': every weight), got {trainable!r}")
    verbose = boolean("verbose", verbose)
    clf = _set_trainable(GPTClassifier(model, num_classes, pooling, pad_token_id, labels), trainable)
    if verbose:
        n, total = count_parameters(clf, trainable_only=True), count_parameters(clf)
        print(f"classifier: {num_classes} classes, pooling '{pooling}', trainable '{trainable}': "
              f"{n:,} of {total:,} parameters ({100 * n / total:.2f}%)")
    return clf.train()


# --------------------------------------------------------------------------- #
# Loss, accuracy, training
# --------------------------------------------------------------------------- #
def _check_batch(input_batch, target_batch) -> None:
    if not isinstance(input_batch, torch.Tensor) or input_batch.dim() != 2 or input_batch.dtype.is_floating_point:
        raise TypeError(f"input_batch must be an integer tensor of token ids [batch, tokens], got "
                        f"{getattr(input_batch, 'shape', type(input_batch).__name__)}")
    if not isinstance(target_batch, torch.Tensor) or target_batch.dim() != 1 \
            or target_batch.shape[0] != input_batch.shape[0]:
        raise ValueError(f"target_batch must be one class id per row, shape [{input_batch.shape[0]}], got "
                         f"{getattr(target_batch, 'shape', type(target_batch).__name__)}")
    if input_batch.shape[0] == 0:
        raise ValueError("the batch has no rows; a loss or an accuracy needs at least one message")
    if target_batch.dtype.is_floating_point or target_batch.dtype == torch.bool:
        raise TypeError(f"target_batch must hold integer class ids (torch.long), got {target_batch.dtype}")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def classification_loss(input_batch: torch.Tensor, target_batch: torch.Tensor, model: nn.Module,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Mean cross-entropy of a classifier on one batch.

    Args:
        input_batch: ``[B, T]`` padded token ids. target_batch: ``[B]`` class ids.
        model: maps ``[B, T]`` to ``[B, num_classes]`` (a :class:`GPTClassifier`).
        device: where to compute. Default the model's device.

    Returns: a scalar tensor.
    """
    _check_batch(input_batch, target_batch)
    device = get_device(device) if device is not None else _device_of(model)
    logits = model(input_batch.to(device))                            # [B, C]
    if logits.dim() != 2:
        raise TypeError(f"model must give one row of class scores per message, [batch, classes], got shape "
                        f"{list(logits.shape)}: wrap the GPT with add_classifier_head(model) first")
    low, high = int(target_batch.min()), int(target_batch.max())
    if low < 0 or high >= logits.shape[1]:
        raise ValueError(f"target_batch holds class id {low if low < 0 else high}, outside the model's "
                         f"{logits.shape[1]} classes (0 to {logits.shape[1] - 1})")
    return F.cross_entropy(logits, target_batch.to(device))


def predict_loader(loader, model: nn.Module, device: torch.device | str | None = None,
                   num_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's predictions over a loader of ``(ids, labels)``, without gradients.

    Does not change the model's mode (call ``model.eval()`` first).

    Returns:
        ``(targets [N], predictions [N], probabilities [N, num_classes])`` on the CPU.
    """
    positive_int("num_batches", num_batches, allow_none=True)
    device = get_device(device) if device is not None else _device_of(model)
    targets, preds, probs = [], [], []
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            _check_batch(x, y)
            p = torch.softmax(model(x.to(device)).float(), dim=-1).cpu()   # [B, C]
            targets.append(y.cpu())
            preds.append(p.argmax(dim=-1))
            probs.append(p)
    if not targets:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(targets), torch.cat(preds), torch.cat(probs)


def calc_accuracy_loader(loader, model: nn.Module, device: torch.device | str | None = None,
                         num_batches: int | None = None) -> float:
    """The fraction of rows classified correctly over the first ``num_batches`` batches (all
    if ``None``); ``nan`` for an empty loader. Does not change the model's mode."""
    targets, preds, _ = predict_loader(loader, model, device, num_batches)
    return float((preds == targets).float().mean()) if len(targets) else float("nan")


def train_classifier(model: nn.Module, train_loader, val_loader, optimizer: torch.optim.Optimizer,
                     device: torch.device | str | None = None, *, num_epochs: int | None = 5,
                     max_steps: int | None = None, eval_freq: int = 50, eval_iter: int | None = 5,
                     **train_kwargs) -> History:
    """Fine-tune a classifier with step 5's :func:`~course_lib.training.train`.

    Same loop and conventions (progress bar, checkpoints with ``checkpoint_path``, exact
    resume, ``nan`` handling, Ctrl-C), with :func:`classification_loss` as the loss and the
    accuracy on ``eval_iter`` batches of each loader measured at every evaluation:
    ``history.metrics["train_accuracy"]`` and ``["val_accuracy"]``.

    Args:
        model: a :class:`GPTClassifier`. train_loader, val_loader: ``(ids, labels)`` batches.
        optimizer: e.g. ``AdamW(filter(lambda p: p.requires_grad, model.parameters()), lr=5e-5)``.
        num_epochs, max_steps, eval_freq, eval_iter, **train_kwargs: as in ``train``.

    Returns: the :class:`~course_lib.training.History`.
    """
    def accuracies(m: nn.Module) -> dict[str, float]:
        return {"train_accuracy": calc_accuracy_loader(train_loader, m, device, eval_iter),
                "val_accuracy": calc_accuracy_loader(val_loader, m, device, eval_iter)}

    return train(model, train_loader, val_loader, optimizer, device, num_epochs=num_epochs, max_steps=max_steps,
                 eval_freq=eval_freq, eval_iter=eval_iter, loss_fn=classification_loss, metrics=accuracies,
                 **train_kwargs)


# --------------------------------------------------------------------------- #
# Using it
# --------------------------------------------------------------------------- #
class Prediction(NamedTuple):
    """One text's predicted ``label`` and the model's ``probability`` for it."""

    label: str
    probability: float


def classify(texts: str | Sequence[str], model: GPTClassifier, tokenizer, *, labels: Sequence[str] | None = None,
             max_length: int | None = None, batch_size: int = 32) -> Prediction | list[Prediction]:
    """The label and its probability for one text, or for each of a list of texts.

    Texts are encoded, cut to ``max_length`` tokens (default the length the model was
    trained on, ``model.max_length``, else its context length; the beginning is kept) and classified ``batch_size`` at a time, each batch padded to its
    longest row. The model is used in ``eval()`` mode and put back in the mode it was in.

    Args:
        texts: a string, or a list of strings.
        model: a :class:`GPTClassifier`. tokenizer: as for :class:`SpamDataset`.
        labels: class names. Default the model's (``("ham", "spam")``).
        max_length: the most tokens read per text. batch_size: texts per forward pass.

    Returns:
        a :class:`Prediction` for a string, a list of them for a list.

    Raises:
        TypeError, ValueError: an empty or non-string text (naming it), ``max_length`` above
            the context, labels of the wrong number.
    """
    if not isinstance(model, GPTClassifier):
        raise TypeError(f"model must be a GPTClassifier (add_classifier_head(gpt) makes one), got "
                        f"{type(model).__name__}")
    single = isinstance(texts, str)
    if not single and not (isinstance(texts, Sequence) and not isinstance(texts, bytes)):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    items = [texts] if single else list(texts)
    labels = tuple(labels) if labels is not None else tuple(getattr(model, "labels", LABELS))
    num_classes = getattr(model, "num_classes", len(labels))
    if len(labels) != num_classes:
        raise ValueError(f"labels has {len(labels)} names but the model has {num_classes} classes")
    context = model.cfg.context_length
    max_length = positive_int("max_length", max_length, allow_none=True) or getattr(model, "max_length", None) \
        or context
    if max_length > context:
        raise ValueError(f"max_length {max_length} is longer than the model's context ({context} tokens)")
    batch_size = positive_int("batch_size", batch_size)
    pad = getattr(model, "pad_token_id", PAD_TOKEN_ID)
    encoded = [_encode(tokenizer, _check_text(t, "the text" if single else f"texts[{i}]"))[:max_length]
               for i, t in enumerate(items)]
    device, was_training = _device_of(model), model.training
    model.eval()
    out: list[Prediction] = []
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start:start + batch_size]
                ids = torch.full((len(chunk), max(len(e) for e in chunk)), pad, dtype=torch.long)
                for row, e in enumerate(chunk):
                    ids[row, :len(e)] = torch.tensor(e, dtype=torch.long)
                probs = torch.softmax(model(ids.to(device)).float(), dim=-1).cpu()   # [B, C]
                best = probs.argmax(dim=-1)
                out += [Prediction(labels[int(k)], float(probs[row, k])) for row, k in enumerate(best)]
    finally:
        model.train(was_training)
    return out[0] if single else out


def binary_metrics(targets, predictions, positive: int = 1) -> dict[str, float]:
    """Accuracy, and precision, recall and F1 of the ``positive`` class (spam), with scikit-learn.

    Args:
        targets, predictions: class ids (tensors, arrays or lists) of equal length.

    Returns: ``{"accuracy", "precision", "recall", "f1"}`` as floats (0 where undefined).

    Raises:
        TypeError: values that are not class ids (probabilities: take ``argmax`` first; a string).
        ValueError: empty or of unequal length.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y, p = _as_list(targets, "targets"), _as_list(predictions, "predictions")
    if len(y) != len(p) or not y:
        raise ValueError(f"targets and predictions must be non-empty and of equal length, got {len(y)} and {len(p)}")
    precision, recall, f1, _ = precision_recall_fscore_support(y, p, labels=[positive], average=None,
                                                               zero_division=0)
    return {"accuracy": float(accuracy_score(y, p)), "precision": float(precision[0]),
            "recall": float(recall[0]), "f1": float(f1[0])}


def _as_list(values, name: str) -> list[int]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be class ids (a tensor or a list of integers), got a string")
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{name} must be class ids (a tensor or a list of integers), got "
                        f"{type(values).__name__}") from None
    out = []
    for v in values:
        if isinstance(v, np.bool_):
            v = bool(v)
        if not isinstance(v, numbers.Real) or not math.isfinite(v) or v != int(v):
            raise TypeError(f"{name} must be class ids (integers), got {v!r}; from probabilities or logits, take "
                            "the class with probs.argmax(-1)")
        out.append(int(v))
    return out


#: The settings :func:`tfidf_baseline` chooses between on the validation split: word unigrams and
#: bigrams, or character 2- to 5-grams inside word boundaries; and the inverse regularisation ``C``.
TFIDF_GRID: tuple[dict[str, Any], ...] = tuple(
    {"analyzer": analyzer, "ngram_range": ngrams, "C": c}
    for analyzer, ngrams in (("word", (1, 2)), ("char_wb", (2, 5)))
    for c in (1.0, 10.0, 100.0))


def tfidf_baseline(train_df, test_dfs: dict[str, Any] | None = None, *, labels: Sequence[str] = LABELS,
                   grid: Sequence[dict[str, Any]] = TFIDF_GRID, seed: int = 123) -> dict[str, Any]:
    """A bag-of-words baseline: TF-IDF features, then logistic regression (scikit-learn).

    Each setting of ``grid`` is fitted on ``train_df``; the one with the best accuracy on
    ``test_dfs["val"]`` (or ``test_dfs["validation"]``) is kept (the first on a tie; the first
    setting if there is neither), so the baseline is tuned exactly as much as the GPT is: on
    validation, never on test.

    Args:
        train_df: the training split (``label``, ``text``).
        test_dfs: ``{name: DataFrame}`` to score, e.g. ``{"val": val_df, "test": test_df}``.
        labels: the class names, in id order (the positive class last).
        grid: settings ``{"analyzer", "ngram_range", "C"}``. Default :data:`TFIDF_GRID`.
        seed: for the solver. Default 123.

    Returns:
        ``{"model": the fitted Pipeline, "params": the chosen setting, "seconds": the time to
        fit every setting, "train": binary_metrics(...), "<name>": ... for each of test_dfs}``.

    Raises:
        TypeError, ValueError: a frame without ``label``/``text``; ``test_dfs`` not a mapping of
            names to frames, or with a ``"train"`` entry (the training split is ``train_df``); a
            label not in ``labels``; fewer than two classes in ``train_df``; an empty ``grid`` or a
            setting without ``analyzer``, ``ngram_range`` or ``C``.
    """
    import time

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from collections.abc import Mapping

    _check_frame(train_df, "train_df")
    if test_dfs is not None and not isinstance(test_dfs, Mapping):
        raise TypeError(f"test_dfs must map names to DataFrames, e.g. {{'val': val_df, 'test': test_df}}, got "
                        f"{type(test_dfs).__name__}")
    if test_dfs and "train" in test_dfs:
        raise ValueError("test_dfs has a 'train' entry; the training split is train_df (its scores come as "
                         "result['train']): name the others 'val', 'test', ...")
    frames = {"train": train_df, **(test_dfs or {})}
    for name, frame in frames.items():
        _check_frame(frame, f"test_dfs[{name!r}]")
    labels = _labels(labels)
    index = {name: i for i, name in enumerate(labels)}
    for name, frame in frames.items():
        unknown = sorted(set(frame["label"]) - set(index), key=str)
        if unknown:
            raise ValueError(f"{'train_df' if name == 'train' else f'test_dfs[{name!r}]'} has label(s) {unknown} "
                             f"not in labels={labels}; pass the class names as labels")
    if train_df["label"].nunique() < 2:
        raise ValueError("train_df holds one class only; logistic regression needs rows of at least two")
    grid = list(grid) if isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)) else None
    if not grid or any(not isinstance(g, Mapping) or {"analyzer", "ngram_range", "C"} - set(g) for g in grid):
        raise ValueError("grid must be a non-empty list of settings {'analyzer', 'ngram_range', 'C'} (e.g. "
                         "TFIDF_GRID)")
    ids = {name: [index[x] for x in frame["label"]] for name, frame in frames.items()}
    started = time.perf_counter()
    best, best_acc, best_params = None, -1.0, None
    tune = "val" if "val" in frames else "validation" if "validation" in frames else None
    for params in (grid if tune else grid[:1]):
        pipeline = make_pipeline(
            TfidfVectorizer(analyzer=params["analyzer"], ngram_range=tuple(params["ngram_range"]), sublinear_tf=True),
            LogisticRegression(C=params["C"], max_iter=2000, random_state=seed))
        pipeline.fit(list(train_df["text"]), ids["train"])
        acc = (binary_metrics(ids[tune], pipeline.predict(list(frames[tune]["text"])))["accuracy"]
               if tune else 0.0)
        if acc > best_acc:
            best, best_acc, best_params = pipeline, acc, dict(params)
    result: dict[str, Any] = {"model": best, "params": best_params, "seconds": time.perf_counter() - started}
    for name, frame in frames.items():
        result[name] = binary_metrics(ids[name], best.predict(list(frame["text"])))
    return result


# --------------------------------------------------------------------------- #
# The whole recipe (the notebook's last cells, `course finetune classify`, the benchmark)
# --------------------------------------------------------------------------- #
def trim_padding(batch, pad_token_id: int = PAD_TOKEN_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``collate_fn`` that stacks ``(ids, label)`` rows and drops the pad columns every row has.

    A speed switch beside the taught loader: the rows keep their real tokens, and under
    causal attention the logits of a row do not depend on the pads after it, so training
    and predictions are those of the full-width batch, on fewer columns.

    Raises:
        ValueError: an empty batch; rows of different lengths (a :class:`SpamDataset` pads them to one).
    """
    if len(batch) == 0:
        raise ValueError("batch is empty; a collate_fn gets at least one (ids, label) row")
    widths = {len(row[0]) for row in batch}
    if len(widths) > 1:
        raise ValueError(f"the rows have different lengths {sorted(widths)}; trim_padding stacks rows padded to "
                         "one length, as SpamDataset gives them")
    ids = torch.stack([row[0] for row in batch])                     # [B, max_length]
    labels = torch.stack([torch.as_tensor(row[1]) for row in batch])  # [B]
    real = (ids != pad_token_id).any(dim=0).nonzero()
    width = int(real.max()) + 1 if len(real) else 1
    return ids[:, :width], labels


@dataclass(frozen=True)
class ClassifierRecipe:
    """How :func:`finetune_classifier` fine-tunes the base model of one profile.

    Attributes:
        trainable, pooling: as in :func:`add_classifier_head`.
        num_epochs, batch_size, lr, weight_decay: the run (AdamW over the trainable weights).
        max_length: the row length (``None``: the longest training message, up to the context).
        max_train_rows: use only this many training rows (``None``: all), for CI's ``tiny``.
        eval_freq, eval_iter: as in :func:`~course_lib.training.train`.
        seed: the split, the head's initial weights, dropout and the batch order.
    """

    trainable: str
    pooling: str
    num_epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    max_length: int | None = None
    max_train_rows: int | None = None
    eval_freq: int = 50
    eval_iter: int = 5
    seed: int = 123


#: One recipe per profile. ``gpu`` is the book's chapter 6 (GPT-2 small, the last block, five
#: epochs at 5e-5); ``cpu`` and ``tiny`` fine-tune the course's own small base models.
CLASSIFIER_RECIPES: dict[str, ClassifierRecipe] = {
    "tiny": ClassifierRecipe("last-block", "last", num_epochs=3, batch_size=8, lr=1e-3, max_length=64,
                             max_train_rows=160, eval_freq=10, eval_iter=2),
    "cpu": ClassifierRecipe("all", "last", num_epochs=3, batch_size=8, lr=3e-4),
    "gpu": ClassifierRecipe("last-block", "last", num_epochs=5, batch_size=8, lr=5e-5),
}


@dataclass
class FinetuneResult:
    """What :func:`finetune_classifier` returns: the ``model``, its training ``history``,
    the ``metrics`` (as written to ``metrics.json``) and the ``splits`` (train, val, test)."""

    model: GPTClassifier
    history: History
    metrics: dict[str, Any]
    splits: tuple


def finetune_classifier(profile: str | None = None, *, trainable: str | None = None, pooling: str | None = None,
                        num_epochs: int | None = None, lr: float | None = None, device: Any = None, base_model: nn.Module | None = None,
                        checkpoint_path: str | os.PathLike | None = None, resume: bool = False, trim: bool = True,
                        prepare_model: Callable[[GPTClassifier], Any] | None = None,
                        progress: bool = True, verbose: bool = True) -> FinetuneResult:
    """Fine-tune the profile's base model into a spam classifier and measure it on the test split.

    The steps of notebook 06 in one call: :func:`load_sms_spam`, :func:`split_dataset`
    (deduplicated, balanced, seed of the recipe), :class:`SpamDataset`,
    :func:`add_classifier_head`, :func:`train_classifier`, then accuracy on every split and
    :func:`binary_metrics` on the test split.

    Args:
        profile: ``tiny``, ``cpu`` or ``gpu``; default the active one. Picks the base model
            (:func:`~course_lib.base_model.load_base_model`) and :data:`CLASSIFIER_RECIPES`.
        trainable, pooling, num_epochs, lr: override the recipe's.
        device: where to train. Default :func:`~course_lib.config.get_device`.
        base_model: start from this GPT instead of the profile's base model (it is modified).
        checkpoint_path, resume: as in :func:`~course_lib.training.train`.
        trim: batches drop their all-pad columns (:func:`trim_padding`). Default ``True``.
        prepare_model: called once with the classifier (head added, on ``device``) before the
            optimizer is built; it may change the model in place and which parameters train
            (e.g. step 9's ``lambda m: add_lora(m, rank=8)``). Its return value is ignored;
            the metrics count the parameters trainable after it. Default ``None``.
        progress, verbose: show the progress bar and the evaluations.

    Returns:
        a :class:`FinetuneResult`; ``metrics`` holds the accuracy of each split, the test
        precision/recall/F1 of ``spam``, the trainable parameter count, the training seconds,
        the base model, profile and recipe.

    Raises:
        TypeError: ``prepare_model`` is not callable; ``base_model`` not a GPTModel; ``trim``,
            ``progress`` or ``verbose`` not ``True``/``False``.
    """
    import time
    from dataclasses import asdict

    from torch.utils.data import DataLoader

    from .base_model import load_base_model
    from .config import get_device, get_profile, seed_everything
    from .tokenizers import tiktoken_gpt2

    prof = get_profile(profile)
    recipe = CLASSIFIER_RECIPES[prof.name]
    changes = {k: v for k, v in (("trainable", trainable), ("pooling", pooling), ("num_epochs", num_epochs),
                                 ("lr", lr)) if v is not None}
    recipe = replace(recipe, **changes)
    positive_int("num_epochs", recipe.num_epochs)
    positive_float("lr", recipe.lr)
    trim, progress, verbose = boolean("trim", trim), boolean("progress", progress), boolean("verbose", verbose)
    if base_model is not None and not isinstance(base_model, GPTModel):
        raise TypeError(f"base_model must be a GPTModel (e.g. course_lib.base_model.load_base_model()) or None for "
                        f"the profile's, got {type(base_model).__name__}")
    if prepare_model is not None and not callable(prepare_model):
        raise TypeError(f"prepare_model must be a function of the model or None, got {type(prepare_model).__name__}")
    device = get_device(device)
    train_df, val_df, test_df = split_dataset(load_sms_spam(), seed=recipe.seed)
    if recipe.max_train_rows is not None:
        train_df = train_df.iloc[:recipe.max_train_rows]
    gpt = base_model if base_model is not None else load_base_model(prof.name, verbose=verbose)
    base_name = ("the model given" if base_model is not None else
                 "gpt2 (OpenAI GPT-2 small)" if prof.name == "gpu" else f"{prof.model} (course base model, {prof.name})")
    tokenizer = tiktoken_gpt2()
    ctx = gpt.cfg.context_length
    train_set = SpamDataset(train_df, tokenizer, recipe.max_length, context_length=ctx)
    val_set = SpamDataset(val_df, tokenizer, train_set.max_length, context_length=ctx)
    test_set = SpamDataset(test_df, tokenizer, train_set.max_length, context_length=ctx)
    collate = trim_padding if trim else None
    seed_everything(recipe.seed)
    train_loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(recipe.seed), collate_fn=collate)
    val_loader = DataLoader(val_set, batch_size=recipe.batch_size, collate_fn=collate)
    test_loader = DataLoader(test_set, batch_size=recipe.batch_size, collate_fn=collate)
    model = add_classifier_head(gpt.to(device), trainable=recipe.trainable, pooling=recipe.pooling,
                                verbose=verbose)
    model.max_length = train_set.max_length
    if prepare_model is not None:
        prepare_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    started = time.perf_counter()
    history = train_classifier(model, train_loader, val_loader, optimizer, device, num_epochs=recipe.num_epochs,
                               eval_freq=recipe.eval_freq, eval_iter=recipe.eval_iter, seed=recipe.seed,
                               checkpoint_path=checkpoint_path, resume=resume, progress=progress, verbose=verbose)
    seconds = time.perf_counter() - started
    model.eval()
    targets, preds, _ = predict_loader(test_loader, model, device)
    test = binary_metrics(targets, preds)
    metrics = {
        "train_accuracy": calc_accuracy_loader(train_loader, model, device),
        "val_accuracy": calc_accuracy_loader(val_loader, model, device),
        "test_accuracy": test["accuracy"],
        "test_precision": test["precision"], "test_recall": test["recall"], "test_f1": test["f1"],
        "trainable_parameters": count_parameters(model, trainable_only=True),
        "total_parameters": count_parameters(model),
        "seconds": seconds,
        "base_model": base_name,
        "profile": prof.name,
        "device": str(device),
        "recipe": asdict(recipe),
        "rows": {"train": len(train_set), "val": len(val_set), "test": len(test_set)},
        "max_length": train_set.max_length,
    }
    return FinetuneResult(model, history, metrics, (train_df, val_df, test_df))
