"""Train on CIFAR-10: SGD + Nesterov, weight decay, crop + flip, warmup + cosine.

    python launch.py --experiment=train --model=resnet --workdir=DIR

Writes DIR/checkpoint.msgpack (variables + optimizer state, atomically, after every
epoch and every --checkpoint_every_steps steps) and, at the end, DIR/model.msgpack
(config + variables + metadata, the file `--weights` takes) and DIR/train.json.
Restarted with the same flags it resumes from the checkpoint and ends with exactly the
result of an uninterrupted run (shuffle order and augmentation depend only on the
seed, the epoch and the example's index).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import serialization

from experiments import common
from experiments.report.progress import format_duration
from experiments.runs import rundir, stopping, storage
from propmaps_jax import models, training
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import checkpoint
from propmaps_jax.results import hashing

flags.DEFINE_integer("epochs", 100, "Training epochs.")
flags.DEFINE_float("learning_rate", 0.1, "Peak learning rate (after warmup).")
flags.DEFINE_float("weight_decay", 5e-4, "L2 weight decay on kernels.")
flags.DEFINE_float(
    "warmup_epochs",
    1.0,
    "Linear learning-rate warm-up, in epochs; capped at half the run (with "
    "--epochs=1 the default warms up over half an epoch).",
)
flags.DEFINE_bool("augment", True, "Random crop (4-pixel reflect padding) + flip.")
flags.DEFINE_integer("eval_every", 1, "Evaluate on the test split every N epochs.")
flags.DEFINE_integer("eval_batch_size", 1000, "Batch size of evaluation.")
flags.DEFINE_integer(
    "checkpoint_every_steps", 0, "Also checkpoint every N steps (0: per epoch only)."
)
flags.DEFINE_string(
    "init_weights",
    None,
    "Fine-tune: start from these weights (a Keras 2 .h5 file or our .msgpack "
    "checkpoint of --model) instead of a random initialisation.",
)
flags.DEFINE_integer(
    "stop_after_epochs",
    None,
    "Stop after this many epochs as if interrupted (for testing resume); "
    "not part of the run's identity.",
)

FLAGS = flags.FLAGS
# The shared flags this experiment reads (experiments/flag_groups.py).
# Not --data_split: training always trains on the train split and evaluates on test.
FLAGS_READ = ("cifar10_path", "workdir", "model", "batch_size", "seed", "max_minutes")
CHECKPOINT = "checkpoint.msgpack"
MODEL = "model.msgpack"
LOG_EVERY_S = 15.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run, read from the flags (and checked) by
    `main`; `stop_after_epochs` and `max_minutes` are not part of its identity."""

    workdir: str | None
    cifar10_path: str | None
    model: str
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_epochs: float
    augment: bool
    seed: int
    eval_every: int
    eval_batch_size: int
    checkpoint_every_steps: int
    init_weights: str | None
    stop_after_epochs: int | None
    max_minutes: float | None


