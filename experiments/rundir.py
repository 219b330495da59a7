"""A run directory: atomic writes, and reuse or resume only under the same settings.

Every experiment writes its files through these helpers, so that a killed run
never leaves a half-written file, and checks a stored record's settings before it
reuses or resumes it: a workdir that holds results of other settings is refused
with the list of differences.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from typing import Any

import numpy as np

from propmaps_jax.checkpoint import atomic_write_bytes
from propmaps_jax.errors import PropmapsError


def write_bytes(path: str, data: bytes) -> None:
    """Atomically write a file (a temporary file renamed over `path`)."""
    atomic_write_bytes(path, data)


def write_text(path: str, text: str) -> None:
    """Atomically write a text file."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    """Atomically write a JSON file (indented, keys in insertion order)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_npz(path: str, arrays: dict[str, Any], compressed: bool = True) -> None:
    """Atomically write an .npz of `arrays` (compressed unless told otherwise)."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def csv_text(header: list[str], rows: list[list]) -> str:
    """A CSV file's text: the header, then the rows (newline line ends)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def file_sha256(path: str) -> str:
    """The SHA-256 hex digest of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def differences(old: dict, new: dict) -> str:
    """'key: old -> new, ...' for every setting that differs."""
    keys = sorted(set(old) | set(new))
    return ", ".join(
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if old.get(k) != new.get(k)
    )


def require_same_settings(
    workdir: str, stored: dict, settings: dict, what: str = "a run"
) -> None:
    """PropmapsError unless the stored settings of a run in `workdir` equal these."""
    if stored != settings:
        raise PropmapsError(
            f"{workdir} already holds {what} with other settings "
            f"({differences(stored, settings)}); use another --workdir or delete it"
        )


def reusable_record(path: str, settings: dict) -> dict | None:
    """The JSON record at `path` when it exists and was made with `settings`."""
    if not os.path.isfile(path):
        return None
    record = read_json(path)
    return record if record.get("settings") == settings else None
