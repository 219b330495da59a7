"""propmaps_jax.evaluation: predictions against a float64 softmax, accuracy."""

import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax import evaluation
from propmaps_jax.errors import PropmapsError


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
