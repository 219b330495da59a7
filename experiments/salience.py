"""The conflicting salience hypothesis (paper, section 8), tested with numbers.

    python launch.py --experiment=salience --workdir=DIR [--model=lenet --weights=W
        --saliency=gradient --steps=32 --bootstrap=2000]

DIR is an attack run: DIR/attack.csv of the attack experiment, or DIR/<model>/ of
the locality experiment. The model is the one that made the run (from
DIR/attack_summary.json when present, unless --model is given); a run recorded
with another model, other weights or other data than the ones given is refused,
and so is one whose stored predictions the model does not reproduce.

For every attacked image (a failed attack contributes its best candidate) three
changes of the clean image are studied: the attack's pixel (original), the same
colour at an adjacent pixel (nearby) and at a random other pixel (random). Their
positions are those of DIR/locality.csv when the locality study ran there (it
moves successful attacks only), else they are drawn as the locality experiment
draws them (same key streams, `fold_in(key, dataset_index)` per image, --seed).
For each change it computes saliency maps of the clean and the changed image for
the true class and for the class predicted after the change ("new"; the true
class when the prediction did not change) and measures:

- attention capture: the share of saliency mass in the 3x3 and 5x5 window around
  the changed pixel, before and after;
- disturbance: 1 - Spearman correlation of the maps before and after, and the
  overlap of their top-5% pixels;
- the last convolution's propagation map max_k |FM - FM_adv|: its max and mean.

Three predictions of the hypothesis become rows of a verdict table with seeded
bootstrap 95% intervals over images: P1 capture rises more after successful
attacks than after failed ones and than after the same colour at a random pixel;
P2 disturbance predicts a class change (ROC AUC over all changes); P3 propagation
maps and saliency disturbance agree (Spearman over images, per outcome). Each
verdict follows the rule in the table's caption. Writes DIR/salience/: table.md,
table.csv, summary.json, per_image.csv, examples.png, attention_capture.png and
roc.png; nothing is written when the input is refused.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
from absl import flags

from experiments import common, flag_groups
from experiments.report import plots
from experiments.report.progress import Progress
from experiments.runs import rundir, storage
from propmaps_jax import models
from propmaps_jax.analysis import locality, saliency
from propmaps_jax.analysis import salience as salience_study
from propmaps_jax.analysis.saliency import TOP_FRACTION, WINDOWS
from propmaps_jax.errors import PropmapsError
from propmaps_jax.figures import salience as salience_figures
from propmaps_jax.results import locality_csv, salience_csv
from propmaps_jax.results.attack_csv import (
    load_attack_run,
    read_summary,
    recorded_weights,
    require_predictions_match,
)

flags.DEFINE_string(
    "saliency",
    "gradient",
    "Salience: saliency map method, one of " + ", ".join(saliency.METHODS) + ".",
)
flags.DEFINE_integer(
    "steps", 32, "Salience: integrated gradients' path points (batched, >= 1)."
)
flags.DEFINE_integer("smoothgrad_samples", 16, "Salience: SmoothGrad noisy copies.")
flags.DEFINE_float(
    "smoothgrad_sigma", saliency.DEFAULT_SIGMA, "Salience: SmoothGrad noise (0..255)."
)
flags.DEFINE_string(
    "saliency_score", "logit", "Salience: the class score, logit or probability."
)
flags.DEFINE_integer("bootstrap", 2000, "Salience: bootstrap resamples (>= 100).")
flags.DEFINE_integer(
    "examples", 3, "Salience: successful and failed attacks in examples.png."
)

FLAGS = flags.FLAGS
# The shared flags this experiment reads (experiments/flag_groups.py).
FLAGS_READ = (*flag_groups.RUN, *flag_groups.MODEL, "batch_size", "seed")


def resolve_model(
    workdir: str, model: str, model_given: bool, weights: str | None
) -> tuple[str, str | None]:
    """(model, weights): those of DIR/attack_summary.json unless given as flags."""
    summary = read_summary(workdir)
    if summary is None:
        return model, weights
    made_by = summary.get("settings", {}).get("model")
    if made_by is None or model_given:
        return model, weights
    return made_by, weights if weights is not None else recorded_weights(summary)


@dataclasses.dataclass(frozen=True)
class SalienceConfig:
    """The settings of one salience study, read from the flags by `main`.

    `batch_size` None: as many attacks per batch as fit 128 forward passes (at
    most 64); `resamples`: bootstrap resamples; `examples`: successful and failed
    attacks shown in examples.png.
    """

    workdir: str
    model_name: str
    weights: str | None
    config: saliency.SaliencyConfig = saliency.SaliencyConfig()
    seed: int = 0
    batch_size: int | None = None
    resamples: int = 2000
    examples: int = 3


def run(cfg: SalienceConfig, dataset) -> dict[str, Any]:
    """The salience study of the attack run in cfg.workdir; returns the summary."""
    start = time.time()
    workdir, model_name, weights = cfg.workdir, cfg.model_name, cfg.weights
    config, seed, resamples = cfg.config, cfg.seed, cfg.resamples
    if resamples < 100:
        raise PropmapsError(f"--bootstrap must be at least 100, got {resamples}")
    if cfg.examples < 0:
        raise PropmapsError(f"--examples must be >= 0, got {cfg.examples}")
    batch_size = common.default_batch_size(
        cfg.batch_size, salience_study.default_batch_size(config)
    )
    x_test, y_test = dataset.split("test")
    run = load_attack_run(
        workdir, x_test, y_test, model_name=model_name, weights=weights
    )
    csv_path, table = run.csv_path, run.table
    locality.check_one_pixel(table["pixels"])
    attacked = np.flatnonzero(table["attacked"])
    if attacked.size == 0:
        raise PropmapsError(
            f"{csv_path} holds no attacked image (all were misclassified before the "
            "attack or it is empty): attack more images first"
        )
    indices = table["index"][attacked]
    labels = table["label"][attacked].astype(np.int32)
    pixels = table["pixels"][attacked].astype(np.int32)
    success = table["success"][attacked]
    height, width = x_test.shape[1:3]
    moves, path = None, os.path.join(workdir, locality_csv.NAME)
    if storage.isfile(path):  # the locality study ran here: its moves
        moves = salience_csv.locality_positions(
            path, indices, pixels, success, height, width
        )
    changes, from_locality = saliency.change_positions(
        seed, indices, pixels, height, width, moves
    )
    loaded = common.load_model(model_name, weights)
    _, module, variables, _ = loaded
    images = x_test[indices]
    common.check_computes(loaded, images, model_name, weights)

    # The model must be the attack's: its predictions must match attack.csv.
    preds = salience_study.attack_predictions(
        models.make_apply_fn(module), variables, images, pixels
    )
    expected = np.stack([table["pred_before"][attacked], table["pred_after"][attacked]])
    mismatches = int(np.sum(np.any(preds != expected, axis=0)))
    require_predictions_match(csv_path, mismatches, len(indices))

    print(
        f"salience: {len(indices)} attacks ({int(success.sum())} successful), 3 "
        f"changes each, {config.method} maps, {batch_size} attacks per batch",
        flush=True,
    )
    study = salience_study.study_attacks(
        models.linen_features(module),
        variables,
        indices,
        images,
        labels,
        changes,
        success,
        config,
        seed,
        batch_size,
        resamples,
        cfg.examples,
        on_batch=Progress(len(indices), "attacks").update,
    )
    settings = {
        "model": model_name,
        "weights": os.path.abspath(weights) if weights else None,
        "attack_csv": csv_path,
        "saliency": salience_study.saliency_settings(config),
        "seed": seed,
        "bootstrap": resamples,
        "windows": list(WINDOWS),
        "top_fraction": TOP_FRACTION,
        "last_layer": study.last_layer,
        "attacks": int(len(indices)),
        "successful": int(success.sum()),
        "failed": int((~success).sum()),
        "positions_from_locality_csv": int(from_locality.sum()),
    }
    summary = {
        "settings": settings,
        "class_changed": study.class_changed(),
        "attack_csv_mismatches": mismatches,
        "predictions": study.rows,
        "rule": {
            "no_effect": salience_study.NO_EFFECT,
            "meaningful": salience_study.MEANINGFUL,
            "min_n": salience_study.MIN_N,
        },
        "groups": study.groups,
        "device": common.device_description(),
        "seconds": None,
    }
    out_dir = os.path.join(workdir, "salience")
    storage.makedirs(out_dir)
    rundir.write_text(
        os.path.join(out_dir, "per_image.csv"),
        salience_csv.per_image_csv(study, from_locality),
    )
    rundir.write_text(
        os.path.join(out_dir, "table.csv"), salience_csv.table_csv(study.rows)
    )
    title = f"{model_name}, {config.method} saliency ({config.score})"
    plots.save_figures(
        out_dir, salience_figures.study_figures(study, title), echo=False
    )
    summary["seconds"] = round(time.time() - start, 2)
    rundir.write_json(
        os.path.join(out_dir, "summary.json"), salience_study.json_safe(summary)
    )
    # The table is written last: its presence marks a finished study.
    table_md = salience_study.table_markdown(study.rows, settings)
    rundir.write_text(os.path.join(out_dir, "table.md"), table_md)
    print(table_md)
    print(f"results in {out_dir}")
    return summary


def main(argv: list[str]) -> None:
    """Run the salience study from flags."""
    del argv
    if not FLAGS.workdir:
        raise PropmapsError("--workdir is required: the folder of an attack run")
    workdir = FLAGS.workdir
    # Flags are checked here, by name, before anything is read or computed.
    for flag, choices in (
        ("saliency", saliency.METHODS),
        ("saliency_score", saliency.SCORES),
    ):
        if FLAGS[flag].value not in choices:
            raise PropmapsError(
                f"--{flag}={FLAGS[flag].value!r} is unknown; choose one of "
                + ", ".join(choices)
            )
    for flag in ("steps", "smoothgrad_samples"):
        if FLAGS[flag].value < 1:
            raise PropmapsError(f"--{flag} must be at least 1, got {FLAGS[flag].value}")
    config = saliency.SaliencyConfig(
        method=FLAGS.saliency,
        steps=FLAGS.steps,
        samples=FLAGS.smoothgrad_samples,
        sigma=FLAGS.smoothgrad_sigma,
        score=FLAGS.saliency_score,
    )
    model_name, weights = resolve_model(
        workdir, FLAGS.model, FLAGS["model"].present, FLAGS.weights
    )
    run(
        SalienceConfig(
            workdir=workdir,
            model_name=model_name,
            weights=weights,
            config=config,
            seed=FLAGS.seed,
            batch_size=FLAGS.batch_size,
            resamples=FLAGS.bootstrap,
            examples=FLAGS.examples,
        ),
        common.load_data(FLAGS.cifar10_path, FLAGS.data_split),
    )
