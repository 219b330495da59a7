"""What experiments share: flags, loading data and models, atomic files, progress."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

import jax
from absl import flags, logging

from propmaps_jax import checkpoint, data, models
from propmaps_jax.errors import PropmapsError

flags.DEFINE_string(
    "cifar10_path",
    None,
    "CIFAR-10 source: cifar-10-python.tar.gz, its cifar-10-batches-py/ folder or an "
    ".npz; default $CIFAR10_PATH, else tensorflow-datasets.",
)
flags.DEFINE_string("workdir", None, "Folder for results (created if needed).")
flags.DEFINE_integer("seed", 0, "Random seed.")
# Flags shared by several experiments are defined here once, so that experiment
# modules can be imported together (absl refuses a flag defined twice).
flags.DEFINE_string(
    "model", "resnet", "Model architecture: " + ", ".join(models.MODEL_REGISTRY) + "."
)
flags.DEFINE_string(
    "weights",
    None,
    "Our checkpoint (.msgpack) or a Keras 2 .h5 file; default: the bundled "
    "checkpoint of --model.",
)
flags.DEFINE_integer(
    "batch_size",
    None,
    "Batch size; default per experiment: train 128, evaluate 500, statistics 64 "
    "attacks, locality 4096 forward passes.",
)
flags.DEFINE_bool(
    "signed",
    False,
    "Propagation maps: signed FM - FM_adv (the paper's equations literally) "
    "instead of |FM - FM_adv|.",
)
flags.DEFINE_integer("columns", 6, "Propagation figures: layer panels per row.")

FLAGS = flags.FLAGS


def default_batch_size(default: int) -> int:
    """Set --batch_size to this experiment's default when not given; check it."""
    if FLAGS.batch_size is None:
        FLAGS.batch_size = default
    if FLAGS.batch_size < 1:
        raise PropmapsError(f"--batch_size must be at least 1, got {FLAGS.batch_size}")
    return FLAGS.batch_size


def require_workdir() -> str:
    """The --workdir flag, created; a clear error when missing."""
    if not FLAGS.workdir:
        raise PropmapsError(
            "--workdir is required: the folder where results are written"
        )
    os.makedirs(FLAGS.workdir, exist_ok=True)
    return FLAGS.workdir


def load_data() -> data.Cifar10:
    """CIFAR-10 from --cifar10_path / $CIFAR10_PATH / tensorflow-datasets."""
    dataset = data.load_cifar10(FLAGS.cifar10_path)
    logging.info("CIFAR-10 from %s", dataset.source)
    return dataset


def load_model(name: str, weights: str | None):
    """(config, module, variables, metadata): `weights`, else the bundled model."""
    if name not in models.MODEL_REGISTRY:
        raise PropmapsError(
            f"unknown model {name!r}; choose one of {', '.join(models.MODEL_REGISTRY)}"
        )
    config, variables, metadata = checkpoint.load_weights(name, weights)
    return config, models.create_model(config), variables, metadata


def write_text(path: str, text: str) -> None:
    """Atomically write a text file."""
    checkpoint.atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any) -> None:
    """Atomically write a JSON file (indented, keys in insertion order)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def device_description() -> dict[str, Any]:
    """Backend, device kinds and count, versions: for summaries and benchmarks."""
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }


class Progress:
    """Progress lines: done/total, successes so far, rate, ETA."""

    def __init__(
        self, total: int, what: str = "images", every_s: float = 10.0, initial: int = 0
    ):
        """`initial`: items already done before this run (a resume): not in the rate."""
        self.total, self.what, self.every_s = total, what, every_s
        self.initial = initial
        self.start = time.time()
        self.last = 0.0

    def update(
        self, done: int, successes: int | None = None, force: bool = False
    ) -> None:
        now = time.time()
        if not force and now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (done - self.initial) / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = f"{done}/{self.total} {self.what}"
        if successes is not None:
            line += f", {successes} successes ({successes / max(done, 1):.1%})"
        line += f", {rate:.2f} {self.what}/s, elapsed {_fmt(elapsed)}, ETA {_fmt(eta)}"
        logging.info(line)
        print(line, file=sys.stderr, flush=True)


def _fmt(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
