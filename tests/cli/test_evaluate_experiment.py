"""The evaluate experiment (launch.py, in process)."""

import json
import os

import numpy as np
import pytest
import scipy.special
from conftest import launch

from propmaps_jax import models
from propmaps_jax.models import checkpoint


def _launch(*args: str):
    return launch("--experiment=evaluate", *args)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A lenet_tiny checkpoint and a 30-image .npz data set."""
    folder = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    y = np.arange(30) % 10
    data_path = str(folder / "tiny.npz")
    np.savez(data_path, x_train=x[:10], y_train=y[:10], x_test=x, y_test=y)
    config = models.ModelConfig("lenet_tiny")
    module = models.create_model(config)
    import jax

    variables = models.init_variables(module, jax.random.key(3))
    ckpt = str(folder / "tiny.msgpack")
    checkpoint.save_checkpoint(ckpt, config, variables)
    logits = np.asarray(models.make_logits_fn(module, variables)(x), np.float64)
    return folder, data_path, ckpt, scipy.special.softmax(logits, axis=1), y


def test_evaluate_checkpoint_writes_results(tiny_setup):
    folder, data_path, ckpt, expected_probs, labels = tiny_setup
    workdir = folder / "run"
    result = _launch(
        "--model=lenet_tiny",
        f"--weights={ckpt}",
        f"--cifar10_path={data_path}",
        f"--workdir={workdir}",
        "--batch_size=8",
        "--save_predictions",
        "--precision=high",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test accuracy" in result.stdout
    report = json.loads((workdir / "evaluation.json").read_text())
    expected_correct = int((expected_probs.argmax(1) == labels).sum())
    assert report["model"] == "lenet_tiny" and report["total"] == 30
    assert report["correct"] == expected_correct
    assert report["accuracy"] == pytest.approx(expected_correct / 30)
    assert len(report["per_class_accuracy"]) == 10
    assert report["device"]["backend"] == "cpu" and report["wall_time_s"] >= 0
    assert report["device"]["matmul_precision"] == "high"  # chosen and recorded
    with np.load(workdir / "predictions.npz") as npz:
        assert npz["probs"].dtype == np.float32 and npz["probs"].shape == (30, 10)
        np.testing.assert_allclose(npz["probs"], expected_probs, atol=1e-6)
        np.testing.assert_array_equal(npz["labels"], labels)
    assert sorted(os.listdir(workdir)) == ["evaluation.json", "predictions.npz"]


def test_evaluate_errors_are_one_line(tiny_setup):
    folder, data_path, ckpt, _, _ = tiny_setup
    wrong = _launch(
        "--model=resnet_tiny",
        f"--weights={ckpt}",
        f"--cifar10_path={data_path}",
        f"--workdir={folder / 'wrong'}",
    )
    assert wrong.returncode == 2
    assert "holds a 'lenet_tiny' model, not 'resnet_tiny'" in wrong.stderr
    # The library names its argument; the command line names the flag.
    assert "change --model" in wrong.stderr and "`model_name`" not in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_evaluate_keras_lenet_on_real_data(keras_weights_dir, cifar10_path, tmp_path):
    result = _launch(
        "--model=lenet",
        f"--weights={os.path.join(keras_weights_dir, 'lenet.h5')}",
        f"--cifar10_path={cifar10_path}",
        f"--workdir={tmp_path}",
        "--batch_size=1000",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["correct"] == 7000 and report["total"] == 10000
    assert report["weights_source"] == "keras"
