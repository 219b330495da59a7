"""One writer per run directory: a lock file held for the run, stale after a crash.

A run takes `DIR/.lock` before it writes anything in DIR and removes it on any
exit (normal, error, Ctrl-C, SIGTERM; `atexit` as a last resort). A second run on
the same DIR is refused with one line naming the running one (pid, host, since
when, its command); exit 2 through the launcher's PropmapsError.

A lock left by a run that was killed (SIGKILL, power loss) is recognised as stale
when it names this host and a pid that no longer runs; it is then taken over with
one line. A lock of another host cannot be checked from here: the message says to
delete the file when that run is known to be gone (a shared filesystem).

The only primitive that needs the storage's help is `create_exclusive`: create a
file if and only if it does not exist, whole (`storage.create_if_absent`: a hard
link of a complete temporary file on a local or NFSv3+ filesystem, an upload with
the precondition `ifGenerationMatch=0` on Cloud Storage). A stale local lock is
taken over under an exclusive `flock` of the run directory (`_take_over_local`,
with `propmaps_jax.locking`, the one inter-process lock of the project, which the
download cache uses too: at most one holder, whatever the timing). A gs://
workdir is locked the same way; its stale lock is taken over by deleting it and
creating ours (no rename or flock on an object store): two takers racing both
delete, exactly one of them creates the new lock, and a taker that read the
stale lock before another replaced it may still delete the new one (not
covered).

Not covered: multi-host runs (--distributed) do not take the lock, and a pid
reused by an unrelated process on the same host keeps a stale lock alive until
it is deleted by hand (the message says how).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator

from experiments.report.progress import say
from experiments.runs import storage
from propmaps_jax import locking
from propmaps_jax.errors import PropmapsError

LOCK_NAME = ".lock"
# path -> (hold count, whether the folder was created for the lock)
_HELD: dict[str, list] = {}


def create_exclusive(path: str, data: bytes) -> bool:
    """Create `path` holding `data` if it does not exist; False if it does.

    The one storage primitive of the lock (`storage.create_if_absent`): locally a
    hard link of a complete temporary file, on gs:// an upload with the
    precondition `ifGenerationMatch=0`. Either way a reader sees the file only once
    it is complete.
    """
    return storage.create_if_absent(path, data)


def _record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }


def _read(path: str) -> dict | None:
    """The lock's record; None when it vanished; {} when unreadable (half made).
    PropmapsError when `path` is not a file that can be read (a folder, no
    permission): no run made it, so no run will remove it."""
    try:
        raw = storage.read_bytes(path)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise PropmapsError(
            f"{path} is a folder, not a lock file: no run made it; remove it "
            f"(rm -r {shlex.quote(path)}) and run again"
        ) from None
    except OSError as e:
        raise PropmapsError(
            f"cannot read the lock {path} ({e.strerror or e}); fix its permissions "
            "or remove it, then run again"
        ) from None
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _stale(path: str, record: dict) -> bool:
    """Whether the lock at `path` was left by a run that no longer runs."""
    if not record:  # created but never written (a crash in between)
        if storage.is_url(path):
            return False  # an object is created whole: never empty
        try:
            return time.time() - os.path.getmtime(path) > 60
        except OSError:
            return False
    if record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    if pid == os.getpid():
        return False  # this process (a lock not released by a nested run)
    return not isinstance(pid, int) or not _pid_alive(pid)


def describe(record: dict) -> str:
    """'pid 123 on host h since 2026-... (python launch.py ...)'."""
    if not record:
        return "a run whose lock is still being written"
    return (
        f"pid {record.get('pid')} on host {record.get('host')} since "
        f"{record.get('since')} ({record.get('command')})"
    )


def acquire(workdir: str) -> bool:
    """Take DIR/.lock for this process (reentrant); PropmapsError when another run
    holds it. Returns False (nothing taken) when DIR cannot be created or written:
    the experiment's own checks then say why in their words.
    """
    workdir = storage.normalize(workdir)
    if workdir in _HELD:
        _HELD[workdir][0] += 1
        return True
    created = not storage.is_url(workdir) and not os.path.exists(workdir)
    try:
        storage.makedirs(workdir)
    except OSError:
        return False
    path = storage.join(workdir, LOCK_NAME)
    data = (json.dumps(_record()) + "\n").encode()
    for _ in range(3):
        try:
            if create_exclusive(path, data):
                _HELD[workdir] = [1, created]
                return True
        except OSError as e:
            if e.errno in (errno.EEXIST,):
                continue
            _remove_if_empty(workdir, created)
            return False
        record = _read(path)
        if record is None:
            continue  # released in between: try again
        if not _stale(path, record):
            raise PropmapsError(
                f"{workdir} is in use by another run: {describe(record)}; wait for "
                f"it to finish, or stop it (if it is known to be gone, delete "
                f"{path})"
            )
        if storage.is_url(path):
            # No rename on an object store: delete the stale lock, then race for
            # a new one (create_exclusive lets exactly one taker win).
            storage.remove(path)
            _took_over(workdir, record)
            continue
        if _take_over_local(workdir, path, record, data):
            _HELD[workdir] = [1, created]
            _took_over(workdir, record)
            return True
    raise PropmapsError(
        f"could not take the lock {path} (it keeps changing); is another run "
        "starting in the same folder?"
    )


def _take_over_local(workdir: str, path: str, record: dict, data: bytes) -> bool:
    """Replace the stale lock `record` at `path` by ours; False when it changed
    in between (look again).

    The takers of a stale lock take turns under `locking.exclusive` of the folder
    itself (a `flock`, released by the kernel when its holder dies, so it is never
    left stale, and no file is added to the run directory). Under it a taker checks
    that the lock is still the one it judged stale, removes it and creates its own
    with `create_exclusive`: only a taker removes a lock, and only the stale one it
    has just read, so a fresh lock (a taker's, or a new run's that was quicker to
    create the file) is never removed or overwritten. (A rename aside and a
    put-back could overwrite a lock created in between: two holders.)
    """
    try:
        with locking.exclusive(workdir):
            if _read(path) != record:
                return False
            try:
                os.remove(path)
            except FileNotFoundError:
                return False
            return create_exclusive(path, data)
    except locking.LockUnavailable as e:
        raise PropmapsError(
            f"{path} was left by a run that is gone ({describe(record)}) but "
            f"this filesystem cannot lock {workdir} to take it over ({e.strerror}); "
            f"delete {path} and run again"
        ) from None
    except FileNotFoundError:  # the folder went away: look again
        return False


def _took_over(workdir: str, record: dict) -> None:
    say(f"{workdir}: taking over the lock of a run that is gone ({describe(record)})")


def _remove_if_empty(workdir: str, created: bool) -> None:
    if created and not storage.is_url(workdir):
        with contextlib.suppress(OSError):
            os.rmdir(workdir)


def release(workdir: str) -> None:
    """Drop one hold of DIR/.lock; the file goes with the last one, and DIR too
    when it was created for the lock and holds nothing else."""
    workdir = storage.normalize(workdir)
    held = _HELD.get(workdir)
    if held is None:
        return
    held[0] -= 1
    if held[0] > 0:
        return
    del _HELD[workdir]
    path = storage.join(workdir, LOCK_NAME)
    try:
        record = _read(path)
        if record is not None and record.get("pid") == os.getpid():
            storage.remove(path)
    except (OSError, PropmapsError):
        pass  # the store is unreachable: the lock stays, and is judged stale later
    _remove_if_empty(workdir, held[1])


def release_all() -> None:
    """Release every lock this process holds (at exit)."""
    for workdir in list(_HELD):
        _HELD[workdir][0] = 1
        release(workdir)


atexit.register(release_all)


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
    """`acquire(workdir)` for the duration of the block (nothing when not
    `enabled`: the processes of a multi-host run other than the first)."""
    taken = enabled and acquire(workdir)
    try:
        yield
    finally:
        if taken:
            release(workdir)
