"""Step 9 — LoRA from scratch: small adapters on a frozen base, in files Hugging Face PEFT reads.

* :class:`LoRALinear` — a frozen ``nn.Linear`` plus named low-rank updates
  ``y = x W^T + b + scale * (x A^T) B^T`` (``A [r, in]``, ``B [out, r]``);
  :class:`LoRAEmbedding` the same for a token embedding (PEFT's ``lora_embedding_A/B``).
* :func:`add_lora` — wrap a model's linear layers in place, freeze everything else; a summary.
* :func:`merge_lora` / :func:`unmerge_lora` / :func:`unload_lora` — fold the adapter into the
  base weight (plain ``F.linear`` speed), take it out again, or drop the wrappers.
* Many adapters on one base: :func:`set_adapter` (a name, ``None`` for the base, or one name
  per batch row), :func:`adapter_rows` (the same as a ``with`` block), :func:`delete_adapter`.
* :func:`save_adapter` / :func:`load_adapter` — PEFT's folder format (``adapter_config.json``
  + ``adapter_model.safetensors``) under GPT-2's module names; see :func:`save_adapter` for
  how our separate query/key/value adapters become GPT-2's fused ``c_attn`` exactly.

``scale = alpha / r`` as in the LoRA paper and PEFT (``alpha / sqrt(r)`` with rsLoRA). With
``alpha`` alone (no division, as some code does) the update's size grows with ``r``; dividing by
``r`` overcorrects (the first step shrinks roughly like ``1 / sqrt(r)``, notebook 09 measures
it), which rsLoRA's ``sqrt(r)`` corrects: a learning rate tuned at one rank carries to another
best with rsLoRA.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import boolean, finite_number, positive_int, probability
from .classification import GPTClassifier
from .files import atomic_write
from .model import GPTModel

__all__ = [
    "LoRALinear",
    "LoRAEmbedding",
    "LoRASummary",
    "DEFAULT_TARGETS",
    "TARGET_GROUPS",
    "LoRARecipe",
    "LORA_RECIPES",
    "add_lora",
    "lora_layers",
    "merge_lora",
    "unmerge_lora",
    "unload_lora",
    "set_adapter",
    "adapter_rows",
    "delete_adapter",
    "save_adapter",
    "load_adapter",
    "adapter_chat_template",
]

#: The attention's query, key, value and output projections (the LoRA paper's choice, plus output).
DEFAULT_TARGETS: tuple[str, ...] = ("W_query", "W_key", "W_value", "out_proj")
#: Short names accepted in ``targets``.
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": DEFAULT_TARGETS,
    "ff": ("ff.layers.0", "ff.layers.2"),
    "head": ("out_head",),
    "embedding": ("tok_emb",),
}


@dataclass(frozen=True)
class LoRARecipe:
    """How ``course finetune classify|instruct --lora RANK`` trains adapters for one profile
    (``RANK`` and ``--alpha``/``--targets``/``--lr``/``--epochs`` override these).

    Attributes:
        rank, alpha: ``r`` and the scale's numerator (``alpha = 2 * rank`` is the common choice).
        targets: as in :func:`add_lora`.
        rank_pattern: a rank of their own for some targets (``add_lora``'s ``rank_pattern``),
            used when ``--targets`` is not given.
        lr: AdamW's learning rate. Adapters start at zero and are small: they want a larger
            rate than a full fine-tune.
        num_epochs: ``None``: the full fine-tune's (step 6's or step 7's recipe).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lr: float = 3e-4
    num_epochs: int | None = None

    def apply(self, model: nn.Module, name: str = "default", **overrides: Any) -> "LoRASummary":
        """:func:`add_lora` with this recipe's rank, alpha, targets and rank pattern (``overrides`` win)."""
        kwargs = dict(rank=self.rank, alpha=self.alpha, targets=list(self.targets),
                      rank_pattern=dict(self.rank_pattern) or None) | overrides
        return add_lora(model, name=name, **kwargs)


#: ``LORA_RECIPES[task][profile]``, task ``"classify"`` (step 6's spam data) or ``"instruct"`` (step 7's).
#: ``cpu`` spam also adapts the token embedding (at rank 2): the course's small base model read only children's
#: stories, so 43 % of the SMS training tokens are ones it never saw and whose embeddings are still random; no
#: adapter on attention can move them (``benchmarks/README.md``, step 9). For the same reason ``cpu`` instruction
#: tuning adapts the output head and the token embedding as well (rank 16 each: 5.8 % of the parameters), where a
#: full fine-tune changes most: the instructions' words are new to that base. GPT-2 (``gpu``) has read web text.
LORA_RECIPES: dict[str, dict[str, LoRARecipe]] = {
    "classify": {
        "tiny": LoRARecipe(lr=1e-3),
        "cpu": LoRARecipe(targets=("attention", "embedding"), rank_pattern={"embedding": 2}, lr=1e-3),
        "gpu": LoRARecipe(rank=16, alpha=16, lr=5e-4, num_epochs=5),
    },
    "instruct": {
        "tiny": LoRARecipe(lr=1e-3),
        "cpu": LoRARecipe(targets=("attention", "head", "embedding"), rank_pattern={"head": 16, "embedding": 16},
                          lr=2e-3),
        "gpu": LoRARecipe(rank=16, alpha=32, lr=3e-4),
    },
}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
#: An instruction adapter's chat template (Jinja, Hugging Face's file name for it); PEFT ignores the file.
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version   # tensors made under inference_mode keep no count


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"adapter name must be a word of letters, digits, '_' or '-' (e.g. 'spam'), got {name!r}")
    return name


