"""Batched class probabilities and accuracy summaries of a classifier."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np

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

    The last batch is padded to `batch_size`, so the jitted function compiles once.
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
    chunks = []
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        count = batch.shape[0]
        if count < batch_size:
            pad = np.repeat(batch[-1:], batch_size - count, axis=0)
            batch = np.concatenate([batch, pad])
        chunks.append(np.asarray(probs_fn(batch), np.float32)[:count])
        if on_batch is not None:
            on_batch(start + count)
    return np.concatenate(chunks)


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
