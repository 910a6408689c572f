"""Step 5 — checkpoints: save a training run, and pick it up again exactly where it stopped.

A checkpoint is one file holding everything needed to continue training as if nothing had
happened: the model's weights, the optimizer's state (Adam's moving averages), the model's
configuration, the step reached, the state of every random number generator, and a small
``extra`` dictionary for the training loop (history, position in the data).

* :func:`save_checkpoint` — write it, atomically.
* :func:`load_checkpoint` — read it back into a model (and optimizer), checking that it fits.
* :func:`model_from_checkpoint` — build the right :class:`~course_lib.model.GPTModel` from
  the configuration stored in the file, then load it.
* :func:`rng_state` / :func:`set_rng_state` — Python's, NumPy's and PyTorch's random state
  as plain tensors and numbers.

What a checkpoint guarantees (atomic, never non-finite, never overwritten silently, safe to
load, checked against the model, CRC-verified, one kind of optimizer) is listed, with why, in
CONTRIBUTING.md, "What the training loop and checkpoints guarantee".
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .checks import boolean, non_negative_int
from .files import atomic_write, check_writable

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "NonFiniteError",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "rng_state",
    "set_rng_state",
    "atomic_write",
    "check_writable",
    "nonfinite_parameters",
    "ARCHITECTURE_KEYS",
    "FORMAT",
]

#: Tag stored in every checkpoint written by this module.
FORMAT = "course_lib.checkpoint/1"
#: Config fields that shape the weights: they must match for a checkpoint to load.
ARCHITECTURE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not a course checkpoint."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose configuration (or tensors) does not fit the model it is loaded into."""


class NonFiniteError(FloatingPointError):
    """A loss, gradient or weight that is ``nan`` or ``inf``: the run diverged.

    :func:`course_lib.training.train` attaches the :class:`~course_lib.training.History`
    measured so far as ``err.history``.
    """

    history = None


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters and buffers that hold a ``nan`` or ``inf`` (floating point only)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


# --------------------------------------------------------------------------- #
# Random number generators as plain data
# --------------------------------------------------------------------------- #
def rng_state() -> dict[str, Any]:
    """The state of Python's ``random``, NumPy's global generator and PyTorch's (CPU, and
    every CUDA device if there is one), as tensors and plain values (``weights_only``-safe)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`.

    CUDA states are restored when both the file and this machine have CUDA (and for as many
    devices as both have); a checkpoint written on a GPU loads on a CPU-only machine.
    """
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= set(state):
        raise ValueError(f"state must be what rng_state() returns (a dict with 'python', 'numpy' and 'torch'), got "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])[: torch.cuda.device_count()]
        for i, s in enumerate(cuda_states):
            torch.cuda.set_rng_state(s.cpu(), i)


# --------------------------------------------------------------------------- #
# Saving
# --------------------------------------------------------------------------- #
def _config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    if isinstance(cfg, dict):
        return dict(cfg)
    raise TypeError(f"model.cfg must be a GPTConfig or a dict, got {type(cfg).__name__}")


def _architecture(model: nn.Module) -> dict[str, Any] | None:
    """``{"class": "course_lib.<module>.<Class>", "args": {...}}`` for a model that is not a
    plain GPT (it has an ``architecture()`` method), else ``None``."""
    describe_it = getattr(model, "architecture", None)
    if describe_it is None:
        return None
    arch = describe_it()
    if not (isinstance(arch, dict) and isinstance(arch.get("class"), str) and isinstance(arch.get("args"), dict)):
        raise TypeError(f"{type(model).__name__}.architecture() must return {{'class': 'course_lib.module.Class', "
                        f"'args': {{...}}}}, got {arch!r}")
    _check_plain(arch, "architecture()")
    return arch


def _build_architecture(path: Path, arch: dict[str, Any], cfg, tie_weights: bool) -> nn.Module:
    """Rebuild a later step's model from its stored ``architecture`` (imported by name, so that
    step 5 knows nothing of the steps that build on it). Only ``course_lib`` classes are built."""
    import importlib

    name = arch.get("class") if isinstance(arch, dict) else None
    module_name, _, class_name = name.rpartition(".") if isinstance(name, str) else ("", "", "")
    if not module_name.startswith("course_lib.") or not class_name:
        raise CheckpointError(f"{path} stores an unknown model architecture {name!r}; only course_lib models "
                              "can be rebuilt: build the model yourself and call load_checkpoint(path, model)")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls.from_architecture(cfg, tie_weights=tie_weights, **arch.get("args", {}))
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} stores a {name} this version of course_lib cannot rebuild ({err}); build the "
                              "model yourself and call load_checkpoint(path, model)") from None