def _scale(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _check_alpha(alpha: Any) -> float:
    """``alpha`` as a float if it is a finite number above 0 (NumPy's too, never a ``bool``)."""
    return finite_number("alpha", alpha, positive=True, hint=" (e.g. 2 * rank)")


# --------------------------------------------------------------------------- #
# The layer
# --------------------------------------------------------------------------- #
class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus low-rank adapters, kept by name.

    ``forward(x [..., in]) -> [..., out]``::

        y = base(x) + scale * dropout(x) @ A.T @ B.T      # A [r, in], B [out, r]

    with ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``). ``A`` is initialised
    Kaiming-uniform (as PEFT), ``B`` zeros, so a fresh adapter changes nothing.

    Args:
        base: the layer to adapt; its parameters are frozen (``requires_grad = False``).
        rank, alpha, dropout, rslora: of the first adapter, named ``"default"``. Default
            dropout ``0.0``, rslora ``False``.
        name: that adapter's name. Default ``"default"``.

    Attributes:
        base: the wrapped ``nn.Linear`` (never copied).
        lora_A, lora_B: ``nn.ParameterDict`` of ``[r, in]`` / ``[out, r]`` by adapter name.
        rank, alpha, rslora, scale, dropout: dicts by adapter name.
        active: ``None`` (the base alone), a name, or a tuple with one name (or ``None``) per
            batch row; set it with :func:`set_adapter`.
        merged: the adapter folded into ``base.weight`` (:func:`merge_lora`), or ``None``.

    Raises:
        TypeError: ``base`` is not an ``nn.Linear``.
        ValueError: ``rank`` not a positive integer, ``alpha`` not positive, ``dropout`` not in ``[0, 1)``.
    """

    _BASE: type[nn.Module] = nn.Linear
    _STACKED_ROWS = True   # per-row adapters at inference through stacked bmm (see _row_stacks)

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 name: str = "default"):
        super().__init__()
        if not isinstance(base, self._BASE):
            raise TypeError(f"base must be an nn.{self._BASE.__name__}, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = self._sizes(base)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.rslora: dict[str, bool] = {}
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: str | tuple[str | None, ...] | None = None
        self.merged: str | None = None
        self._original: torch.Tensor | None = None
        self._tied: nn.Parameter | None = None  # while merged: the base weight another layer shares
        self._rows: tuple | None = None          # per-row stacks (see _row_stacks): (key, stamp, params, A, B)
        self.add_adapter(name, rank, alpha, dropout, rslora)
        self.active = name

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> None:
        """Add adapter ``name`` (fresh, or with the given ``A [r, in]`` and ``B [out, r]``); not activated.

        Raises:
            ValueError: ``name`` exists or is not a word; a bad ``rank``/``alpha``/``dropout``; ``A``/``B`` misshapen.
            TypeError: ``A``/``B`` not a floating-point tensor.
        """
        name = _check_name(name)
        if name in self.lora_A:
            raise ValueError(f"this layer already has an adapter named {name!r}; delete_adapter it or pick another name")
        rank = positive_int("rank", rank, hint=" (typical: 4, 8 or 16)")
        alpha = _check_alpha(alpha)
        dropout = probability("dropout", dropout)
        rslora = boolean("rslora", rslora)
        w = self.base.weight
        for label, t in (("A", A), ("B", B)):
            if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
                raise TypeError(f"adapter {name!r}: {label} must be a floating-point tensor or None, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        fresh_A, fresh_B = (self._fresh(rank, w) if A is None or B is None else (None, None))
        A = fresh_A if A is None else A
        B = fresh_B if B is None else B
        if tuple(A.shape) != (rank, self.in_features) or tuple(B.shape) != (self.out_features, rank):
            raise ValueError(f"adapter {name!r}: A must be [{rank}, {self.in_features}] and B "
                             f"[{self.out_features}, {rank}], got {list(A.shape)} and {list(B.shape)}")
        self._rows = None
        self.lora_A[name] = nn.Parameter(A.detach().to(w.device, w.dtype).clone())
        self.lora_B[name] = nn.Parameter(B.detach().to(w.device, w.dtype).clone())
        self.rank[name], self.alpha[name], self.rslora[name] = rank, alpha, rslora
        self.scale[name], self.dropout[name] = _scale(rank, alpha, rslora), dropout

    @staticmethod
    def _sizes(base: nn.Linear) -> tuple[int, int]:
        return base.in_features, base.out_features

    def _fresh(self, rank: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A new adapter's ``A`` (Kaiming-uniform, as PEFT and ``nn.Linear``) and ``B`` (zeros)."""
        A = torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        return A, torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s contribution ``scale * dropout(x) @ A.T @ B.T``: ``[..., in] -> [..., out]``."""
        x = F.dropout(x, self.dropout[name], self.training)
        return (x @ self.lora_A[name].T) @ self.lora_B[name].T * self.scale[name]  # [.., r] -> [.., out]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A``: ``[out, in]``, what merging adds to ``base.weight``."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scale[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``; with per-row adapters ``x`` is ``[batch, ...]``, one name per row.

        Per-row adapters with no gradient wanted and dropout off (``eval()`` or ``p = 0``): two
        batched products with each row's adapter stacked (:meth:`_row_stacks`, kept between calls).
        Otherwise (training) each adapter's rows are gathered and updated in turn.

        Raises:
            ValueError: per-row adapters and a batch of another size; training (grad on, ``train()``)
                while the adapter is merged (its ``A``/``B`` would get no gradient).
        """
        out = self.base(x)                                                   # [.., out]
        active = self.active
        if self.merged is not None:
            if self.training and torch.is_grad_enabled() and self.lora_A[self.merged].requires_grad:
                raise ValueError(f"adapter {self.merged!r} is merged into the base weight, so it would get no "
                                   "gradient; call unmerge_lora(model) before training (or model.eval())")
            return out
        if active is None:
            return out
        if isinstance(active, str):
            return out + self.delta(active, x)
        if x.dim() < 2 or x.shape[0] != len(active):
            raise ValueError(f"set_adapter gave {len(active)} per-row adapter names but the batch has "
                             f"{x.shape[0] if x.dim() else 0} rows; give one name (or None) per row")
        names = [n for n in dict.fromkeys(active) if n is not None]
        if not names:
            return out
        params = [p for n in names for p in (self.lora_A[n], self.lora_B[n])]
        grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if self._STACKED_ROWS and not grad and (not self.training or all(self.dropout[n] == 0 for n in names)):
            A, B = self._row_stacks(active, names, params)                     # [B, in, r], [B, r, out]
            xr = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), self.in_features)   # [B, T, in] (T = 1 for 2-D)
            return out + torch.bmm(torch.bmm(xr, A), B).view(out.shape)       # [B, T, r] -> [.., out]
        for name in names:                                          # each adapter once, its rows grouped
            rows = torch.tensor([i for i, a in enumerate(active) if a == name], device=x.device)
            out = out.index_add(0, rows, self.delta(name, x.index_select(0, rows)))
        return out

    def _row_stacks(self, active: tuple[str | None, ...], names: list[str],
                    params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's adapter as stacks ``A [batch, in, r_max]`` and ``B [batch, r_max, out]`` (scale
        folded into ``B``; smaller ranks and ``None`` rows zero-padded, which adds exact zeros).

        Built once per per-row choice and kept; rebuilt when ``active``, the adapters' scales or
        any of their ``A``/``B`` (replaced, moved, or changed in place: ``_version``) change.
        """
        key = (active, tuple(self.scale[n] for n in names))
        stamp = tuple((_version(p), p.data_ptr()) for p in params)
        c = self._rows
        if c is None or c[0] != key or c[1] != stamp or any(a is not b for a, b in zip(params, c[2])):
            r = max(self.rank[n] for n in names)
            w = params[0]
            with torch.no_grad():
                A = w.new_zeros(len(active), self.in_features, r)                 # [B, in, r]
                B = w.new_zeros(len(active), r, self.out_features)                # [B, r, out]
                for i, n in enumerate(active):
                    if n is not None:
                        A[i, :, :self.rank[n]] = self.lora_A[n].T
                        B[i, :self.rank[n]] = self.lora_B[n].T * self.scale[n]
            self._rows = c = (key, stamp, params, A, B)
        return c[3], c[4]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.rank.items())
        return f"in={self.in_features}, out={self.out_features}, adapters={{{ranks}}}, active={self.active!r}"


class LoRAEmbedding(LoRALinear):
    """A frozen ``nn.Embedding`` plus low-rank adapters (PEFT's LoRA ``Embedding``).

    ``forward(ids [...]) -> [..., dim]``::

        y = base(ids) + scale * A.T[ids] @ B.T      # A [r, num_embeddings], B [dim, r]

    A lookup is a product with one-hot rows, so this is :class:`LoRALinear` with
    ``in = num_embeddings`` and ``out = embedding_dim``: each token id gets ``r`` numbers of
    its own (a column of ``A``), mixed by ``B`` into the embedding space. For a task whose words
    the base model never read (a model pretrained on children's stories reading SMS spam),
    this is what moves their embeddings. As in PEFT, ``A`` starts at zeros and ``B`` normal
    (a fresh adapter changes nothing), dropout is not applied, and the merge adds
    ``scale * (B @ A).T`` to the ``[num_embeddings, dim]`` weight.

    Args and attributes as :class:`LoRALinear` (``in_features`` is the vocabulary size).

    Raises:
        TypeError: ``base`` is not an ``nn.Embedding``.
    """

    _BASE = nn.Embedding
    _STACKED_ROWS = False   # rows grouped by adapter: a lookup is cheap, a stacked [rows, vocab, r] A is not

    @staticmethod
    def _sizes(base: nn.Embedding) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    def _fresh(self, rank: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A = torch.zeros(rank, self.in_features, device=w.device, dtype=w.dtype)
        return A, torch.randn(self.out_features, rank, device=w.device, dtype=w.dtype)

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Adapter ``name``'s contribution ``scale * A.T[ids] @ B.T``: ``ids [...] -> [..., dim]``."""
        return F.embedding(x, self.lora_A[name].T) @ self.lora_B[name].T * self.scale[name]   # [.., r] -> [.., dim]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * (B @ A).T``: ``[num_embeddings, dim]``, what merging adds to ``base.weight``."""
        return (self.lora_B[name] @ self.lora_A[name]).T * self.scale[name]


def _wrapper(layer: nn.Module) -> type[LoRALinear]:
    return LoRAEmbedding if isinstance(layer, nn.Embedding) else LoRALinear


# --------------------------------------------------------------------------- #
# Injecting
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class LoRASummary:
    """What :func:`add_lora` did: ``trainable`` and ``total`` parameters, their ratio, the wrapped layers."""

    trainable: int
    total: int
    fraction: float
    layers: tuple[str, ...]

    def __str__(self) -> str:
        return (f"LoRA on {len(self.layers)} layers: {self.trainable:,} of {self.total:,} parameters trainable "
                f"({100 * self.fraction:.3f} %)")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".{i}.", name)


def _adaptable(model: nn.Module) -> list[str]:
    """Names of the linear and embedding layers LoRA can wrap (a LoRA layer counts as its layer, its
    ``base`` not)."""
    inside = {n + ".base" for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding, LoRALinear)) and n not in inside]


