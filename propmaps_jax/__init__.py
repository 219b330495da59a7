"""propmaps-jax: propagation maps and locality analysis of the one-pixel attack.

    import propmaps_jax as pj
    pj.attack.attack_image(key, apply_fn, variables, image, label, config)

The library, one room per concept:
- `models/`: the networks (`nets`, `column_pair`), the receptive-field forward
  (`receptive`), checkpoints and the Keras import;
- `attack/`: the one-pixel attack (`de`, `engine`, `driver`) and `perturb`;
- `analysis/`: what the paper measures: `propagation` maps, `locality` and
  `locality_study`, our `locality_controls`, `statistics`, `saliency`, `claims`
  (the paper's sentences about the maps as numbers), `readings`, ...;
- `results/`: the formats of the files a run writes (`attack_csv`, ...);
- `figures/`: the project's figures (matplotlib, imported only there);
- `data/`: CIFAR-10 (`cifar10`) and its download (`download`);
- `stats` (every statistic: intervals, tests, Spearman, ROC), `batching` (the one
  padded fixed-shape batch loop), `evaluation`, `training`, `backend`, `locking`,
  `memory`, `progress` (the H:MM:SS of progress lines), `errors`, `types`.

Each of them is an attribute of the package imported on first use, and so is each
module of a subpackage (`pj.analysis.propagation`, `pj.models.receptive`), so
that `import propmaps_jax` stays light and starts no JAX backend (multi-host runs
must call `jax.distributed.initialize()` first).
"""

import importlib
from typing import Any

from propmaps_jax.errors import DataError, PropmapsError, WeightsError

# The package's modules and subpackages, imported on first use.
SUBMODULES = (
    "analysis",
    "attack",
    "backend",
    "batching",
    "data",
    "errors",
    "evaluation",
    "figures",
    "locking",
    "memory",
    "models",
    "progress",
    "results",
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
