"""The train experiment: resume after interruption, fine-tuning from given weights,
divergence, workdir checks (launch.py in process).
"""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
from conftest import ROOT, launch

from experiments.runs import train_run
from propmaps_jax import models, training
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import checkpoint
from propmaps_jax.results import hashing


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 10, n)
        images = rng.normal(0, 30, (n, 32, 32, 3)) + 20 * labels[:, None, None, None]
        return np.clip(images, 0, 255).astype(np.uint8), labels

    x_train, y_train = split(96)
    x_test, y_test = split(40)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def _train(workdir, data, *extra):
    return launch(
        "--experiment=train",
        "--model=resnet_tiny",
        "--epochs=2",
        "--batch_size=32",
        "--eval_batch_size=16",
        f"--cifar10_path={data}",
        f"--workdir={workdir}",
        *extra,
    )


def test_resume_after_interruption_gives_identical_model(tmp_path, tiny_npz):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = _train(straight, tiny_npz)
    assert result.returncode == 0, result.stderr
    result = _train(interrupted, tiny_npz, "--stop_after_epochs=1")
    assert result.returncode == 0, result.stderr
    assert not (interrupted / "model.msgpack").exists()
    assert (interrupted / "checkpoint.msgpack").exists()

    # other settings on the same workdir: a clear one-line error, no traceback
    result = _train(interrupted, tiny_npz, "--learning_rate=0.2")
    assert result.returncode == 2
    assert "--learning_rate=0.1 (now 0.2)" in result.stderr
    assert "Traceback" not in result.stderr

    result = _train(interrupted, tiny_npz)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    a = checkpoint.read_checkpoint(str(straight / "model.msgpack"))
    b = checkpoint.read_checkpoint(str(interrupted / "model.msgpack"))
    leaves_a = jax.tree_util.tree_leaves_with_path(a["variables"])
    leaves_b = jax.tree_util.tree_leaves(b["variables"])
    assert len(leaves_a) == len(leaves_b) > 0
    assert any("batch_stats" in jax.tree_util.keystr(k) for k, _ in leaves_a)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert a["metadata"]["test_accuracy"] == b["metadata"]["test_accuracy"]
    assert b["metadata"]["epochs"] == 2 and b["metadata"]["seed"] == 0
    assert "stop_after_epochs" not in b["metadata"]["command"]
    # the final model loads as --weights, without optimizer state
    config, variables, _ = checkpoint.load_weights(
        "resnet_tiny", str(straight / "model.msgpack")
    )
    assert config.name == "resnet_tiny" and b["train_state"] is None


def test_fine_tuning_starts_from_the_given_weights(tmp_path, tiny_npz):
    """--init_weights: the run starts from those weights (its epoch-0 evaluation is
    theirs), the starting file's content is part of the settings (not its path), and
    resume is bit-identical."""
    base = tmp_path / "base"
    # --epochs=1 with the default 1-epoch warm-up: the warm-up is capped, not refused
    result = _train(base, tiny_npz, "--epochs=1")
    assert result.returncode == 0, result.stderr
    assert "warm-up capped at 1 steps, half of the run's 3" in result.stderr
    init = str(base / "model.msgpack")
    base_accuracy = checkpoint.read_checkpoint(init)["metadata"]["test_accuracy"]

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = _train(straight, tiny_npz, f"--init_weights={init}")
    assert result.returncode == 0, result.stderr
    assert "fine-tuning from" in result.stderr
    meta = checkpoint.read_checkpoint(str(straight / "model.msgpack"))["metadata"]
    history = json.loads((straight / "train.json").read_text())["history"]
    assert history[0]["epoch"] == 0
    assert history[0]["test_accuracy"] == pytest.approx(base_accuracy)
    digest = hashlib.sha256((base / "model.msgpack").read_bytes()).hexdigest()
    assert meta["settings"]["init_weights_sha256"] == digest
    assert meta["init_weights"] == init

    result = _train(
        interrupted,
        tiny_npz,
        f"--init_weights={init}",
        "--stop_after_epochs=1",
    )
    assert result.returncode == 0, result.stderr
    # resuming from other starting weights is refused in one line
    result = _train(interrupted, tiny_npz)
    assert result.returncode == 2
    assert f"--init_weights of SHA-256 {digest[:12]} (now none)" in result.stderr
    assert "Traceback" not in result.stderr
    # the same file under another name (a symlink, by a relative path) resumes
    link = tmp_path / "same-weights.msgpack"
    link.symlink_to(init)
    relative = os.path.relpath(link, ROOT)
    result = _train(interrupted, tiny_npz, f"--init_weights={relative}")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr
    a = checkpoint.read_checkpoint(str(straight / "model.msgpack"))["variables"]
    b = checkpoint.read_checkpoint(str(interrupted / "model.msgpack"))["variables"]
    for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        np.testing.assert_array_equal(x, y)

    # the run trains the starting weights' model: their normalisation is kept
    config, variables, _ = checkpoint.load_weights("resnet_tiny", init)
    custom = models.ModelConfig(
        "resnet_tiny", mean=(100.0, 90.0, 80.0), std=(50.0, 40.0, 30.0)
    )
    renormalised = tmp_path / "renormalised.msgpack"
    checkpoint.save_checkpoint(str(renormalised), custom, variables)
    result = _train(
        tmp_path / "renorm",
        tiny_npz,
        f"--init_weights={renormalised}",
        "--epochs=1",
        "--warmup_epochs=0",
    )
    assert result.returncode == 0, result.stderr
    tuned = checkpoint.read_checkpoint(str(tmp_path / "renorm" / "model.msgpack"))
    assert tuned["config"] == custom
    with np.load(tiny_npz) as split:
        x_test, y_test = split["x_test"], split["y_test"]
    expected = training.eval_step(
        models.create_model(custom), variables, x_test, y_test
    )
    history = json.loads((tmp_path / "renorm" / "train.json").read_text())["history"]
    assert history[0]["test_accuracy"] == pytest.approx(
        float(expected["correct"]) / len(y_test)
    )

    # a missing file or the weights of another model: one line, exit 2
    result = _train(tmp_path / "x", tiny_npz, "--init_weights=nope.h5")
    assert result.returncode == 2 and "--init_weights=nope.h5 does not exist" in (
        result.stderr
    )
    broken = tmp_path / "broken.msgpack"
    broken.write_bytes(b"\x00" * 64)
    result = _train(tmp_path / "z", tiny_npz, f"--init_weights={broken}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "truncated or corrupt" in result.stderr
    assert "--init_weights" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "z" / "checkpoint.msgpack").exists()
    lenet = tmp_path / "lenet.msgpack"
    module = models.create_model("lenet_tiny")
    checkpoint.save_checkpoint(
        str(lenet),
        models.ModelConfig("lenet_tiny"),
        models.init_variables(module, jax.random.key(0)),
    )
    result = _train(tmp_path / "y", tiny_npz, f"--init_weights={lenet}")
    assert result.returncode == 2 and "not 'resnet_tiny'" in result.stderr
    assert "Traceback" not in result.stderr


