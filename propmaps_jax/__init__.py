"""propmaps-jax: propagation maps and locality analysis of the one-pixel attack.

    import propmaps_jax as pj
    pj.attack.attack_image(key, apply_fn, variables, image, label, config)

The library, one room per concept:
- `models/`: the networks (`nets`, `column_pair`), the receptive-field forward
  (`receptive`), checkpoints and the Keras import;
- `attack/`: the one-pixel attack (`de`, `engine`, `driver`) and `perturb`;
- `analysis/`: what the paper measures: `propagation` maps, `locality`, our
  `locality_controls`, `saliency` (maps and the salience study's device part) and
  `claims` (the paper's sentences about the maps as numbers);
- `data/`: CIFAR-10 (`cifar10`) and its download (`download`);
- `stats` (every statistic: intervals, tests, Spearman, ROC), `batching` (the one
  padded fixed-shape batch loop), `evaluation`, `training`, `backend`, `memory`,
  `errors`, `types`.

Each of them is an attribute of the package, imported on first use (`pj.attack`,
`pj.propagation`, `pj.saliency`, ..., also by their short names: `pj.receptive`
is `propmaps_jax.models.receptive`), so that `import propmaps_jax` stays light
and starts no JAX backend (multi-host runs must call `jax.distributed.initialize()`
first).
"""

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from propmaps_jax.errors import DataError, PropmapsError, WeightsError

# Attribute name -> module. The short names of modules that live in a subpackage
# (`pj.propagation`, `pj.attack_de`, ...) keep `from propmaps_jax import X` working.
SUBMODULES = {
    "analysis": "propmaps_jax.analysis",
    "attack": "propmaps_jax.attack",
    "attack_de": "propmaps_jax.attack.de",
    "attack_engine": "propmaps_jax.attack.engine",
    "backend": "propmaps_jax.backend",
    "batching": "propmaps_jax.batching",
    "checkpoint": "propmaps_jax.models.checkpoint",
    "claims": "propmaps_jax.analysis.claims",
    "data": "propmaps_jax.data",
    "errors": "propmaps_jax.errors",
    "evaluation": "propmaps_jax.evaluation",
    "keras_import": "propmaps_jax.models.keras_import",
    "locality": "propmaps_jax.analysis.locality",
    "locality_controls": "propmaps_jax.analysis.locality_controls",
    "memory": "propmaps_jax.memory",
    "models": "propmaps_jax.models",
    "perturb": "propmaps_jax.attack.perturb",
    "propagation": "propmaps_jax.analysis.propagation",
    "receptive": "propmaps_jax.models.receptive",
    "results": "propmaps_jax.results",
    "saliency": "propmaps_jax.analysis.saliency",
    "stats": "propmaps_jax.stats",
    "training": "propmaps_jax.training",
    "types": "propmaps_jax.types",
}

__all__ = ["DataError", "PropmapsError", "WeightsError", *SUBMODULES]
__version__ = "0.1.0"


# The dotted paths of modules that moved into a subpackage (`import
# propmaps_jax.propagation`, `from propmaps_jax.perturb import apply_pixels`) name
# the same module object as their new home, so code written against the flat
# layout keeps working, monkeypatching included.
MOVED = {
    f"propmaps_jax.{name}": target
    for name, target in SUBMODULES.items()
    if target != f"propmaps_jax.{name}"
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old dotted path as the module that now holds it."""

    def __init__(self) -> None:
        self.homes: dict[str, Any] = {}  # old path -> the module's own spec

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self.homes[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import machinery gave the module the old path's spec: give it back
        # its own, so that it still names the file that holds it.
        module.__spec__ = self.homes.pop(module.__spec__.name)


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(SUBMODULES[name])
    raise AttributeError(f"module 'propmaps_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
