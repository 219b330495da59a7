"""What experiments share: the shared flags, loading data and models, the device
record. The helpers read no flag: each experiment's `main` passes the values."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from typing import Any

import jax
from absl import flags, logging

from experiments.runs import rundir, storage
from propmaps_jax import data, models
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import checkpoint

flags.DEFINE_string(
    "cifar10_path",
    None,
    "CIFAR-10 source: cifar-10-python.tar.gz, its cifar-10-batches-py/ folder, an "
    ".npz, or tfds[:DATA_DIR] (a prepared tensorflow-datasets cifar10); default "
    "$CIFAR10_PATH, else the official archive, downloaded on first use into "
    "$PROPMAPS_CACHE (default ~/.cache/propmaps_jax).",
)
flags.DEFINE_enum(
    "data_split",
    "test",
    list(data.SPLITS),
    "Which split of the CIFAR-10 source the experiment attacks or evaluates: test, "
    "or train (needed by an .npz of x, y alone, which holds training images only). "
    "Recorded with the data source (' [train split]'); an attack's settings hold "
    "the SHA-256 of the images attacked, so a --workdir never mixes two splits or "
    "two copies of the data.",
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
flags.DEFINE_enum(
    "layers",
    "conv",
    ["conv", "conv_relu", "bn_relu"],
    "Propagation maps of: raw convolution outputs (conv), ReLU of them "
    "(conv_relu: LeNet's activations) or ReLU of every BatchNorm output (bn_relu: "
    "the ResNet's activations).",
)
flags.DEFINE_integer("columns", 6, "Propagation figures: layer panels per row.")
flags.DEFINE_enum(
    "precision",
    "highest",
    ["highest", "high", "default"],
    "Precision of matmuls and convolutions (jax.default_matmul_precision): highest "
    "is true float32 on every backend; default lets GPUs/TPUs use TF32/bfloat16 "
    "passes. Recorded next to the device in every summary.",
)
# Multi-host runs (the attack, and the locality study that runs it).
flags.DEFINE_bool(
    "distributed",
    False,
    "Multi-host run: call jax.distributed.initialize() (cluster auto-detection on "
    "Cloud TPU, SLURM, ..., or --coordinator_address/--num_processes/--process_id).",
)
flags.DEFINE_string(
    "coordinator_address", None, "With --distributed: host:port of process 0."
)
flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's id.")
flags.DEFINE_float(
    "max_minutes",
    None,
    "Stop cleanly between chunks after this many minutes, with one line saying how "
    "to continue (the same command resumes) and exit status 75 (not finished).",
)


def maps_folder(name: str, signed: bool, layers: str) -> str:
    """`name` for the default propagation maps; `name`_signed, `name`_<layers> or
    both for those of --signed and of --layers other than conv."""
    if signed:
        name += "_signed"
    if layers != "conv":
        name += f"_{layers}"
    return name


def default_batch_size(batch_size: int | None, default: int) -> int:
    """--batch_size, else this experiment's `default`; checked."""
    if batch_size is None:
        batch_size = default
    if batch_size < 1:
        raise PropmapsError(f"--batch_size must be at least 1, got {batch_size}")
    return batch_size


def require_workdir(workdir: str | None, create: bool = True) -> str:
    """--workdir (or the experiment's default), checked to be a usable folder (see
    `rundir.check_workdir`); created unless `create=False` (experiments that
    create it only when their first result is written). One-line error otherwise.
    """
    workdir = rundir.check_workdir(workdir)
    if create:
        storage.makedirs(workdir)
    return workdir


def cifar10_path(flag_value: str | None) -> str | None:
    """--cifar10_path, else the CIFAR10_PATH environment variable, else None (the
    download cache)."""
    return flag_value or os.environ.get("CIFAR10_PATH") or None


def load_data(path: str | None, split: str) -> data.Cifar10:
    """CIFAR-10 from --cifar10_path (`path`) / $CIFAR10_PATH, else the download
    cache (downloaded on first use), with --data_split (`split`) in its test slot
    (the split every experiment attacks or evaluates: `data.attack_split`); its
    source is recorded as an absolute path, with " [train split]" when that split
    is the training one.
    """
    dataset = data.load_cifar10(cifar10_path(path))
    dataset = data.attack_split(dataset, split)
    logging.info("CIFAR-10 from %s", dataset.source)
    return dataset


