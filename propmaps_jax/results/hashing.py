"""The content hashes that results record, so a reader can tell what made a file.

A chunk records the SHA-256 of its run's settings and of its own content, a
summary the SHA-256 of attack.csv and of each chunk, a locality record that of
its files; a reader recomputes them here. Settings are hashed as canonical JSON
(sorted keys, no spaces, NaN and infinities as null), so the same settings give
the same hash on every machine.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import fsspec
import numpy as np


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (Python or NumPy) replaced by None.

    JSON has no NaN or Infinity: json.dumps would write bare `NaN`, which strict
    readers (jq, JavaScript, most languages' parsers) refuse.
    """
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    return obj


def settings_sha256(settings: dict) -> str:
    """SHA-256 of a settings record (canonical JSON: sorted keys, no spaces)."""
    text = json.dumps(finite_json(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def text_sha256(text: str) -> str:
    """SHA-256 of a text file's UTF-8 bytes (as `file_sha256` of the file)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str) -> str:
    """The SHA-256 hex digest of a file's bytes (local or gs://), read in blocks."""
    digest = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
