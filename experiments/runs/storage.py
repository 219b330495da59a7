"""Files of a run directory on a local disk or on Google Cloud Storage (gs://).

On a multi-host TPU VM every host has its own disk, so the ecosystem's convention
(flax examples, big_vision) is `--workdir=gs://bucket/path`. This module is the
one place that knows the difference: every function takes a local path or a
`gs://bucket/key` URL and behaves the same on both, so that the run-directory
code (atomic writes, resume, a lock) is written once.

**One code path.** Each operation is written once, on an fsspec filesystem:
`fsspec.filesystem("file")` for a local path, gcsfs for gs://. Only three
differences are real, and only they branch on the store:

- an atomic write: locally a temporary file, fsynced, then `os.replace`
  (fsspec's local write is neither atomic nor synced); on gs:// one upload;
- a create-if-absent: locally a hard link of a complete temporary file
  (fsspec's local `mode="create"` is `O_EXCL` then a write, which a reader can
  see empty); on gs:// an upload with the precondition `ifGenerationMatch=0`;
- a folder: created locally; on gs:// there are none (`makedirs` checks the
  bucket instead: gcsfs's own `makedirs` would create a bucket).

Errors differ by design too: a local failure stays an `OSError` (the launcher
turns a full disk or a read-only one into its stop line), a gs:// failure
becomes one `StorageError` line (below).

**Library.** fsspec with gcsfs, not etils `epath`. Without TensorFlow, `epath`
hands gs:// paths to fsspec and gcsfs anyway, and its pathlib interface has no
way to ask for an upload with a precondition, which the lock needs
(`create_if_absent`). fsspec is already installed with flax (orbax needs
`etils[epath]`, which needs fsspec); gcsfs is imported only when a gs:// path is
used. We use gcsfs's plain JSON-API client (`gcsfs.core.GCSFileSystem`), not the
gRPC-probing default class of gcsfs >= 2025.10, which asks every bucket for its
type over gRPC first (zonal "Rapid" buckets, which need gRPC writes, are not
supported here). With `STORAGE_EMULATOR_HOST` set (an emulator, as in the
tests) no credentials are used; otherwise gcsfs finds them as Google's clients
do (`gcloud auth application-default login`, or a VM's service account).

**Why a half-written file can never be read as finished.**

- Local disk: the bytes go to a temporary file in the same folder, are flushed
  and fsynced, and the file is renamed over the target (`os.replace`, atomic on
  POSIX): a reader sees the old file or the whole new one, never a part.
- gs://: Cloud Storage has no rename, and needs none. An object (a new
  *generation* of it) comes into existence only when its upload completes: a
  single-request upload (gcsfs sends everything below 50 MiB in one request)
  either arrives whole, with its length checked by the server, or creates
  nothing; a larger, resumable upload is invisible until its last chunk is
  accepted, and an abandoned one is never an object. Until then readers see the
  previous generation or no object at all. Reads, writes and listings are
  strongly consistent, so a chunk written by one host is seen whole by every
  host that lists or reads after the write returned. A writer killed mid-upload
  therefore leaves the previous state, and a resumed run redoes that chunk.
- On both, readers do not take a file's existence as proof: an attack chunk is
  merged only when the image range in its name matches its rows, one by one,
  and it carries the run's settings hash (`experiments/attack.py`); the summary
  records the SHA-256 of attack.csv and of every chunk (`integrity`).

**A lock.** `create_if_absent` creates a file only if nothing is there, and says
whether it did: locally a hard link of a complete temporary file (the link
fails if the name exists, so the contents are never seen half written; where
hard links are not supported, `O_CREAT | O_EXCL`), on gs:// an upload with the
precondition `ifGenerationMatch=0`, which the server refuses (412) when any
generation of the object exists. Two hosts or processes racing for the same
name: exactly one wins, on either.

**Other URLs.** Only gs:// (alias gcs://) is accepted besides local paths.
fsspec can reach many more stores, but its generic create-if-absent is "check,
then write" (not atomic), and the atomicity of a write depends on each backend;
a scheme that has not been checked here is refused with one line rather than
trusted.

**Errors.** A missing file is `FileNotFoundError`, on both (callers test for it).
Everything else that is the store's fault or the user's (a bucket that does not
exist, no permission or credentials, an unreachable endpoint, gcsfs not
installed, an unsupported scheme) is `StorageError`, a `PropmapsError`: one line
that names the path and what to do, so the launcher exits 2 and a rerun resumes.
gcsfs retries transient failures (connection errors, 5xx, 429) six times with
exponential back-off, about 30 s, before one is reported.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec

from propmaps_jax.errors import PropmapsError
from propmaps_jax.models.checkpoint import atomic_write_bytes

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"
# Schemes whose writes and exclusive creates are atomic, as checked (see above).
SUPPORTED_SCHEMES = ("gs", "gcs")


class StorageError(PropmapsError):
    """A run-directory store is unusable: no bucket, no access, unreachable."""


def scheme(path: str) -> str:
    """The URL scheme of `path` ("gs"), or "" for a local path (or file://)."""
    head, sep, _ = path.partition("://")
    if not sep or "/" in head or head == "file":
        return ""
    return head.lower()


def is_url(path: str) -> bool:
    """Whether `path` is an object-store URL (gs://...) rather than a local path."""
    return bool(scheme(path))


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def normalize(path: str) -> str:
    """A local path made absolute; a URL with no trailing slash (else unchanged)."""
    if is_url(path):
        head, _, rest = path.partition("://")
        return f"{head.lower()}://{rest.rstrip('/')}"
    return os.path.abspath(os.path.expanduser(_local(path)))


def join(base: str, *parts: str) -> str:
    """`base`/`parts`: os.path.join for a local path, "/"-joined for a URL."""
    if is_url(base):
        return posixpath.join(base, *parts) if parts else base
    return os.path.join(_local(base), *parts)


def _bucket_and_key(path: str) -> tuple[str, str]:
    rest = path.partition("://")[2]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def _filesystem(path: str) -> tuple[Any, str]:
    """(the fsspec filesystem of `path`, `path` as that filesystem names it): the
    local one (creating parent folders on write), or gcsfs for a gs:// URL
    (StorageError for another scheme, a URL without a bucket, or no gcsfs)."""
    if not is_url(path):
        return fsspec.filesystem("file", auto_mkdir=True), _local(path)
    kind = scheme(path)
    if kind not in SUPPORTED_SCHEMES:
        raise StorageError(
            f"{path}: the scheme {kind}:// is not supported for results (only gs:// "
            "and local paths are: their writes are known to be atomic); use a local "
            "path or a gs:// bucket"
        )
    if not _bucket_and_key(path)[0]:
        raise StorageError(f"{path} names no bucket; use gs://BUCKET/PATH")
    # gcsfs logs its optional features at INFO on import, and each request out of
    # retries at ERROR with a traceback; every failure also reaches us as an
    # exception, which becomes one line (`_translated`). Its log stays quiet
    # unless a user has set a level for it.
    gcsfs_logger = logging.getLogger("gcsfs")
    if gcsfs_logger.level == logging.NOTSET:
        gcsfs_logger.setLevel(logging.CRITICAL)
    try:
        import gcsfs.core
    except ImportError:
        raise StorageError(
            f"{path} needs gcsfs to reach Cloud Storage, which is not installed: "
            "pip install gcsfs (the gcs extra: pip install '.[gcs]'), or use a local "
            "path"
        ) from None
    emulator = os.environ.get(EMULATOR_VARIABLE)
    # An emulator takes no credentials; never look for them (or for a metadata
    # server) when one is set. Listings are never cached: other hosts write too.
    filesystem = gcsfs.core.GCSFileSystem(
        token="anon" if emulator else None, use_listings_cache=False
    )
    return filesystem, path


def _endpoint() -> str:
    emulator = os.environ.get(EMULATOR_VARIABLE)
    if emulator:
        return f"the emulator at {emulator} ({EMULATOR_VARIABLE})"
    return "Cloud Storage"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import fsspec.exceptions

        errors.append(fsspec.exceptions.FSTimeoutError)
    except ImportError:
        pass
    return tuple(errors)


def _bucket_missing(fs, path: str) -> bool:
    """Whether the bucket of a gs:// `path` does not exist (False if unknown, and
    for a local path)."""
    if not is_url(path):
        return False
    bucket, _ = _bucket_and_key(path)
    try:
        fs.info(bucket)
    except FileNotFoundError:
        return True
    except Exception:
        return False
    return False


def _no_bucket(path: str) -> StorageError:
    bucket, _ = _bucket_and_key(path)
    return StorageError(
        f"{path}: the bucket gs://{bucket} does not exist on {_endpoint()} (or "
        "these credentials cannot see it); create it (gcloud storage buckets create "
        f"gs://{bucket} --location=REGION) or use another path"
    )


@contextlib.contextmanager
def _translated(fs, path: str, action: str) -> Iterator[None]:
    """Turn a gs:// store's failures into one-line StorageErrors (missing files
    stay FileNotFoundError); a local path's errors pass unchanged."""
    if not is_url(path):
        yield
        return
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        if _bucket_missing(fs, path):
            raise _no_bucket(path) from None
        raise
    except FileExistsError:
        raise
    except _connection_errors() as e:
        raise StorageError(
            f"cannot reach {_endpoint()} to {action} {path} ({_first_line(e)}, after "
            "retries); check the network, then run the same command again to resume"
        ) from None
    except PermissionError as e:
        raise StorageError(_denied(path, action, e)) from None
    except OSError as e:
        if "Forbidden" in str(e) or getattr(e, "errno", None) == errno.EACCES:
            raise StorageError(_denied(path, action, e)) from None
        raise StorageError(
            f"could not {action} {path} on {_endpoint()} ({_first_line(e)})"
        ) from None
    except Exception as e:
        code = getattr(e, "code", None)
        if code in (401, 403):
            raise StorageError(_denied(path, action, e)) from None
        if type(e).__name__ == "HttpError" or "google" in type(e).__module__:
            raise StorageError(
                f"could not {action} {path} on {_endpoint()} ({_first_line(e)})"
            ) from None
        raise


def _denied(path: str, action: str, error: BaseException) -> str:
    return (
        f"no permission to {action} {path} ({_first_line(error)}); give these "
        "credentials access to the bucket (gcloud auth application-default login, "
        "or the VM's service account with storage read/write scope)"
    )


# ---------------------------------------------------------------------------------
# The operations the run-directory code needs.


def _look(path: str, method: str) -> bool:
    """The filesystem's `method` ("exists", "isfile", "isdir") of `path`; on gs://
    a missing bucket is a StorageError rather than False."""
    fs, where = _filesystem(path)
    with _translated(fs, path, "look for"):
        if getattr(fs, method)(where):
            return True
        if _bucket_missing(fs, path):
            raise _no_bucket(path)
        return False


def exists(path: str) -> bool:
    """Whether a file exists at `path` (a gs:// bucket must exist: StorageError)."""
    return _look(path, "exists")


def isfile(path: str) -> bool:
    """Whether `path` is a file (an object on gs://; a bucket must exist)."""
    return _look(path, "isfile")


def isdir(path: str) -> bool:
    """Whether `path` is a folder: on gs://, whether any object lies under it."""
    return _look(path, "isdir")


def read_bytes(path: str) -> bytes:
    """The contents of the file at `path` (FileNotFoundError if there is none)."""
    fs, where = _filesystem(path)
    with _translated(fs, path, "read"):
        return fs.cat_file(where)


def read_text(path: str) -> str:
    """The UTF-8 text of the file at `path`."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically: readers see the old file or all of it.

    Locally a temporary file renamed over `path` (its folder is created); on
    gs:// one upload, which creates the object only when complete (module
    docstring).
    """
    if not is_url(path):
        atomic_write_bytes(_local(path), data)
        return
    fs, where = _filesystem(path)
    with _translated(fs, path, "write"):
        fs.pipe_file(where, bytes(data))


def write_text(path: str, text: str) -> None:
    """Write a UTF-8 text file atomically (`write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def create_if_absent(path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless something is there; True if created.

    Atomic against other processes and hosts (module docstring): when several
    race, exactly one gets True, and the file always holds the winner's whole
    `data`.
    """
    if not is_url(path):
        return atomic_write_bytes(_local(path), data, exclusive=True)
    fs, where = _filesystem(path)
    with _translated(fs, path, "create"):
        try:
            fs.pipe_file(where, bytes(data), mode="create")
        except FileExistsError:
            return False
        return True


def remove(path: str, missing_ok: bool = True) -> None:
    """Delete the file at `path` (a missing one is fine unless `missing_ok=False`)."""
    fs, where = _filesystem(path)
    with _translated(fs, path, "delete"):
        try:
            fs.rm_file(where)
        except FileNotFoundError:
            if not missing_ok or _bucket_missing(fs, path):
                raise


def move(source: str, target: str) -> None:
    """Move a file (the target's folder is created): a rename locally; on gs://
    the server's move where the bucket offers one, else a copy, then a delete.

    Both paths must be on the same store. On gs:// the copy-then-delete is not
    atomic (object stores have no rename): a crash in between leaves the file at
    both names, never at neither; callers only move files aside (stale chunks),
    where a leftover original is judged again, and moved again, by the next run.
    """
    fs, where = _filesystem(source)
    with _translated(fs, source, "move"):
        fs.mv(where, _filesystem(target)[1])


def makedirs(path: str) -> None:
    """Create the folder `path` and its parents; on gs:// check the bucket instead.

    Object stores have no folders (a "folder" is a key prefix that exists once an
    object is written under it), so there is nothing to create; the bucket is
    checked so that a mistyped one fails here, before any work, in one line.
    """
    fs, where = _filesystem(path)
    with _translated(fs, path, "use"):
        if not is_url(path):
            fs.makedirs(where, exist_ok=True)
            return
        try:
            fs.info(_bucket_and_key(path)[0])
        except FileNotFoundError:
            raise _no_bucket(path) from None


def listdir(path: str) -> list[str]:
    """Sorted names of the files and folders directly in `path` ([] if none)."""
    fs, where = _filesystem(path)
    with _translated(fs, path, "list"):
        try:
            found = fs.ls(where, detail=False)
        except FileNotFoundError:
            if _bucket_missing(fs, path):
                raise
            return []
    prefix = fs._strip_protocol(where).strip("/")
    # A file lists as itself; some stores list a folder as its own first entry.
    entries = (p.strip("/") for p in found)
    return sorted({posixpath.basename(p) for p in entries if p and p != prefix})


def glob(pattern: str) -> list[str]:
    """Sorted paths (URLs for a URL pattern) matching a `*`/`?` pattern (a `*`
    matches names that start with a dot too, on both stores)."""
    fs, where = _filesystem(pattern)
    with _translated(fs, pattern, "list"):
        found = fs.glob(where)
        if not found and _bucket_missing(fs, pattern):
            raise _no_bucket(pattern)
    if not is_url(pattern):
        return sorted(found)
    kind = scheme(pattern)
    return sorted(f"{kind}://{p.split('://', 1)[-1].lstrip('/')}" for p in found)
