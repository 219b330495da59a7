"""CIFAR-10 downloaded on first use, against a local HTTP server on 127.0.0.1.

The server (http.server in a thread, ephemeral port) serves a small archive built
here in the official layout (cifar-10-batches-py/ with pickled batches of a few
images each), and misbehaves on request: a corrupt body, fewer bytes than its
Content-Length, a connection reset mid-way, no answer at all.
"""

import hashlib
import http.server
import io
import json
import os
import pickle
import re
import socket
import ssl
import struct
import tarfile
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import launch

from experiments import common
from propmaps_jax import data
from propmaps_jax.errors import DataError
from tests._fixtures import assert_dataset_equal

PER_BATCH = 2  # images per training batch; the test batch has 3
ARCHIVE = "/" + data.ARCHIVE_NAME


def _splits(seed: int):
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (5 * PER_BATCH, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    y_train = (np.arange(5 * PER_BATCH) * 3 + seed) % 10
    y_test = (np.arange(3) + seed) % 10
    return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


def _batch(images: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    """A batch as the official files hold it: a Python 2 pickle (protocol 2) of a
    dict with bytes keys, rows of 1024 R, 1024 G, 1024 B values."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {
        b"batch_label": name.encode(),
        b"labels": [int(v) for v in labels],
        b"data": np.ascontiguousarray(rows),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    return pickle.dumps(batch, protocol=2)


def _archive(splits, members=None) -> bytes:
    """cifar-10-python.tar.gz's bytes: cifar-10-batches-py/ with the 6 batches,
    batches.meta and readme.html (or only `members` of them)."""
    x_train, y_train, x_test, y_test = splits
    files = {}
    for i in range(5):
        part = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        name = f"data_batch_{i + 1}"
        files[name] = _batch(x_train[part], y_train[part], name)
    files["test_batch"] = _batch(x_test, y_test, "testing batch 1 of 1")
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer")]
    files["batches.meta"] = pickle.dumps({b"label_names": names}, protocol=2)
    files["readme.html"] = b"<html>CIFAR-10, for tests</html>"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(data.BATCHES_DIR)
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, content in files.items():
            if members is not None and name not in members:
                continue
            info = tarfile.TarInfo(f"{data.BATCHES_DIR}/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _md5(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


class Server:
    """Serves `payload` at /cifar-10-python.tar.gz in the way `mode` says."""

    def __init__(self, payload: bytes):
        self.payload, self.mode, self.requests = payload, "good", 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                body, mode = server.payload, server.mode
                if self.path != ARCHIVE or mode == "missing":
                    self.send_error(404)
                    return
                if mode == "corrupt":  # same length, one byte changed
                    middle = len(body) // 2
                    body = (
                        body[:middle] + bytes([body[middle] ^ 1]) + body[middle + 1 :]
                    )
                self.send_response(200)
                if mode != "no_length":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "good" or mode == "corrupt":
                    self.wfile.write(body)
                elif mode in ("truncated", "no_length"):  # then a clean close
                    self.wfile.write(body[: len(body) // 2])
                elif mode == "reset":  # close mid-way with a TCP reset
                    self.wfile.write(body[: len(body) // 2])
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda *args: None  # the reset case's noise
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{ARCHIVE}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), daemon=True
        )
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: the connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{ARCHIVE}"


@pytest.fixture(scope="module")
def good():
    """(splits, archive bytes) of a small dataset in the official layout."""
    splits = _splits(7)
    return splits, _archive(splits)


@pytest.fixture
def server(good):
    srv = Server(good[1])
    yield srv
    srv.close()


@pytest.fixture
def env(tmp_path, monkeypatch, server, good):
    """No configured source; the cache in tmp_path; the local server as mirror,
    with its archive's MD5. Returns the cache folder."""
    cache = tmp_path / "cache"
    for name in ("CIFAR10_PATH", data.URL_ENV, data.MD5_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(cache))
    monkeypatch.setenv(data.URL_ENV, server.url)
    monkeypatch.setenv(data.MD5_ENV, _md5(good[1]))
    monkeypatch.setattr(data.download, "DOWNLOAD_CHUNK_BYTES", 4096)  # several reads
    return cache


def _assert_nothing_kept(cache) -> None:
    """No dataset, archive or temporary file: only the (empty) lock file."""
    left = sorted(os.listdir(cache)) if os.path.isdir(cache) else []
    assert left in ([], [".cifar10.lock"]), left


def test_good_archive_downloads_verifies_extracts_then_uses_the_cache(
    env, server, good, capsys, monkeypatch
):
    dataset = data.load_cifar10(common.cifar10_path(None))
    assert_dataset_equal(dataset, good[0])
    folder = str(env / data.BATCHES_DIR)
    assert dataset.source == folder and os.path.isabs(dataset.source)
    # The extracted folder only: the archive and every temporary file are gone.
    assert sorted(os.listdir(env)) == [".cifar10.lock", data.BATCHES_DIR]
    assert sorted(os.listdir(folder)) == sorted(
        [
            *data.TRAIN_FILES,
            data.TEST_FILE,
            "batches.meta",
            "readme.html",
            data.download.SHA256_RECORD,
        ]
    )
    # The record holds the SHA-256 of each batch as extracted, as sha256sum writes.
    with tarfile.open(fileobj=io.BytesIO(good[1]), mode="r:gz") as tar:
        names = (*data.TRAIN_FILES, data.TEST_FILE)
        raw = [tar.extractfile(f"{data.BATCHES_DIR}/{name}").read() for name in names]
    expected = "".join(
        f"{hashlib.sha256(content).hexdigest()}  {name}\n"
        for name, content in zip(names, raw, strict=True)
    )
    with open(os.path.join(folder, data.download.SHA256_RECORD)) as f:
        assert f.read() == expected
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    err = capsys.readouterr().err
    size = len(good[1]) / 1024
    assert f"downloading CIFAR-10 (once) from {server.url}, {size:.1f} KiB" in err
    assert f"into {env}" in err
    assert f"CIFAR-10: {size:.1f}/{size:.1f} KiB (100%), " in err and "/s" in err
    assert f"MD5 {_md5(good[1])} verified" in err
    assert server.requests == 1

    # Second call: the cache, with no network at all.
    server.close()
    monkeypatch.setenv(data.URL_ENV, _refused_url())
    again = data.load_cifar10(None)
    assert_dataset_equal(again, good[0])
    assert again.source == folder
    assert capsys.readouterr().err == ""


def test_progress_is_rewritten_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = data.download._DownloadProgress(3 * 2**20, stream)
    progress.last -= 1.0  # due for an update
    progress.update(2**20)
    progress.update(3 * 2**20, final=True)
    first, last = stream.getvalue().split("\r")[1:]
    assert first.startswith("CIFAR-10: 1.0/3.0 MiB (33%), ") and "ETA" in first
    assert "\n" not in first and last.startswith("CIFAR-10: 3.0/3.0 MiB (100%), ")
    assert last.endswith(", in 0:00:00\n") and "ETA" not in last


@pytest.mark.parametrize(
    "mode, message",
    [
        ("corrupt", r"has MD5 [0-9a-f]{32}, not the expected [0-9a-f]{32}: it is "),
        ("truncated", r"is truncated: \d+ of \d+ bytes; nothing was kept"),
        ("reset", r"(is truncated|broke off after \d+ of \d+ bytes)"),
        ("no_length", r"has MD5 [0-9a-f]{32}, not the expected"),
        ("missing", r"from .*: HTTP 404 Not Found; check PROPMAPS_CIFAR10_URL, or"),
    ],
)
def test_bad_download_is_one_error_keeps_nothing_and_a_rerun_succeeds(
    env, server, good, mode, message
):
    server.mode = mode
    with pytest.raises(DataError, match=message) as error:
        data.load_cifar10(None)
    text = str(error.value)
    assert "\n" not in text and server.url in text
    assert ", or pass `path`: a local copy of cifar-10-batches-py/" in text
    assert ("run again" in text) == (mode != "missing")
    assert (data.MD5_ENV in text) is False  # the mirror's own MD5 was given
    if mode != "missing":
        assert "nothing was kept" in text
    if mode == "truncated":
        assert f"{len(good[1]) // 2} of {len(good[1])} bytes" in text
    _assert_nothing_kept(env)
    # In the experiments' words: the flag and the environment variable.
    assert "--cifar10_path (or set CIFAR10_PATH)" in common.in_flag_terms(text)

    server.mode = "good"
    assert_dataset_equal(data.load_cifar10(None), good[0])


def test_interrupted_by_the_user_keeps_nothing(env, good, monkeypatch):
    def interrupt(self, done, final=False):
        if done >= 8192:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(data.download._DownloadProgress, "update", interrupt)
        with pytest.raises(KeyboardInterrupt):
            data.fetch_cifar10()
    _assert_nothing_kept(env)
    assert_dataset_equal(data.load_cifar10(None), good[0])


def test_leftovers_of_a_killed_download_never_look_complete(env, good):
    env.mkdir()
    part = env / f".{data.ARCHIVE_NAME}.x1y2.part"
    part.write_bytes(good[1][:1000])
    staging = env / f".{data.BATCHES_DIR}.abc"
    staging.mkdir()
    (staging / "test_batch").write_bytes(b"half")
    folder = data.fetch_cifar10()
    # Removed under the lock; a stranger's file in the cache is left alone.
    assert sorted(os.listdir(env)) == [".cifar10.lock", data.BATCHES_DIR]
    assert_dataset_equal(data.load_from_path(folder), good[0])


def test_official_checksum_guards_a_mirror_without_its_own(env, server, monkeypatch):
    monkeypatch.delenv(data.MD5_ENV)
    with pytest.raises(DataError) as error:
        data.load_cifar10(None)
    text = str(error.value)
    assert f"not the expected {data.CIFAR10_MD5}: it is corrupt or not the " in text
    assert f"(the mirror in {data.URL_ENV})" in text
    assert f"set {data.MD5_ENV} to the mirror's MD5" in text
    _assert_nothing_kept(env)


def test_offline_gives_both_remedies(env, monkeypatch):
    url = _refused_url()
    monkeypatch.setenv(data.URL_ENV, url)
    with pytest.raises(DataError) as error:
        data.load_cifar10(None)
    text = common.in_flag_terms(str(error.value))
    assert text == (
        f"cannot download CIFAR-10 from {url} (Connection refused): no network? "
        "Connect to the internet and run again, or pass --cifar10_path (or set "
        "CIFAR10_PATH): a local copy of cifar-10-batches-py/ (or "
        "cifar-10-python.tar.gz)"
    )
    _assert_nothing_kept(env)


@pytest.mark.parametrize(
    "error, cause, remedy",
    [
        (
            urllib.error.URLError(
                socket.gaierror(-3, "Temporary failure in name resolution")
            ),
            "(Temporary failure in name resolution): no network? Connect",
            "Connect to the internet and run again, or pass `path`",
        ),
        (TimeoutError("timed out"), "(timed out): no network?", "run again, or pass"),
        (
            urllib.error.URLError(
                ssl.SSLCertVerificationError(1, "certificate verify failed")
            ),
            "(TLS: certificate verify failed); install this machine's CA",
            f"set {data.URL_ENV} to a mirror, or pass `path`",
        ),
    ],
)
def test_network_failures_name_their_cause(env, monkeypatch, error, cause, remedy):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    with pytest.raises(DataError) as raised:
        data.fetch_cifar10()
    assert cause in str(raised.value) and remedy in str(raised.value)
    _assert_nothing_kept(env)


def test_mirror_on_a_shared_file_system(env, good, monkeypatch, tmp_path):
    mirror = tmp_path / "mirror" / data.ARCHIVE_NAME
    mirror.parent.mkdir()
    mirror.write_bytes(good[1])
    monkeypatch.setenv(data.URL_ENV, mirror.as_uri())
    assert_dataset_equal(data.load_from_path(data.fetch_cifar10()), good[0])
    assert mirror.read_bytes() == good[1]  # the source is untouched


def test_verified_file_that_is_not_a_tar_archive(env, server, monkeypatch):
    server.payload = b"\x1f\x8b" + bytes(range(256)) * 40  # a gzip header, then junk
    monkeypatch.setenv(data.MD5_ENV, _md5(server.payload))
    with pytest.raises(DataError) as error:
        data.fetch_cifar10()
    archive = env / data.ARCHIVE_NAME
    assert str(error.value).startswith(f"{archive} is not a readable tar archive (")
    assert "delete it to download again, or pass `path`" in str(error.value)
    assert sorted(os.listdir(env)) == [".cifar10.lock", data.ARCHIVE_NAME]


def test_archive_without_the_batches_is_named(env, server, monkeypatch):
    bad = _archive(_splits(1), members={"data_batch_1", "batches.meta"})
    server.payload = bad
    monkeypatch.setenv(data.MD5_ENV, _md5(bad))
    with pytest.raises(DataError, match="does not contain the CIFAR-10 batches"):
        data.fetch_cifar10()
    # The verified archive stays (named in the message), no partial dataset.
    assert sorted(os.listdir(env)) == [".cifar10.lock", data.ARCHIVE_NAME]


def test_archive_members_outside_the_batches_folder_are_not_written(
    env, server, good, monkeypatch, tmp_path
):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(good[1]), mode="r:gz") as src:
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for member in src:
                tar.addfile(
                    member, src.extractfile(member) if member.isfile() else None
                )
            for name in ("../escaped", f"{data.BATCHES_DIR}/../../escaped2", "/abs"):
                info = tarfile.TarInfo(name)
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
            link = tarfile.TarInfo(f"{data.BATCHES_DIR}/link")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    server.payload = buffer.getvalue()
    monkeypatch.setenv(data.MD5_ENV, _md5(server.payload))
    folder = data.fetch_cifar10()
    assert "link" not in os.listdir(folder)
    assert not any(p.name.startswith("escaped") for p in tmp_path.rglob("*"))
    assert_dataset_equal(data.load_from_path(folder), good[0])


def test_incomplete_cache_is_refused_not_repaired(env, good):
    folder = data.fetch_cifar10()
    os.remove(os.path.join(folder, "data_batch_2"))
    with pytest.raises(DataError, match=r"cached .* is incomplete \(missing data_b"):
        data.fetch_cifar10()


def test_cache_changed_after_extraction_is_refused(env, good):
    """The cache is checked against the SHA-256 recorded from the verified archive
    at every use: a batch replaced by another valid one, a flipped byte, a missing
    or edited record are each one line, never read."""
    folder = data.fetch_cifar10()
    record = os.path.join(folder, data.download.SHA256_RECORD)
    original = open(record).read()
    batch = os.path.join(folder, data.TEST_FILE)
    x_train, y_train, x_test, y_test = _splits(9)
    with open(batch, "wb") as f:
        f.write(_batch(x_test, y_test, "planted"))
    with pytest.raises(DataError) as raised:
        data.load_cifar10(None)
    message = str(raised.value)
    assert f"{data.TEST_FILE} has SHA-256" in message and "was changed" in message
    assert f"delete {folder} to download again" in message and "\n" not in message

    with open(record, "w") as f:  # the record edited to match: still checked
        f.write(original.replace(original.split()[0], "0" * 64))
    with pytest.raises(DataError, match=r"data_batch_1 has SHA-256 .*, not the 0000"):
        data.fetch_cifar10()
    os.remove(record)
    with pytest.raises(DataError, match=r"has no SHA-256 record of data_batch_1, "):
        data.fetch_cifar10()


@pytest.mark.parametrize(
    "variable, value, message",
    [
        (data.URL_ENV, "www.example.org/c.tar.gz", "is not a URL"),
        (data.MD5_ENV, "c58f30108f", "is not an MD5 (32 hexadecimal digits)"),
    ],
)
def test_bad_mirror_settings(env, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(DataError, match=re.escape(message)):
        data.fetch_cifar10()


def test_cache_folder_that_cannot_be_created(env, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(data.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(DataError) as error:
        data.fetch_cifar10()
    assert str(error.value).startswith(f"cannot create the cache folder {blocker}")
    assert f"set {data.CACHE_ENV} to a writable folder, or pass `path`" in str(
        error.value
    )


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({"PROPMAPS_CACHE": "/c/p", "XDG_CACHE_HOME": "/x"}, "/c/p"),
        ({"XDG_CACHE_HOME": "/x"}, "/x/propmaps_jax"),
        ({"HOME": "/home/u"}, "/home/u/.cache/propmaps_jax"),
    ],
)
def test_cache_dir(monkeypatch, variables, expected):
    for name in ("PROPMAPS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert data.cache_dir() == expected


def _write_folder(root, splits) -> str:
    """The archive's cifar-10-batches-py/ under `root`, written directly."""
    folder = root / data.BATCHES_DIR
    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(_archive(splits)), mode="r:gz") as tar:
        for member in tar:
            if member.isfile():
                name = os.path.basename(member.name)
                (folder / name).write_bytes(tar.extractfile(member).read())
    return str(folder)


def test_precedence_flag_then_environment_then_cache(env, tmp_path, monkeypatch):
    flag_splits, env_splits, cache_splits = _splits(1), _splits(2), _splits(3)
    flag_folder = _write_folder(tmp_path / "flag", flag_splits)
    env_folder = _write_folder(tmp_path / "env", env_splits)
    server_payload = _archive(cache_splits)
    monkeypatch.setenv(data.MD5_ENV, _md5(server_payload))
    mirror = Server(server_payload)
    monkeypatch.setenv(data.URL_ENV, mirror.url)
    try:
        monkeypatch.setenv("CIFAR10_PATH", env_folder)
        assert_dataset_equal(common.load_data(flag_folder, "test"), flag_splits)
        dataset = common.load_data(None, "test")
        assert_dataset_equal(dataset, env_splits)
        assert dataset.source == env_folder
        monkeypatch.setenv("CIFAR10_PATH", "")  # set but empty: not a source
        dataset = common.load_data(None, "test")
        assert_dataset_equal(dataset, cache_splits)
        assert dataset.source == str(env / data.BATCHES_DIR)
        assert mirror.requests == 1
    finally:
        mirror.close()


def test_relative_path_is_recorded_absolute(tmp_path, monkeypatch):
    _write_folder(tmp_path, _splits(4))
    monkeypatch.chdir(tmp_path)
    dataset = data.load_cifar10(data.BATCHES_DIR)
    assert dataset.source == str(tmp_path / data.BATCHES_DIR)


def test_launch_downloads_on_first_use_and_says_offline_in_one_line(
    env, server, good, tmp_path
):
    args = ("--experiment=evaluate", "--model=lenet", "--batch_size=3")

    offline = launch(
        *args,
        f"--workdir={tmp_path / 'offline'}",
        env={"CIFAR10_PATH": None, data.URL_ENV: _refused_url()},
    )
    assert offline.returncode == 2
    assert "Traceback" not in offline.stderr
    last = offline.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot download CIFAR-10 from http://127.0.0.1:")
    assert "Connect to the internet and run again, or pass --cifar10_path" in last
    assert not os.path.exists(tmp_path / "offline" / "evaluation.json")

    online = launch(
        *args, f"--workdir={tmp_path / 'online'}", env={"CIFAR10_PATH": None}
    )
    assert online.returncode == 0, online.stderr[-2000:]
    assert "MD5" in online.stderr and "verified" in online.stderr
    report = json.loads((tmp_path / "online" / "evaluation.json").read_text())
    assert report["data"] == str(env / data.BATCHES_DIR) and report["total"] == 3
