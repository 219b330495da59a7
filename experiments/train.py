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

import functools
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

from experiments import common, rundir
from propmaps_jax import checkpoint, models, training
from propmaps_jax.errors import PropmapsError

flags.DEFINE_integer("epochs", 100, "Training epochs.")
flags.DEFINE_float("learning_rate", 0.1, "Peak learning rate (after warmup).")
flags.DEFINE_float("weight_decay", 5e-4, "L2 weight decay on kernels.")
flags.DEFINE_float("warmup_epochs", 1.0, "Linear learning-rate warmup, in epochs.")
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
CHECKPOINT = "checkpoint.msgpack"
MODEL = "model.msgpack"
LOG_EVERY_S = 15.0


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_settings(num_train: int) -> dict[str, Any]:
    """The flags that determine the result: a checkpoint resumes only under the same."""
    return {
        "model": FLAGS.model,
        "epochs": FLAGS.epochs,
        "batch_size": FLAGS.batch_size,
        "learning_rate": FLAGS.learning_rate,
        "weight_decay": FLAGS.weight_decay,
        "warmup_epochs": FLAGS.warmup_epochs,
        "augment": FLAGS.augment,
        "seed": FLAGS.seed,
        "train_examples": num_train,
        "init_weights": init_weights_identity(FLAGS.init_weights),
    }


def init_weights_identity(path: str | None) -> str | None:
    """What identifies the starting weights: file name and SHA-256 of its bytes."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise PropmapsError(
            f"--init_weights={path} does not exist: pass a Keras .h5 file or a "
            "checkpoint of ours"
        )
    return f"{os.path.basename(path)} sha256:{rundir.file_sha256(path)[:16]}"


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


def check_settings(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Raise unless the checkpoint was written under the same settings."""
    diffs = [
        f"--{k}={saved.get(k)!r} (now {current[k]!r})"
        for k in current
        if saved.get(k) != current[k]
    ]
    if diffs:
        raise PropmapsError(
            f"{path} was trained with other settings: {', '.join(diffs)}; "
            "rerun with the same flags to resume, or use a new --workdir"
        )


def evaluate(eval_fn, variables, images: np.ndarray, labels: np.ndarray, batch: int):
    """(accuracy, mean loss) on a split, padding the last batch."""
    totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
    for start in range(0, len(images), batch):
        x, y = images[start : start + batch], labels[start : start + batch]
        mask = np.ones(batch, bool)
        if len(x) < batch:
            pad = batch - len(x)
            mask[len(x) :] = False
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
        out = eval_fn(variables, x, y, mask)
        for k in totals:
            totals[k] += float(out[k])
    return totals["correct"] / totals["count"], totals["loss"] / totals["count"]


