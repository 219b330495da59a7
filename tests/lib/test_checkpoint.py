"""Checkpoints: round trip, atomic writes, and clear errors for every bad file."""

import os

import jax
import numpy as np
import pytest
from flax import serialization

from propmaps_jax import models
from propmaps_jax.errors import WeightsError
from propmaps_jax.models import checkpoint

CONFIG = models.ModelConfig("lenet_tiny", mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0))


@pytest.fixture(scope="module")
def saved(tiny_lenet, tmp_path_factory):
    """(path, variables) of a lenet_tiny checkpoint with metadata and a train state."""
    _, variables = tiny_lenet
    path = str(tmp_path_factory.mktemp("ckpt") / "lenet_tiny.msgpack")
    checkpoint.save_checkpoint(
        path,
        CONFIG,
        variables,
        metadata={"epochs": 3, "note": "test"},
        train_state={"step": np.int32(7), "momentum": np.ones(4, np.float32)},
    )
    return path, variables


def _assert_trees_equal(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


def test_round_trip(saved):
    path, variables = saved
    config, loaded, metadata = checkpoint.load_checkpoint(
        path, expect_model="lenet_tiny"
    )
    assert config == CONFIG
    assert metadata == {"epochs": 3, "note": "test"}
    _assert_trees_equal(loaded, variables)
    raw = checkpoint.read_checkpoint(path)
    assert int(raw["train_state"]["step"]) == 7
    np.testing.assert_array_equal(raw["train_state"]["momentum"], np.ones(4))
    # load_weights takes the same file, and the model it rebuilds uses the saved config.
    config, loaded, _ = checkpoint.load_weights("lenet_tiny", path)
    module = models.create_model(config)
    assert module.mean == (1.0, 2.0, 3.0)
    _assert_trees_equal(loaded, variables)


def test_atomic_write_leaves_no_temporary_files(tmp_path, tiny_lenet, monkeypatch):
    _, variables = tiny_lenet
    path = tmp_path / "model.msgpack"
    checkpoint.save_checkpoint(str(path), CONFIG, variables)
    checkpoint.save_checkpoint(str(path), CONFIG, variables, metadata={"v": 2})
    assert os.listdir(tmp_path) == ["model.msgpack"]
    before = path.read_bytes()

    def interrupted(src, dst):
        raise KeyboardInterrupt  # the process is stopped between write and rename

    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(str(path), CONFIG, variables, metadata={"v": 3})
    assert os.listdir(tmp_path) == ["model.msgpack"]
    assert path.read_bytes() == before  # the old checkpoint is intact


def test_atomic_write_bytes_creates_folders(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    checkpoint.atomic_write_bytes(str(target), b"payload")
    assert target.read_bytes() == b"payload"
    assert os.listdir(target.parent) == ["file.bin"]


def test_truncated_checkpoint(saved, tmp_path):
    path, _ = saved
    raw = open(path, "rb").read()
    for fraction in (0.5, 0.99):
        truncated = tmp_path / f"cut{fraction}.msgpack"
        truncated.write_bytes(raw[: int(len(raw) * fraction)])
        with pytest.raises(
            WeightsError,
            match=rf"cut{fraction}\.msgpack is not a "
            r"readable propmaps-jax checkpoint .*truncated or corrupt",
        ):
            checkpoint.load_weights("lenet_tiny", str(truncated))


def test_not_a_checkpoint(tmp_path):
    other = tmp_path / "other.msgpack"
    other.write_bytes(serialization.msgpack_serialize({"params": np.zeros(3)}))
    with pytest.raises(
        WeightsError,
        match=r"other\.msgpack is not a propmaps-jax "
        r"checkpoint .*`weights` takes",
    ):
        checkpoint.load_weights("lenet_tiny", str(other))
    with pytest.raises(WeightsError, match=r"absent\.msgpack does not exist"):
        checkpoint.load_weights("lenet_tiny", str(tmp_path / "absent.msgpack"))


def test_wrong_model_for_file(saved):
    path, _ = saved
    with pytest.raises(
        WeightsError,
        match=r"holds a 'lenet_tiny' model, not "
        r"'resnet_tiny': pass the weights of the right model or change "
        r"`model_name`",
    ):
        checkpoint.load_weights("resnet_tiny", path)


def test_wrong_shapes(tiny_lenet, tmp_path):
    _, variables = tiny_lenet
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    wider = dict(params, conv2={**params["conv2"], "kernel": np.zeros((5, 5, 3, 9))})
    path = str(tmp_path / "wider.msgpack")
    checkpoint.save_checkpoint(path, CONFIG, {"params": wider})
    with pytest.raises(
        WeightsError,
        match=r"wider\.msgpack does not fit the model: "
        r".*conv2.*kernel.* has shape \(5, 5, 3, 9\), the model "
        r"expects \(5, 5, 3, 4\)",
    ):
        checkpoint.load_weights("lenet_tiny", path)

    fewer = {k: v for k, v in params.items() if k != "fc1"}
    path = str(tmp_path / "fewer.msgpack")
    checkpoint.save_checkpoint(path, CONFIG, {"params": fewer})
    with pytest.raises(
        WeightsError,
        match=r"fewer\.msgpack does not fit the model: "
        r"missing .*fc1",
    ):
        checkpoint.load_weights("lenet_tiny", path)


def test_bundled_checkpoint(saved, tmp_path, monkeypatch):
    path, variables = saved
    monkeypatch.setattr(
        checkpoint, "bundled_checkpoint_path", lambda name: str(tmp_path / f"{name}.x")
    )
    with pytest.raises(
        WeightsError,
        match=r"no bundled checkpoint for model "
        r"'lenet_tiny'.*pass `weights`",
    ):
        checkpoint.load_weights("lenet_tiny")
    monkeypatch.setattr(checkpoint, "bundled_checkpoint_path", lambda name: path)
    _, loaded, _ = checkpoint.load_weights("lenet_tiny")
    _assert_trees_equal(loaded, variables)