def _linear_names(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(_pattern(n) for n in _adaptable(model)))


def _find_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise TypeError(f"targets must be a non-empty list of layer names such as {list(DEFAULT_TARGETS)}, "
                        f"got {targets!r}")
    candidates = _adaptable(model)
    found: dict[str, None] = {}
    for target in targets:
        if not isinstance(target, str):
            raise TypeError(f"targets must hold layer names (str), got {target!r}")
        hits = [n for t in TARGET_GROUPS.get(target, (target,)) for n in candidates if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"target {target!r} matches no linear or embedding layer of the model; they are "
                             f"{_linear_names(model)} (or the groups {list(TARGET_GROUPS)})")
        found.update(dict.fromkeys(sorted(hits, key=_natural)))
    return list(found)


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _head_modules(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, GPTClassifier):
        head = model.gpt.out_head
        return [] if isinstance(head, LoRALinear) else [head]       # a head given LoRA trains through it
    return []


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16, targets: Sequence[str] = DEFAULT_TARGETS, *,
             dropout: float = 0.0, rslora: bool = False, name: str = "default",
             train_head: bool | None = None, rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None) -> LoRASummary:
    """Wrap ``model``'s chosen ``nn.Linear`` layers in :class:`LoRALinear` (``nn.Embedding`` in
    :class:`LoRAEmbedding`) in place and freeze the rest.

    The new adapter ``name`` becomes the active one, and only its ``A``/``B`` train (adapters
    added earlier stay, frozen). Calling it again with another ``name`` adds a second adapter
    to the same layers: one base, several adapters.

    Args:
        model: a :class:`~course_lib.model.GPTModel`, a :class:`~course_lib.classification.GPTClassifier`,
            or any module with linear layers.
        rank, alpha: ``r`` and the scale's numerator. Default 8 and 16.
        targets: layer names, matched against the end of each module name (``"W_query"``,
            ``"ff.layers.0"``, ``"trf_blocks.11.att.out_proj"``), or the groups ``"attention"``,
            ``"ff"`` (both feed-forward layers), ``"head"`` and ``"embedding"`` (the token
            embedding). Default: query, key, value, output.
        rank_pattern, alpha_pattern: another rank / alpha for some targets, keyed as ``targets``
            (e.g. ``{"embedding": 4}``), as PEFT's options of those names. Default ``None``.
        dropout, rslora: see :class:`LoRALinear`. Default ``0.0``, ``False``.
        name: the adapter's name. Default ``"default"``.
        train_head: keep a classifier's head trainable in full. Default: ``True`` for a ``GPTClassifier``
            (unless the head itself is a target: then its adapter trains and its weight stays frozen).

    Returns:
        a :class:`LoRASummary` (trainable and total parameters, their fraction, the layers wrapped).

    Raises:
        ValueError: a bad ``rank``/``alpha``/``dropout``/``name``; a target matching no linear
            layer (the message lists the model's linear layers); ``name`` exists already on any layer
            (one adapter is made by one call).
        TypeError: ``model`` is not an ``nn.Module``; ``targets`` not a list of names; ``rslora``
            or ``train_head`` not ``True``/``False``. Every argument is checked before the model
            is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rank = positive_int("rank", rank, hint=" (typical: 4, 8 or 16)")
    alpha, name = _check_alpha(alpha), _check_name(name)
    dropout, rslora = probability("dropout", dropout), boolean("rslora", rslora)   # all checked before any change
    if train_head is not None:
        train_head = boolean("train_head", train_head)
    names = _find_targets(model, targets)
    ranks, alphas = dict.fromkeys(names, rank), dict.fromkeys(names, alpha)
    for label, pattern, values, check in (("rank_pattern", rank_pattern, ranks, positive_int),
                                          ("alpha_pattern", alpha_pattern, alphas, None)):
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise TypeError(f"{label} must be a dict of target -> value (e.g. {{'embedding': 4}}), got "
                            f"{type(pattern).__name__}")
        for key, value in pattern.items():
            value = check(f"{label}[{key!r}]", value) if check else _check_alpha(value)
            hits = [n for n in _find_targets(model, [key]) if n in values]
            if not hits:
                raise ValueError(f"{label} key {key!r} matches none of the targets {sorted(values)}")
            values.update(dict.fromkeys(hits, value))
    taken = [n for n, layer in lora_layers(model).items() if name in layer.lora_A]
    if taken:
        raise ValueError(f"layer {taken[0]} already has an adapter named {name!r}; pass another name "
                         "(or delete_adapter it first)")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        layer = model.get_submodule(n)
        if isinstance(layer, LoRALinear):
            layer.add_adapter(name, ranks[n], alphas[n], dropout, rslora)
        else:
            parent, _, child = n.rpartition(".")
            layer = _wrapper(layer)(layer, ranks[n], alphas[n], dropout, rslora, name=name)
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    set_adapter(model, name)
    for n in names:
        for p in (model.get_submodule(n).lora_A[name], model.get_submodule(n).lora_B[name]):
            p.requires_grad_(True)
    if train_head is None:
        train_head = isinstance(model, GPTClassifier)
    if train_head:
        for head in _head_modules(model):
            for p in head.parameters():
                p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return LoRASummary(trainable, total, trainable / total, tuple(names))


def _layers_or_error(model: nn.Module) -> dict[str, LoRALinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call add_lora or load_adapter first")
    return layers


# --------------------------------------------------------------------------- #
# Choosing adapters
# --------------------------------------------------------------------------- #
def set_adapter(model: nn.Module, name: str | Sequence[str | None] | None) -> None:
    """Choose the adapter every LoRA layer uses: a name, ``None`` (the base model alone), or a
    list with one name (or ``None``) per batch row, so that rows for different adapters run in
    one forward pass (each adapter's rows are gathered and get its low-rank update; the base
    weights are shared, never copied). A layer without the named adapter runs as its base.

    Args:
        model: a model with :class:`LoRALinear` layers.
        name: ``"spam"``, ``None``, or ``["spam", None, "instr"]`` for a batch of 3 rows (the
            forward then needs exactly that many rows).

    Raises:
        TypeError: ``model`` not an ``nn.Module``; ``name`` not a str, ``None`` or a non-empty
            list/tuple of those.
        ValueError: a name no LoRA layer has (the message lists those it has); the model has
            no LoRA layers, or has a merged adapter (:func:`unmerge_lora` first).
    """
    layers = _layers_or_error(model)
    known = sorted({n for layer in layers.values() for n in layer.lora_A})
    if not (name is None or isinstance(name, str) or isinstance(name, (list, tuple))):
        raise TypeError(f"name must be an adapter name, None, or a list with one name (or None) per batch row, "
                        f"got {type(name).__name__}")
    wanted = [name] if name is None or isinstance(name, str) else list(name)
    if not wanted or not all(n is None or isinstance(n, str) for n in wanted):
        raise TypeError(f"a per-row adapter list must be non-empty and hold names (str) or None, got {name!r}")
    unknown = [n for n in wanted if n is not None and n not in known]
    if unknown:
        raise ValueError(f"unknown adapter {unknown[0]!r}; the model has {known}")
    merged = [n for n, layer in layers.items() if layer.merged is not None]
    if merged:
        raise ValueError(f"layer {merged[0]} has adapter {layers[merged[0]].merged!r} merged into its weight; "
                         "call unmerge_lora(model) before choosing another adapter")
    for layer in layers.values():
        if name is None or isinstance(name, str):
            layer.active = name if name in layer.lora_A else None
        else:
            layer.active = tuple(n if n in layer.lora_A else None for n in wanted)


@contextmanager
def adapter_rows(model: nn.Module, names: str | Sequence[str | None] | None) -> Iterator[nn.Module]:
    """``with adapter_rows(model, ["spam", None, "instr"]): logits = model(idx)`` — as
    :func:`set_adapter` inside the block; the previous choice is restored afterwards.

    Raises:
        TypeError, ValueError: as :func:`set_adapter`.
    """
    layers = _layers_or_error(model)
    before = {n: layer.active for n, layer in layers.items()}
    set_adapter(model, names)
    try:
        yield model
    finally:
        for n, layer in layers.items():
            layer.active = before[n]


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every LoRA layer (layers left without any keep a ``None`` active).

    Raises:
        ValueError: no layer has ``name``; it is merged (unmerge first).
    """
    layers = _layers_or_error(model)
    holders = [layer for layer in layers.values() if name in layer.lora_A]
    if not holders:
        raise ValueError(f"unknown adapter {name!r}; the model has "
                         f"{sorted({n for layer in layers.values() for n in layer.lora_A})}")
    if any(layer.merged == name for layer in holders):
        raise ValueError(f"adapter {name!r} is merged; call unmerge_lora(model) before deleting it")
    for layer in holders:
        del layer.lora_A[name], layer.lora_B[name]
        layer._rows = None
        for d in (layer.rank, layer.alpha, layer.rslora, layer.scale, layer.dropout):
            del d[name]
        if layer.active == name:
            layer.active = None
        elif isinstance(layer.active, tuple):
            layer.active = tuple(None if a == name else a for a in layer.active)


