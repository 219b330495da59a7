"""--workdir=gs://...: the experiments run, resume and refuse as on a local disk.

Against fake-gcs-server on 127.0.0.1 (conftest's `gcs_emulator`/`gcs_bucket`,
reached through STORAGE_EMULATOR_HOST), skipped where it is not installed. The
attack runs in process with a tiny LeNet; the locality and propagation
experiments, and the two-process run, are launched as a user launches them.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from absl import flags

from experiments import attack as attack_experiment
from experiments import common, runlock, storage
from experiments.results import read_attack_csv
from propmaps_jax import checkpoint, data, models
from propmaps_jax.attack import AttackConfig
from propmaps_jax.errors import PropmapsError
from tests import _gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = AttackConfig(pixels=1, population=8, generations=3)
FLAGS = flags.FLAGS
_ORIGINAL_SAVE_CHUNK = attack_experiment._save_chunk


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LeNet checkpoint and a 12-image fake CIFAR-10 it classifies (two
    labels changed: not attacked), as attack kwargs, plus the .npz for launches."""
    folder = tmp_path_factory.mktemp("gcs")
    module = models.create_model("lenet_tiny")
    variables = models.init_variables(module, jax.random.key(2))
    weights = str(folder / "lenet_tiny.msgpack")
    checkpoint.save_checkpoint(weights, models.ModelConfig("lenet_tiny"), variables)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    y = np.asarray(models.make_logits_fn(module, variables)(x)).argmax(-1)
    y = y.astype(np.int32)
    for i in (1, 6):
        y[i] = (y[i] + 1) % 10
    npz = str(folder / "tiny.npz")
    np.savez(npz, x_train=x[:1], y_train=y[:1], x_test=x, y_test=y)
    kwargs = dict(
        model_name="lenet_tiny",
        weights=weights,
        dataset=data.Cifar10(x[:0], y[:0], x, y, source="fake"),
        num_samples=10,
        seed=0,
        sample="first",
        config=CONFIG,
        slots=3,
        chunk_size=4,
    )
    return folder, kwargs, npz


@pytest.fixture(scope="module")
def local_csv(tiny):
    """attack.csv of an uninterrupted run on the local disk."""
    folder, kwargs, _ = tiny
    workdir = str(folder / "local")
    attack_experiment.run_attack(workdir, **kwargs)
    return open(os.path.join(workdir, "attack.csv")).read()


@pytest.fixture
def parsed_flags():
    from absl.testing import flagsaver

    if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield FLAGS


def as_launched(workdir, run, parsed):
    """(exit status) of `run()` called as a launched experiment's main."""
    parsed.workdir = workdir
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            common.resumable()(lambda argv: run())([])
    finally:
        signal.signal(signal.SIGTERM, old)
    return stop.value.code


def stop_after_chunks(monkeypatch, chunks, stop):
    """Call `stop()` right after the attack saved its `chunks`-th chunk."""
    save_chunk = attack_experiment._save_chunk
    saved = []

    def save_then_stop(*args):
        save_chunk(*args)
        saved.append(args)
        if len(saved) == chunks:
            stop()

    monkeypatch.setattr(attack_experiment, "_save_chunk", save_then_stop)


def chunk_names(workdir):
    return [
        os.path.basename(p)
        for p in storage.glob(storage.join(workdir, ".attack_chunks", "chunk_*.json"))
    ]


def test_attack_interrupted_and_resumed_on_gcs_equals_local(
    tiny, local_csv, gcs_bucket, monkeypatch, parsed_flags, capsys
):
    """Ctrl-C after the first chunk: exit 130, one line; the chunk is on gs://
    and the lock is gone; the same call resumes and attack.csv is byte for byte
    the local disk's; a finished run is reused; other settings are refused."""
    _, kwargs, _ = tiny
    workdir = storage.join(gcs_bucket, "runs", "attack")

    def interrupt():
        raise KeyboardInterrupt

    stop_after_chunks(monkeypatch, 1, interrupt)
    status = as_launched(
        workdir, lambda: attack_experiment.run_attack(workdir, **kwargs), parsed_flags
    )
    monkeypatch.setattr(attack_experiment, "_save_chunk", _ORIGINAL_SAVE_CHUNK)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 130, last
    assert last == (
        f"interrupted: the finished results are kept in {workdir}; run the same "
        "command again to resume"
    )
    assert chunk_names(workdir) == ["chunk_0000000_0000004.json"]
    assert not storage.exists(storage.join(workdir, runlock.LOCK_NAME))
    assert not storage.exists(storage.join(workdir, "attack.csv"))

    summary = attack_experiment.run_attack(workdir, **kwargs)
    assert storage.read_text(storage.join(workdir, "attack.csv")) == local_csv
    assert chunk_names(workdir) == [
        "chunk_0000000_0000004.json",
        "chunk_0000004_0000008.json",
        "chunk_0000008_0000010.json",
    ]
    stored = json.loads(storage.read_text(storage.join(workdir, "attack_summary.json")))
    assert stored["attack_csv_sha256"] == summary["attack_csv_sha256"]
    assert sorted(stored["chunks_sha256"]) == chunk_names(workdir)
    # The consumers' reader takes the gs:// file as the local one.
    table = read_attack_csv(storage.join(workdir, "attack.csv"))
    assert int(table["success"].sum()) == summary["successes"]

    # Finished: reused without attacking. (No monkeypatch.undo() in this file:
    # it would also drop STORAGE_EMULATOR_HOST, and gs:// would mean the real one.)
    attack_chunks = attack_experiment._attack_chunks
    monkeypatch.setattr(
        attack_experiment, "_attack_chunks", lambda *a, **k: pytest.fail("attacked")
    )
    assert (
        attack_experiment.run_attack(workdir, **kwargs)["successes"]
        == (summary["successes"])
    )
    monkeypatch.setattr(attack_experiment, "_attack_chunks", attack_chunks)
    other = dict(kwargs, config=AttackConfig(pixels=1, population=9, generations=3))
    with pytest.raises(PropmapsError, match="already holds an attack with other"):
        attack_experiment.run_attack(workdir, **other)


