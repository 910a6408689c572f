"""Step 9 — deployment: reading a model to serve, and writing it for other runtimes.

* :func:`load_model`, :class:`LoadedModel` — a language model from a course checkpoint, a run
  folder of ``course finetune instruct`` / ``course pretrain``, a Hugging Face folder, or a
  profile's base model: what ``course serve``, ``course chat``, ``course export`` and
  ``course adapters merge`` start from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model import GPTModel

__all__ = ["LoadedModel", "load_model", "MODEL_FILES"]

#: The files :func:`load_model` looks for in a folder, in this order: ``course finetune`` writes
#: ``model.pt``, ``course pretrain`` writes ``checkpoint.pt``, ``export_hf`` / ``save_pretrained``
#: write ``config.json`` with the safetensors weights.
MODEL_FILES: tuple[str, ...] = ("model.pt", "checkpoint.pt", "config.json")


@dataclass
class LoadedModel:
    """What :func:`load_model` returns.

    Attributes:
        model: the :class:`~course_lib.model.GPTModel`, in ``eval()`` mode.
        style: the prompt template it was instruction-tuned with (``"alpaca"``, ``"phi3"``), or
            ``None`` when the file records none (a base model).
        source: where it came from (a file, a folder, or ``"profile <name>"``).
        kind: ``"checkpoint"``, ``"hf"`` or ``"profile"``.
    """

    model: GPTModel
    style: str | None
    source: str
    kind: str


def _checkpoint_file(path: Path) -> Path | None:
    if path.is_file():
        return None if path.name == "config.json" else path
    for name in MODEL_FILES[:2]:
        if (path / name).is_file():
            return path / name
    return None


def load_model(path: str | os.PathLike | None = None, *, profile: str | None = None,
               device: Any = None) -> LoadedModel:
    """A language model to serve, chat with or export.

    Args:
        path: a course checkpoint file (``model.pt``, ``checkpoint.pt``), a folder holding one
            (the ``--out`` of ``course finetune instruct`` or ``course pretrain``), or a Hugging
            Face GPT-2 folder (``config.json`` + ``model.safetensors``, as :func:`export_hf`
            writes). ``None``: the base model of ``profile``.
        profile: with ``path=None``, ``tiny``/``cpu``/``gpu``
            (:func:`~course_lib.base_model.load_base_model`); default the active profile.
        device: where to put the model. Default CPU.

    Returns:
        a :class:`LoadedModel`.

    Raises:
        ValueError: ``path`` and ``profile`` both given; ``path`` does not exist or holds no model
            (the message lists what was looked for); the checkpoint holds a model that does not
            write text (step 6's classifier); a damaged file (``CheckpointError``).
        FileNotFoundError: a Hugging Face folder without its weights.
    """
    if path is None:
        from .base_model import load_base_model
        from .config import get_profile

        name = get_profile(profile).name
        return LoadedModel(load_base_model(name, device=device, verbose=False), None, f"profile {name}", "profile")
    if profile is not None:
        raise ValueError(f"give a model path or profile={profile!r}, not both")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file or folder path, got {type(path).__name__}")
    target = Path(path).expanduser()
    if not target.exists():
        raise ValueError(f"{target} does not exist; give a course checkpoint (model.pt), the --out folder of "
                         "`course finetune instruct` or `course pretrain`, or a Hugging Face GPT-2 folder")
    ckpt = _checkpoint_file(target)
    if ckpt is None:
        folder = target.parent if target.is_file() else target
        if not (folder / "config.json").is_file():
            raise ValueError(f"{target} holds no model: looked for {', '.join(MODEL_FILES)}; give the --out folder "
                             "of `course finetune instruct` or `course pretrain`, or a Hugging Face GPT-2 folder")
        from .pretrained import load_gpt2

        return LoadedModel(load_gpt2(folder, device=device), None, str(folder), "hf")
    from .checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(ckpt, device=device)
    if not isinstance(model, GPTModel):
        hint = " (a spam classifier: `course classify` uses it)" if type(model).__name__ == "GPTClassifier" else ""
        raise ValueError(f"{ckpt} holds a {type(model).__name__}{hint}, not a language model that writes text; "
                         "give a model from `course finetune instruct`, `course pretrain` or a GPT-2 folder")
    extra = load_checkpoint(ckpt).get("extra") or {}
    style = extra.get("style") if isinstance(extra.get("style"), str) else None
    return LoadedModel(model, style, str(ckpt), "checkpoint")