def load_model(name: str, weights: str | None, num_classes: int = data.NUM_CLASSES):
    """(config, module, variables, metadata): `weights`, else the bundled model;
    one line when a variable is not finite or the model has other than the data's
    `num_classes` outputs (`check_computes` then runs it on a few images)."""
    if name not in models.MODEL_REGISTRY:
        raise PropmapsError(
            f"unknown model {name!r}; choose one of {', '.join(models.MODEL_REGISTRY)}"
        )
    config, variables, metadata = checkpoint.load_weights(name, weights)
    models.check_num_classes(
        config.num_classes, num_classes, _weights_name(name, weights)
    )
    return config, models.create_model(config), variables, metadata


def _weights_name(name: str, weights: str | None) -> str:
    return weights or checkpoint.bundled_checkpoint_path(name)


def load_checked_model(name: str, weights: str | None, images: Any) -> tuple:
    """`load_model(name, weights)`, then `check_computes` on the first few `images`:
    (config, module, variables, metadata) of a model that computes."""
    loaded = load_model(name, weights)
    check_computes(loaded, images, name, weights)
    return loaded


def check_computes(loaded: tuple, images: Any, name: str, weights: str | None) -> None:
    """One line unless the model of `loaded` (`load_model(name, weights)`) gives
    finite logits on the first few `images`: before any work starts."""
    _, module, variables, _ = loaded
    models.check_outputs_finite(
        models.make_apply_fn(module), variables, images, _weights_name(name, weights)
    )


def start_backend() -> None:
    """Start JAX's backend now, before the launcher locks the workdir.

    A platform that JAX_PLATFORMS asks for and this machine lacks is then one line
    (PropmapsError: what was asked, what is available) instead of a traceback at
    the first array; and XLA's own checks that end the process from C++, where no
    Python cleanup runs (an unknown flag in XLA_FLAGS), end it before there is a
    lock to leave behind. Not for --distributed: jax.distributed.initialize() must
    come before any backend starts.
    """
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        # Without JAX_PLATFORMS, JAX starts what it finds and names a failing
        # plugin itself. With it, a missing CUDA is an AssertionError (jax 0.10)
        # and a missing TPU a RuntimeError.
        asked = jax.config.jax_platforms
        if not asked:
            raise
        reason = str(e).split(" (set JAX_PLATFORMS=")[0].strip()
        reason = f" ({' '.join(reason.split())})" if reason else ""
        available = ", ".join(_available_platforms()) or "none found"
        raise PropmapsError(
            f"JAX_PLATFORMS={asked} asks for a platform this machine does not "
            f"have{reason} (available: {available}); set JAX_PLATFORMS to one of "
            "those, or unset it to let JAX choose"
        ) from None


def _available_platforms() -> list[str]:
    """The platforms JAX finds when left to choose (after a failed start only: it
    replaces the JAX_PLATFORMS setting of this process)."""
    jax.config.update("jax_platforms", "")
    found = []
    for name in ("cpu", "gpu", "tpu"):
        try:
            jax.devices(name)
        except RuntimeError:
            continue
        found.append(name)
    return found


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
) -> None:
    """jax.distributed.initialize() from --coordinator_address, --num_processes and
    --process_id (None: auto-detected)."""
    # CPU devices of different processes need a collectives implementation (it
    # does not affect accelerators). No backend may start before initialize().
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    except (ValueError, RuntimeError) as e:
        raise PropmapsError(
            f"--distributed: jax.distributed.initialize() failed ({e}); outside a "
            "detected cluster pass --coordinator_address, --num_processes and "
            "--process_id"
        ) from None


# The library's messages name its arguments in backquotes; the command line's
# names for them.
FLAG_NAMES = {
    "`path`": "--cifar10_path (or set CIFAR10_PATH)",
    "`weights`": "--weights",
    "`model_name`": "--model",
    "`learning_rate`": "--learning_rate",
    "`weight_decay`": "--weight_decay",
    "`warmup_steps`": "--warmup_epochs",
    "`total_steps`": "--epochs",
}


def in_flag_terms(message: str) -> str:
    """A library error message with its argument names replaced by the flags."""
    message = re.sub(r"`model_name='([^']*)'`", r"--model=\1", message)
    message = re.sub(r"`split='([^']*)'`", r"--data_split=\1", message)
    for argument, flag in FLAG_NAMES.items():
        message = message.replace(argument, flag)
    return message


def device_description() -> dict[str, Any]:
    """Backend, device kinds and count, precision, versions: for summaries."""
    devices = jax.devices()
    return {
        "matmul_precision": jax.config.jax_default_matmul_precision or "default",
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }


def cpu_model() -> str:
    """The CPU's model name (lscpu), else platform.processor()."""
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10
        ).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown CPU"
