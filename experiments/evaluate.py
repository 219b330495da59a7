"""Test accuracy of a model: our checkpoint, a Keras .h5, or the bundled checkpoint.

    python launch.py --experiment=evaluate --model=lenet \
        --weights=../shared/one-pixel-attack-keras/lenet.h5 --workdir=/tmp/eval

writes DIR/evaluation.json (accuracy, counts, per-class accuracy, wall time, device)
and, with --save_predictions, DIR/predictions.npz (`probs` (N, 10) float32, `labels`).
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import flags

from experiments import common, flag_groups
from experiments.report.progress import Progress
from experiments.runs import rundir
from propmaps_jax import evaluation, models
from propmaps_jax.models import checkpoint

flags.DEFINE_bool(
    "save_predictions", False, "Also write predictions.npz (probs (N, 10), labels)."
)

FLAGS = flags.FLAGS
# The shared flags this experiment reads (experiments/flag_groups.py).
FLAGS_READ = (*flag_groups.RUN, *flag_groups.MODEL, "batch_size")


def main(argv: list[str]) -> None:
    """Evaluate --model with --weights on the test split and write the results."""
    del argv
    batch_size = common.default_batch_size(FLAGS.batch_size, 500)
    workdir = common.require_workdir(FLAGS.workdir)
    config, module, variables, metadata = common.load_model(FLAGS.model, FLAGS.weights)
    weights = FLAGS.weights or checkpoint.bundled_checkpoint_path(FLAGS.model)
    dataset = common.load_data(FLAGS.cifar10_path, FLAGS.data_split)
    images, labels = dataset.split("test")
    common.check_computes(
        (config, module, variables, metadata), images, FLAGS.model, FLAGS.weights
    )

    start = time.time()
    progress = Progress(len(images), what="images")
    probs = evaluation.predict(
        models.make_apply_fn(module),
        variables,
        images,
        batch_size,
        on_batch=progress.update,
    )
    wall_time = time.time() - start
    summary = evaluation.accuracy_summary(probs, labels, config.num_classes)
    names = (
        models.CIFAR10_CLASSES
        if config.num_classes == len(models.CIFAR10_CLASSES)
        else [str(c) for c in range(config.num_classes)]
    )
    result = {
        "model": config.name,
        "weights": os.path.abspath(weights),
        "weights_source": "bundled"
        if FLAGS.weights is None
        else metadata.get("source", "checkpoint"),
        "config": config.to_dict(),
        "data": dataset.source,
        "split": "test",
        "accuracy": summary["accuracy"],
        "correct": summary["correct"],
        "total": summary["total"],
        "per_class_accuracy": {
            names[c]: v["accuracy"] for c, v in summary["per_class"].items()
        },
        "batch_size": batch_size,
        "wall_time_s": round(wall_time, 3),
        "device": common.device_description(),
    }
    rundir.write_json(os.path.join(workdir, "evaluation.json"), result)
    if FLAGS.save_predictions:
        rundir.write_npz(
            os.path.join(workdir, "predictions.npz"),
            {"probs": probs.astype(np.float32), "labels": labels.astype(np.int32)},
            compressed=False,
        )
    print(
        f"{config.name} ({weights}): test accuracy {summary['accuracy']:.2%} "
        f"({summary['correct']}/{summary['total']}) in {wall_time:.1f} s; "
        f"results in {workdir}"
    )
    for name, accuracy in result["per_class_accuracy"].items():
        print(f"  {name:>10s}: " + ("-" if accuracy is None else f"{accuracy:.2%}"))