# --------------------------------------------------------------------------- #
# Merging
# --------------------------------------------------------------------------- #
def merge_lora(model: nn.Module, *, keep_original: bool = True) -> None:
    """Fold each layer's active adapter into its base weight: ``W <- W + scale * B @ A``.

    The model then computes the same outputs (to float rounding) at the base model's cost: the
    forward is the base ``F.linear`` alone. A base weight shared with another layer (a head tied
    to the token embedding) is merged into a copy: the embedding stays as it was, the model's
    ``tie_weights`` reads ``False`` while merged, and :func:`unmerge_lora` ties it again.

    Args:
        model: a model with :class:`LoRALinear` layers; layers already merged are skipped, so
            a second call does nothing.
        keep_original: keep a copy of each base weight so that :func:`unmerge_lora` restores
            it bit for bit. ``False`` saves that memory; unmerging then subtracts (exact to
            rounding). Default ``True``.

    Raises:
        ValueError: no LoRA layers; per-row adapters are active (one adapter per merge).
    """
    layers = _layers_or_error(model)
    keep_original = boolean("keep_original", keep_original)
    for n, layer in layers.items():
        if isinstance(layer.active, tuple):
            raise ValueError(f"layer {n} has per-row adapters active; set_adapter(model, name) to one adapter to merge")
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for layer in layers.values():
            if layer.merged is not None or layer.active is None:
                continue
            w = layer.base.weight
            if uses[id(w)] > 1:  # shared (a head tied to the token embedding): merge into a copy, keep the tie's
                layer._tied, layer._original = w, None
                layer.base.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
                w = layer.base.weight
            else:
                layer._original = w.detach().clone() if keep_original else None
            w += layer.delta_weight(layer.active).to(w.dtype)
            layer.merged = layer.active
    _sync_tie_flags(model)


