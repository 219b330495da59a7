"""experiments.runs.storage: the same file operations on a local disk and on gs://.

The gs:// cases run against fake-gcs-server on 127.0.0.1 (conftest's
`gcs_bucket`), skipped with the reason where it is not installed.
"""

import os
import socket
import sys
import threading
import types

import pytest

from experiments.runs import storage
from experiments.runs.storage import StorageError


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    """A fresh folder: on the local disk, or on the emulator (gs://bucket/run)."""
    if request.param == "local":
        return str(tmp_path / "run")
    return storage.join(request.getfixturevalue("gcs_bucket"), "run")


def test_paths():
    assert storage.is_url("gs://bucket/run") and storage.scheme("GS://b/k") == "gs"
    assert not storage.is_url("/tmp/run") and not storage.is_url("runs/a")
    assert not storage.is_url("file:///tmp/run")  # a local path
    assert storage.join("gs://b/run", "lenet", "attack.csv") == (
        "gs://b/run/lenet/attack.csv"
    )
    assert storage.join("/tmp/run", "attack.csv") == "/tmp/run/attack.csv"
    assert storage.normalize("gs://b/run/") == "gs://b/run"
    assert storage.normalize("file:///tmp/run") == "/tmp/run"
    assert storage.normalize("runs/a") == os.path.abspath("runs/a")


def test_write_read_overwrite(root):
    path = storage.join(root, "lenet", "attack_summary.json")
    assert not storage.exists(path)
    storage.makedirs(root)
    storage.write_text(path, '{"done": 1}')
    assert storage.exists(path)
    assert storage.read_text(path) == '{"done": 1}'
    data = bytes(range(256)) * 1000  # binary and not tiny
    storage.write_bytes(path, data)
    assert storage.read_bytes(path) == data


def test_missing_file_is_file_not_found(root):
    storage.makedirs(root)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nothing.csv"))
    storage.remove(storage.join(root, "nothing.csv"))  # missing is fine by default
    with pytest.raises(FileNotFoundError):
        storage.remove(storage.join(root, "nothing.csv"), missing_ok=False)


def test_list_glob_remove(root):
    assert storage.listdir(root) == [] and storage.glob(root + "/*") == []
    for name in ("chunk_00001.csv", "chunk_00000.csv", "settings.json", "sub/x"):
        storage.write_text(storage.join(root, name), name)
    assert storage.listdir(root) == [
        "chunk_00000.csv",
        "chunk_00001.csv",
        "settings.json",
        "sub",
    ]
    chunks = [storage.join(root, f"chunk_{i:05d}.csv") for i in range(2)]
    assert storage.glob(storage.join(root, "chunk_*.csv")) == chunks
    storage.remove(chunks[0])
    assert not storage.exists(chunks[0]) and storage.exists(chunks[1])
    assert storage.glob(storage.join(root, "chunk_*.csv")) == chunks[1:]
    assert storage.listdir(storage.join(root, "sub")) == ["x"]


def test_create_if_absent_refuses_the_second_creator(root):
    lock = storage.join(root, "lock")
    assert storage.create_if_absent(lock, b"host 0")
    assert not storage.create_if_absent(lock, b"host 1")
    assert storage.read_bytes(lock) == b"host 0"
    storage.remove(lock)
    assert storage.create_if_absent(lock, b"host 1")  # free again once removed


def test_create_if_absent_race_has_one_winner(root):
    lock = storage.join(root, "lock")
    storage.makedirs(root)
    barrier = threading.Barrier(6)
    won = {}

    def contend(i):
        barrier.wait()
        won[i] = storage.create_if_absent(lock, f"owner {i}".encode() * 1000)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, w in won.items() if w]
    assert len(won) == 6 and len(winners) == 1
    assert storage.read_bytes(lock) == f"owner {winners[0]}".encode() * 1000


def test_local_write_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "attack.csv")
    storage.write_text(path, "old")

    def killed(src, dst):
        raise KeyboardInterrupt  # as if the process died before the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        storage.write_text(path, "new and longer")
    assert storage.read_text(path) == "old"
    assert os.listdir(tmp_path) == ["attack.csv"]  # no temporary file left


