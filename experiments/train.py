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
import shlex
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags, logging

from experiments import common
from experiments.runs import rundir, stopping, storage, train_run
from propmaps_jax import models, training
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import checkpoint
from propmaps_jax.progress import format_duration
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
        "init_weights_sha256": train_run.init_weights_sha256(cfg.init_weights),
    }


def load_init_weights(model: str, path: str):
    """(config, variables) of --init_weights, errors naming that flag."""
    try:
        config, variables, _ = checkpoint.load_weights(model, path)
    except PropmapsError as e:  # the library names `weights`: here --init_weights
        raise PropmapsError(str(e).replace("`weights`", "--init_weights")) from None
    return config, jax.tree_util.tree_map(jnp.asarray, variables)


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
        train_run.exit_interrupted(stop, FLAGS.workdir)


def train(cfg: TrainConfig) -> None:
    """The training run of `main`: `training.fit` between a checkpoint (if any)
    and DIR/model.msgpack + train.json, with the checkpoints written as it goes."""
    stopping.start_deadline(cfg.max_minutes)
    workdir = train_run.workdir_path(cfg.workdir)
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
    ckpt_path = os.path.join(workdir, train_run.CHECKPOINT)
    ckpt = None
    if storage.exists(ckpt_path):
        ckpt = checkpoint.parse_checkpoint(storage.read_bytes(ckpt_path), ckpt_path)
        train_run.check_settings(
            ckpt["metadata"].get("settings", {}), settings, ckpt_path
        )

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
    created = train_run.prepare_workdir(workdir)
    module = models.create_model(config)
    optimizer = training.make_optimizer(
        cfg.learning_rate, cfg.weight_decay, total_steps, warmup_steps
    )
    state, augment_key = training.initial_state(
        module, optimizer, cfg.seed, config.image_shape, init_variables
    )
    wall_before = 0.0
    history: list[dict[str, Any]] = []
    saved_step = None
    if ckpt is not None:
        variables = checkpoint.check_variables_fit(
            state.variables, ckpt["variables"], ckpt_path
        )
        try:
            state, augment_key = training.restore(state, variables, ckpt["train_state"])
        except PropmapsError as e:
            raise PropmapsError(
                f"{ckpt_path} has {e}; delete it to start over or use a new --workdir"
            ) from None
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
        storage.write_bytes(
            ckpt_path,
            checkpoint.checkpoint_bytes(
                config,
                state.variables,
                hashing.finite_json(metadata),
                training.resume_record(state, augment_key),
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
        train_run.remove_if_empty(workdir, created)
        kept = train_run.kept_after_divergence(saved_step, steps_per_epoch, ckpt_path)
        raise PropmapsError(
            f"{e}; lower --learning_rate (now {cfg.learning_rate:g}) and start "
            f"again in a new --workdir; {kept}"
        ) from None
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
        "device": {**common.device_description(), "cpu": common.cpu_model()},
        "wall_time_s": wall,
    }
    storage.write_bytes(
        os.path.join(workdir, MODEL),
        checkpoint.checkpoint_bytes(
            config, state.variables, hashing.finite_json(metadata)
        ),
    )
    rundir.write_json(
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