def _optimizer_type(optimizer: torch.optim.Optimizer) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    *, step: int = 0, extra: dict[str, Any] | None = None, overwrite: bool = False,
                    include_rng: bool = True, allow_nonfinite: bool = False) -> Path:
    """Save model, optimizer, config, step and random state to ``path``, atomically.

    Args:
        path: the file to write (by convention ``*.pt``); parent folders are created.
        model: the model; its ``state_dict()`` is saved, and its ``cfg`` (a
            :class:`~course_lib.config.GPTConfig`) as a dict when it has one. A model built
            on a GPT by a later step (step 6's classifier) also saves what
            ``model.architecture()`` returns, so that :func:`model_from_checkpoint` can
            rebuild it.
        optimizer: saved with its ``state_dict()`` and its class when given.
        step: the number of optimizer steps taken so far.
        extra: anything else the caller wants back, made of tensors and plain Python
            values only (dict, list, tuple, str, int, float, bool, None).
        overwrite: replace an existing file. Default ``False`` — a learner's checkpoint is
            never replaced by accident.
        include_rng: save the state of every random generator (see :func:`rng_state`), so
            that a resumed run draws the same dropout masks. Default ``True``.
        allow_nonfinite: save even if a weight is ``nan``/``inf``. Default ``False``: a
            diverged model never replaces a good checkpoint.

    Returns:
        the path written.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``optimizer`` is not an optimizer, a flag
            that is not ``True``/``False``, ``path`` not a path, or ``extra`` holds something
            ``torch.load(weights_only=True)`` could not read back.
        ValueError: ``step`` is not a non-negative integer.
        NonFiniteError: a weight holds ``nan``/``inf`` (the file at ``path`` is untouched).
        FileExistsError: the file exists and ``overwrite`` is ``False``.
        IsADirectoryError, NotADirectoryError, PermissionError, OSError: ``path`` cannot be
            written (see :func:`atomic_write`); the previous file is kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    step = non_negative_int("step", step)
    # "no" is truthy: overwrite="no" replaced a checkpoint, allow_nonfinite="no" saved nan weights
    overwrite, include_rng = boolean("overwrite", overwrite), boolean("include_rng", include_rng)
    allow_nonfinite = boolean("allow_nonfinite", allow_nonfinite)
    path = _path("path", path)
    if extra is not None:
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
        _check_plain(extra, "extra")
    if not allow_nonfinite:
        bad = nonfinite_parameters(model)
        if bad:
            raise NonFiniteError(
                f"not saving {Path(path).expanduser()}: {len(bad)} weight tensor(s) hold nan or inf "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}), so the model has diverged; the file "
                "there (if any) is kept. Lower the learning rate and resume from it, or pass allow_nonfinite=True "
                "to save the broken weights for inspection")
    payload = {
        "format": FORMAT,
        "model": model.state_dict(),
        "config": _config_dict(model),
        "tie_weights": bool(getattr(model, "tie_weights", False)),
        "architecture": _architecture(model),
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "optimizer_type": _optimizer_type(optimizer) if optimizer is not None else None,
        "rng": rng_state() if include_rng else None,
        "extra": extra or {},
        "torch_version": str(torch.__version__),
    }
    return atomic_write(path, lambda fh: torch.save(payload, fh), overwrite=overwrite)


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) cannot read back; "
                    "store tensors, numbers, strings, and lists/dicts of them (e.g. float(x), x.tolist())")


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def _verify_crc(path: Path) -> None:
    """Check every member of the checkpoint's zip archive against its stored CRC-32.

    ``torch.load`` does not, so without this a flipped bit would load as a wrong weight.
    Files that are not zip archives are left to ``torch.load``'s own error.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # not a readable zip: torch.load says why, below
    except zipfile.LargeZipFile:
        return
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged: its member {damaged!r} fails the archive's CRC-32 check (bits changed on disk or "
            "in a copy since it was saved). Do not use it: load an earlier checkpoint (train() keeps the best one "
            "beside it as *.best.pt) or copy the file again from its source")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _path(label: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{label} must be the checkpoint's file path (a str or Path), got {type(path).__name__}")
    if not str(path).strip():
        raise ValueError(f"{label} is empty; give the checkpoint's file path (e.g. runs/model.pt)")
    return Path(path).expanduser()


def _map_location(map_location: Any) -> Any:
    """A device given as ``map_location`` that this machine lacks is named here (torch's error from
    inside the file's loading would read as a damaged file). Functions and dicts pass through."""
    if isinstance(map_location, (str, torch.device)):
        from .config import get_device

        get_device(map_location)
    return map_location


def _read(path: Path, map_location) -> dict[str, Any]:
    map_location = _map_location(map_location)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}" + ("" if path.parent.is_dir() else
                                f" (the folder {path.parent} does not exist either)"))
    _verify_crc(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):    # torch.save writes a zip archive: this is no checkpoint at all
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint ({path.stat().st_size:,} bytes, not the zip archive torch.save "
                "writes): it is damaged, or another kind of file. Load an earlier checkpoint, or train again") from err
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line),
                      str(err).splitlines()[0] if str(err) else "")
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, so it is refused by the safe loader "
            f"(torch.load(weights_only=True)): {detail}. It was not written by "
            "course_lib.checkpoint.save_checkpoint; only load files like this from a source you trust") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({size:,} bytes): it looks truncated or corrupt "
            f"({type(err).__name__}: {_short(str(err).splitlines()[0]) if str(err) else 'no detail'}). "
            "Delete it and load an earlier checkpoint (or train again); checkpoints written by "
            "save_checkpoint are replaced atomically, so a crash during a save cannot cause this") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a course_lib checkpoint (format {got!r}, expected {FORMAT!r}); "
                              "for a bare state_dict use model.load_state_dict(torch.load(path, weights_only=True))")
    kinds = {"model": dict, "config": (dict, type(None)), "extra": (dict, type(None)), "rng": (dict, type(None)),
             "optimizer": (dict, type(None))}
    bad = [key for key, kind in kinds.items() if not isinstance(payload.get(key), kind)]
    if bad:
        raise CheckpointError(f"{path} is damaged: its {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} missing "
                              "or of the wrong kind. Load an earlier checkpoint (or train again)")
    return payload


