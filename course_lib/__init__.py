"""course_lib — the library behind The LLM Sovereignty Stack.

Layered like the course: each module belongs to one step and imports only from its own
or earlier steps (see CONTRIBUTING.md for the map). The names most notebooks need first:

>>> from course_lib import setup
>>> S = setup()             # prints profile, device, seed and versions
"""

from .config import (DEFAULT_SEED, GPT_CONFIGS, GPTConfig, Profile, get_config, get_device,
                     get_profile, seed_everything, setup)
from .data import fetch

__version__ = "0.1.0"

__all__ = ["GPTConfig", "GPT_CONFIGS", "get_config", "Profile", "get_profile", "get_device",
           "seed_everything", "setup", "fetch", "DEFAULT_SEED", "__version__"]
