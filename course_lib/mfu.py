"""Step 8 — model FLOPs utilisation (MFU): how much of the hardware a training run uses.

::

    MFU = tokens_per_second x flops_per_token / peak_flops

* ``flops_per_token`` is :func:`course_lib.anatomy.flops_per_token` ``(cfg, training=True)``:
  about ``6·N`` for ``N`` matmul weights, plus attention (forward + backward).
* ``peak_flops`` is the device's peak dense FLOP/s at the dtype the matmuls run in, from
  :data:`PEAK_FLOPS` (datasheet numbers, dense, without 2:4 sparsity), or your own figure.

Whole-model runs of GPT-2-sized models reach 30-60 % on a modern GPU; on a CPU, a few
percent of the rough estimate below is normal. The table is approximate; pass
``override=`` (``TrainerConfig.peak_flops``) for the number of your own machine.

* :data:`PEAK_FLOPS` — peak dense FLOP/s by device and dtype.
* :func:`peak_flops` — the peak of a device (CUDA name lookup, a CPU estimate, overridable).
* :func:`mfu` — the formula above.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch

from .checks import finite_number

__all__ = ["PEAK_FLOPS", "CPU_CORE_FLOPS", "FALLBACK_GPU", "DTYPES", "peak_flops", "mfu", "device_name",
           "lookup"]

#: Dtype names accepted by :func:`peak_flops`, and what each means.
DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
          "fp32": "fp32", "float32": "fp32", "float": "fp32", "tf32": "tf32"}

#: One CPU core: 2.5 GHz x 2 FMA units x 8 fp32 lanes (AVX2) x 2 FLOPs per FMA = 80 GFLOP/s.
#: A rough, deliberately generic figure (no AMX, no AVX-512); bf16/fp16 are given the fp32 rate
#: because CPUs without AMX do not multiply them faster.
CPU_CORE_FLOPS = 2.5e9 * 2 * 8 * 2

#: Peak dense FLOP/s (no sparsity) by device and dtype, from the vendors' datasheets.
#: ``"tf32"`` is fp32 matmuls on tensor cores (``torch.backends.cuda.matmul.allow_tf32``);
#: devices without tensor-core bf16/tf32 (T4, V100) are given their fp32 rate for those.
#: ``"cpu"`` is *per core* (see :data:`CPU_CORE_FLOPS`): :func:`peak_flops` multiplies it by the
#: cores torch uses. ``"Apple M"`` is a very rough figure for an M-series GPU (MPS).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200":      {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},   # SXM
    "H100 SXM":  {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 NVL":  {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "A100":      {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S":      {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40":       {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "A10":       {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L4":        {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "RTX 4090":  {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "RTX 3090":  {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "V100":      {"bf16": 15.7e12, "fp16": 125e12, "tf32": 15.7e12, "fp32": 15.7e12},
    "T4":        {"bf16": 8.1e12, "fp16": 65e12, "tf32": 8.1e12, "fp32": 8.1e12},
    "Apple M":   {"bf16": 4e12, "fp16": 4e12, "tf32": 4e12, "fp32": 4e12},
    "cpu":       {"bf16": CPU_CORE_FLOPS, "fp16": CPU_CORE_FLOPS, "tf32": CPU_CORE_FLOPS, "fp32": CPU_CORE_FLOPS},
}

#: What an unknown GPU is taken to be (with a warning, once per name): an A100.
FALLBACK_GPU = "A100"

# How CUDA device names map to table keys ("NVIDIA H100 80GB HBM3" is the SXM part).
# Checked in order; a key must not be followed by a digit ("A10" is not "A100", "L4" not "L40S").
_ALIASES = (("GH200", "H200"), ("H100 PCIE", "H100 PCIe"), ("H100 NVL", "H100 NVL"), ("H100", "H100 SXM"),
            ("H200", "H200"), ("H800", "H100 SXM"), ("A100", "A100"), ("A800", "A100"), ("L40S", "L40S"),
            ("L40", "L40"), ("A10", "A10"), ("L4", "L4"), ("4090", "RTX 4090"), ("3090", "RTX 3090"), ("V100", "V100"),
            ("T4", "T4"), ("APPLE M", "Apple M"))
_warned: set[str] = set()


def device_name(device: Any = None) -> str:
    """A name to look up: the CUDA device's name (``torch.cuda.get_device_name``), ``"Apple M"``
    for MPS, ``"cpu"``; another kind of device, its type (``"xpu"``: not in the table, so
    :func:`peak_flops` warns rather than taking a CPU's figure). ``device`` ``None`` means CUDA
    if available, else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "mps":
        return "Apple M"
    return "cpu" if dev.type == "cpu" else dev.type


def lookup(name: str) -> str | None:
    """The :data:`PEAK_FLOPS` key for a device name such as ``"NVIDIA A100-SXM4-80GB"``, or ``None``.

    Raises:
        TypeError: ``name`` is not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a device name (str) such as 'NVIDIA A100-SXM4-80GB', got {type(name).__name__}")
    if name in PEAK_FLOPS:
        return name
    upper = name.upper()
    same = [key for key in PEAK_FLOPS if key.upper() == upper.strip()]     # "CPU", "a100"
    if same:
        return same[0]
    for alias, key in _ALIASES:
        if re.search(rf"(?<![A-Z0-9]){re.escape(alias)}(?![0-9])", upper):
            return key
    return None


def _positive(name: str, value: Any) -> float:
    return finite_number(name, value, positive=True, hint=" (FLOP/s, e.g. 989e12)")


def peak_flops(device: Any = None, dtype: str | torch.dtype = "bf16", override: float | None = None) -> float:
    """Peak dense FLOP/s of ``device`` for matmuls in ``dtype``.

    Args:
        device: a torch device (``"cuda"``, ``"cuda:1"``, ``"cpu"``, ``"mps"``, a ``torch.device``)
            or a device name as ``torch.cuda.get_device_name`` gives it (``"NVIDIA H100 80GB HBM3"``).
            Default ``None``: CUDA if available, else CPU.
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` or ``"tf32"`` (or the matching ``torch.dtype``).
            Default ``"bf16"``.
        override: your own figure; when given it is returned (as a float) and wins over the table.

    Returns:
        FLOP/s. A CPU gets ``PEAK_FLOPS["cpu"]`` x the cores torch uses
        (``min(torch.get_num_threads(), os.cpu_count())``). A GPU missing from the table is taken
        to be a :data:`FALLBACK_GPU`, with a warning (once per name) saying how to override it.

    Raises:
        ValueError: an unknown dtype; an ``override`` that is not a positive number; an empty
            device name; ``"cuda"`` on a machine without CUDA.
        TypeError: ``device`` is neither a torch device nor a string.
    """
    if override is not None:
        return _positive("override (peak_flops)", override)
    if isinstance(dtype, torch.dtype):
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    key = DTYPES.get(str(dtype).lower()) if isinstance(dtype, str) else None
    if key is None:
        raise ValueError(f"dtype must be one of 'bf16', 'fp16', 'fp32', 'tf32', got {dtype!r}")
    try:
        parsed = None if device is None else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        if not isinstance(device, str):
            raise TypeError(f"device must be a torch device or a device name (str), got {type(device).__name__}")
        parsed = device  # a device name such as "NVIDIA H100 80GB HBM3"
    if isinstance(parsed, str) and not parsed.strip():
        raise ValueError("device is an empty name; pass a torch device ('cuda', 'cpu') or a device name such as "
                         "'NVIDIA H100 80GB HBM3'")
    if isinstance(parsed, torch.device) and parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here, so its peak cannot be read; pass a "
                         "device name (e.g. 'NVIDIA H100 80GB HBM3') or override=")
    name = parsed if isinstance(parsed, str) else device_name(parsed)
    entry = lookup(name)
    if entry == "cpu":
        cores = max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
        return PEAK_FLOPS["cpu"][key] * cores
    if entry is None:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"peak FLOP/s of {name!r} is not in course_lib.mfu.PEAK_FLOPS; assuming an "
                          f"{FALLBACK_GPU} ({PEAK_FLOPS[FALLBACK_GPU][key]:.3g} FLOP/s at {key}), so the MFU shown "
                          "is approximate. Pass peak_flops=<your device's datasheet figure> to override",
                          stacklevel=2)
        entry = FALLBACK_GPU
    return PEAK_FLOPS[entry][key]


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: ``tokens_per_second * flops_per_token / peak``.

    Args:
        tokens_per_second: training throughput (input tokens per second, all processes together
            when ``peak`` is the peak of all of them).
        flops_per_token: from :func:`course_lib.anatomy.flops_per_token` ``(cfg, training=True)``.
        peak: peak FLOP/s, from :func:`peak_flops`.

    Returns:
        a fraction (0.4 = 40 %); it can exceed 1 only when ``peak`` is too low.

    Raises:
        ValueError: a negative or non-finite throughput, or a ``flops_per_token``/``peak`` that is
            not a positive number.
    """
    tps = finite_number("tokens_per_second", tokens_per_second, minimum=0)
    fpt = finite_number("flops_per_token", flops_per_token, positive=True,
                        hint=" (course_lib.anatomy.flops_per_token(cfg))")
    return tps * fpt / _positive("peak", peak)