def test_lock_on_gcs_refuses_a_second_writer(tiny, gcs_bucket, capsys):
    """A live run's lock (here: another host's) refuses a second run, which writes
    nothing; a stale lock of this host (a pid that is gone) is taken over."""
    _, kwargs, _ = tiny
    workdir = storage.join(gcs_bucket, "busy")
    lock = storage.join(workdir, runlock.LOCK_NAME)
    record = {"pid": 1, "host": "elsewhere", "since": "then", "command": "x"}
    assert storage.create_if_absent(lock, json.dumps(record).encode())
    with pytest.raises(PropmapsError) as error:
        attack_experiment.run_attack(workdir, **kwargs)
    message = str(error.value)
    assert "in use by another run: pid 1 on host elsewhere" in message
    assert "\n" not in message
    assert storage.listdir(workdir) == [runlock.LOCK_NAME]
    assert json.loads(storage.read_text(lock)) == record  # not ours, kept

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    storage.write_text(lock, json.dumps({**record, "pid": gone.pid, "host": _host()}))
    with runlock.hold(workdir):
        assert json.loads(storage.read_text(lock))["pid"] == os.getpid()
        # Held: a second creator (another process, another host) is refused.
        assert not runlock.create_exclusive(lock, b"{}")
    assert "taking over the lock of a run that is gone" in capsys.readouterr().err
    assert not storage.exists(lock)


def _host():
    return socket.gethostname()


def test_missing_bucket_is_one_line_exit_2(tiny, gcs_bucket):
    """Through launch.py: a bucket that does not exist gives one line and exit 2,
    before any work."""
    _, kwargs, npz = tiny
    base = [
        sys.executable,
        "launch.py",
        "--experiment=attack",
        "--model=lenet_tiny",
        f"--weights={kwargs['weights']}",
        f"--cifar10_path={npz}",
        "--num_samples=4",
        "--population=8",
        "--generations=2",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [*base, "--workdir=gs://no-such-bucket/run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "the bucket gs://no-such-bucket does not exist" in errors[0]
    assert "gcloud storage buckets create" in errors[0]


def test_no_permission_is_one_line(tiny, gcs_bucket, monkeypatch):
    """Credentials the store refuses (HTTP 401/403 from gcsfs): one line naming
    the path and what to do, before any work (the workdir's write probe)."""
    _, kwargs, _ = tiny

    class Refused(Exception):
        code = 401

        def __str__(self):
            return "Anonymous caller does not have storage.objects.create access"

    real = storage._filesystem

    class Refusing:
        def __init__(self, path):
            self.fs = real(path)

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def pipe_file(self, *args, **kwargs):
            raise Refused()

    monkeypatch.setattr(storage, "_filesystem", Refusing)
    with pytest.raises(PropmapsError) as error:
        attack_experiment.run_attack(storage.join(gcs_bucket, "run"), **kwargs)
    message = str(error.value)
    assert message.startswith(f"no permission to write {gcs_bucket}/run/.write-probe")
    assert "gcloud auth application-default login" in message
    assert "\n" not in message


def test_store_gone_mid_run_is_one_line_and_a_rerun_resumes(
    tiny, local_csv, gcs_emulator, tmp_path, monkeypatch, parsed_flags, capsys
):
    """The emulator stops after the first chunk: the next write fails after
    gcsfs's retries with one line (exit 2 through the launcher); started again,
    the same call resumes from the chunk on gs:// and attack.csv equals the
    local disk's."""
    import gcsfs.retry

    _, kwargs, _ = tiny
    store = _gcs_emulator.Emulator(gcs_emulator.executable, root=str(tmp_path / "gcs"))
    store.start()
    try:
        for name, value in _gcs_emulator.environment(store.url).items():
            monkeypatch.setenv(name, value)
        store.create_bucket("outage")
        workdir = "gs://outage/run"

        async def no_wait(seconds):  # keep the retries, skip the back-off
            pass

        monkeypatch.setattr(
            gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_wait)
        )
        stop_after_chunks(monkeypatch, 1, store.stop)
        with pytest.raises(storage.StorageError) as error:
            attack_experiment.run_attack(workdir, **kwargs)
        message = str(error.value)
        assert message.startswith(f"cannot reach the emulator at {store.url}"), message
        assert "run the same command again to resume" in message
        assert "\n" not in message
        monkeypatch.setattr(attack_experiment, "_save_chunk", _ORIGINAL_SAVE_CHUNK)
        store.start()  # the same port and folder: the objects are back
        assert chunk_names(workdir) == ["chunk_0000000_0000004.json"]
        # The failed run could not delete its lock (the store was gone). A rerun
        # is a new process, and this one's pid is then gone: as the lock of a
        # process that no longer runs, it is taken over.
        lock = storage.join(workdir, runlock.LOCK_NAME)
        record = json.loads(storage.read_text(lock))
        assert record["pid"] == os.getpid()
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        storage.write_text(lock, json.dumps({**record, "pid": gone.pid}))
        attack_experiment.run_attack(workdir, **kwargs)
        assert storage.read_text(storage.join(workdir, "attack.csv")) == local_csv
    finally:
        store.stop()
