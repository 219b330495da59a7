"""--workdir=gs://...: the experiments run, resume and refuse as on a local disk.

Against fake-gcs-server on 127.0.0.1 (conftest's `gcs_emulator`/`gcs_bucket`,
reached through STORAGE_EMULATOR_HOST), skipped where it is not installed. The
experiments run in this process with a tiny LeNet (conftest's `launch`); real
processes only where the process is the point: a first start against a missing
bucket. The two-process run on gs:// (process 0 alone touches it) is in
tests/lib/test_attack_distributed.py, on the processes that check its results.
"""

import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import launch
from test_run_trust import (  # noqa: F401 (fixtures used below)
    as_launched,
    reference,
    setup,
)

from experiments.runs import attack_run, lock, storage
from propmaps_jax.attack import AttackConfig
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import checkpoint
from propmaps_jax.results.attack_csv import read_attack_csv
from tests import _gcs_emulator
from tests._fixtures import stop_after_chunks


@pytest.fixture(scope="module")
def tiny(setup):  # noqa: F811 (test_run_trust's fixture)
    """test_run_trust's tiny LeNet and 12-image fake CIFAR-10 (two labels changed:
    not attacked): (folder, attack kwargs, the .npz for launches)."""
    folder, kwargs, (*_, npz) = setup
    return folder, kwargs, npz


@pytest.fixture(scope="module")
def local_csv(reference):  # noqa: F811
    """attack.csv of an uninterrupted run on the local disk (test_run_trust's)."""
    return reference[1]


@pytest.fixture
def parsed_flags():
    """The absl flags as a launched experiment sees them, restored after."""
    from absl import flags
    from absl.testing import flagsaver

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield flags.FLAGS


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

    restore = stop_after_chunks(monkeypatch, 1, interrupt)
    status = as_launched(
        workdir, lambda: attack_run.run_attack(workdir, **kwargs), parsed_flags
    )
    restore()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 130, last
    assert last == (
        f"interrupted: the finished results are kept in {workdir}; run the same "
        "command again to resume"
    )
    assert chunk_names(workdir) == ["chunk_0000000_0000004.json"]
    assert not storage.exists(storage.join(workdir, lock.LOCK_NAME))
    assert not storage.exists(storage.join(workdir, "attack.csv"))

    summary = attack_run.run_attack(workdir, **kwargs).summary
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
    attack_chunks = attack_run._attack_chunks
    monkeypatch.setattr(
        attack_run, "_attack_chunks", lambda *a, **k: pytest.fail("attacked")
    )
    assert (
        attack_run.run_attack(workdir, **kwargs).summary["successes"]
        == (summary["successes"])
    )
    monkeypatch.setattr(attack_run, "_attack_chunks", attack_chunks)
    other = dict(kwargs, config=AttackConfig(pixels=1, population=9, generations=3))
    with pytest.raises(PropmapsError, match="already holds an attack with other"):
        attack_run.run_attack(workdir, **other)


def test_lock_on_gcs_refuses_a_second_writer(tiny, gcs_bucket, capsys):
    """A live run's lock (here: another host's) refuses a second run, which writes
    nothing; a stale lock of this host (a pid that is gone) is taken over."""
    _, kwargs, _ = tiny
    workdir = storage.join(gcs_bucket, "busy")
    lock_path = storage.join(workdir, lock.LOCK_NAME)
    record = {"pid": 1, "host": "elsewhere", "since": "then", "command": "x"}
    assert storage.create_if_absent(lock_path, json.dumps(record).encode())
    with pytest.raises(PropmapsError) as error:
        attack_run.run_attack(workdir, **kwargs)
    message = str(error.value)
    assert "in use by another run: pid 1 on host elsewhere" in message
    assert "\n" not in message
    assert storage.listdir(workdir) == [lock.LOCK_NAME]
    assert json.loads(storage.read_text(lock_path)) == record  # not ours, kept

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    storage.write_text(
        lock_path, json.dumps({**record, "pid": gone.pid, "host": _host()})
    )
    with lock.hold(workdir):
        assert json.loads(storage.read_text(lock_path))["pid"] == os.getpid()
        # Held: a second creator (another process, another host) is refused.
        assert not lock.create_exclusive(lock_path, b"{}")
    assert "taking over the lock of a run that is gone" in capsys.readouterr().err
    assert not storage.exists(lock_path)


