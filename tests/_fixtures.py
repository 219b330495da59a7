"""Set-up that several test files share: a tiny LeNet saved as a checkpoint, fake
CIFAR-10 images labelled with its own predictions (a few changed: misclassified,
so not attacked), that data as an .npz, and the comparison of loaded datasets."""

import os
import subprocess

import jax
import numpy as np
import pytest
from conftest import start

from experiments.runs import attack_run
from experiments.runs import chunks as chunk_store
from propmaps_jax import data, models
from propmaps_jax.attack import AttackConfig
from propmaps_jax.models import checkpoint


def save_lenet_tiny(path, seed: int):
    """(module, variables): a lenet_tiny initialised from key(seed), saved at `path`."""
    module = models.create_model("lenet_tiny")
    variables = models.init_variables(module, jax.random.key(seed))
    checkpoint.save_checkpoint(str(path), models.ModelConfig("lenet_tiny"), variables)
    return module, variables


def classified_images(module, variables, count: int, seed: int, misclassified=()):
    """(x, y): `count` random uint8 images (default_rng(seed)) and int32 labels that
    are the model's predictions, but for the images at `misclassified`, whose label
    is moved to the next class (the model gets them wrong: they are not attacked)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    logits = np.asarray(models.make_logits_fn(module, variables)(x))
    y = logits.argmax(-1).astype(np.int32)
    flipped = list(misclassified)
    y[flipped] = (y[flipped] + 1) % 10
    return x, y


def save_npz(path, x, y, train: int = 1) -> str:
    """A CIFAR-10 .npz at `path`: (x, y) as the test split, their first `train` as
    the train split."""
    np.savez(path, x_train=x[:train], y_train=y[:train], x_test=x, y_test=y)
    return str(path)


def tiny_attack_setup(
    folder, misclassified, config: AttackConfig, num_samples: int
) -> tuple[dict, tuple]:
    """A lenet_tiny checkpoint (key 2), 12 fake test images (seed 1) it classifies
    but for `misclassified`, that data as tiny.npz, all in `folder`.

    Returns (kwargs of `experiments.attack.run_attack` for the first `num_samples`
    images, 3 slots, chunks of 4), (module, variables, x_test, y_test, npz path)).
    """
    weights = os.path.join(folder, "lenet_tiny.msgpack")
    module, variables = save_lenet_tiny(weights, 2)
    x_test, y_test = classified_images(module, variables, 12, 1, misclassified)
    npz = save_npz(os.path.join(folder, "tiny.npz"), x_test, y_test)
    kwargs = dict(
        model_name="lenet_tiny",
        weights=weights,
        dataset=data.Cifar10(x_test[:0], y_test[:0], x_test, y_test, source="fake"),
        num_samples=num_samples,
        seed=0,
        sample="first",
        config=config,
        slots=3,
        chunk_size=4,
    )
    return kwargs, (module, variables, x_test, y_test, npz)


def assert_dataset_equal(dataset: data.Cifar10, splits) -> None:
    """`dataset` holds (x_train, y_train, x_test, y_test) = `splits`, dtypes and all."""
    for got, want in zip(
        (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test),
        splits,
        strict=True,
    ):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dataset.split("test")[1], splits[3])


def stop_after_chunks(monkeypatch, chunks: int, stop):
    """Make the attack call `stop()` right after it saved its `chunks`-th chunk
    file; returns a function that undoes this."""
    save_chunk = chunk_store.save_chunk
    saved = []

    def save_then_stop(*args):
        save_chunk(*args)
        saved.append(args[1:3])
        if len(saved) == chunks:
            stop()

    monkeypatch.setattr(chunk_store, "save_chunk", save_then_stop)
    return lambda: monkeypatch.setattr(chunk_store, "save_chunk", save_chunk)


def interrupted_run(workdir, kwargs, monkeypatch, chunks: int = 1) -> None:
    """`run_attack(workdir, **kwargs)` until `chunks` chunk files are saved, then
    stopped as Ctrl-C would."""

    def interrupt():
        raise KeyboardInterrupt

    restore = stop_after_chunks(monkeypatch, chunks, interrupt)
    with pytest.raises(KeyboardInterrupt):
        attack_run.run_attack(workdir, **kwargs)
    restore()


def start_interruptible(code: str, *args: str, stdout=subprocess.PIPE):
    """`python -c code *args` started from the repository root in a launch's
    environment, stderr piped as text, for the tests that send it Ctrl-C.

    A shell's background job ignores SIGINT and its children inherit that: the
    child restores Python's handler before `code` runs, as a user's launch has it.
    """
    restore_sigint = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    )
    return start(*args, code=restore_sigint + code, stdout=stdout)
