"""Progress lines of the experiments and the one way they are printed (`say`); their
H:MM:SS is the library's (`propmaps_jax.progress.format_duration`)."""

import contextlib
import os
import sys
import time
from typing import TextIO

from propmaps_jax.progress import format_duration


def say(line: str, stream: TextIO | None = None) -> None:
    """Print one line (default on stderr) and flush; a reader that went away
    (`launch.py ... 2>&1 | head -1`: a closed pipe) never stops the run.

    On a BrokenPipeError the stream's file descriptor is pointed at /dev/null, so
    that later lines, and the flush at exit, go nowhere instead of raising.
    """
    stream = sys.stderr if stream is None else stream
    try:
        print(line, file=stream, flush=True)
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


class Progress:
    """Progress lines: done/total, successes so far, rate, ETA."""

    def __init__(
        self, total: int, what: str = "images", every_s: float = 10.0, initial: int = 0
    ):
        """`initial`: items already done before this run (a resume): not in the rate."""
        self.total, self.what, self.every_s = total, what, every_s
        self.initial = initial
        self.start = time.time()
        self.last = 0.0

    def update(
        self, done: int, successes: int | None = None, force: bool = False
    ) -> None:
        now = time.time()
        if not force and now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (done - self.initial) / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = f"{done}/{self.total} {self.what}"
        if successes is not None:
            line += f", successes: {successes} ({successes / max(done, 1):.1%})"
        elapsed_text, eta_text = format_duration(elapsed), format_duration(eta)
        line += f", {rate:.2f} {self.what}/s, elapsed {elapsed_text}, ETA {eta_text}"
        # One line: under absl, logging.info would print it to stderr a second time.
        say(line)