def test_training_diverges_with_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_npz
):
    """--learning_rate=1e6: the run stops at the first non-finite loss, saves no
    non-finite model (no model.msgpack, no train.json) and keeps the last checkpoint
    written while everything was finite (the first step, at warm-up rate 0)."""
    workdir = tmp_path / "diverged"
    result = _train(
        workdir,
        tiny_npz,
        "--learning_rate=1e6",
        "--checkpoint_every_steps=1",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at epoch 1 (")
    assert "lower --learning_rate (now 1e+06)" in last
    assert f"the last good checkpoint ({workdir / 'checkpoint.msgpack'}" in last
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoint.msgpack"]
    saved = checkpoint.read_checkpoint(str(workdir / "checkpoint.msgpack"))
    assert saved["metadata"]["step"] >= 1
    assert bool(training.all_finite(saved["variables"]))
    json.dumps(saved["metadata"], allow_nan=False)


def test_json_safe_writes_non_finite_numbers_as_null():
    value = {"a": float("nan"), "b": [1.5, np.float32(np.inf), -np.inf], "c": "x"}
    safe = hashing.finite_json(value)
    assert safe == {"a": None, "b": [1.5, None, None], "c": "x"}
    json.dumps(safe, allow_nan=False)


def test_workdir_checked_before_anything_is_written(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(PropmapsError, match="--workdir is required"):
        train_run.workdir_path(None)
    with pytest.raises(PropmapsError, match=f"--workdir={a_file} is a file"):
        train_run.workdir_path(str(a_file))
    with pytest.raises(PropmapsError, match=f"is under {a_file}, which is a file"):
        train_run.workdir_path(str(a_file / "sub" / "dir"))
    new = tmp_path / "new" / "run"
    assert train_run.workdir_path(str(new)) == str(new)
    assert not (tmp_path / "new").exists()  # checked, not created

    assert train_run.prepare_workdir(str(new)) is True
    assert new.is_dir() and list(new.iterdir()) == []  # the probe file is gone
    assert train_run.prepare_workdir(str(new)) is False
    train_run.remove_if_empty(str(new), created=True)
    assert not new.exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_unwritable_workdir_is_one_line(tmp_path):
    # /proc refuses new files even to root (chmod does not stop root).
    with pytest.raises(PropmapsError, match="--workdir=/proc is not writable"):
        train_run.prepare_workdir("/proc")
    with pytest.raises(PropmapsError, match="--workdir=/proc/propmaps is not writable"):
        train_run.prepare_workdir("/proc/propmaps")
    if os.geteuid() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
        with pytest.raises(PropmapsError, match="is not writable"):
            train_run.prepare_workdir(str(read_only))


def test_resume_compares_the_starting_weights_by_content():
    digest = "ab" * 32
    settings = {"model": "lenet", "init_weights_sha256": digest}
    check = train_run.check_settings
    check(dict(settings), settings, "ckpt")
    # a checkpoint written before the full hash was recorded: name + 16 digits
    check(
        {"model": "lenet", "init_weights": f"old-name.h5 sha256:{digest[:16]}"},
        settings,
        "ckpt",
    )
    with pytest.raises(PropmapsError) as error:
        check({"model": "lenet", "init_weights": None}, settings, "ckpt")
    assert "--init_weights of none (now SHA-256 abababababab)" in str(error.value)
    with pytest.raises(PropmapsError) as error:
        check({"model": "resnet", "init_weights_sha256": digest}, settings, "ckpt")
    assert "--model='resnet' (now 'lenet')" in str(error.value)