def _check_config(path: Path, stored: dict[str, Any] | None, model: nn.Module) -> None:
    ours = _config_dict(model)
    if stored is None or ours is None:
        return
    diffs = [f"{key} (checkpoint {stored.get(key)!r}, model {ours.get(key)!r})"
             for key in ARCHITECTURE_KEYS if stored.get(key) != ours.get(key)]
    if diffs:
        raise CheckpointMismatchError(
            f"{path} was saved from a model with a different configuration: {'; '.join(diffs)}. Build the model "
            "from the checkpoint's own config (course_lib.checkpoint.model_from_checkpoint(path)) or load a "
            "checkpoint of this model")


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, *, map_location: Any = "cpu",
                    restore_rng: bool = False, strict: bool = True) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; load it into ``model``/``optimizer``.

    Args:
        path: the checkpoint file.
        model: if given, its configuration is checked against the stored one and the
            weights are loaded into it (in place; they move to the model's device).
        optimizer: if given, its state is restored (the file must hold one).
        map_location: where tensors are placed while reading. Default ``"cpu"``.
        restore_rng: also restore every random generator (what resuming training needs).
        strict: passed to ``model.load_state_dict`` (every tensor must be present and used).

    Returns:
        the checkpoint as a dict: ``model`` (state dict), ``optimizer`` (state dict or None),
        ``config`` (dict or None), ``tie_weights``, ``step``, ``rng``, ``extra``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt, or not a course checkpoint.
        ValueError: ``map_location`` is a device this machine lacks (``"cuda"`` without CUDA).
        TypeError: ``restore_rng`` or ``strict`` not ``True``/``False``; ``path`` not a path.
        CheckpointMismatchError: the stored config differs from ``model.cfg`` (each differing
            field is named), the tensors do not fit the model, or an optimizer state was asked
            for but not saved or does not fit the optimizer.
    """
    path = _path("path", path)
    restore_rng, strict = boolean("restore_rng", restore_rng), boolean("strict", strict)
    payload = _read(path, map_location)
    _apply(path, payload, model, optimizer, restore_rng=restore_rng, strict=strict)
    return payload


def _check_optimizer(path: Path, payload: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    stored_state = payload.get("optimizer")
    if stored_state is None:
        raise CheckpointMismatchError(f"{path} holds no optimizer state (it was saved without an optimizer); "
                                      "load it without optimizer= and start the optimizer afresh")
    stored, ours = payload.get("optimizer_type"), _optimizer_type(optimizer)
    if stored is None:  # written before the type was stored: compare the hyperparameter names instead
        groups = stored_state.get("param_groups") or [{}]
        stored_keys = set(groups[0]) - {"params"}
        our_keys = set(optimizer.param_groups[0]) - {"params"}
        if stored_keys and stored_keys != our_keys:
            raise CheckpointMismatchError(
                f"the optimizer state in {path} is from another kind of optimizer (its settings are "
                f"{sorted(stored_keys)}, this {type(optimizer).__name__}'s are {sorted(our_keys)}); build the same "
                "kind of optimizer it was saved with, or load without optimizer= to start a new one")
    elif stored != ours:
        raise CheckpointMismatchError(
            f"the optimizer state in {path} belongs to a {stored}, not a {ours}: loading it would silently "
            f"change this optimizer's settings. Build a {stored.rsplit('.', 1)[-1]} over the same parameters to "
            "resume, or load without optimizer= to start a new one")


def _check_tensors(path: Path, stored: dict[str, torch.Tensor], model: nn.Module) -> None:
    ours = model.state_dict()
    missing, unexpected = sorted(set(ours) - set(stored)), sorted(set(stored) - set(ours))
    shapes = [f"{k} (checkpoint {tuple(stored[k].shape)}, model {tuple(v.shape)})"
              for k, v in ours.items() if k in stored and tuple(stored[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"shapes differ: {'; '.join(shapes[:5])}" if shapes else ""]
        raise CheckpointMismatchError(f"the weights in {path} do not fit the model: "
                                      f"{', '.join(x for x in parts if x)}")


def _apply(path: Path, payload: dict[str, Any], model: nn.Module | None, optimizer: torch.optim.Optimizer | None,
           *, restore_rng: bool = False, strict: bool = True) -> None:
    """Load a read checkpoint into ``model``/``optimizer``. Everything is checked before anything
    is changed, so a refused checkpoint leaves the model and optimizer as they were."""
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        _check_config(path, payload.get("config"), model)
    if optimizer is not None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        _check_optimizer(path, payload, optimizer)
    if restore_rng and payload.get("rng") is None:
        raise CheckpointMismatchError(f"{path} was saved without random state (include_rng=False), so it cannot "
                                      "restore the random generators; load it with restore_rng=False")
    if model is not None and strict:
        _check_tensors(path, payload["model"], model)
    if optimizer is not None:  # torch checks the groups' sizes before it changes anything
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointMismatchError(f"the optimizer state in {path} does not fit this optimizer: {err}. "
                                          "Build the optimizer over the same parameters, in the same order") from err
    if model is not None:
        try:
            model.load_state_dict(payload["model"], strict=strict)
        except RuntimeError as err:
            raise CheckpointMismatchError(f"the weights in {path} do not fit the model: {err}") from err
    if restore_rng:
        set_rng_state(payload["rng"])


def model_from_checkpoint(path: str | os.PathLike, device: Any = None, *, return_extra: bool = False):
    """Build a :class:`~course_lib.model.GPTModel` from the config stored in ``path`` and load it.

    A checkpoint of a model a later step built on a GPT (step 6's
    :class:`~course_lib.classification.GPTClassifier`) gives that model back, as it was saved.
    The model is returned in ``eval()`` mode, on ``device`` (default CPU).

    Args:
        return_extra: also return the checkpoint's ``extra`` dict (``{}`` when none), read from
            the same pass over the file: ``model, extra = model_from_checkpoint(path, return_extra=True)``.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or the file stores no model config.
    """
    from .config import GPTConfig
    from .model import GPTModel

    path = _path("path", path)
    return_extra = boolean("return_extra", return_extra)
    payload = _read(path, "cpu")
    if not payload.get("config"):
        raise CheckpointError(f"{path} stores no model configuration; build the model yourself and call "
                              "load_checkpoint(path, model)")
    try:
        cfg = GPTConfig.from_dict(payload["config"], source=str(path))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{err}; the checkpoint's stored configuration is damaged: build the model yourself "
                              "and call load_checkpoint(path, model)") from None
    tie_weights = bool(payload.get("tie_weights", False))
    if payload.get("architecture"):
        model = _build_architecture(path, payload["architecture"], cfg, tie_weights)
    else:
        model = GPTModel(cfg, tie_weights=tie_weights)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointMismatchError(f"the weights in {path} do not fit its own config: {err}") from err
    if device is not None:
        from .config import get_device

        model.to(get_device(device))
    if return_extra:
        extra = payload.get("extra")
        return model.eval(), (extra if isinstance(extra, dict) else {})
    return model.eval()
