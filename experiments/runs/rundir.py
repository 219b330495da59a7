"""A run directory: atomic writes, and reuse or resume only under the same settings.

Every experiment writes its files through these helpers, so that a killed run
never leaves a half-written file, and checks a stored record's settings before it
reuses or resumes it: a workdir that holds results of other settings is refused
with the list of differences.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Any

import numpy as np

from experiments.runs import storage
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import hashing


def write_bytes(path: str, data: bytes) -> None:
    """Atomically write a file: a temporary file renamed over `path`, or one
    upload on gs:// (`storage.write_bytes`)."""
    storage.write_bytes(path, data)


def write_text(path: str, text: str) -> None:
    """Atomically write a text file."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    """Atomically write a JSON file (`json_bytes`)."""
    write_bytes(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
    """The bytes of a JSON file of `obj` (indented, keys in insertion order);
    always valid JSON: NaN and infinities are written as null."""
    text = json.dumps(hashing.finite_json(obj), indent=2, allow_nan=False) + "\n"
    return text.encode("utf-8")


def npz_bytes(arrays: dict[str, Any], compressed: bool = True) -> bytes:
    """The bytes of an .npz file of `arrays` (compressed unless told otherwise)."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def write_npz(path: str, arrays: dict[str, Any], compressed: bool = True) -> None:
    """Atomically write an .npz of `arrays` (compressed unless told otherwise)."""
    write_bytes(path, npz_bytes(arrays, compressed))


def file_sha256(path: str) -> str:
    """The SHA-256 hex digest of a file's bytes: a gs:// file read through the
    store (its failures one `StorageError` line), a local one in blocks
    (`hashing.file_sha256`)."""
    if storage.is_url(path):
        return hashlib.sha256(storage.read_bytes(path)).hexdigest()
    return hashing.file_sha256(path)


def read_json(path: str) -> Any:
    """A JSON file's contents (local or gs://; FileNotFoundError if missing)."""
    return json.loads(storage.read_bytes(path))


def _shown(key: str, value: Any) -> str:
    # Content hashes are told apart by their first 12 hex digits.
    if key.endswith("sha256") and isinstance(value, str):
        return repr(value[:12])
    return repr(value)


def differences(old: dict, new: dict) -> str:
    """'key: old -> new, ...' for every setting that differs (hashes shortened)."""
    keys = sorted(set(old) | set(new))
    return ", ".join(
        f"{k}: {_shown(k, old.get(k))} -> {_shown(k, new.get(k))}"
        for k in keys
        if old.get(k) != new.get(k)
    )


def check_workdir(path: str, flag: str = "--workdir") -> str:
    """`path` as an absolute path once it is known to be usable, creating nothing.

    A usable workdir is an existing, writable directory, or a path whose nearest
    existing ancestor is a writable directory (so that it can be created when the
    first result is written). Writability is probed with a temporary file (the
    permission bits do not tell for root, read-only mounts or ACLs), which is
    removed at once. PropmapsError (one line, what to do) otherwise.
    """
    if not path:
        raise PropmapsError(f"{flag} is required: the folder where results are written")
    if storage.is_url(path):
        return _check_url_workdir(storage.normalize(path), flag)
    path = os.path.abspath(path)
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        where = "is a file" if existing == path else f"is under the file {existing}"
        raise PropmapsError(
            f"{flag}={path} {where}: results need a folder; use another {flag}"
        )
    check_name_lengths(path, flag)
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        what = "" if existing == path else f" (its existing parent {existing})"
        raise PropmapsError(
            f"{flag}={path}{what} is not writable ({e.strerror or e}); use a "
            f"writable {flag} or fix its permissions"
        ) from None
    return path


def _nearest_existing(path: str) -> str:
    """`path` itself if it exists, else its nearest existing ancestor."""
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    return existing


# The usual NAME_MAX, where the filesystem does not say (POSIX's pathconf).
DEFAULT_NAME_MAX = 255


def check_name_lengths(path: str, flag: str = "--workdir") -> None:
    """PropmapsError (one line) when a folder of the local `path` that is still to
    be created has a longer name than its filesystem allows (`PC_NAME_MAX`).

    Checked with the workdir, before any data or model is loaded: otherwise the
    first write fails, after the loading. gs:// names are left to the store.
    """
    if storage.is_url(path):
        return
    path = os.path.abspath(path)
    existing = _nearest_existing(path)
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = DEFAULT_NAME_MAX
    if limit <= 0:  # no limit stated
        limit = DEFAULT_NAME_MAX
    for name in os.path.relpath(path, existing).split(os.sep):
        size = len(os.fsencode(name))
        if size > limit:
            raise PropmapsError(
                f"{flag}={path} has a folder name of {size} bytes, more than the "
                f"{limit} its filesystem allows; use a shorter {flag}"
            )


def _check_url_workdir(path: str, flag: str) -> str:
    """A gs:// workdir: its bucket exists and these credentials may write to it.

    The probe is one small object, written and deleted at once, so that missing
    credentials or permissions fail here, in one line, before any work. Only
    process 0 of a multi-host run (--distributed) checks: it alone reads and
    writes the run directory, and the others never touch the store.
    """
    import jax

    if jax.process_index() != 0:
        return path
    storage.makedirs(path)  # the bucket exists (StorageError otherwise)
    if storage.isfile(path):
        raise PropmapsError(
            f"{flag}={path} is a file: results need a folder; use another {flag}"
        )
    probe = storage.join(path, f".write-probe-{os.getpid()}")
    storage.write_bytes(probe, b"")
    storage.remove(probe)
    return path


def require_same_settings(
    workdir: str, stored: dict, settings: dict, what: str = "a run"
) -> None:
    """PropmapsError unless the stored settings of a run in `workdir` equal these."""
    if stored != settings:
        raise PropmapsError(
            f"{workdir} already holds {what} with other settings "
            f"({differences(stored, settings)}); use another --workdir or delete it"
        )
