"""The official CIFAR-10 archive, downloaded on first use into a cache folder.

`fetch_cifar10` downloads it from its publisher (`CIFAR10_URL`) into the cache
folder (`cache_dir()`: `$PROPMAPS_CACHE`, else `$XDG_CACHE_HOME/propmaps_jax`, else
`~/.cache/propmaps_jax`), checks its MD5 and extracts it to `cifar-10-batches-py/`
there. Later calls read the cache without the network.

The download never leaves anything that looks complete unless it is: the archive is
written to a temporary file in the cache folder and renamed only after its checksum
matched; it is extracted into a temporary folder that is renamed to
`cifar-10-batches-py` only once every batch is there, with the SHA-256 of each
batch as extracted from the verified archive (`SHA256SUMS`, the format of
`sha256sum -c`). Every later use checks the batches against that record, so a
cached file changed since (damaged, replaced, or a pickle planted there) is refused,
not read. A mirror can be named with
`$PROPMAPS_CIFAR10_URL`; it is checked against the official MD5 (a mirror holds the
same bytes) unless `$PROPMAPS_CIFAR10_MD5` gives another. The check is never
skipped: an archive that cannot be verified can still be used by passing its path.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import posixpath
import re
import shutil
import ssl
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from typing import TextIO

from propmaps_jax import locking
from propmaps_jax.errors import DataError
from propmaps_jax.progress import format_duration

# The archive's layout: the folder it extracts to and the batches in it.
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
BATCHES_DIR = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
# The publisher's archive and the MD5 that its page states:
# https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CACHE_ENV = "PROPMAPS_CACHE"
URL_ENV = "PROPMAPS_CIFAR10_URL"
MD5_ENV = "PROPMAPS_CIFAR10_MD5"
DOWNLOAD_TIMEOUT_S = 60.0
DOWNLOAD_CHUNK_BYTES = 1 << 20
USER_AGENT = "propmaps-jax (CIFAR-10 download)"
# The record of the extracted batches' SHA-256, written inside the cache's folder.
SHA256_RECORD = "SHA256SUMS"
LOCAL_COPY = f"or pass `path`: a local copy of {BATCHES_DIR}/ (or {ARCHIVE_NAME})"


def cache_dir() -> str:
    """The absolute cache folder: $PROPMAPS_CACHE, else the user's cache folder."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        folder = os.path.join(base, "propmaps_jax")
    return os.path.abspath(os.path.expanduser(folder))


def download_source() -> tuple[str, str]:
    """(url, md5) of the archive to download: the official ones unless the
    environment names a mirror ($PROPMAPS_CIFAR10_URL) or another MD5
    ($PROPMAPS_CIFAR10_MD5). A mirror without its own MD5 must match the official
    one: the check is never skipped."""
    url = os.environ.get(URL_ENV) or CIFAR10_URL
    md5 = os.environ.get(MD5_ENV) or CIFAR10_MD5
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "ftp", "file"):
        raise DataError(
            f"{URL_ENV}={url!r} is not a URL (http, https, ftp or file); set it to "
            "a mirror of cifar-10-python.tar.gz or unset it for the official one"
        )
    if not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise DataError(
            f"{MD5_ENV}={md5!r} is not an MD5 (32 hexadecimal digits); set it to "
            "the archive's MD5 or unset it for the official one"
        )
    return url, md5.lower()


def _batches_missing(folder: str) -> list[str]:
    return [
        f
        for f in (*TRAIN_FILES, TEST_FILE)
        if not os.path.isfile(os.path.join(folder, f))
    ]


def _reason(error: BaseException) -> str:
    """A short, one-line cause of a network error."""
    reason = getattr(error, "reason", None)
    if isinstance(reason, BaseException):
        error = reason
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return " ".join(str(text).split())


def _unit(n: float) -> tuple[float, str]:
    """(divisor, name) of the binary unit that shows `n` bytes readably."""
    for power, name in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n >= 1024**power:
            return 1024**power, name
    return 1, "bytes"


