"""propmaps_jax.evaluation and the evaluate experiment (run through launch.py)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax import checkpoint, evaluation, models
from propmaps_jax.errors import PropmapsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _linear_apply(variables, images):
    """A linear model as data: apply_fn(variables, images), the weights as variables."""
    return images.reshape(images.shape[0], -1) @ jnp.asarray(variables)


def _softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 100])
def test_predict_matches_float64_softmax_for_any_batch_size(batch_size):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 2, 2, 3), dtype=np.uint8)
    weights = rng.normal(0, 0.01, (12, 4)).astype(np.float32)
    probs = evaluation.predict(_linear_apply, weights, images, batch_size)
    expected = _softmax64(images.reshape(7, -1).astype(np.float64) @ weights)
    assert probs.dtype == np.float32 and probs.shape == (7, 4)
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_predict_reports_progress_and_rejects_bad_input():
    done = []
    images = np.zeros((5, 2, 2, 3), np.uint8)
    evaluation.predict(_linear_apply, np.zeros((12, 2)), images, 2, done.append)
    assert done == [2, 4, 5]
    with pytest.raises(PropmapsError, match="batch_size"):
        evaluation.predict(_linear_apply, np.zeros((12, 2)), images, 0)
    with pytest.raises(PropmapsError, match="no images"):
        evaluation.predict(_linear_apply, np.zeros((12, 2)), images[:0], 2)


def test_accuracy_summary_hand_computed():
    probs = np.array(
        [[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.1, 0.2, 0.7]]
    )
    labels = np.array([0, 1, 1, 1])
    summary = evaluation.accuracy_summary(probs, labels)
    assert summary["accuracy"] == 0.5 and summary["correct"] == 2
    assert summary["total"] == 4
    assert summary["per_class"][0] == {"correct": 1, "total": 1, "accuracy": 1.0}
    assert summary["per_class"][1]["accuracy"] == pytest.approx(1 / 3)
    assert summary["per_class"][2]["accuracy"] is None  # no images of class 2
    with pytest.raises(PropmapsError, match="do not match"):
        evaluation.accuracy_summary(probs, labels[:3])


def _launch(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "launch.py", "--experiment=evaluate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


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
    return folder, data_path, ckpt, _softmax64(logits), y


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
