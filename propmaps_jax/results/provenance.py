"""What an attack run was made from: the model, its weights and its data, by content.

A run directory records these in its settings (so a resume with other weights or
data is refused) and in its summary (so every consumer of its attack.csv can check
that it is given the same model and data). Weights and data are identified by the
SHA-256 of their content, never by path: the same file under another path is the
same run.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import checkpoint
from propmaps_jax.results import hashing

KEYS = ("model", "weights_sha256", "dataset_sha256")


def weights_sha256(model_name: str, weights: str | None) -> str:
    """SHA-256 of the weights file (`weights`, else the model's bundled checkpoint)."""
    path = (
        checkpoint.bundled_checkpoint_path(model_name) if weights is None else weights
    )
    return hashing.file_sha256(path)


def dataset_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of a split's content: its shapes, dtypes, image bytes and labels."""
    digest = hashlib.sha256()
    for arr in (np.ascontiguousarray(images), np.asarray(labels, np.int64)):
        digest.update(f"{arr.dtype.str}{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def describe(
    model_name: str, weights: str | None, images: np.ndarray, labels: np.ndarray
) -> dict[str, str]:
    """{"model", "weights_sha256", "dataset_sha256"} of a run (images: the split
    that the samples are drawn from)."""
    return {
        "model": model_name,
        "weights_sha256": weights_sha256(model_name, weights),
        "dataset_sha256": dataset_sha256(images, labels),
    }


def mismatch(recorded: dict[str, Any], expected: dict[str, str]) -> str:
    """'' when `recorded` (a run's settings) matches `expected`, else what differs.

    A key the record lacks (runs made before it was recorded) is not compared.
    """
    names = {"model": "model", "weights_sha256": "weights", "dataset_sha256": "data"}
    out = []
    for key in KEYS:
        old, new = recorded.get(key), expected.get(key)
        if old is None or new is None or old == new:
            continue
        if key == "model":
            out.append(f"model {old!r}, not {new!r}")
        else:
            out.append(f"other {names[key]} (SHA-256 {old[:12]}, not {new[:12]})")
    return "; ".join(out)


def require_match(
    what: str, recorded: dict[str, Any], expected: dict[str, str], remedy: str
) -> None:
    """PropmapsError naming the difference unless `recorded` matches `expected`."""
    diff = mismatch(recorded, expected)
    if diff:
        raise PropmapsError(f"{what} was made with {diff}; {remedy}")