def _size(n: float, unit: tuple[float, str] | None = None) -> str:
    divisor, name = unit or _unit(n)
    return f"{n / divisor:.1f} {name}"


class _DownloadProgress:
    """Bytes done/total, rate and ETA: rewritten in place on a terminal, else a
    line every `every_s` seconds (a log file gets a few lines, not thousands)."""

    def __init__(self, total: int | None, stream: TextIO, every_s: float = 5.0):
        self.total, self.stream = total, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.every_s = 0.25 if self.tty else every_s
        self.start = self.last = time.monotonic()

    def line(self, done: int, final: bool = False) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        if self.total:
            divisor, name = _unit(self.total)
            text = (
                f"CIFAR-10: {done / divisor:.1f}/{_size(self.total)} "
                f"({done / self.total:.0%})"
            )
        else:
            text = f"CIFAR-10: {_size(done)}"
        text += f", {_size(rate)}/s"
        if final:
            text += f", in {format_duration(elapsed)}"
        elif self.total and rate > 0:
            text += f", ETA {format_duration((self.total - done) / rate)}"
        return text

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + self.line(done, final) + end)
        self.stream.flush()


@contextlib.contextmanager
def _cache_lock(cache: str, stream: TextIO) -> Iterator[bool]:
    """One download per cache folder at a time (processes that share a home
    folder, as on a cluster); the others wait and then find it done.

    Yields whether the lock is held (`locking.exclusive` of `.cifar10.lock`): then
    no other process is writing there. Where no lock can be had (no `flock`), the
    download goes on: its renames keep the cache safe.
    """

    def waiting() -> None:
        stream.write(f"waiting for another process downloading into {cache}\n")
        stream.flush()

    with contextlib.ExitStack() as stack:
        path = os.path.join(cache, ".cifar10.lock")
        try:
            stack.enter_context(locking.exclusive(path, on_wait=waiting))
            held = True
        except locking.LockUnavailable:
            held = False
        yield held


def _remove_leftovers(cache: str) -> None:
    """Temporary files and folders of downloads that were killed (kill -9, power
    loss): only our own names, and only while holding the lock."""
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        if name.startswith(f".{ARCHIVE_NAME}.") and name.endswith(".part"):
            with contextlib.suppress(OSError):
                os.remove(path)
        elif name.startswith(f".{BATCHES_DIR}.") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def _download(
    url: str, md5: str, archive: str, timeout_s: float, stream: TextIO
) -> None:
    """Fetch `url` into `archive`: a temporary file, checked, then renamed.

    On any failure (interruption included) the temporary file is removed and
    `archive` is untouched, so nothing incomplete is ever under its name.
    """
    mirror = "" if url == CIFAR10_URL else f" (the mirror in {URL_ENV})"
    retry = f"run again, {LOCAL_COPY}"
    fd, part = tempfile.mkstemp(
        prefix=f".{ARCHIVE_NAME}.", suffix=".part", dir=os.path.dirname(archive)
    )
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            try:
                response = urllib.request.urlopen(request, timeout=timeout_s)
            except urllib.error.HTTPError as e:
                where = (
                    f"check {URL_ENV}"
                    if mirror
                    else f"try again later, set {URL_ENV} to a mirror"
                )
                raise DataError(
                    f"cannot download CIFAR-10 from {url}{mirror}: HTTP {e.code} "
                    f"{e.reason}; {where}, {LOCAL_COPY}"
                ) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                if isinstance(getattr(e, "reason", e), ssl.SSLError):
                    raise DataError(
                        f"cannot download CIFAR-10 from {url} (TLS: {_reason(e)}); "
                        "install this machine's CA certificates (on macOS, run "
                        "Python's 'Install Certificates.command'), set "
                        f"{URL_ENV} to a mirror, {LOCAL_COPY}"
                    ) from None
                raise DataError(
                    f"cannot download CIFAR-10 from {url} ({_reason(e)}): no network? "
                    f"Connect to the internet and run again, {LOCAL_COPY}"
                ) from None
            with response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                stream.write(
                    f"downloading CIFAR-10 (once) from {url}"
                    + (f", {_size(total)}" if total else "")
                    + f", into {os.path.dirname(archive)}\n"
                )
                progress = _DownloadProgress(total, stream)
                digest = hashlib.md5(usedforsecurity=False)
                done = 0
                while True:
                    try:
                        chunk = response.read(DOWNLOAD_CHUNK_BYTES)
                    except (OSError, http.client.HTTPException) as e:
                        # IncompleteRead: the server closed before Content-Length.
                        raise DataError(
                            f"the download of CIFAR-10 from {url} broke off after "
                            f"{done} of {total or '?'} bytes ({_reason(e)}); nothing "
                            f"was kept: {retry}"
                        ) from None
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as e:
                        raise DataError(
                            f"cannot write the CIFAR-10 download into "
                            f"{os.path.dirname(archive)} ({_reason(e)}); free some "
                            f"space or set {CACHE_ENV} to another folder, {LOCAL_COPY}"
                        ) from None
                    digest.update(chunk)
                    done += len(chunk)
                    progress.update(done)
                progress.update(done, final=True)
            if total is not None and done != total:
                raise DataError(
                    f"the download of CIFAR-10 from {url} is truncated: {done} of "
                    f"{total} bytes; nothing was kept: {retry}"
                )
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != md5:
            what = (
                f"set {MD5_ENV} to the mirror's MD5 if it serves another archive, "
                if mirror and md5 == CIFAR10_MD5
                else ""
            )
            raise DataError(
                f"the file downloaded from {url}{mirror} has MD5 {got}, not the "
                f"expected {md5}: it is corrupt or not the official archive; nothing "
                f"was kept: {what}{retry}"
            )
        stream.write(f"MD5 {got} verified\n")
        os.replace(part, archive)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(part)


