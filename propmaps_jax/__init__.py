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
    "saliency": "propmaps_jax.analysis.saliency",
    "stats": "propmaps_jax.stats",
    "training": "propmaps_jax.training",
    "types": "propmaps_jax.types",
}

__all__ = ["DataError", "PropmapsError", "WeightsError", *SUBMODULES]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(SUBMODULES[name])
    raise AttributeError(f"module 'propmaps_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