def check_config(cfg: TrainConfig) -> None:
    """Every setting of the run checked before any data is read or anything
    written (the messages name the flags)."""
    if cfg.model not in models.MODEL_REGISTRY:
        raise PropmapsError(
            f"unknown model {cfg.model!r}; choose one of "
            f"{', '.join(models.MODEL_REGISTRY)}"
        )
    for name in ("epochs", "eval_every", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise PropmapsError(f"--{name} must be at least 1")
    if cfg.stop_after_epochs is not None and cfg.stop_after_epochs < 1:
        raise PropmapsError("--stop_after_epochs must be at least 1")
    if cfg.checkpoint_every_steps < 0:
        raise PropmapsError("--checkpoint_every_steps must be >= 0 (0: per epoch)")
    if not (math.isfinite(cfg.warmup_epochs) and cfg.warmup_epochs >= 0):
        raise PropmapsError(
            f"--warmup_epochs must be a number >= 0, got {cfg.warmup_epochs}"
        )
    training.check_hyperparameters(cfg.learning_rate, cfg.weight_decay)


def run_settings(cfg: TrainConfig, num_train: int) -> dict[str, Any]:
    """The settings that determine the result: a checkpoint resumes only under the
    same."""
    return {
        "model": cfg.model,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "warmup_epochs": cfg.warmup_epochs,
        "augment": cfg.augment,
        "seed": cfg.seed,
        "train_examples": num_train,
        "init_weights_sha256": init_weights_sha256(cfg.init_weights),
    }


def init_weights_sha256(path: str | None) -> str | None:
    """What identifies the starting weights: the SHA-256 of the file's bytes (never
    its path, so that a resume through a symlink or another path is the same run)."""
    if path is None:
        return None
    if os.path.isdir(path):
        raise PropmapsError(
            f"--init_weights={path} is a folder: pass a Keras .h5 file or a "
            "checkpoint of ours"
        )
    if not os.path.isfile(path):
        raise PropmapsError(
            f"--init_weights={path} does not exist: pass a Keras .h5 file or a "
            "checkpoint of ours"
        )
    return rundir.file_sha256(path)


def load_init_weights(model: str, path: str):
    """(config, variables) of --init_weights, errors naming that flag."""
    try:
        config, variables, _ = checkpoint.load_weights(model, path)
    except PropmapsError as e:  # the library names `weights`: here --init_weights
        raise PropmapsError(str(e).replace("`weights`", "--init_weights")) from None
    return config, jax.tree_util.tree_map(jnp.asarray, variables)


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


def _saved_setting(saved: dict[str, Any], key: str, current: Any) -> Any:
    """A checkpoint's setting; a checkpoint written before the starting weights were
    recorded by full hash ("name sha256:<first 16 hex digits>") counts as equal when
    the digits are the start of the current hash."""
    if key == "init_weights_sha256" and key not in saved and "init_weights" in saved:
        old = saved["init_weights"]
        if old is None:
            return None
        digits = str(old).rsplit("sha256:", 1)[-1]
        return current if current and current.startswith(digits) else digits
    return saved.get(key)


def _setting_text(key: str, value: Any) -> str:
    if key == "init_weights_sha256":
        return "none" if value is None else f"SHA-256 {value[:12]}"
    return repr(value)


def check_settings(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Raise unless the checkpoint was written under the same settings."""
    flag_names = {"init_weights_sha256": "init_weights", "train_examples": None}
    diffs = []
    for key, value in current.items():
        old = _saved_setting(saved, key, value)
        if old == value:
            continue
        name = flag_names.get(key, key)
        old_text, new_text = _setting_text(key, old), _setting_text(key, value)
        if name is None:
            diffs.append(f"{old_text} {key.replace('_', ' ')} (now {new_text})")
        elif key == "init_weights_sha256":
            diffs.append(f"--{name} of {old_text} (now {new_text})")
        else:
            diffs.append(f"--{name}={old_text} (now {new_text})")
    if diffs:
        raise PropmapsError(
            f"{path} was trained with other settings: {', '.join(diffs)}; "
            "rerun with the same flags to resume, or use a new --workdir"
        )


def workdir_path(path: str | None) -> str:
    """--workdir, checked without creating anything: given, and not a file or under
    one (created later by `prepare_workdir`, once every input is checked)."""
    if not path:
        raise PropmapsError(
            "--workdir is required: the folder where results are written"
        )
    if storage.is_url(path):
        return storage.normalize(path)  # checked by prepare_workdir
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        where = (
            "is" if parent == os.path.abspath(path) else f"is under {parent}, which is"
        )
        raise PropmapsError(f"--workdir={path} {where} a file: pass a folder")
    return path


def prepare_workdir(path: str) -> bool:
    """Create --workdir if needed and check that files can be written there (a probe
    file created and removed) before training; True when this run created it."""
    if storage.is_url(path):
        rundir.check_workdir(path)  # the bucket, the credentials (one line)
        return False
    created = not os.path.isdir(path)
    probe = os.path.join(path, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        remove_if_empty(path, created)
        raise PropmapsError(
            f"--workdir={path} is not writable ({e.strerror}): pass a folder you "
            "can write to"
        ) from None
    return created


def remove_if_empty(path: str, created: bool) -> None:
    """Remove a workdir this run created when nothing was written into it."""
    if (
        created
        and not storage.is_url(path)
        and os.path.isdir(path)
        and not os.listdir(path)
    ):
        os.rmdir(path)


def _exists(path: str) -> bool:
    """Whether `path` exists; False when its store cannot be reached."""
    try:
        return storage.isfile(path)
    except (OSError, storage.StorageError):
        return False


def diverged(
    error: training.Diverged,
    saved_step: int | None,
    steps_per_epoch: int,
    ckpt_path: str,
    cfg: TrainConfig,
) -> PropmapsError:
    """The one-line error of a run whose loss or weights are no longer finite,
    naming the last good checkpoint (written while everything was finite)."""
    if saved_step is None:
        kept = "nothing was saved"
    else:
        when = (
            f"after epoch {saved_step // steps_per_epoch}"
            if saved_step % steps_per_epoch == 0
            else f"at step {saved_step}"
        )
        kept = f"the last good checkpoint ({ckpt_path}, {when}) is kept"
    return PropmapsError(
        f"{error}; lower --learning_rate (now {cfg.learning_rate:g}) and start "
        f"again in a new --workdir; {kept}"
    )


def _resumed_state(state, ckpt: dict[str, Any], ckpt_path: str):
    """(train state, augmentation key) of a checkpoint, checked to fit `state`."""
    variables = checkpoint.check_variables_fit(
        state.variables, ckpt["variables"], ckpt_path
    )
    saved = ckpt["train_state"] or {}
    try:
        opt_state = serialization.from_state_dict(state.opt_state, saved["opt_state"])
        step = int(saved["step"])
        augment_key = jax.random.wrap_key_data(np.asarray(saved["rng"], np.uint32))
    except (KeyError, TypeError, ValueError) as e:
        raise PropmapsError(
            f"{ckpt_path} has no usable training state ({e}); "
            "delete it to start over or use a new --workdir"
        ) from None
    resumed = training.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=jax.tree_util.tree_map(jnp.asarray, opt_state),
    )
    return resumed, augment_key


def main(argv: list[str]) -> None:
    """Train (see the module docstring); Ctrl-C: one line, exit 130."""
    del argv
    try:
        cfg = TrainConfig(
            batch_size=common.default_batch_size(FLAGS.batch_size, 128),
            workdir=FLAGS.workdir,
            cifar10_path=FLAGS.cifar10_path,
            model=FLAGS.model,
            epochs=FLAGS.epochs,
            learning_rate=FLAGS.learning_rate,
            weight_decay=FLAGS.weight_decay,
            warmup_epochs=FLAGS.warmup_epochs,
            augment=FLAGS.augment,
            seed=FLAGS.seed,
            eval_every=FLAGS.eval_every,
            eval_batch_size=FLAGS.eval_batch_size,
            checkpoint_every_steps=FLAGS.checkpoint_every_steps,
            init_weights=FLAGS.init_weights,
            stop_after_epochs=FLAGS.stop_after_epochs,
            max_minutes=FLAGS.max_minutes,
        )
        check_config(cfg)
        train(cfg)
    except KeyboardInterrupt as stop:
        kept = os.path.join(FLAGS.workdir or "", CHECKPOINT)
        if FLAGS.workdir and _exists(kept):
            message = f"{kept} (the last checkpoint) is kept; run the same command "
            message += "again to resume"
        else:
            message = "no checkpoint was written yet"
        # SIGTERM (stopping.Terminated) as Ctrl-C, with the shell's status 143.
        term = isinstance(stop, stopping.Terminated)
        sys.stderr.write(
            f"{'terminated (SIGTERM)' if term else 'interrupted'}: {message}\n"
        )
        sys.exit(stopping.EXIT_TERMINATED if term else stopping.EXIT_INTERRUPTED)


def train(cfg: TrainConfig) -> None:
    """The training run of `main`: `training.fit` between a checkpoint (if any)
    and DIR/model.msgpack + train.json, with the checkpoints written as it goes."""
    stopping.start_deadline(cfg.max_minutes)
    workdir = workdir_path(cfg.workdir)
    # Training always trains on the train split and evaluates on test.
    dataset = common.load_data(cfg.cifar10_path, "test")
    x_train, x_test = dataset.x_train, dataset.x_test
    steps_per_epoch = len(x_train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise PropmapsError(
            f"--batch_size={cfg.batch_size} exceeds the {len(x_train)} training images"
        )
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = training.warmup_steps(
        cfg.warmup_epochs, steps_per_epoch, total_steps
    )
    if warmup_steps < int(round(cfg.warmup_epochs * steps_per_epoch)):
        logging.info(
            "warm-up capped at %d steps, half of the run's %d (--warmup_epochs=%g)",
            warmup_steps,
            total_steps,
            cfg.warmup_epochs,
        )
    settings = run_settings(cfg, len(x_train))

    # Check a previous run's settings before any compilation: fail fast.
    ckpt_path = os.path.join(workdir, CHECKPOINT)
    ckpt = None
    if storage.exists(ckpt_path):
        ckpt = checkpoint.parse_checkpoint(storage.read_bytes(ckpt_path), ckpt_path)
        check_settings(ckpt["metadata"].get("settings", {}), settings, ckpt_path)

    # A fine-tune trains the starting weights' model, normalisation included
    # (load_weights checks that it is --model and that the variables fit); a resume
    # trains the checkpoint's.
    init_variables = None
    if ckpt is not None:
        config = ckpt["config"]
    elif cfg.init_weights is not None:
        config, init_variables = load_init_weights(cfg.model, cfg.init_weights)
    else:
        config = models.default_config(cfg.model)
    # Flags, data and starting weights are checked: only now is the workdir
    # created (and probed), before anything is compiled.
    created = prepare_workdir(workdir)
    module = models.create_model(config)
    optimizer = training.make_optimizer(
        cfg.learning_rate, cfg.weight_decay, total_steps, warmup_steps
    )
    base_key = jax.random.key(cfg.seed)
    if init_variables is None:
        state = training.create_train_state(
            module, optimizer, jax.random.fold_in(base_key, 0), config.image_shape
        )
    else:
        state = training.state_from_variables(init_variables, optimizer)
    augment_key = jax.random.fold_in(base_key, 1)
    wall_before = 0.0
    history: list[dict[str, Any]] = []
    saved_step = None
    if ckpt is not None:
        state, augment_key = _resumed_state(state, ckpt, ckpt_path)
        wall_before = float(ckpt["metadata"].get("wall_time_s", 0.0))
        history = list(ckpt["metadata"].get("history", []))
        saved_step = int(state.step)
        logging.info(
            "resuming from %s at step %d/%d (epoch %d)",
            ckpt_path,
            saved_step,
            total_steps,
            saved_step // steps_per_epoch,
        )

    steps = training.jit_steps(module, optimizer, cfg.augment)
    start_time = time.time()
    if init_variables is not None:
        init_accuracy, init_loss = training.evaluate(
            steps.eval, state.variables, x_test, dataset.y_test, cfg.eval_batch_size
        )
        history.append(
            {"epoch": 0, "test_accuracy": init_accuracy, "test_loss": init_loss}
        )
        logging.info(
            "fine-tuning from %s: test accuracy %.2f%% before training, test loss %.4f",
            cfg.init_weights,
            100 * init_accuracy,
            init_loss,
        )

    def save(state, history, test_accuracy: float | None) -> None:
        nonlocal saved_step
        metadata = {
            "settings": settings,
            "wall_time_s": wall_before + time.time() - start_time,
            "step": int(state.step),
            "test_accuracy": test_accuracy,
            "history": history,
        }
        train_state = {
            "step": np.asarray(state.step),
            "opt_state": state.opt_state,
            "rng": np.asarray(jax.random.key_data(augment_key)),
        }
        storage.write_bytes(
            ckpt_path,
            checkpoint.checkpoint_bytes(
                config, state.variables, hashing.finite_json(metadata), train_state
            ),
        )
        saved_step = int(state.step)

    logging.info(
        "training %s: %d epochs x %d steps of %d images, %d parameters",
        cfg.model,
        cfg.epochs,
        steps_per_epoch,
        cfg.batch_size,
        models.count_params(state.variables),
    )
    try:
        state, history, test_accuracy = training.fit(
            steps,
            state,
            augment_key,
            (x_train, dataset.y_train),
            (x_test, dataset.y_test),
            seed=cfg.seed,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            eval_every=cfg.eval_every,
            eval_batch_size=cfg.eval_batch_size,
            checkpoint_every_steps=cfg.checkpoint_every_steps,
            stop_after_epochs=cfg.stop_after_epochs,
            history=history,
            on_checkpoint=save,
            should_stop=stopping.past_deadline,
            log=logging.info,
            log_every_s=LOG_EVERY_S,
        )
    except training.Diverged as e:
        remove_if_empty(workdir, created)
        raise diverged(e, saved_step, steps_per_epoch, ckpt_path, cfg) from None
    epochs_done = int(state.step) // steps_per_epoch
    if epochs_done < min(cfg.epochs, cfg.stop_after_epochs or cfg.epochs):
        raise stopping.TimeLimit(f"epoch {epochs_done} of {cfg.epochs} is saved")
    if int(state.step) < total_steps:
        logging.info(
            "stopped after epoch %d of %d (--stop_after_epochs); rerun the same "
            "command without it to resume",
            epochs_done,
            cfg.epochs,
        )
        return

    wall = wall_before + time.time() - start_time
    command = "python " + shlex.join(
        [a for a in sys.argv if not a.startswith("--stop_after_epochs")]
    )
    metadata = {
        "command": command,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "settings": settings,
        "test_accuracy": test_accuracy,
        "test_examples": len(x_test),
        "data_source": dataset.source,
        "init_weights": (
            None if cfg.init_weights is None else os.path.abspath(cfg.init_weights)
        ),
        "device": {**common.device_description(), "cpu": cpu_model()},
        "wall_time_s": wall,
    }
    storage.write_bytes(
        os.path.join(workdir, MODEL),
        checkpoint.checkpoint_bytes(
            config, state.variables, hashing.finite_json(metadata)
        ),
    )
    common.write_json(
        os.path.join(workdir, "train.json"),
        hashing.finite_json({**metadata, "history": history}),
    )
    logging.info(
        "done: test accuracy %.2f%% after %d epochs, %s wall; wrote %s",
        100 * test_accuracy,
        cfg.epochs,
        format_duration(wall),
        os.path.join(workdir, MODEL),
    )
