"""propmaps-jax: propagation maps and locality analysis of the one-pixel attack.

    import propmaps_jax as pj
    pj.attack.attack_image(key, apply_fn, variables, image, label, config)

The submodules are imported on first use (`pj.attack`, `pj.propagation`, ...), so
that `import propmaps_jax` stays light and starts no JAX backend (multi-host runs
must call `jax.distributed.initialize()` first).
"""

import importlib
from typing import Any

from propmaps_jax.errors import DataError, PropmapsError, WeightsError

SUBMODULES = (
    "attack",
    "attack_de",
    "attack_engine",
    "backend",
    "checkpoint",
    "claims",
    "data",
    "evaluation",
    "keras_import",
    "locality",
    "locality_controls",
    "memory",
    "models",
    "perturb",
    "propagation",
    "receptive",
    "saliency",
    "stats",
    "training",
    "types",
)

__all__ = ["DataError", "PropmapsError", "WeightsError", *SUBMODULES]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(f"propmaps_jax.{name}")
    raise AttributeError(f"module 'propmaps_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