def _tied(m: GPTModel) -> bool:
    head, emb = (layer.base if isinstance(layer, LoRALinear) else layer for layer in (m.out_head, m.tok_emb))
    return head.weight is emb.weight


def _sync_tie_flags(model: nn.Module) -> None:
    """A GPTModel whose head a merge untied says so (``export_hf``, checkpoints read the flag)."""
    for m in model.modules():
        if isinstance(m, GPTModel) and m.tie_weights:
            m.tie_weights = _tied(m)


def unmerge_lora(model: nn.Module) -> None:
    """Take merged adapters out of the base weights again (restored exactly when merged with
    ``keep_original``, or when the weight is shared with another layer: a tied head gets its
    tie back). Layers not merged are left as they are, so a second call does nothing.

    Raises:
        TypeError: ``model`` not an ``nn.Module``.
        ValueError: the model has no LoRA layers.
    """
    layers = _layers_or_error(model)
    with torch.no_grad():
        for layer in layers.values():
            if layer.merged is None:
                continue
            if layer._tied is not None:
                layer.base.weight = layer._tied
            elif layer._original is not None:
                layer.base.weight.copy_(layer._original)
            else:
                layer.base.weight -= layer.delta_weight(layer.merged).to(layer.base.weight.dtype)
            layer._original, layer._tied, layer.merged = None, None, None
    for m in model.modules():
        if isinstance(m, GPTModel) and not m.tie_weights:
            m.tie_weights = _tied(m)


