"""Step 1 — model configurations, course profiles, devices and seeds.

Everything a notebook needs to know before it builds anything:

* :class:`GPTConfig` — the seven numbers that define a GPT, with named presets
  for the four GPT-2 sizes and for the small models the profiles train.
* :func:`get_profile` — ``tiny`` (CI, seconds), ``cpu`` (a laptop, minutes) or
  ``gpu`` (GPT-2 sizes, real corpora), read from ``COURSE_PROFILE``.
* :func:`get_device` — CUDA, then Apple's MPS, then CPU, unless ``COURSE_DEVICE``
  or an argument says otherwise.
* :func:`seed_everything` — one call that makes Python, NumPy and PyTorch repeatable.
* :func:`setup` — the first code cell of every notebook: all of the above, printed.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .checks import boolean, integer, positive_int, probability

__all__ = [
    "GPTConfig",
    "GPT_CONFIGS",
    "get_config",
    "Profile",
    "PROFILES",
    "get_profile",
    "get_device",
    "available_devices",
    "seed_everything",
    "Setup",
    "setup",
    "DEFAULT_SEED",
]

DEFAULT_SEED = 123


# --------------------------------------------------------------------------- #
# Model configurations
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class GPTConfig:
    """The hyper-parameters of a GPT model.

    Args:
        vocab_size: number of token ids (50,257 for GPT-2's BPE).
        context_length: the longest sequence the model reads (its position table).
        emb_dim: width of every token's vector (``d_model`` in the paper).
        n_heads: attention heads per layer; must divide ``emb_dim``.
        n_layers: number of transformer blocks.
        drop_rate: dropout probability used everywhere dropout appears.
        qkv_bias: whether the query/key/value projections have a bias
            (GPT-2 has one; models trained from scratch often leave it out).

    Raises:
        TypeError: a size that is not an integer (``bool`` is not one), ``drop_rate``
            not a real number, or ``qkv_bias`` not ``True``/``False`` (a string such as
            ``"no"`` is refused, not read as true).
        ValueError: a size below 1, ``emb_dim`` not divisible by ``n_heads``, or
            ``drop_rate`` outside ``[0, 1)``.

    Integers of other types (``numpy.int64``) become ``int``, real numbers ``float``
    and ``numpy.bool_`` ``bool``, so a config read back from JSON or NumPy compares equal.
    To build one from a dict read from a file, use :meth:`from_dict`.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            field = f"GPTConfig.{name}"
            value = integer(field, getattr(self, name), hint=f"; pass a whole number such as {getattr(GPTConfig, name)}")
            object.__setattr__(self, name, positive_int(field, value))
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads}); "
                f"try n_heads in {[h for h in range(1, 33) if self.emb_dim % h == 0]}"
            )
        object.__setattr__(self, "drop_rate", probability(
            "GPTConfig.drop_rate", self.drop_rate, strict=True, hint="; pass e.g. drop_rate=0.1 (or 0.0 for no dropout)"))
        object.__setattr__(self, "qkv_bias", boolean("GPTConfig.qkv_bias", self.qkv_bias))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the config") -> "GPTConfig":
        """The config stored in ``data`` (as written by :meth:`to_dict`, e.g. read from a
        checkpoint or a JSON file), with every field required and checked.

        Args:
            data: field name -> value, all seven fields.
            source: where ``data`` came from (a file name), used in error messages.

        Raises:
            TypeError: ``data`` is not a dict, or a value has the wrong type.
            ValueError: a field is missing or unknown, or a value is out of range.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"{source}: a GPTConfig must be stored as a dict of its fields, "
                            f"got {type(data).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in fields)
        missing = [f for f in fields if f not in data]
        if unknown or missing:
            wrong = ([f"unknown field(s) {unknown}"] if unknown else []) + \
                    ([f"missing field(s) {missing}"] if missing else [])
            raise ValueError(f"{source}: not a GPTConfig ({'; '.join(wrong)}); a config has exactly "
                             f"the fields {fields}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{source}: {err}") from None

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``emb_dim // n_heads``."""
        return self.emb_dim // self.n_heads

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some fields changed, e.g. ``cfg.replace(context_length=256)``.

        Raises:
            TypeError: a name that is not a field, or a value of the wrong type.
            ValueError: a value out of range (see :class:`GPTConfig`).
        """
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in changes if k not in fields]
        if unknown:
            raise TypeError(f"GPTConfig has no field {unknown[0]!r}; the fields are {fields}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Named configurations. The four GPT-2 sizes are the published ones
#: (Radford et al., 2019), with a QKV bias as in OpenAI's weights.
GPT_CONFIGS: dict[str, GPTConfig] = {
    "gpt2-small": GPTConfig(50257, 1024, 768, 12, 12, 0.1, True),
    "gpt2-medium": GPTConfig(50257, 1024, 1024, 16, 24, 0.1, True),
    "gpt2-large": GPTConfig(50257, 1024, 1280, 20, 36, 0.1, True),
    "gpt2-xl": GPTConfig(50257, 1024, 1600, 25, 48, 0.1, True),
    # Small models for the profiles: same vocabulary, so GPT-2's tokenizer works.
    "gpt-tiny": GPTConfig(50257, 64, 64, 4, 2, 0.0, False),
    "gpt-cpu": GPTConfig(50257, 256, 256, 4, 4, 0.1, False),
}


def get_config(name: str, **overrides: Any) -> GPTConfig:
    """Return the preset called ``name`` (see :data:`GPT_CONFIGS`), optionally changed.

    Raises:
        ValueError: unknown name; the message lists the valid ones.
        TypeError: an override that is not a field, or of the wrong type.
    """
    if not isinstance(name, str) or name not in GPT_CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(GPT_CONFIGS)}")
    cfg = GPT_CONFIGS[name]
    return cfg.replace(**overrides) if overrides else cfg


# --------------------------------------------------------------------------- #
# Profiles
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Profile:
    """How big everything is: the model, the data and the training budget.

    Notebooks ask the profile for their sizes with :meth:`pick`, so one
    setting switches a whole notebook between a CI smoke run and a real run::

        steps = profile.pick(tiny=20, cpu=2_000, gpu=50_000)
    """

    name: str
    model: str  # a key of GPT_CONFIGS
    description: str

    @property
    def config(self) -> GPTConfig:
        """The model configuration this profile trains by default."""
        return GPT_CONFIGS[self.model]

    def pick(self, *, tiny: Any, cpu: Any, gpu: Any) -> Any:
        """Return the value given for this profile's name."""
        return {"tiny": tiny, "cpu": cpu, "gpu": gpu}[self.name]


