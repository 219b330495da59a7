"""Reading a results file, local or gs://, for the results formats (written once).

The formats only read: the run directory's atomic writes, its lock and the
one-line errors of an unreachable store are the shell's (`experiments/runs`).
Reads go through fsspec, which serves a local path and a `gs://` URL alike
(gcsfs, found through `STORAGE_EMULATOR_HOST` in the tests), so that an
installed package reads a committed run or a bucket without the shell.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import fsspec


def is_url(path: str) -> bool:
    """Whether `path` is an object-store URL (gs://...) rather than a local path."""
    head, sep, _ = path.partition("://")
    return bool(sep) and "/" not in head and head != "file"


def read_bytes(path: str) -> bytes:
    """The contents of the file at `path` (FileNotFoundError if there is none)."""
    with fsspec.open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    """The UTF-8 text of the file at `path`."""
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    """A JSON file's contents (FileNotFoundError if missing)."""
    return json.loads(read_bytes(path))


def isfile(path: str) -> bool:
    """Whether a file (not a folder) exists at `path`."""
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.isfile(inner)


def exists(path: str) -> bool:
    """Whether anything exists at `path`."""
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.exists(inner)


def csv_text(header: list[str], rows: list[list]) -> str:
    """A CSV file's text: the header, then the rows (newline line ends)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
