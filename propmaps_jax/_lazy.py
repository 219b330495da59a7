"""Submodules as attributes of their package, imported on first use.

`import propmaps_jax as pj; pj.analysis.propagation` works on a fresh import
without importing every analysis module (and JAX, matplotlib) up front: each
subpackage's `__getattr__` is `submodule_getattr(__name__, __path__)`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any


def submodule_getattr(package: str, path: Iterable[str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `package.<name>` for its submodules."""
    names = frozenset(module.name for module in pkgutil.iter_modules(list(path)))

    def __getattr__(name: str) -> Any:
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