def _file_md5(path: str) -> str:
    return _file_digest(path, hashlib.md5(usedforsecurity=False))


def _file_digest(path: str, digest) -> str:
    """The hex digest of the file at `path` with `digest` (a new hashlib object)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _member_file_name(member: tarfile.TarInfo) -> str | None:
    """The file name of a regular file directly in cifar-10-batches-py/, else None.

    Only such files are extracted, by name, so that no archive can write outside
    the cache folder (no absolute paths, `..`, links or devices).
    """
    if not member.isfile():
        return None
    parts = posixpath.normpath(member.name).split("/")
    if len(parts) != 2 or parts[0] != BATCHES_DIR or parts[1] in ("", ".", ".."):
        return None
    return parts[1]


def _extract(archive: str, folder: str) -> None:
    """Extract the batches of `archive` to `folder`, with the SHA-256 of each in
    `SHA256_RECORD`: into a temporary folder beside it, renamed once complete."""
    staging = tempfile.mkdtemp(prefix=f".{BATCHES_DIR}.", dir=os.path.dirname(folder))
    try:
        # mkdtemp's folder is private (0700); the dataset gets the usual mode, so
        # that a cache shared by a group stays readable to it.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        sha256 = {}
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    name = _member_file_name(member)
                    if name is None or name == SHA256_RECORD:
                        continue
                    digest = hashlib.sha256()
                    with (
                        tar.extractfile(member) as source,
                        open(os.path.join(staging, name), "wb") as target,
                    ):
                        for block in iter(lambda: source.read(1 << 20), b""):
                            digest.update(block)
                            target.write(block)
                    sha256[name] = digest.hexdigest()
            with open(os.path.join(staging, SHA256_RECORD), "w") as record:
                for name in (*TRAIN_FILES, TEST_FILE):
                    if name in sha256:
                        record.write(f"{sha256[name]}  {name}\n")
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(
                f"{archive} is not a readable tar archive ({type(e).__name__}: "
                f"{_reason(e)}); "
                f"delete it to download again, {LOCAL_COPY}"
            ) from None
        except OSError as e:
            raise DataError(
                f"cannot extract {archive} into {os.path.dirname(folder)} "
                f"({_reason(e)}); free some space or set {CACHE_ENV} to another "
                f"folder, {LOCAL_COPY}"
            ) from None
        missing = _batches_missing(staging)
        if missing:
            raise DataError(
                f"{archive} does not contain the CIFAR-10 batches (missing "
                f"{', '.join(missing)}); delete it to download again, {LOCAL_COPY}"
            )
        try:
            os.rename(staging, folder)
        except OSError as e:
            # Another process (without POSIX locks) finished first: use its copy.
            if _batches_missing(folder):
                raise DataError(
                    f"cannot move the extracted CIFAR-10 to {folder} ({_reason(e)}); "
                    f"delete it to extract again, {LOCAL_COPY}"
                ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_cifar10(
    cache: str | None = None,
    *,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
    stream: TextIO | None = None,
) -> str:
    """The cache's `cifar-10-batches-py` folder, downloaded and extracted on first use.

    Args:
      cache: the cache folder; default `cache_dir()`.
      timeout_s: seconds without an answer from the server before giving up.
      stream: where the progress lines go; default sys.stderr.

    Returns:
      The absolute path of the extracted folder.
    """
    stream = stream or sys.stderr
    cache = os.path.abspath(os.path.expanduser(cache or cache_dir()))
    folder = os.path.join(cache, BATCHES_DIR)
    if os.path.isdir(folder):
        _require_complete(folder)
        return folder
    url, md5 = download_source()
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"cannot create the cache folder {cache} ({_reason(e)}); set {CACHE_ENV} "
            f"to a writable folder, {LOCAL_COPY}"
        ) from None
    if not os.access(cache, os.W_OK):
        raise DataError(
            f"the cache folder {cache} is not writable; set {CACHE_ENV} to a writable "
            f"folder, {LOCAL_COPY}"
        )
    with _cache_lock(cache, stream) as exclusive:
        if os.path.isdir(folder):  # another process made it while we waited
            _require_complete(folder)
            return folder
        if exclusive:
            _remove_leftovers(cache)
        archive = os.path.join(cache, ARCHIVE_NAME)
        downloaded = False
        if os.path.isfile(archive):
            # Left by a run stopped between download and extraction, or put here
            # by the user: it must be the expected archive all the same.
            got = _file_md5(archive)
            if got != md5:
                raise DataError(
                    f"{archive} has MD5 {got}, not the expected {md5}; delete it to "
                    f"download again, {LOCAL_COPY}"
                )
        else:
            _download(url, md5, archive, timeout_s, stream)
            downloaded = True
        _extract(archive, folder)
        if downloaded:  # the extracted folder is what is read; keep one copy
            with contextlib.suppress(OSError):
                os.remove(archive)
    return folder


def _require_complete(folder: str) -> None:
    """The cached batches are all there and are the bytes extracted from the
    verified archive (their SHA-256 in `SHA256_RECORD`); DataError otherwise."""
    missing = _batches_missing(folder)
    if missing:
        raise DataError(
            f"the cached {folder} is incomplete (missing {', '.join(missing)}); "
            f"delete it to download again, {LOCAL_COPY}"
        )
    record = os.path.join(folder, SHA256_RECORD)
    try:
        with open(record) as f:
            lines = [line.split() for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        lines = []
    expected = {line[1]: line[0].lower() for line in lines if len(line) == 2}
    unrecorded = [f for f in (*TRAIN_FILES, TEST_FILE) if f not in expected]
    if unrecorded:
        raise DataError(
            f"the cached {folder} has no SHA-256 record of {', '.join(unrecorded)} "
            f"(its {SHA256_RECORD} is missing or damaged: extracted by an older "
            f"version, or changed), so it cannot be verified; delete it to "
            f"download again, {LOCAL_COPY}"
        )
    for name in (*TRAIN_FILES, TEST_FILE):
        got = _file_digest(os.path.join(folder, name), hashlib.sha256())
        if got != expected[name]:
            raise DataError(
                f"the cached {folder}/{name} has SHA-256 {got}, not the "
                f"{expected[name]} extracted from the verified archive: it was "
                "changed or damaged; "
                f"delete {folder} to download again, {LOCAL_COPY}"
            )