def main(argv: list[str]) -> None:
    del argv
    common.default_batch_size(128)
    workdir = common.require_workdir()
    if FLAGS.model not in models.MODEL_REGISTRY:
        raise PropmapsError(
            f"unknown model {FLAGS.model!r}; choose one of "
            f"{', '.join(models.MODEL_REGISTRY)}"
        )
    # --batch_size is checked by common.default_batch_size.
    for name in ("epochs", "eval_every", "eval_batch_size"):
        if getattr(FLAGS, name) < 1:
            raise PropmapsError(f"--{name} must be at least 1")
    dataset = common.load_data()
    x_train, y_train = dataset.x_train, dataset.y_train
    x_test, y_test = dataset.x_test, dataset.y_test
    steps_per_epoch = len(x_train) // FLAGS.batch_size
    if steps_per_epoch == 0:
        raise PropmapsError(
            f"--batch_size={FLAGS.batch_size} exceeds the {len(x_train)} "
            "training images"
        )
    total_steps = steps_per_epoch * FLAGS.epochs
    warmup_steps = int(round(FLAGS.warmup_epochs * steps_per_epoch))
    settings = run_settings(len(x_train))

    # Check a previous run's settings before any compilation: fail fast.
    ckpt_path = os.path.join(workdir, CHECKPOINT)
    ckpt = None
    if os.path.exists(ckpt_path):
        ckpt = checkpoint.read_checkpoint(ckpt_path)
        check_settings(ckpt["metadata"].get("settings", {}), settings, ckpt_path)

    # A fine-tune trains the starting weights' model, normalisation included
    # (load_weights checks that it is --model and that the variables fit); a resume
    # trains the checkpoint's.
    init_variables = None
    if ckpt is not None:
        config = ckpt["config"]
    elif FLAGS.init_weights is not None:
        config, init_variables = load_init_weights(FLAGS.model, FLAGS.init_weights)
    else:
        config = models.ModelConfig(FLAGS.model)
    module = models.create_model(config)
    optimizer = training.make_optimizer(
        FLAGS.learning_rate, FLAGS.weight_decay, total_steps, warmup_steps
    )
    base_key = jax.random.key(FLAGS.seed)
    if init_variables is None:
        state = training.create_train_state(
            module, optimizer, jax.random.fold_in(base_key, 0), config.image_shape
        )
    else:
        state = training.state_from_variables(init_variables, optimizer)
    augment_key = jax.random.fold_in(base_key, 1)
    wall_before = 0.0
    history: list[dict[str, Any]] = []

    if ckpt is not None:
        variables = checkpoint.check_variables_fit(
            state.variables, ckpt["variables"], ckpt_path
        )
        saved = ckpt["train_state"] or {}
        try:
            opt_state = serialization.from_state_dict(
                state.opt_state, saved["opt_state"]
            )
            step = int(saved["step"])
            augment_key = jax.random.wrap_key_data(np.asarray(saved["rng"], np.uint32))
        except (KeyError, TypeError, ValueError) as e:
            raise PropmapsError(
                f"{ckpt_path} has no usable training state ({e}); "
                "delete it to start over or use a new --workdir"
            ) from None
        state = training.TrainState(
            step=jnp.asarray(step, jnp.int32),
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            opt_state=jax.tree_util.tree_map(jnp.asarray, opt_state),
        )
        wall_before = float(ckpt["metadata"].get("wall_time_s", 0.0))
        history = list(ckpt["metadata"].get("history", []))
        logging.info(
            "resuming from %s at step %d/%d (epoch %d)",
            ckpt_path,
            step,
            total_steps,
            step // steps_per_epoch,
        )

    train_fn = jax.jit(
        functools.partial(
            training.train_step, module, optimizer, do_augment=FLAGS.augment
        ),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(functools.partial(training.eval_step, module))
    start_time = time.time()
    if init_variables is not None:
        init_accuracy, init_loss = evaluate(
            eval_fn, state.variables, x_test, y_test, FLAGS.eval_batch_size
        )
        history.append(
            {"epoch": 0, "test_accuracy": init_accuracy, "test_loss": init_loss}
        )
        logging.info(
            "fine-tuning from %s: test accuracy %.2f%% before training, test loss %.4f",
            FLAGS.init_weights,
            100 * init_accuracy,
            init_loss,
        )

    def save(test_accuracy: float | None) -> None:
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
        checkpoint.save_checkpoint(
            ckpt_path, config, state.variables, metadata, train_state
        )

    step = int(state.step)
    last_epoch = FLAGS.epochs
    if FLAGS.stop_after_epochs is not None:
        last_epoch = min(last_epoch, FLAGS.stop_after_epochs)
    test_accuracy = None
    logging.info(
        "training %s: %d epochs x %d steps of %d images, %d parameters",
        FLAGS.model,
        FLAGS.epochs,
        steps_per_epoch,
        FLAGS.batch_size,
        models.count_params(state.variables),
    )
    while step < last_epoch * steps_per_epoch:
        epoch = step // steps_per_epoch
        order = training.epoch_permutation(FLAGS.seed, epoch, len(x_train))
        epoch_key = jax.random.fold_in(augment_key, epoch)
        epoch_start, last_log = time.time(), time.time()
        first_step = step
        loss_sum = jnp.zeros(()), jnp.zeros(())
        for position in range(step % steps_per_epoch, steps_per_epoch):
            idx = order[position * FLAGS.batch_size : (position + 1) * FLAGS.batch_size]
            state, metrics = train_fn(
                state, x_train[idx], y_train[idx], idx.astype(np.int32), epoch_key
            )
            loss_sum = (
                loss_sum[0] + metrics["loss"],
                loss_sum[1] + metrics["accuracy"],
            )
            step += 1
            done = step - first_step
            now = time.time()
            if now - last_log >= LOG_EVERY_S or position == steps_per_epoch - 1:
                last_log = now
                rate = done * FLAGS.batch_size / max(now - epoch_start, 1e-9)
                eta = (total_steps - step) * FLAGS.batch_size / rate
                logging.info(
                    "epoch %d/%d step %d/%d: loss %.4f, train acc %.2f%%, "
                    "%.0f images/s, ETA %s",
                    epoch + 1,
                    FLAGS.epochs,
                    step,
                    total_steps,
                    float(loss_sum[0]) / done,
                    100 * float(loss_sum[1]) / done,
                    rate,
                    _hms(eta),
                )
            every = FLAGS.checkpoint_every_steps
            if every and step % every == 0 and step % steps_per_epoch:
                save(None)
        epoch_done = step // steps_per_epoch
        test_accuracy = None
        if epoch_done % FLAGS.eval_every == 0 or epoch_done == FLAGS.epochs:
            test_accuracy, test_loss = evaluate(
                eval_fn, state.variables, x_test, y_test, FLAGS.eval_batch_size
            )
            logging.info(
                "epoch %d/%d: test accuracy %.2f%%, test loss %.4f (%.1f s)",
                epoch_done,
                FLAGS.epochs,
                100 * test_accuracy,
                test_loss,
                time.time() - epoch_start,
            )
        history.append(
            {
                "epoch": epoch_done,
                "train_loss": float(loss_sum[0]) / max(step - first_step, 1),
                "train_accuracy": float(loss_sum[1]) / max(step - first_step, 1),
                "test_accuracy": test_accuracy,
                "seconds": time.time() - epoch_start,
            }
        )
        save(test_accuracy)

    if step < total_steps:
        logging.info(
            "stopped after epoch %d of %d (--stop_after_epochs); rerun the same "
            "command without it to resume",
            step // steps_per_epoch,
            FLAGS.epochs,
        )
        return

    if test_accuracy is None:
        test_accuracy, _ = evaluate(
            eval_fn, state.variables, x_test, y_test, FLAGS.eval_batch_size
        )
    wall = wall_before + time.time() - start_time
    command = "python " + shlex.join(
        [a for a in sys.argv if not a.startswith("--stop_after_epochs")]
    )
    metadata = {
        "command": command,
        "seed": FLAGS.seed,
        "epochs": FLAGS.epochs,
        "settings": settings,
        "test_accuracy": test_accuracy,
        "test_examples": len(x_test),
        "data_source": dataset.source,
        "device": {**common.device_description(), "cpu": cpu_model()},
        "wall_time_s": wall,
    }
    checkpoint.save_checkpoint(
        os.path.join(workdir, MODEL), config, state.variables, metadata
    )
    common.write_json(
        os.path.join(workdir, "train.json"), {**metadata, "history": history}
    )
    logging.info(
        "done: test accuracy %.2f%% after %d epochs, %s wall; wrote %s",
        100 * test_accuracy,
        FLAGS.epochs,
        _hms(wall),
        os.path.join(workdir, MODEL),
    )