def unload_lora(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Replace every :class:`LoRALinear` by its base ``nn.Linear`` (with the active adapter merged
    in when ``merge``), giving the plain model back (e.g. for ``export_hf`` or ``save_checkpoint``).

    Args:
        merge: fold the active adapter in first (:func:`merge_lora`). Default ``True``.

    Returns:
        ``model``, without LoRA layers.

    Raises:
        ValueError: no LoRA layers; per-row adapters active (with ``merge``).
    """
    if boolean("merge", merge):
        merge_lora(model, keep_original=False)
    for n, layer in lora_layers(model).items():
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base)
    return model


# --------------------------------------------------------------------------- #
# PEFT's format
# --------------------------------------------------------------------------- #
_QKV = ("W_query", "W_key", "W_value")
_HF_LINEAR = {"attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.layers.0", "mlp.c_proj": "ff.layers.2"}
_PREFIX = "base_model.model."
_HF_TOP = {"out_head": "lm_head", "tok_emb": "transformer.wte", "pos_emb": "transformer.wpe"}


#: safetensors metadata key of the base model's fingerprint (:func:`_base_fingerprint`).
_FINGERPRINT = "course_lib.base_fingerprint"


def _base_fingerprint(gpt: GPTModel) -> str | None:
    """A short hash of the base weights an adapter is trained on (not of the adapters): 64 evenly
    spaced values of every base tensor, rounded to bfloat16 (so a copy cast to bfloat16 or moved to
    another device reads the same), with the tensors' names and shapes. Another base (retrained, or
    another seed) differs in every sample. ``None`` while an adapter is merged without its original
    weight kept (the base cannot be read back exactly).
    """
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    originals: dict[str, torch.Tensor | None] = {}
    for n, layer in lora_layers(gpt).items():
        if layer.merged is not None:
            originals[n + ".base.weight"] = layer._tied if layer._tied is not None else layer._original
    for n, p in sorted(gpt.named_parameters(remove_duplicate=False), key=lambda item: item[0]):
        if ".lora_" in f".{n}":
            continue
        if n in originals:
            p = originals[n]
            if p is None:
                return None
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 64), device=flat.device).long()
        h.update(f"{n.replace('.base.', '.')}{list(p.shape)};".encode())
        h.update(flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()


def _folder(label: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{label} must be a folder path (str or Path), got {type(path).__name__}")
    return Path(path).expanduser()


def _gpt_prefix(model: nn.Module) -> tuple[GPTModel, str]:
    if isinstance(model, GPTModel):
        return model, ""
    if isinstance(model, GPTClassifier):
        return model.gpt, "gpt."
    raise TypeError(f"model must be a GPTModel or GPTClassifier for PEFT's GPT-2 format, got {type(model).__name__}")


def _hf_module(ours: str, n_layers: int) -> tuple[str, str | None]:
    """Our module name (inside the GPTModel) -> (HF module name, q/k/v part or None)."""
    if ours in _HF_TOP:
        return _HF_TOP[ours], None
    m = re.fullmatch(r"trf_blocks\.(\d+)\.(.+)", ours)
    if m and int(m.group(1)) < n_layers:
        h, rest = f"transformer.h.{m.group(1)}.", m.group(2)
        if rest.startswith("att.") and rest[4:] in _QKV:
            return h + "attn.c_attn", rest[4:]
        for hf, mine in _HF_LINEAR.items():
            if rest == mine:
                return h + hf, None
    raise ValueError(f"layer {ours} has no counterpart in GPT-2's Hugging Face layout, so PEFT cannot read its "
                     "adapter; save only adapters on the embeddings, attention, feed-forward or LM head layers")


def save_adapter(model: nn.Module, folder: str | os.PathLike, name: str = "default", *, overwrite: bool = False,
                 base_model_name_or_path: str | None = None, chat_template: str | None = None) -> Path:
    """Write adapter ``name`` as a PEFT LoRA folder for GPT-2: ``adapter_config.json`` + ``adapter_model.safetensors``.

    ``peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(export), folder)`` then
    computes what ``model`` computes with this adapter (``export`` written by
    :func:`~course_lib.pretrained.export_hf`). Tensors are named
    ``base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight`` (and ``lora_B``,
    ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``, ``lm_head``; the token embedding's
    ``transformer.wte.lora_embedding_A`` and ``_B``); ``fan_in_fan_out`` is true because GPT-2's
    layers are ``Conv1D`` (PEFT's ``A [r, in]``/``B [out, r]`` equal ours). Layers whose rank or
    alpha differs from the most common one are listed in ``rank_pattern``/``alpha_pattern``.

    **Query, key and value in one ``c_attn``.** GPT-2 computes ``[q | k | v] = x W_c`` with one
    ``[d, 3d]`` weight; we have three layers with adapters ``(A_q, B_q)``, ``(A_k, B_k)``,
    ``(A_v, B_v)`` of rank ``r`` and one scale ``s``. Stacking the A's along the rank axis and
    placing the B's on a block diagonal gives one adapter of rank ``3r``::

        A_c = [A_q; A_k; A_v]                 # [3r, d]
        B_c = [[B_q, 0, 0], [0, B_k, 0], [0, 0, B_v]]   # [3d, 3r]
        B_c @ A_c = [B_q A_q; B_k A_k; B_v A_v]         # each part's own update, exactly

    PEFT scales ``c_attn`` by ``lora_alpha / 3r``, so ``rank_pattern`` / ``alpha_pattern`` give
    ``c_attn`` rank ``3r`` and alpha ``3r * s`` (``sqrt(3r) * s`` with rsLoRA): the product
    and the scale are unchanged. A part without an adapter gets a zero block. Which rows of
    ``A_c`` belong to which part is kept in the file's metadata, so :func:`load_adapter`
    splits it back to rank ``r`` each.

    Args:
        model: a ``GPTModel`` or ``GPTClassifier`` with LoRA layers (a classifier's new head
            has no GPT-2 counterpart: save it with :func:`~course_lib.checkpoint.save_checkpoint`).
        folder: created if needed.
        name: the adapter to write. Default ``"default"``.
        overwrite: replace an adapter already in ``folder``. Default ``False``.
        base_model_name_or_path: recorded in the config. Default ``"gpt2"``.
        chat_template: for an instruction adapter, the Jinja chat template it was tuned with
            (:func:`course_lib.serve.chat_template`), written as ``chat_template.jinja`` beside the
            adapter (:func:`adapter_chat_template` reads it; ``course adapters merge`` puts it in the
            merged model's tokenizer). Default ``None``: none; when an adapter in ``folder`` is
            replaced (``overwrite``), the template saved with it goes too. A ``chat_template.jinja``
            in a folder without an adapter (a tokenizer's) is left alone, and replaced only with
            ``overwrite``.

    Returns:
        the folder.

    Raises:
        FileExistsError: ``folder`` holds an adapter and ``overwrite`` is ``False``.
        TypeError: ``folder`` not a path; ``overwrite`` not a bool; ``model`` not a GPTModel/GPTClassifier;
            ``chat_template`` not a str.
        ValueError: ``folder`` (or a folder above it) is a file; unknown ``name``; an adapter on a
            layer GPT-2 does not have; q/k/v adapters of one block with different scales; an empty
            ``chat_template``.
    """
    from safetensors.torch import save as safetensors_bytes

    gpt, prefix = _gpt_prefix(model)
    layers = {n.removeprefix(prefix): layer for n, layer in lora_layers(model).items()
              if name in layer.lora_A and n.startswith(prefix)}
    if not layers:
        known = sorted({n for layer in lora_layers(model).values() for n in layer.lora_A})
        raise ValueError(f"unknown adapter {name!r}; the model has {known}")
    if isinstance(model, GPTClassifier) and "out_head" in layers:
        raise ValueError("the classifier's head has a LoRA adapter, which GPT-2's LM format cannot hold; "
                         "leave the head out of targets (it trains in full)")
    overwrite = boolean("overwrite", overwrite)
    folder = _folder("folder", folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{blocker} is a file, so the folder {folder} cannot be made; save_adapter writes a "
                         "folder: choose another path")
    template_bytes = None
    if chat_template is not None:
        if not isinstance(chat_template, str):
            raise TypeError(f"chat_template must be None or the template's Jinja text (a str, e.g. "
                            f"course_lib.serve.chat_template('alpaca')), got {type(chat_template).__name__}")
        if not chat_template.strip():
            raise ValueError("chat_template is empty; give the template's Jinja text, or None for no template")
        try:
            template_bytes = chat_template.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"chat_template cannot be written as UTF-8 text ({err.reason} at character "
                             f"{err.start}); give the template's text") from None
        if (folder / CHAT_TEMPLATE_FILE).is_dir():
            raise ValueError(f"{folder / CHAT_TEMPLATE_FILE} is a folder, where the chat template goes; move it "
                             "or choose another folder")
    existing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if (folder / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{folder} already holds an adapter ({', '.join(existing)}); pass overwrite=True "
                              "to replace it, or choose another folder")
    if template_bytes is not None and (folder / CHAT_TEMPLATE_FILE).exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds a {CHAT_TEMPLATE_FILE} (a tokenizer's?); pass "
                              "overwrite=True to replace it, or choose another folder")

    d = gpt.cfg.emb_dim
    grouped: dict[str, dict[str | None, LoRALinear]] = {}
    for ours, layer in layers.items():
        hf, part = _hf_module(ours, gpt.cfg.n_layers)
        grouped.setdefault(hf, {})[part] = layer
    tensors, ranks, alphas, splits = {}, {}, {}, {}
    rslora = {layer.rslora[name] for layer in layers.values()}
    if len(rslora) > 1:
        raise ValueError(f"adapter {name!r} mixes rsLoRA and plain LoRA layers; PEFT has one use_rslora per adapter")
    rslora = rslora.pop()
    for hf, parts in grouped.items():
        if None in parts:
            layer = parts[None]
            A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scale[name]
        else:
            scales = {layer.scale[name] for layer in parts.values()}
            if len(scales) > 1:
                raise ValueError(f"{hf}: the query/key/value adapters have different scales {sorted(scales)}; "
                                 "GPT-2's fused c_attn holds one scale")
            s = scales.pop()
            present = [p for p in _QKV if p in parts]
            A = torch.cat([parts[p].lora_A[name] for p in present])                      # [R, d]
            B = torch.zeros(3 * d, A.shape[0], dtype=A.dtype, device=A.device)           # [3d, R]
            col = 0
            for p in present:
                r, j = parts[p].rank[name], _QKV.index(p)
                B[j * d:(j + 1) * d, col:col + r] = parts[p].lora_B[name]
                col += r
            splits[hf] = [[p, parts[p].rank[name]] for p in present]
        r = A.shape[0]
        ranks[hf], alphas[hf] = r, s * (math.sqrt(r) if rslora else r)
        a_key, b_key = _tensor_keys(hf)
        tensors[a_key] = A.detach().cpu().contiguous()
        tensors[b_key] = B.detach().cpu().contiguous()
    r0, a0 = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
    targets = sorted({_kind(hf) for hf in grouped})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or "gpt2",
        "r": r0, "lora_alpha": a0, "lora_dropout": max(layer.dropout[name] for layer in layers.values()),
        "target_modules": targets, "fan_in_fan_out": True, "bias": "none", "use_rslora": rslora,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": _patterns(ranks, r0), "alpha_pattern": _patterns(alphas, a0),
    }
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "course_lib.qkv_split": json.dumps(splits)}
    fingerprint = _base_fingerprint(gpt)
    if fingerprint is not None:
        metadata[_FINGERPRINT] = fingerprint
    blob = safetensors_bytes(tensors, metadata=metadata)
    atomic_write(folder / WEIGHTS_FILE, lambda fh: fh.write(blob), overwrite=True)
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(folder / CONFIG_FILE, lambda fh: fh.write(text.encode("utf-8")), overwrite=True)
    if template_bytes is not None:
        atomic_write(folder / CHAT_TEMPLATE_FILE, lambda fh: fh.write(template_bytes), overwrite=True)
    elif existing:      # the adapter it was saved with was just replaced: it would describe another adapter
        (folder / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
    return folder


def adapter_chat_template(folder: str | os.PathLike) -> str | None:
    """The chat template saved with the adapter in ``folder`` (``chat_template.jinja``, see
    :func:`save_adapter`), or ``None`` when it has none (a classification adapter, one PEFT made,
    or an empty file).

    Raises:
        ValueError: the file is not UTF-8 text, or is a folder; ``folder`` is a file.
    """
    folder = _folder("folder", folder)
    if folder.is_file():
        raise ValueError(f"{folder} is a file; give the adapter's folder (the one holding {CONFIG_FILE})")
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a chat template; move it out of the adapter's folder")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; delete it, or save the adapter again") from None
    return text if text.strip() else None


def _kind(hf: str) -> str:
    """``transformer.h.3.attn.c_attn`` -> ``attn.c_attn``, ``transformer.wte`` -> ``wte`` (what
    ``target_modules`` names)."""
    return hf.split(".", 3)[3] if hf.startswith("transformer.h.") else hf.removeprefix("transformer.")


def _tensor_keys(hf: str) -> tuple[str, str]:
    """PEFT's names for a module's A and B: ``lora_A.weight`` of a linear layer, ``lora_embedding_A``
    (a bare parameter) of an embedding."""
    if hf in ("transformer.wte", "transformer.wpe"):
        return f"{_PREFIX}{hf}.lora_embedding_A", f"{_PREFIX}{hf}.lora_embedding_B"
    return f"{_PREFIX}{hf}.lora_A.weight", f"{_PREFIX}{hf}.lora_B.weight"


def _layer_sizes(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear layer, ``(num_embeddings, dim)`` of an embedding (as LoRA's A and B see them)."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    return layer.in_features, layer.out_features


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """PEFT ``rank_pattern``/``alpha_pattern`` entries for the modules whose value is not ``default``:
    one per kind of module (``attn\\.c_attn``) where all of that kind agree, else one per module
    (``h\\.3\\.attn\\.c_attn``). Keys are regular expressions matched at the end of a module's name."""
    out: dict[str, Any] = {}
    kinds: dict[str, set] = {}
    for hf, v in values.items():
        kinds.setdefault(_kind(hf), set()).add(v)
    for hf, v in values.items():
        if v == default:
            continue
        if len(kinds[_kind(hf)]) == 1 and all(values.get(h, v) == v for h in values if _kind(h) == _kind(hf)):
            out[re.escape(_kind(hf))] = v
        else:
            out[re.escape(hf.removeprefix("transformer."))] = v
    return out


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():                               # as PEFT's get_pattern_key
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} holds no adapter: {' and '.join(missing)} missing (an adapter folder "
                                f"has {CONFIG_FILE} and {WEIGHTS_FILE}, as save_adapter or PEFT's "
                                "save_pretrained write)")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({err}); save the adapter again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG_FILE} must hold a JSON object (PEFT's LoraConfig), got "
                         f"{type(config).__name__}")
    try:
        with safe_open(folder / WEIGHTS_FILE, framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            metadata = fh.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{folder / WEIGHTS_FILE} cannot be read as safetensors ({err}); save the adapter "
                         "again") from None
    return config, tensors, metadata


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 trainable: bool = False, activate: bool = True, check_base: bool = True) -> list[str]:
    """Read a LoRA adapter folder (ours, or one PEFT trained on GPT-2) into ``model`` as adapter ``name``.

    Plain linear layers the adapter targets are wrapped in :class:`LoRALinear` (their weights
    frozen, never copied). A PEFT ``c_attn`` adapter of rank ``r`` (``A [r, d]``, ``B [3d, r]``)
    becomes three adapters sharing ``A`` with ``B``'s three row blocks, exactly; one written
    by :func:`save_adapter` is split back into its parts (see there). ``"c_proj"`` in
    ``target_modules`` means both ``attn.c_proj`` and ``mlp.c_proj``, as in PEFT.

    Args:
        model: a ``GPTModel`` or ``GPTClassifier`` of the adapter's base model.
        path: the folder.
        name: the name to give it. Default ``"default"``.
        trainable: let its ``A``/``B`` train. Default ``False``.
        activate: make it the active adapter. Default ``True``.
        check_base: refuse an adapter that :func:`save_adapter` wrote from another base model
            (its file records a fingerprint of the base weights: a sample of each tensor, so
            a retrained or differently seeded base of the same shape is caught, which the
            shapes alone cannot). ``False`` loads it anyway. Adapters from PEFT carry no
            fingerprint and are not checked. Default ``True``.

    Returns:
        the names of the layers that received it.

    Raises:
        FileNotFoundError: no adapter in ``path`` (the missing file is named).
        TypeError: ``path`` not a path; ``trainable``/``activate`` not a bool; ``model`` not a
            GPTModel/GPTClassifier.
        ValueError: not a LoRA adapter (``peft_type``, ``bias``, DoRA); a bad ``r``,
            ``lora_alpha``, ``lora_dropout`` or pattern in the config; ``name`` taken; a tensor
            the model has no layer for, missing its partner, or of the wrong shape or dtype (the
            tensor is named); made from another base model (``check_base``).
    """
    gpt, prefix = _gpt_prefix(model)
    name = _check_name(name)
    trainable, activate = boolean("trainable", trainable), boolean("activate", activate)
    check_base = boolean("check_base", check_base)
    if any(name in layer.lora_A for layer in lora_layers(model).values()):
        raise ValueError(f"the model already has an adapter named {name!r}; delete_adapter it or pick another name")
    folder = _folder("path", path)
    config, tensors, metadata = _read_adapter(folder)
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config.get('bias')!r} (only 'none' is supported)")
    if config.get("use_dora"):
        problems.append("use_dora is true (DoRA is not plain LoRA)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (full layers, not LoRA)")
    if problems:
        raise ValueError(f"{folder / CONFIG_FILE}: {'; '.join(problems)}")
    where = f"{folder / CONFIG_FILE}: "
    r0 = positive_int("r", config.get("r", 8), hint=f" in {folder / CONFIG_FILE}")
    try:
        a0 = _check_alpha(config.get("lora_alpha", 8))
        dropout = probability("lora_dropout", config.get("lora_dropout", 0.0) or 0.0)
    except ValueError as err:
        raise ValueError(where + str(err)) from None
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):          # "false" (a string) would read as true: another scale
        raise ValueError(f"{where}use_rslora must be true or false, got {rslora!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"{where}{key} must be a mapping of module patterns to values, got "
                             f"{type(config[key]).__name__}")
        for module, value in (config.get(key) or {}).items():
            try:
                if key == "rank_pattern":
                    positive_int(f"{key}[{module!r}]", value)
                else:
                    _check_alpha(value)
            except (ValueError, TypeError) as err:
                raise ValueError(f"{where}{key}[{module!r}]: {err}") from None
    try:
        splits = json.loads(metadata.get("course_lib.qkv_split", "{}"))
    except json.JSONDecodeError:
        splits = None
    if not isinstance(splits, dict) or not all(
            isinstance(parts, list) and parts and all(
                isinstance(pr, list) and len(pr) == 2 and pr[0] in _QKV and _is_rank(pr[1]) for pr in parts)
            for parts in splits.values()):
        raise ValueError(f"{folder / WEIGHTS_FILE}: its course_lib.qkv_split metadata is damaged; "
                         "save the adapter again")


    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = (re.fullmatch(rf"{re.escape(_PREFIX)}(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
             or re.fullmatch(rf"{re.escape(_PREFIX)}(transformer\.wte|transformer\.wpe)\.lora_embedding_([AB])"
                             rf"(?:\.[^.]+)?", key))
        if not m:
            raise ValueError(f"{folder / WEIGHTS_FILE}: tensor {key!r} is not a LoRA A/B weight of GPT-2")
        modules.setdefault(m.group(1), {})["lora_" + m.group(2)[-1]] = t
    d, L = gpt.cfg.emb_dim, gpt.cfg.n_layers
    plan: list[tuple[str, torch.Tensor, torch.Tensor, int, float]] = []   # (our module, A, B, rank, alpha)
    for hf, ab in modules.items():
        key = _tensor_keys(hf)[0]
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{folder / WEIGHTS_FILE}: module {hf} lacks its "
                             f"{'lora_B' if 'lora_A' in ab else 'lora_A'} tensor")
        A, B = ab["lora_A"], ab["lora_B"]
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValueError(f"{folder / WEIGHTS_FILE}: tensor {key!r} (and its lora_B) must be floating point, "
                             f"got {A.dtype} and {B.dtype}")
        r = A.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, hf, a0))
        want_r = int(_pattern_value(config.get("rank_pattern") or {}, hf, r0))
        m = re.fullmatch(r"transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", hf)
        if hf == "lm_head" and prefix == "":
            targets = [("out_head", gpt.out_head, 0, gpt.cfg.vocab_size)]
        elif hf in ("transformer.wte", "transformer.wpe"):
            targets = [("tok_emb" if hf.endswith("wte") else "pos_emb", None, 0, None)]
        elif m and int(m.group(1)) < L:
            i, kind = m.group(1), m.group(2)
            if kind == "attn.c_attn":
                targets = [(f"trf_blocks.{i}.att.{p}", None, j * d, (j + 1) * d) for j, p in enumerate(_QKV)]
            else:
                targets = [(f"trf_blocks.{i}.{_HF_LINEAR[kind]}", None, 0, None)]
        else:
            raise ValueError(f"{folder / WEIGHTS_FILE}: tensor {key!r} is for a layer this model does not have "
                             f"({L} blocks); was the adapter made for another base model?")
        outs = sum(_layer_sizes(gpt.get_submodule(t[0]))[1] for t in targets)
        ins = _layer_sizes(gpt.get_submodule(targets[0][0]))[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != ins or B.shape != (outs, r) or r != want_r:
            raise ValueError(f"{folder / WEIGHTS_FILE}: tensor {key!r} (and its lora_B) has shapes {list(A.shape)} and "
                             f"{list(B.shape)}, but this model needs [{want_r}, {ins}] and [{outs}, {want_r}]; "
                             "was the adapter made for another base model?")
        if hf in splits:                                                 # ours: the block diagonal, split back
            if sum(pr for _, pr in splits[hf]) != r:
                raise ValueError(f"{folder / WEIGHTS_FILE}: its course_lib.qkv_split metadata for {hf} covers "
                                 f"{sum(pr for _, pr in splits[hf])} of the adapter's rank {r}; it is damaged: "
                                 "save the adapter again")
            col = 0
            for part, pr in splits[hf]:
                j = _QKV.index(part)
                plan.append((f"trf_blocks.{hf.split('.')[2]}.att.{part}", A[col:col + pr],
                             B[j * d:(j + 1) * d, col:col + pr], pr, alpha * _rank_ratio(pr, r, rslora)))
                col += pr
        else:
            for ours, _, lo, hi in targets:
                plan.append((ours, A, B[lo:hi] if hi is not None else B, r, alpha))
    if check_base and metadata.get(_FINGERPRINT):          # the shapes fit (checked above): is it the same base?
        base_now = _base_fingerprint(gpt)
        if base_now is not None and base_now != metadata[_FINGERPRINT]:
            raise ValueError(f"{folder} was trained on another base model (recorded: "
                             f"{config.get('base_model_name_or_path') or 'unnamed'}; its weights differ from "
                             "this model's, though the shapes fit), so it would compute something else here. "
                             "Load it onto the base it was made for (a base pretrained again, by a new recipe "
                             "or --retrain, is another base); in Python, load_adapter(..., check_base=False) "
                             "loads it anyway")
    merged = sorted({prefix + ours for ours, *_ in plan
                     if isinstance(model.get_submodule(prefix + ours), LoRALinear)
                     and model.get_submodule(prefix + ours).merged is not None})
    if merged and activate:              # set_adapter would refuse it after the layers were changed
        raise ValueError(f"layer {merged[0]} has an adapter merged into its weight, so the new one cannot be made "
                         "active; unmerge_lora(model) first, or load it with activate=False")
    wrapped = []
    for ours, A, B, r, alpha in plan:
        full = prefix + ours
        layer = model.get_submodule(full)
        if isinstance(layer, LoRALinear):
            layer.add_adapter(name, r, alpha, dropout, rslora, A=A, B=B)
        elif not isinstance(layer, (nn.Linear, nn.Embedding)):
            raise ValueError(f"{full} is a {type(layer).__name__}, not a linear or embedding layer LoRA can adapt")
        else:
            parent, _, child = full.rpartition(".")
            new = _wrapper(layer)(layer, r, alpha, dropout, rslora, name=name)
            with torch.no_grad():
                new.lora_A[name].copy_(A)
                new.lora_B[name].copy_(B)
            setattr(model.get_submodule(parent), child, new)
            layer = new
        for p in (layer.lora_A[name], layer.lora_B[name]):
            p.requires_grad_(bool(trainable))
        wrapped.append(full)
    if activate:
        set_adapter(model, name)
    return wrapped


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rank_ratio(part_rank: int, fused_rank: int, rslora: bool) -> float:
    """Alpha for a part of rank ``part_rank`` with the fused module's scale (``alpha / fused_rank``)."""
    return math.sqrt(part_rank / fused_rank) if rslora else part_rank / fused_rank
