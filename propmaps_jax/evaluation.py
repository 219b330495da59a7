"""Batched class probabilities and accuracy summaries of a classifier."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax import batching
from propmaps_jax.errors import PropmapsError
from propmaps_jax.types import ApplyFn, Images, Labels, Variables


@functools.cache
def _probs_program(apply_fn: ApplyFn):
    """Jitted softmax of the model, cached on `apply_fn` (variables are an argument)."""
    return jax.jit(lambda v, x: jax.nn.softmax(apply_fn(v, x.astype(np.float32))))


def predict(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    batch_size: int = 500,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Softmax probabilities (N, classes) float32 of the model on `images`, batched.

    The last batch is padded to `batch_size` (`batching.map_batches`), so the jitted
    function compiles once.
    `on_batch(done)` is called after each batch (for progress lines).
    """
    if batch_size < 1:
        raise PropmapsError(f"batch_size must be at least 1, got {batch_size}")
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
        raise PropmapsError("no images to evaluate")
    batch_size = min(batch_size, n)
    probs_fn = functools.partial(_probs_program(apply_fn), variables)
    return batching.map_batches(probs_fn, [images], batch_size, on_batch)


@functools.cache
def _verdict_program(apply_fn: ApplyFn):
    """Jitted (prediction, p(label)) of the model, cached on `apply_fn`."""

    def forward(variables, images, labels):
        logits = apply_fn(variables, images)
        probs = jax.nn.softmax(logits, -1)
        return jnp.argmax(logits, -1), jnp.take_along_axis(probs, labels[:, None], -1)

    return jax.jit(forward)


def predict_labels(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    labels: Labels,
    batch_size: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """(prediction int64 (N,), p(label) float32 (N,)) of the model, batched.

    The attack's verdict before it starts: the argmax of the logits and the
    softmax probability of each image's own label, from one program. (`predict`
    returns every class's probability from another: the two can differ in the
    last float32 bit, 1.2e-7 at most on 10,000 CIFAR-10 test images with the
    bundled LeNet; attack.csv's prob_true_before has always come from this one.)
    """
    if batch_size < 1:
        raise PropmapsError(f"batch_size must be at least 1, got {batch_size}")
    images, labels = np.asarray(images), np.asarray(labels)
    if images.shape[0] == 0:
        raise PropmapsError("no images to evaluate")
    pred, prob = batching.map_batches(
        functools.partial(_verdict_program(apply_fn), variables),
        [images, labels],
        min(batch_size, images.shape[0]),
    )
    return pred.astype(np.int64), prob[:, 0].astype(np.float32)


def accuracy_summary(
    probs: np.ndarray, labels: Labels, num_classes: int | None = None
) -> dict:
    """Accuracy, correct/total counts and per-class accuracy of predictions `probs`."""
    probs = np.asarray(probs)
    labels = np.asarray(labels).reshape(-1)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise PropmapsError(
            f"probs {probs.shape} and labels {labels.shape} do not match: "
            "expected (N, classes) and (N,)"
        )
    num_classes = num_classes or probs.shape[1]
    predicted = probs.argmax(axis=1)
    correct = predicted == labels
    per_class = {}
    for c in range(num_classes):
        mask = labels == c
        per_class[c] = {
            "correct": int(correct[mask].sum()),
            "total": int(mask.sum()),
            "accuracy": float(correct[mask].mean()) if mask.any() else None,
        }
    return {
        "accuracy": float(correct.mean()),
        "correct": int(correct.sum()),
        "total": int(labels.shape[0]),
        "per_class": per_class,
    }
