"""Step 5 — the base model each profile fine-tunes in steps 6, 7 and 9.

* :func:`load_base_model` — ``gpu``: OpenAI's GPT-2 small (:func:`~course_lib.pretrained.load_gpt2`);
  ``tiny`` / ``cpu``: a small GPT pretrained here with step 5's :func:`~course_lib.training.train`
  the first time it is asked for, then read from its cache.
* :class:`BaseModelRecipe`, :data:`BASE_RECIPES` — how each small model is pretrained.
* :func:`base_model_path` — where it is cached: ``<data cache>/checkpoints/base-<profile>.pt``.

The cached file is written atomically (two notebooks starting together cannot leave half a
file) and pretrained again when its recipe changes. The small models have learned spelling,
common words and a little grammar, not facts: a starting point for fine-tuning, not an assistant.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, model_from_checkpoint, save_checkpoint
from .config import get_config, get_profile, seed_everything
from .data import default_cache_dir, read_text
from .model import GPTModel
from .paths import writable_problem
from .pretrained import load_gpt2
from .text_data import create_dataloader, encode_text
from .tokenizers import ENDOFTEXT, tiktoken_gpt2
from .training import train

__all__ = ["BaseModelRecipe", "BASE_RECIPES", "load_base_model", "base_model_path"]


@dataclass(frozen=True)
class BaseModelRecipe:
    """How :func:`load_base_model` pretrains the base model of one profile (deterministic on CPU).

    Attributes:
        config: a preset of :data:`course_lib.config.GPT_CONFIGS`.
        corpus: data-registry names of the texts, joined with ``<|endoftext|>``.
        max_chars: use only the first this many characters of the joined text (``None``: all).
        batch_size, max_steps, lr, weight_decay: the training run (AdamW, constant rate).
        val_fraction: the tail of the token stream held out for the validation loss.
        seed: seeds the initial weights, dropout and batch order.
    """

    config: str
    corpus: tuple[str, ...]
    max_chars: int | None
    batch_size: int
    max_steps: int
    lr: float
    weight_decay: float = 0.1
    val_fraction: float = 0.05
    seed: int = 123

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["corpus"] = list(self.corpus)
        return d


#: The recipes: ``tiny`` trains in seconds (it learns the commonest words and punctuation:
#: enough for CI to exercise steps 6, 7 and 9), ``cpu`` in a few minutes on a laptop (short
#: simple sentences). Both read TinyStories (Eldan & Li, 2023), which a small model learns fast.
BASE_RECIPES: dict[str, BaseModelRecipe] = {
    "tiny": BaseModelRecipe("gpt-tiny", ("tinystories-val",), max_chars=300_000, batch_size=8, max_steps=60,
                            lr=3e-3),
    "cpu": BaseModelRecipe("gpt-cpu", ("tinystories-val",), max_chars=None, batch_size=4, max_steps=300,
                           lr=6e-4),
}


def base_model_path(profile: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the base model of ``profile`` is cached: ``<cache>/checkpoints/base-<profile>.pt``.

    Args:
        cache_dir: the data cache. Default :func:`course_lib.data.default_cache_dir`.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "checkpoints" / f"base-{profile}.pt"


def _pretrain_base(recipe: BaseModelRecipe, path: Path, verbose: bool) -> GPTModel:
    text = f" {ENDOFTEXT} ".join(read_text(name) for name in recipe.corpus)
    if recipe.max_chars is not None:
        text = text[: recipe.max_chars]
    ids = encode_text(text, tiktoken_gpt2())
    cut = int(len(ids) * (1 - recipe.val_fraction))
    cfg = get_config(recipe.config)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state as it was
        seed_everything(recipe.seed)
        model = GPTModel(cfg)
        train_loader = create_dataloader(ids[:cut], batch_size=recipe.batch_size, max_length=cfg.context_length,
                                         stride=cfg.context_length, seed=recipe.seed)
        val_loader = create_dataloader(ids[cut:], batch_size=recipe.batch_size, max_length=cfg.context_length,
                                       stride=cfg.context_length, shuffle=False, drop_last=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        if verbose:
            print(f"pretraining the {recipe.config} base model on {', '.join(recipe.corpus)} "
                  f"({len(ids):,} tokens, {recipe.max_steps} steps); cached afterwards at {path}")
        history = train(model, train_loader, val_loader, optimizer, torch.device("cpu"),
                        max_steps=recipe.max_steps, eval_freq=max(recipe.max_steps // 4, 1), eval_iter=5,
                        seed=recipe.seed, progress=verbose, verbose=False)
    problem = writable_problem(path.parent)
    if problem is None:
        save_checkpoint(path, model, step=history.step, overwrite=True, include_rng=False,
                        extra={"recipe": recipe.to_dict(), "history": history.to_dict(), "kind": "base-model"})
    else:
        print(f"could not cache the base model: the folder {path.parent} {problem}. It will be pretrained again "
              "next time; set COURSE_DATA_DIR to a folder you can write to (course doctor checks it)")
    if verbose:
        print(f"base model: validation loss {history.val_losses[0]:.2f} -> {history.val_losses[-1]:.2f} "
              f"in {history.seconds:.0f} s")
    return model


def load_base_model(profile: str | None = None, *, device: Any = None, cache_dir: str | os.PathLike | None = None,
                    retrain: bool = False, verbose: bool = True) -> GPTModel:
    """A model that has learned some language, to fine-tune in steps 6, 7 and 9.

    * ``gpu``: OpenAI's GPT-2 small (:func:`~course_lib.pretrained.load_gpt2` ``("gpt2")``).
    * ``tiny`` / ``cpu``: a small GPT pretrained by :data:`BASE_RECIPES` the first time it
      is asked for (seconds for ``tiny``, minutes for ``cpu``), then read from
      :func:`base_model_path`. The cached file is retrained when its recipe changes (it is
      the library's cache, not a learner's work) or with ``retrain=True``. The caller's
      random state is left untouched.

    Args:
        profile: ``tiny``, ``cpu`` or ``gpu``; default the active profile (``$COURSE_PROFILE``).
        device: where to put the model. Default CPU.
        cache_dir: the data cache (default :func:`course_lib.data.default_cache_dir`).
        retrain: pretrain again even if a cached model exists. Default ``False``.
        verbose: say what is happening. Default ``True``.

    Returns:
        a :class:`~course_lib.model.GPTModel` in ``eval()`` mode.

    Raises:
        ValueError: an unknown profile.
    """
    prof = get_profile(profile)
    if prof.name == "gpu":
        return load_gpt2("gpt2", device=device)
    recipe = BASE_RECIPES[prof.name]
    path = base_model_path(prof.name, cache_dir)
    model = None
    if path.is_file() and not retrain:
        try:
            loaded, extra = model_from_checkpoint(path, return_extra=True)     # one read of the file
            if extra.get("recipe") == recipe.to_dict():
                model = loaded
                if verbose:
                    print(f"base model ({recipe.config}) loaded from {path}")
            elif verbose:
                print(f"{path} was made by another recipe; pretraining again")
        except CheckpointError as err:
            if verbose:
                print(f"{path} is damaged ({err}); pretraining again")
    if model is None:
        model = _pretrain_base(recipe, path, verbose)
    if device is not None:
        model.to(device)
    return model.eval()