def test_gcs_upload_cut_off_creates_nothing(gcs_bucket, gcs_emulator):
    """A single-request upload whose body stops half way never becomes the object.

    This is the property `write_bytes` relies on for gs:// (no temp + rename): we
    send the multipart upload gcsfs would send, but close the connection after
    half of the declared body, as a killed writer would.
    """
    path = storage.join(gcs_bucket, "run", "chunk_00000.csv")
    storage.write_text(path, "old")
    bucket, key = gcs_bucket[len("gs://") :], "run/chunk_00000.csv"
    body = (
        b"--b\r\nContent-Type: application/json\r\n\r\n"
        + f'{{"name": "{key}"}}'.encode()
        + b"\r\n--b\r\nContent-Type: text/csv\r\n\r\n"
        + b"new," * 50_000
        + b"\r\n--b--\r\n"
    )
    head = (
        f"POST /upload/storage/v1/b/{bucket}/o?uploadType=multipart HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{gcs_emulator.port}\r\n"
        "Content-Type: multipart/related; boundary=b\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gcs_emulator.port), timeout=5) as s:
        s.sendall(head + body[: len(body) // 2])
    assert storage.read_text(path) == "old"
    assert storage.listdir(storage.join(gcs_bucket, "run")) == ["chunk_00000.csv"]


def test_missing_bucket_is_one_line(gcs_bucket):
    path = "gs://no-such-bucket/run/attack.csv"
    calls = {
        "makedirs": lambda: storage.makedirs("gs://no-such-bucket/run"),
        "exists": lambda: storage.exists(path),
        "read": lambda: storage.read_bytes(path),
        "write": lambda: storage.write_bytes(path, b"x"),
        "create": lambda: storage.create_if_absent(path, b"x"),
        "listdir": lambda: storage.listdir("gs://no-such-bucket/run"),
        "glob": lambda: storage.glob("gs://no-such-bucket/run/*.csv"),
        "remove": lambda: storage.remove(path),
    }
    for name, call in calls.items():
        with pytest.raises(StorageError) as error:
            call()
        message = str(error.value)
        assert "the bucket gs://no-such-bucket does not exist" in message, name
        assert "gcloud storage buckets create gs://no-such-bucket" in message, name
        assert "\n" not in message, name


def test_emulator_gone_is_one_line(gcs_emulator, monkeypatch):
    import gcsfs.retry

    from tests import _gcs_emulator

    # A second emulator, stopped mid-run as a network outage would.
    gone = _gcs_emulator.Emulator(gcs_emulator.executable).start()
    for name, value in _gcs_emulator.environment(gone.url).items():
        monkeypatch.setenv(name, value)
    gone.create_bucket("outage")
    storage.write_text("gs://outage/run/chunk_00000.csv", "done")
    gone.stop()
    # gcsfs retries six times with back-off (about 30 s); keep the retries, skip
    # the waiting.
    waits = []

    async def no_wait(seconds):
        waits.append(seconds)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_wait))
    for call in (
        lambda: storage.write_text("gs://outage/run/chunk_00001.csv", "x"),
        lambda: storage.read_text("gs://outage/run/chunk_00000.csv"),
        lambda: storage.exists("gs://outage/run/chunk_00000.csv"),
    ):
        with pytest.raises(StorageError) as error:
            call()
        message = str(error.value)
        assert message.startswith(f"cannot reach the emulator at {gone.url}"), message
        assert "run the same command again to resume" in message
        assert "\n" not in message
    assert len(waits) >= 5  # the retries did happen


def test_unsupported_scheme_and_missing_gcsfs(monkeypatch):
    with pytest.raises(StorageError, match=r"scheme s3:// is not supported"):
        storage.write_bytes("s3://bucket/run/x", b"x")
    with pytest.raises(StorageError, match=r"gs:///run names no bucket"):
        storage.exists("gs:///run")
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import fails
    monkeypatch.setitem(sys.modules, "gcsfs.core", None)
    with pytest.raises(StorageError, match=r"needs gcsfs .* pip install gcsfs"):
        storage.exists("gs://bucket/run/x")