def _host():
    return socket.gethostname()


@pytest.mark.e2e  # a real launch.py process: its first start against the store
def test_missing_bucket_is_one_line_exit_2(tiny, gcs_bucket):
    """Through launch.py: a bucket that does not exist gives one line and exit 2,
    before any work."""
    _, kwargs, npz = tiny
    proc = launch(
        "--experiment=attack",
        "--model=lenet_tiny",
        f"--weights={kwargs['weights']}",
        f"--cifar10_path={npz}",
        "--workdir=gs://no-such-bucket/run",
        env=ALONE,
        subprocess=True,
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
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def pipe_file(self, *args, **kwargs):
            raise Refused()

    def refusing(path):
        fs, where = real(path)
        return Refusing(fs), where

    monkeypatch.setattr(storage, "_filesystem", refusing)
    with pytest.raises(PropmapsError) as error:
        attack_run.run_attack(storage.join(gcs_bucket, "run"), **kwargs)
    message = str(error.value)
    assert message.startswith(f"no permission to write {gcs_bucket}/run/.write-probe")
    assert "gcloud auth application-default login" in message
    assert "\n" not in message


def test_store_gone_mid_run_is_one_line_and_a_rerun_resumes(
    tiny, local_csv, gcs_emulator, tmp_path, monkeypatch
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
        restore = stop_after_chunks(monkeypatch, 1, store.stop)
        with pytest.raises(storage.StorageError) as error:
            attack_run.run_attack(workdir, **kwargs)
        message = str(error.value)
        assert message.startswith(f"cannot reach the emulator at {store.url}"), message
        assert "run the same command again to resume" in message
        assert "\n" not in message
        restore()
        store.start()  # the same port and folder: the objects are back
        assert chunk_names(workdir) == ["chunk_0000000_0000004.json"]
        # The failed run could not delete its lock (the store was gone). A rerun
        # is a new process, and this one's pid is then gone: as the lock of a
        # process that no longer runs, it is taken over.
        lock_path = storage.join(workdir, lock.LOCK_NAME)
        record = json.loads(storage.read_text(lock_path))
        assert record["pid"] == os.getpid()
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        storage.write_text(lock_path, json.dumps({**record, "pid": gone.pid}))
        attack_run.run_attack(workdir, **kwargs)
        assert storage.read_text(storage.join(workdir, "attack.csv")) == local_csv
    finally:
        store.stop()


# A launched run does not see the user's CIFAR-10 (it compiles as this process
# does: conftest's XLA_FLAGS, carried by the environment).
ALONE = {"CIFAR10_PATH": None}


def ran(*args: str):
    """launch.py in this process, as a process of its own would run it (no
    $CIFAR10_PATH), checked to exit 0: what it did (conftest.Launched)."""
    done = launch(*args, env=ALONE)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_locality_and_propagation_on_gcs_write_what_a_local_disk_gets(
    tiny, gcs_bucket, tmp_path
):
    """launch.py --experiment=locality on gs:// and on a local disk (in this
    process): the same files, the tables and attack.csv byte for byte; then
    propagation reads that attack.csv from gs:// and writes its figures there;
    statistics and salience write the same tables and figures on both."""
    _, kwargs, npz = tiny
    common_args = [
        "--experiment=locality",
        "--models=lenet_tiny",
        f"--weights_lenet_tiny={kwargs['weights']}",
        f"--cifar10_path={npz}",
        "--num_samples=10",
        "--population=8",
        "--generations=3",
        "--vulnerability_maps=1",
        "--max_distance=2",
        "--batch_size=512",
    ]
    remote = storage.join(gcs_bucket, "locality")
    local = str(tmp_path / "locality")
    out_remote, out_local = (
        ran(*common_args, f"--workdir={w}").stdout for w in (remote, local)
    )
    # The same output, but for the workdir its last line names.
    assert "# Table 1" in out_remote
    assert out_remote.replace(remote, "DIR") == out_local.replace(local, "DIR")
    local_files = sorted(
        os.path.relpath(os.path.join(d, f), local)
        for d, _, files in os.walk(local)
        for f in files
    )
    remote_files = sorted(
        p[len(remote) + 1 :] for p in storage.glob(remote + "/**") if storage.isfile(p)
    )
    assert remote_files == local_files
    assert ".lock" not in remote_files and "table1.md" in remote_files
    assert any(f.startswith("vulnerability_map_lenet_tiny_") for f in remote_files)
    for name in (
        "table1.md",
        "table1.csv",
        "controls.csv",
        "lenet_tiny/attack.csv",
        "lenet_tiny/locality.csv",
        "lenet_tiny/controls.csv",
    ):
        with open(os.path.join(local, name), "rb") as f:
            assert storage.read_bytes(storage.join(remote, name)) == f.read(), name
    png = storage.read_bytes(storage.join(remote, "locality_vs_distance.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    table = read_attack_csv(storage.join(remote, "lenet_tiny", "attack.csv"))
    index = int(table["index"][table["success"]][0])
    out = ran(
        "--experiment=propagation",
        "--model=lenet_tiny",
        f"--weights={kwargs['weights']}",
        f"--cifar10_path={npz}",
        f"--workdir={remote}/lenet_tiny",
        f"--index={index}",
    ).stdout
    for name in (f"{index}_pm_max.png", f"{index}_pm_avg.png", f"{index}_maps.npz"):
        path = storage.join(remote, "lenet_tiny", "propagation", name)
        assert storage.isfile(path), (path, out)

    # statistics, then salience, read that run on gs:// and on the local disk:
    # the same tables.
    for experiment, extra in (
        ("statistics", ["--model=lenet_tiny", f"--weights={kwargs['weights']}"]),
        ("salience", ["--bootstrap=100", "--examples=0"]),
    ):
        for where in (remote, local):
            ran(
                f"--experiment={experiment}",
                f"--cifar10_path={npz}",
                f"--workdir={where}/lenet_tiny",
                "--batch_size=8",
                *extra,
            )
    for name in (
        "statistics/distance_from_centre.png",
        "statistics/mean_maps.npz",
        "salience/per_image.csv",
        "salience/table.csv",
        "salience/table.md",
        "salience/roc.png",
    ):
        with open(os.path.join(local, "lenet_tiny", name), "rb") as f:
            got = storage.read_bytes(storage.join(remote, "lenet_tiny", name))
            assert got == f.read(), name


def test_train_stopped_and_resumed_on_gcs_then_evaluate(gcs_bucket, tmp_path):
    """train on gs://: stopped by --max_minutes after the first epoch's checkpoint
    (exit 75, the checkpoint on gs://), the same command resumes from it and continues
    to the end (model.msgpack, train.json with 2 epochs); evaluate writes its
    evaluation.json and predictions.npz to gs://."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 16)
    npz = str(tmp_path / "tiny.npz")
    np.savez(npz, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    workdir = storage.join(gcs_bucket, "train")
    train = [
        "--experiment=train",
        "--model=lenet_tiny",
        f"--cifar10_path={npz}",
        "--epochs=2",
        "--batch_size=4",
        f"--workdir={workdir}",
    ]
    stopped = launch(*train, "--max_minutes=0.0001", env=ALONE)
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert (
        stopped.stderr.strip()
        .splitlines()[-1]
        .startswith("stopped after --max_minutes: epoch 1 of 2 is saved")
    )
    assert storage.listdir(workdir) == ["checkpoint.msgpack"]
    done = ran(*train)
    assert (
        f"resuming from {workdir}/checkpoint.msgpack at step 4/8 (epoch 1)"
        in done.stderr
    )
    record = json.loads(storage.read_text(storage.join(workdir, "train.json")))
    assert len(record["history"]) == 2
    model = str(tmp_path / "model.msgpack")
    with open(model, "wb") as f:
        f.write(storage.read_bytes(storage.join(workdir, "model.msgpack")))
    assert checkpoint.read_checkpoint(model)["config"].name == "lenet_tiny"
    evaluation = storage.join(gcs_bucket, "evaluate")
    ran(
        "--experiment=evaluate",
        "--model=lenet_tiny",
        f"--weights={model}",
        f"--cifar10_path={npz}",
        "--save_predictions",
        f"--workdir={evaluation}",
    )
    result = json.loads(storage.read_text(storage.join(evaluation, "evaluation.json")))
    assert result["total"] == 8
    assert storage.listdir(evaluation) == ["evaluation.json", "predictions.npz"]