PROFILES: dict[str, Profile] = {
    "tiny": Profile("tiny", "gpt-tiny", "CI smoke run: every notebook in well under a minute on 2 CPU cores"),
    "cpu": Profile("cpu", "gpt-cpu", "a laptop: real results in minutes"),
    "gpu": Profile("gpu", "gpt2-small", "a GPU: GPT-2 sizes and real corpora"),
}


def get_profile(name: str | None = None) -> Profile:
    """The active profile: ``name`` if given, else ``$COURSE_PROFILE``, else ``cpu``.

    Raises:
        ValueError: an unknown profile name; the message lists ``tiny``, ``cpu``, ``gpu``.
    """
    source = "argument"
    if name is None:
        name = os.environ.get("COURSE_PROFILE", "").strip() or "cpu"
        source = "COURSE_PROFILE"
    key = str(name).strip().lower()
    if key not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r} (from {source}); valid profiles are: "
            f"{', '.join(PROFILES)}. Set e.g. COURSE_PROFILE=tiny"
        )
    return PROFILES[key]


# --------------------------------------------------------------------------- #
# Devices
# --------------------------------------------------------------------------- #
def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """Device types usable on this machine, best first (always ends with ``cpu``)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    if _mps_available():
        found.append("mps")
    found.append("cpu")
    return found


def get_device(name: str | torch.device | None = None) -> torch.device:
    """Pick the device: ``name`` if given, else ``$COURSE_DEVICE``, else the best available.

    The automatic order is CUDA, then MPS (Apple silicon), then CPU.

    Raises:
        ValueError: the requested device does not exist on this machine or is not a
            device name; the message lists the available ones.
    """
    source = "argument"
    if name is None:
        name = os.environ.get("COURSE_DEVICE", "").strip() or None
        source = "COURSE_DEVICE"
    if name is None or str(name).lower() == "auto":
        return torch.device(available_devices()[0])
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"{name!r} (from {source}) is not a device name; use one of {available_devices()} or 'auto'"
        ) from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} (from {source}) was requested but CUDA is not available here; "
                f"available: {available_devices()}. Unset COURSE_DEVICE or choose 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} (from {source}) does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(
                f"device {name!r} (from {source}) was requested but MPS is not available here; "
                f"available: {available_devices()}"
            )
        return device
    raise ValueError(f"device type {device.type!r} is not supported by the course; use cuda, mps or cpu")


# --------------------------------------------------------------------------- #
# Seeds
# --------------------------------------------------------------------------- #
def seed_everything(seed: int = DEFAULT_SEED) -> int:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and all GPUs).

    On CPU this makes notebooks and tests repeatable run after run. GPU kernels
    may still be non-deterministic; that is a property of the hardware.

    Returns:
        the seed, so a notebook can print it.

    Raises:
        TypeError: ``seed`` is not an integer.
        ValueError: ``seed`` outside torch's range, ``-2**63`` to ``2**64 - 1``.
    """
    seed = integer("seed", seed)
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be between -2**63 and 2**64 - 1 (what torch.manual_seed takes), got {seed}; "
                         "any smaller whole number will do, e.g. 123")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return seed


# --------------------------------------------------------------------------- #
# The notebook setup cell
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Setup:
    """What :func:`setup` chose: use ``S.profile``, ``S.device``, ``S.seed``, ``S.config``."""

    profile: Profile
    device: torch.device
    seed: int

    @property
    def config(self) -> GPTConfig:
        return self.profile.config

    def pick(self, *, tiny: Any, cpu: Any, gpu: Any) -> Any:
        return self.profile.pick(tiny=tiny, cpu=cpu, gpu=gpu)


def setup(profile: str | None = None, device: str | None = None, seed: int = DEFAULT_SEED,
          verbose: bool = True) -> Setup:
    """Choose profile and device, seed everything, and print the choices and versions.

    This is the first code cell of every notebook.
    """
    chosen = Setup(get_profile(profile), get_device(device), seed_everything(seed))
    if verbose:
        print(f"profile : {chosen.profile.name} ({chosen.profile.description})")
        print(f"device  : {chosen.device}")
        print(f"seed    : {chosen.seed}")
        print(f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    return chosen
