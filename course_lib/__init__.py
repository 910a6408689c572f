"""course_lib — the library behind The LLM Sovereignty Stack.

Layered like the course: each module belongs to one step and imports only from its own
or earlier steps (see CONTRIBUTING.md for the map). The names most notebooks need first:

>>> from course_lib import setup
>>> S = setup()             # prints profile, device, seed and versions
"""

import importlib

__version__ = "0.1.0"

#: name -> the module it comes from. Imported on first use (PEP 562), so that importing the
#: package (``course --help``, ``course data list``) does not import torch.
_EXPORTS = {**dict.fromkeys(["DEFAULT_SEED", "GPT_CONFIGS", "GPTConfig", "Profile", "get_config", "get_device",
                             "get_profile", "seed_everything", "setup"], "config"),
            "fetch": "data"}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
