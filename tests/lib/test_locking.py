"""propmaps_jax.locking: one holder at a time, a waiter told, nothing left behind.

The 12-process race over a stale run lock, which takes turns under this lock, is
tests/cli/test_run_trust.py's `test_a_stale_lock_has_one_taker_however_many_race`.
"""

import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from propmaps_jax import locking

HOLD = """
import sys, time
from propmaps_jax import locking
with locking.exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_second_process_waits_and_is_told(kind, tmp_path):
    """Held by another process: `on_wait` is called once, and the lock is had
    only once the holder lets go; a folder is locked without adding a file."""
    path = str(tmp_path / "cache.lock") if kind == "file" else str(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, path, "1.0"],
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        held_since, waits = time.monotonic(), []
        with locking.exclusive(path, on_wait=lambda: waits.append(1)):
            assert time.monotonic() - held_since > 0.8  # after the holder's 1 s
    finally:
        holder.kill()
        holder.wait()
    assert len(waits) == 1
    with locking.exclusive(path, on_wait=lambda: waits.append(0)):
        pass  # free: no wait
    assert len(waits) == 1
    expected = ["cache.lock"] if kind == "file" else []
    assert os.listdir(tmp_path) == expected


def test_no_flock_is_lock_unavailable(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    with pytest.raises(locking.LockUnavailable), locking.exclusive(str(tmp_path)):
        pass
