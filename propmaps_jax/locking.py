"""One exclusive lock between processes of a machine: `flock`, held for a block.

Two places need one, and both use `exclusive`: the download cache (one download
per cache folder; `data.download`) and the take-over of a stale run lock (one
taker at a time; `experiments/runs/lock.py`, whose lock file itself is a
create-if-absent that also works on Cloud Storage).

**Why `flock`.** The kernel drops it when its holder dies, kill -9 included, so
it is never left stale and needs no record of who holds it; and it can lock a
folder as well as a file, so the run lock's take-over locks the run directory
itself and adds no file to a folder of results.

**Why not the `filelock` package.** It fits the download cache, but not the run
directory: its Unix lock always opens a lock *file* (`O_CREAT`) and leaves it in
place, so it cannot lock a folder, and every run directory would gain a file
(which the listings of a run, and the tests of them, would see). Measured on this
project's 2-core machine (2026-12-07): filelock 4.3.2 is 15,772 lines of Python
and adds 0.19-0.33 s to import; this is `fcntl` (0.5 ms) and 40 lines, and it
keeps the 12-process race of `tests/_lock_race.py` to one holder in every trial
(322 of 322 in 12 s).

Where `fcntl` does not exist (Windows) or the filesystem refuses `flock` (some
network filesystems), `LockUnavailable` says so; each caller decides what that
means (the download goes on: its renames keep it safe; a take-over is refused).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator


class LockUnavailable(OSError):
    """`path` cannot be locked here: no `flock` on this platform or filesystem."""


@contextlib.contextmanager
def exclusive(path: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive `flock` of `path` (a folder, or a file, created if
    absent) for the block; wait while another process holds it, calling
    `on_wait()` once first (to say so). Released when the block ends, or when the
    process dies.

    Raises LockUnavailable when `path` cannot be locked here; OSError when it
    cannot be opened.
    """
    try:
        import fcntl
    except ImportError:
        raise LockUnavailable(errno.ENOSYS, "no flock on this platform", path) from None
    if os.path.isdir(path):
        fd = os.open(path, os.O_RDONLY)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process: say so, then wait
            if on_wait is not None:
                on_wait()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                raise LockUnavailable(e.errno, e.strerror, path) from None
        except OSError as e:
            raise LockUnavailable(e.errno, e.strerror, path) from None
        yield
    finally:
        os.close(fd)  # releases the flock
