"""How a run stops: Ctrl-C, SIGTERM, --max_minutes and a failed write, each as
one line and its own exit status (README "What a run guarantees").

The launcher (experiments/cli.py) installs the handlers (`handle_sigterm`) and
turns a stop into its line (`exit_when_stopped`); the resumable experiments start
the --max_minutes clock (`start_deadline`) and check it between chunks or epochs
(`past_deadline`, then `TimeLimit`). Kept apart from the experiments' other
helpers because its state is process-wide (the deadline, the signal being
handled) and its order matters: a second signal during the first one's cleanup
must do nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import signal
import sys
import time

from experiments.report.progress import say
from experiments.runs import storage
from propmaps_jax.errors import PropmapsError


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, `timeout`, `docker stop`), handled like Ctrl-C."""


class TimeLimit(Exception):
    """--max_minutes has passed: the run stopped itself between chunks."""


# Exit statuses of a stopped run (README "What a run guarantees").
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)
EXIT_TIME_LIMIT = 75  # --max_minutes reached (EX_TEMPFAIL: not finished, resume)
EXIT_WRITE_FAILED = 74  # disk full, read-only or no permission (EX_IOERR)
WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_DEADLINE: list[float | None] = [None]


def start_deadline(max_minutes: float | None) -> None:
    """Start the --max_minutes clock (None: no limit)."""
    if max_minutes is not None and not (0 < max_minutes < 10**7):
        raise PropmapsError(
            f"--max_minutes must be a positive number of minutes, got {max_minutes}"
        )
    _DEADLINE[0] = None if max_minutes is None else time.time() + 60 * max_minutes


def past_deadline() -> bool:
    """Whether the --max_minutes limit has passed (False without a limit)."""
    return _DEADLINE[0] is not None and time.time() >= _DEADLINE[0]


# The signal this process is stopping for (None: none yet). A second signal while
# the first one's stop is under way (TERM then INT from a scheduler, Ctrl-C
# pressed twice) is ignored: its exception would land in the middle of the
# cleanup (the lock's release, the stop line, JAX's teardown at exit), as a
# traceback, another exit status, or worse.
_STOPPING: list[int | None] = [None]
# Read end of the pipe where the C-level handler writes each signal's number as it
# arrives (`signal.set_wakeup_fd`). Python runs pending handlers by signal number,
# not in order of arrival (SIGINT before SIGTERM when both came during one long
# device call): the pipe says which came first.
_ARRIVALS: list[int | None] = [None]


def _drain_arrivals() -> bytes:
    if _ARRIVALS[0] is None:
        return b""
    data = b""
    with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
        while chunk := os.read(_ARRIVALS[0], 512):
            data += chunk
    return data


def _watch_arrivals() -> None:
    """Record the signals' order of arrival (main thread only; nothing when
    another part of the program already uses the wakeup fd)."""
    if _ARRIVALS[0] is not None:
        _drain_arrivals()  # left from an earlier run in this process
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    try:
        previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        previous = None
    if previous == -1:
        _ARRIVALS[0] = read
        return
    if previous is not None:
        signal.set_wakeup_fd(previous)
    os.close(read)
    os.close(write)


def _on_stop_signal(signum, frame) -> None:
    if _STOPPING[0] is not None:
        return
    arrived = [s for s in _drain_arrivals() if s in (signal.SIGINT, signal.SIGTERM)]
    first = arrived[0] if arrived else signum
    _STOPPING[0] = first
    _ignore_further_signals()
    raise Terminated() if first == signal.SIGTERM else KeyboardInterrupt()


def _absorb(signum, frame) -> None:
    """A signal after the first: nothing (the first one's stop is under way)."""


def _ignore_at_exit() -> None:
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


_IGNORE_AT_EXIT = [False]


def _ignore_further_signals() -> None:
    """Later SIGINT and SIGTERM do nothing. Until exit a Python handler absorbs
    them: signals that arrived together during one long device call are run one
    after the other, and setting SIG_IGN here would make CPython print "Signal 15
    ignored due to race condition" for the ones still pending. At exit (an atexit
    hook, registered after JAX's and so run before its teardown) the OS ignores
    them instead: Python puts its own handlers back to the default action, which
    kills the process, but leaves an ignored signal ignored."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, _absorb)
        signal.signal(signal.SIGTERM, _absorb)
    if not _IGNORE_AT_EXIT[0]:
        atexit.register(_ignore_at_exit)
        _IGNORE_AT_EXIT[0] = True


def handle_sigterm() -> None:
    """SIGTERM raises `Terminated` (a KeyboardInterrupt): every Ctrl-C path applies.
    SIGINT (when Python's own handler is in place) and SIGTERM stop the run once:
    after the first, both are ignored until the process ends (`_STOPPING`)."""
    _STOPPING[0] = None
    try:
        signal.signal(signal.SIGTERM, _on_stop_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _on_stop_signal)
    except ValueError:  # not the main thread (e.g. a test runner's worker)
        return
    _watch_arrivals()


def stopping() -> None:
    """A stop is under way (also one not raised by our handler, e.g. a
    KeyboardInterrupt from elsewhere): later signals are ignored."""
    if _STOPPING[0] is None:
        _STOPPING[0] = signal.SIGINT
    _ignore_further_signals()


def _holds_results(workdir: str | None) -> bool:
    """Whether `workdir` holds anything but the run's lock (`runs.lock`); False when
    it cannot be listed (a store that is gone)."""
    if not workdir:
        return False
    try:
        return any(name != ".lock" for name in storage.listdir(workdir))
    except (OSError, storage.StorageError):
        return False


def interruption(stop: KeyboardInterrupt) -> tuple[str, int]:
    """(what stopped the run, its exit status) of Ctrl-C or SIGTERM (`Terminated`):
    ("interrupted", 130) or ("terminated (SIGTERM)", 143)."""
    if isinstance(stop, Terminated):
        return "terminated (SIGTERM)", EXIT_TERMINATED
    return "interrupted", EXIT_INTERRUPTED


def stop_message(error: BaseException, workdir: str | None) -> tuple[str, int] | None:
    """(one line, exit status) of a run stopped by `error`; None for other errors.

    What stops a run without a fault of its own: Ctrl-C, SIGTERM, --max_minutes,
    and a write that fails (disk full, quota, read-only filesystem, permission
    lost). The finished results are on disk (each written atomically), so the
    same command resumes.
    """
    kept = _holds_results(workdir)
    where = (
        f"the finished results are kept in {workdir}"
        if kept
        else "no result was written yet"
    )
    if isinstance(error, KeyboardInterrupt):
        what, status = interruption(error)
        if not kept:
            return f"{what} before the first result was written", status
        return f"{what}: {where}; run the same command again to resume", status
    if isinstance(error, TimeLimit):
        return (
            f"stopped after --max_minutes: {error}; run the same command again to "
            f"continue (exit {EXIT_TIME_LIMIT}: not finished)",
            EXIT_TIME_LIMIT,
        )
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        target = f" {error.filename}" if error.filename else ""
        return (
            f"could not write{target}: {WRITE_ERRNOS[error.errno]}; {where}; make "
            "room or fix the permissions, then run the same command again to resume",
            EXIT_WRITE_FAILED,
        )
    return None


def exit_when_stopped(error: BaseException, workdir: str | None) -> None:
    """Exit with the one line and status of a run stopped by `error` (Ctrl-C,
    SIGTERM, --max_minutes, a failed write: `stop_message`); return for any other
    error, for the caller to raise."""
    stop = stop_message(error, workdir)
    if stop is None:
        return
    stopping()
    say(stop[0])
    sys.exit(stop[1])
