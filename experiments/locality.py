"""Locality analysis (paper, section 7, Table 1): the project's main job.

    python launch.py --experiment=locality --models=lenet,resnet --num_samples=5000 \
        --workdir=DIR

For each model: runs (or reuses) the one-pixel attack in DIR/<model>/ (the attack
experiment's flags --num_samples --population --generations --sample --slots
--chunk_size apply; --num_samples_<model> sets one model's sample count), then
moves the colour of every successful attack on the clean image: to one random
adjacent pixel (nearby), to one random other pixel (random),
to every position at Chebyshev distance 1..--max_distance, and, for the first
--vulnerability_maps successful images, to every position (vulnerability maps).

Then the controls of propmaps_jax/locality_controls.py (fragility strata, colour
or place, distance after fragility, the verdict by its fixed rule): one clean
forward per attacked image and three per successful attack.

Writes DIR/table1.md (Table 1, distances, the controls and their verdict),
DIR/table1.csv, DIR/controls.csv, DIR/locality.json, DIR/locality_vs_distance.png,
DIR/locality_controls.png, DIR/vulnerability_map_<model>_<index>.png and, per
model, DIR/<model>/locality.csv (one row per successful attack),
DIR/<model>/controls.csv (one row per attacked image),
DIR/<model>/vulnerability_maps.npz, DIR/<model>/locality.json and
DIR/<model>/controls.json (each reused when run again with the same inputs and
settings).
Models: the bundled checkpoints, or --weights_<model>=PATH (ours or a Keras .h5).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import numpy as np
from absl import flags

import experiments.attack as attack_experiment
from experiments import common, flag_groups
from experiments.report import plots
from experiments.report import tables as report_tables
from experiments.report.progress import Progress, say
from experiments.runs import budget, chunks, integrity, lock, rundir, storage
from propmaps_jax import (
    batching,
    checkpoint,
    locality,
    locality_controls,
    models,
    stats,
)
from propmaps_jax.analysis import content, content_controls, readings
from propmaps_jax.attack import AttackConfig
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import controls_csv, provenance
from propmaps_jax.results import locality_csv as locality_file
from propmaps_jax.results.attack_csv import (
    check_attack_csv,
    check_dataset,
    read_attack_csv,
    read_summary,
)

DEFAULT_WORKDIR = os.path.join("runs", "locality")

flags.DEFINE_string(
    "models", "lenet,resnet", "Comma-separated models (see models.MODEL_REGISTRY)."
)
for _name in models.MODEL_REGISTRY:
    flags.DEFINE_string(
        f"weights_{_name}",
        None,
        f"Weights of model {_name!r} for --models (a checkpoint of ours or a Keras "
        ".h5); default: the bundled checkpoint.",
    )
for _name in models.MODEL_REGISTRY:
    flags.DEFINE_integer(
        f"num_samples_{_name}",
        None,
        f"Test images for model {_name!r}; default --num_samples (e.g. fewer for "
        "the slower ResNet-32 on a CPU).",
    )
flags.DEFINE_integer(
    "vulnerability_maps", 3, "Successful images per model that get a vulnerability map."
)
flags.DEFINE_integer(
    "max_distance", 4, "Largest Chebyshev distance of the success-vs-distance study."
)

FLAGS = flags.FLAGS
# The shared flags this experiment reads (experiments/flag_groups.py).
FLAGS_READ = (
    *flag_groups.RUN,
    *flag_groups.ATTACK,
    *flag_groups.DISTRIBUTED,
    "batch_size",
    "seed",
    "max_minutes",
)


def parse_models(text: str) -> list[str]:
    """The model names of --models, checked."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise PropmapsError(
            "--models is empty: give one or more of " + ", ".join(models.MODEL_REGISTRY)
        )
    for name in names:
        if name not in models.MODEL_REGISTRY:
            raise PropmapsError(
                f"unknown model {name!r} in --models; choose from "
                + ", ".join(models.MODEL_REGISTRY)
            )
    if len(set(names)) != len(names):
        raise PropmapsError(f"--models={text} names a model twice")
    return names


def check_flags() -> None:
    """Attack flags that make no sense for the locality study: a clear error."""
    if FLAGS.pixels != 1:
        raise PropmapsError(
            f"--pixels={FLAGS.pixels}: the locality study moves one pixel; "
            "use --pixels=1"
        )
    if attack_experiment.parse_target(FLAGS.target) is not None:
        raise PropmapsError(
            "--target: the locality study uses untargeted attacks (success = the "
            "prediction differs from the label); drop --target"
        )
    for name in ("model", "weights"):
        if name in FLAGS and FLAGS[name].present:
            raise PropmapsError(
                f"--{name} belongs to the attack experiment; for the locality study "
                "use --models=a,b and --weights_<model>=PATH"
            )
    for name in models.MODEL_REGISTRY:
        count = getattr(FLAGS, f"num_samples_{name}")
        if count is not None and count < 1:
            raise PropmapsError(f"--num_samples_{name} must be >= 1, got {count}")
        if count is not None and name not in parse_models(FLAGS.models):
            raise PropmapsError(
                f"--num_samples_{name} is given but {name!r} is not in "
                f"--models={FLAGS.models}"
            )
    attack_experiment.check_run_flags(
        FLAGS.num_samples, FLAGS.chunk_size, FLAGS.slots, FLAGS.search_dtype
    )
    if FLAGS.max_distance < 1:
        raise PropmapsError(f"--max_distance must be >= 1, got {FLAGS.max_distance}")
    if FLAGS.vulnerability_maps < 0:
        raise PropmapsError(
            f"--vulnerability_maps must be >= 0, got {FLAGS.vulnerability_maps}"
        )


def model_samples(name: str) -> int:
    """--num_samples_<name>, else --num_samples."""
    count = getattr(FLAGS, f"num_samples_{name}")
    return FLAGS.num_samples if count is None else count


def check_sample_counts(names: list[str], num_test: int) -> None:
    """Each model's sample count fits the test split; the error names its flag."""
    for name in names:
        own = FLAGS[f"num_samples_{name}"].value is not None
        flag = f"num_samples_{name}" if own else "num_samples"
        if model_samples(name) > num_test:
            raise PropmapsError(
                f"--{flag}={model_samples(name)} exceeds the {num_test} test images"
            )


def load_models(names: list[str], weights: dict[str, str | None]) -> dict[str, tuple]:
    """`common.load_model` of every model, all checked before any attack starts.

    A broken file is named with its flag (--weights_<model>).
    """
    loaded = {}
    for name in names:
        try:
            loaded[name] = common.load_model(name, weights[name])
        except PropmapsError as e:
            flag = f"--weights_{name}"
            message = str(e).replace("`weights`", flag)
            raise type(e)(
                message if flag in message else f"{flag}: {message}"
            ) from None
    return loaded


def model_weights(name: str) -> str | None:
    """--weights_<name>, or None for the bundled checkpoint (checked to exist)."""
    weights = getattr(FLAGS, f"weights_{name}")
    if weights is None and not os.path.isfile(checkpoint.bundled_checkpoint_path(name)):
        raise PropmapsError(
            f"no bundled checkpoint for model {name!r} (it has not been trained yet); "
            f"pass --weights_{name}=PATH (a checkpoint of ours or a Keras .h5 file)"
        )
    return weights


def log(message: str) -> None:
    """A progress message: stderr (results go to stdout)."""
    say(message)


def study_model(
    name: str,
    apply_fn,
    variables,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    pixels: np.ndarray,
    seed: int,
    max_distance: int,
    batch_size: int,
    permutation: tuple[int, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Per successful attack: nearby/random positions and outcomes, ring successes;
    with a model's pixel `permutation`, also the network-space nearby and rings."""
    n, height, width = len(indices), images.shape[1], images.shape[2]
    rows, cols = pixels[:, 0, 0], pixels[:, 0, 1]
    nearby_rc, random_rc = locality.protocol_moves(
        seed, indices, rows, cols, height, width
    )
    offsets, distances = locality.chebyshev_offsets(max_distance)
    per_batch = max(1, batch_size // (len(offsets) + 2))
    evaluate = functools.partial(
        locality.moves_program(apply_fn, max_distance), variables
    )
    out = {
        "nearby_pred": np.zeros(n, np.int32),
        "nearby_success": np.zeros(n, bool),
        "random_pred": np.zeros(n, np.int32),
        "random_success": np.zeros(n, bool),
        "ring_success": np.zeros((n, len(offsets)), bool),
        "ring_inside": np.zeros((n, len(offsets)), bool),
    }
    log(
        f"{name}: moving the pixels of {n} successful attacks: "
        f"{len(offsets) + 2} forward passes each, {per_batch} images per batch"
    )
    progress = Progress(n, what="images")
    for batch in batching.batches(n, per_batch):
        take, start, count = batch.take, batch.start, batch.count
        nearby, random, rings, inside = jax.device_get(
            evaluate(
                images[take],
                labels[take],
                pixels[take],
                nearby_rc[take],
                random_rc[take],
            )
        )
        part = slice(start, start + count)
        out["nearby_pred"][part] = nearby.pred[:count]
        out["nearby_success"][part] = nearby.success[:count]
        out["random_pred"][part] = random.pred[:count]
        out["random_success"][part] = random.success[:count]
        out["ring_success"][part] = rings.success[:count] & inside[:count]
        out["ring_inside"][part] = inside[:count]
        progress.update(
            start + count, int(out["nearby_success"][: start + count].sum())
        )
    out["nearby_rc"], out["random_rc"], out["distances"] = (
        nearby_rc,
        random_rc,
        distances,
    )
    if permutation is not None:
        out.update(
            network_moves(
                name,
                apply_fn,
                variables,
                images,
                labels,
                indices,
                pixels,
                seed,
                max_distance,
                per_batch,
                permutation,
            )
        )
    return out


def network_moves(
    name,
    apply_fn,
    variables,
    images,
    labels,
    indices,
    pixels,
    seed,
    max_distance,
    per_batch,
    permutation,
) -> dict[str, np.ndarray]:
    """The network-space nearby and rings of a pixel-permuted model's attacks."""
    n, height, width = len(indices), images.shape[1], images.shape[2]
    netnearby_rc = locality.network_protocol_moves(
        seed, indices, pixels[:, 0, 0], pixels[:, 0, 1], permutation, height, width
    )
    offsets, _ = locality.chebyshev_offsets(max_distance)
    evaluate = functools.partial(
        locality.network_moves_program(apply_fn, max_distance, tuple(permutation)),
        variables,
    )
    out = {
        "netnearby_rc": netnearby_rc,
        "netnearby_pred": np.zeros(n, np.int32),
        "netnearby_success": np.zeros(n, bool),
        "netring_success": np.zeros((n, len(offsets)), bool),
        "netring_inside": np.zeros((n, len(offsets)), bool),
    }
    log(f"{name}: the same colours moved in the network's coordinates")
    for batch in batching.batches(n, per_batch):
        take, start, count = batch.take, batch.start, batch.count
        nearby, rings, inside = jax.device_get(
            evaluate(images[take], labels[take], pixels[take], netnearby_rc[take])
        )
        part = slice(start, start + count)
        out["netnearby_pred"][part] = nearby.pred[:count]
        out["netnearby_success"][part] = nearby.success[:count]
        out["netring_success"][part] = rings.success[:count] & inside[:count]
        out["netring_inside"][part] = inside[:count]
    return out


def vulnerability_maps(
    apply_fn,
    variables,
    images: np.ndarray,
    labels: np.ndarray,
    pixels: np.ndarray,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """The colour of each attack at every position of its clean image: (V, H, W)."""
    height, width = images.shape[1], images.shape[2]
    chunk = min(batch_size, height * width)
    compute = functools.partial(
        locality.vulnerability_program(apply_fn, chunk), variables
    )
    maps = [
        jax.device_get(compute(images[i], labels[i], pixels[i, 0, 2:]))
        for i in range(len(images))
    ]
    shape = (len(images), height, width)
    return {
        "pred": np.asarray([m.pred for m in maps], np.int32).reshape(shape),
        "prob_true": np.asarray([m.prob_true for m in maps], np.float32).reshape(shape),
        "success": np.asarray([m.success for m in maps], bool).reshape(shape),
    }


def summarise(
    table: dict[str, np.ndarray], study: dict[str, np.ndarray], max_distance: int
) -> dict[str, Any]:
    """Every rate of one model, with 95% Wilson intervals."""
    n_samples = len(table["index"])
    correct = int(table["attacked"].sum())
    successes = int(table["success"].sum())
    result: dict[str, Any] = {
        "samples": n_samples,
        "correctly_classified": correct,
        "accuracy_on_samples": stats.proportion(correct, n_samples),
        "original_all": stats.proportion(successes, n_samples),
        "original_correct": stats.proportion(successes, correct),
        "random": stats.proportion(int(study["random_success"].sum()), successes),
        "nearby": stats.proportion(int(study["nearby_success"].sum()), successes),
    }
    result["distance"] = _ring_summary(study, "ring", max_distance, successes)
    if "netnearby_success" in study:  # a pixel-permuted model: network space too
        result["network_nearby"] = stats.proportion(
            int(study["netnearby_success"].sum()), successes
        )
        result["network_distance"] = _ring_summary(
            study, "netring", max_distance, successes
        )
    return result


def _ring_summary(study: dict, prefix: str, max_distance: int, successes: int):
    """Per distance: the pooled rate of the rings `prefix`_success / _inside."""
    rings = []
    for d in range(1, max_distance + 1):
        at_d = study["distances"] == d
        inside = study[f"{prefix}_inside"][:, at_d]
        success = study[f"{prefix}_success"][:, at_d]
        fraction = success.sum(axis=1) / np.maximum(inside.sum(axis=1), 1)
        rings.append(
            {
                "distance": d,
                "positions_per_image": int(at_d.sum()),
                "pooled": stats.proportion(int(success.sum()), int(inside.sum())),
                "mean_per_image_rate": float(fraction.mean()) if successes else None,
                "images_with_any_success": stats.proportion(
                    int(success.any(axis=1).sum()), successes
                ),
            }
        )
    return rings


def _reuse(name: str, model_dir: str, settings: dict) -> dict | None:
    """The stored study of DIR/<model>/ when made with these settings and its files
    are intact (`integrity.reusable`), else None (one line says why)."""
    cache = os.path.join(model_dir, "locality.json")
    cached, why = integrity.reusable(cache, settings, ["vulnerability_maps.npz"])
    maps = integrity.read_npz(os.path.join(model_dir, "vulnerability_maps.npz"))
    if cached is not None and maps is None:
        cached, why = None, "vulnerability_maps.npz is truncated or unreadable"
    if cached is None:
        if why:
            integrity.note(f"{name}: recomputing the locality study: {why}")
        return None
    log(f"{name}: reusing the locality results in {cache}")
    cached["maps"] = maps
    return cached


def _empty_study(max_distance: int, permutation=None) -> dict[str, np.ndarray]:
    offsets, distances = locality.chebyshev_offsets(max_distance)
    spaces = ("", "net") if permutation is not None else ("",)
    out: dict[str, np.ndarray] = {"distances": distances}
    for space in spaces:
        out[f"{space}nearby_success"] = np.zeros(0, bool)
        out[f"{space}ring_success"] = np.zeros((0, len(offsets)), bool)
        out[f"{space}ring_inside"] = np.zeros((0, len(offsets)), bool)
    out["random_success"] = np.zeros(0, bool)
    return out


def _maps_summary(maps_arrays: dict, table: dict, succ_rows: np.ndarray) -> list:
    """Per vulnerability map: fooling positions and agreement with the attack."""
    summary = []
    for i, index in enumerate(maps_arrays["index"]):
        row, col = (int(v) for v in maps_arrays["pixels"][i, 0, :2])
        success, prob_true = maps_arrays["success"][i], maps_arrays["prob_true"][i]
        summary.append(
            {
                "index": int(index),
                "fooling_positions": stats.proportion(int(success.sum()), success.size),
                # Consistency with the attack: its own position must fool the model.
                "success_at_attack_position": bool(success[row, col]),
                "prob_true_at_attack_position": float(prob_true[row, col]),
                "attack_prob_true_after": float(table["prob_true_after"][succ_rows[i]]),
            }
        )
    return summary


def _write_model_results(model_dir, table, succ_rows, study, maps_arrays, record):
    """locality.csv, vulnerability_maps.npz, then locality.json (marks it done)."""
    if len(succ_rows):
        rundir.write_text(
            os.path.join(model_dir, "locality.csv"),
            locality_file.text(table, succ_rows, study),
        )
    rundir.write_npz(os.path.join(model_dir, "vulnerability_maps.npz"), maps_arrays)
    record["files_sha256"] = integrity.files_sha256(
        model_dir, ["locality.csv", "vulnerability_maps.npz"]
    )
    rundir.write_json(os.path.join(model_dir, "locality.json"), record)


def locality_for_model(
    name: str,
    model_dir: str,
    weights: str | None,
    loaded: tuple,
    dataset,
    seed: int,
    max_distance: int,
    num_maps: int,
    batch_size: int,
) -> dict[str, Any]:
    """The locality study of one model from DIR/<model>/attack.csv (reused if done).

    `loaded`: `common.load_model(name, weights)`. The study is reused when made
    from the same attack.csv and weights (both by content) and settings.
    """
    attack_csv = os.path.join(model_dir, "attack.csv")
    summary = read_summary(model_dir)
    check_attack_csv(attack_csv, summary)
    table = read_attack_csv(attack_csv, summary=summary)
    locality.check_one_pixel(table["pixels"])
    settings = {
        "attack_csv_sha256": rundir.file_sha256(attack_csv),
        "weights_sha256": provenance.weights_sha256(name, weights),
        "seed": seed,
        "max_distance": max_distance,
        "vulnerability_maps": num_maps,
    }
    cached = _reuse(name, model_dir, settings)
    if cached is not None:
        return cached
    x_test, y_test = dataset.split("test")
    check_dataset(attack_csv, table, x_test, y_test)
    _, module, variables, _ = loaded
    apply_fn = models.make_apply_fn(module)
    succ_rows = np.flatnonzero(table["success"])
    index = table["index"][succ_rows]
    images, labels = x_test[index], y_test[index]
    pixels = table["pixels"][succ_rows].astype(np.int32)
    start = time.time()
    study = (
        study_model(
            name,
            apply_fn,
            variables,
            images,
            labels,
            index,
            pixels,
            seed,
            max_distance,
            batch_size,
            getattr(module, "permutation", None),
        )
        if len(succ_rows)
        else _empty_study(max_distance, getattr(module, "permutation", None))
    )
    num_maps = min(num_maps, len(succ_rows))
    if num_maps:
        log(f"{name}: vulnerability maps of {num_maps} images")
    maps = (
        vulnerability_maps(
            apply_fn,
            variables,
            images[:num_maps],
            labels[:num_maps],
            pixels[:num_maps],
            batch_size,
        )
        if num_maps
        else {}
    )
    maps_arrays = {
        "index": index[:num_maps],
        "label": labels[:num_maps],
        "pixels": pixels[:num_maps],
        **maps,
    }
    result = summarise(table, study, max_distance)
    result["vulnerability_maps"] = (
        _maps_summary(maps_arrays, table, succ_rows) if num_maps else []
    )
    if jax.process_index() != 0:  # only the main process writes
        return {"settings": settings, **result, "maps": maps_arrays}
    result["locality_wall_time_s"] = time.time() - start
    record = {"settings": settings, **result}
    _write_model_results(model_dir, table, succ_rows, study, maps_arrays, record)
    record["maps"] = maps_arrays
    return record


CONTROLS_BOOTSTRAP = 2000
# Recorded and recomputed clean p(true) may differ by float32 rounding (batch size,
# device) but not by more.
PROBABILITY_TOLERANCE = 1e-3
CONTROLS_BOOTSTRAP_STREAM = 0xB00C


@functools.cache
def _controls_evaluator(apply_fn):
    """Jitted: the three control outcomes of a fixed-size batch (variables first)."""

    @jax.jit
    def evaluate(variables, images, labels, pixels, nearby_rc, own, near, context):
        return locality_controls.evaluate_controls(
            apply_fn, variables, images, labels, pixels, nearby_rc, own, near, context
        )

    return evaluate


@functools.cache
def _probabilities_program(apply_fn):
    return jax.jit(
        lambda variables, images: locality_controls.clean_probabilities(
            apply_fn, variables, images
        )
    )


def controls_inputs(
    table: dict[str, np.ndarray], moved: dict[str, np.ndarray], margin: np.ndarray
) -> tuple[dict, dict]:
    """(attacked, per_attack) of the controls' statistics, before the draws.

    table: attack.csv read back; moved: locality.csv read back (its rows are the
    successful attacks, in attack.csv's order); margin: the clean margin of each
    attacked image, in attack.csv's order. Quartiles are over the attacked images.
    """
    attacked_rows = np.flatnonzero(table["attacked"])
    succ_rows = np.flatnonzero(table["success"])
    quartile, cuts = stats.quartile_groups(margin, margin)
    attacked = {
        "index": table["index"][attacked_rows],
        "success": table["success"][attacked_rows],
        "generations": table["generations"][attacked_rows],
        "margin": margin,
        "quartile": quartile,
        "cuts": cuts,
    }
    in_attacked = np.searchsorted(attacked_rows, succ_rows)
    pixels = table["pixels"][succ_rows]
    random_rc = np.stack([moved["random_row"], moved["random_col"]], 1)
    per_attack = {
        "index": table["index"][succ_rows],
        "generation0": table["generations"][succ_rows] == 0,
        "margin": margin[in_attacked],
        "quartile": quartile[in_attacked],
        "ring_n": moved["ring_n"],
        "ring_success": moved["ring_success"],
        "nearby_success": moved["nearby_success"].astype(bool),
        "random_success": moved["random_success"].astype(bool),
        "random_distance": np.max(np.abs(random_rc - pixels[:, 0, :2]), axis=1),
    }
    return attacked, per_attack


def run_controls(
    apply_fn,
    variables,
    table: dict[str, np.ndarray],
    moved: dict[str, np.ndarray],
    x_test: np.ndarray,
    y_test: np.ndarray,
    seed: int,
    batch_size: int,
) -> tuple[dict, dict, locality_controls.Controls]:
    """(attacked, per_attack, draws): margins, strata and control outcomes.

    `moved`: DIR/<model>/locality.csv read back (the successful attacks' moves).
    """
    index = table["index"][table["attacked"]]
    probs = batching.map_batches(
        functools.partial(_probabilities_program(apply_fn), variables),
        [x_test[index]],
        max(1, min(batch_size, len(index))),
    )
    margin = np.asarray(
        locality_controls.clean_margin(probs, y_test[index]), np.float64
    )
    # The margins must be the attacked model's: its clean p(true) as recorded.
    recorded = table["prob_true_before"][table["attacked"]]
    p_true = probs[np.arange(len(index)), y_test[index]]
    if len(index) and np.max(np.abs(p_true - recorded)) > PROBABILITY_TOLERANCE:
        worst = int(index[np.argmax(np.abs(p_true - recorded))])
        raise PropmapsError(
            f"the model's clean p(true) of test image {worst} differs from "
            "attack.csv's prob_true_before by more than "
            f"{PROBABILITY_TOLERANCE:g}: the attack was made with another model or "
            "data; run the locality experiment with that model, or into an empty "
            "--workdir"
        )
    attacked, per_attack = controls_inputs(table, moved, margin)
    succ_rows = np.flatnonzero(table["success"])
    images, labels = x_test[per_attack["index"]], y_test[per_attack["index"]]
    pixels = table["pixels"][succ_rows].astype(np.int32)
    nearby_rc = np.stack([moved["nearby_row"], moved["nearby_col"]], 1)
    draws = locality_controls.draw_controls(
        seed, per_attack["index"], images, pixels, nearby_rc
    )
    per_attack.update(
        context_found=draws.context_found,
        context_candidates=draws.context_candidates,
        context_distance=draws.context_distance,
        nearby_context_distance=draws.nearby_context_distance,
    )
    if len(succ_rows):
        evaluate = functools.partial(_controls_evaluator(apply_fn), variables)
        own, near, context = batching.map_batches(
            evaluate,
            [
                images,
                labels,
                pixels,
                nearby_rc.astype(np.int32),
                draws.own_colour,
                draws.nearby_colour,
                draws.context_rc,
            ],
            max(1, min(batch_size // 3, len(succ_rows))),
        )
        per_attack["own_random_colour_success"] = own.success.astype(bool)
        per_attack["nearby_random_colour_success"] = near.success.astype(bool)
        per_attack["context_success"] = context.success.astype(bool)
    else:
        for move in ("own_random_colour", "nearby_random_colour", "context"):
            per_attack[f"{move}_success"] = np.zeros(0, bool)
    return attacked, per_attack, draws


def _empty_locality(max_distance: int) -> dict[str, np.ndarray]:
    moved = {c: np.zeros(0, np.int64) for c in locality_file.BASE_COLUMNS}
    moved["ring_n"] = np.zeros((0, max_distance), np.int64)
    moved["ring_success"] = np.zeros((0, max_distance), np.int64)
    return moved


def controls_for_model(
    name: str,
    model_dir: str,
    weights: str | None,
    loaded: tuple,
    dataset,
    seed: int,
    max_distance: int,
    batch_size: int,
) -> dict[str, Any] | None:
    """The controls of one model from DIR/<model>/attack.csv and locality.csv.

    Reused (DIR/<model>/controls.json) when made from the same two files, weights
    and settings; writes DIR/<model>/controls.csv and controls.json.
    """
    attack_csv = os.path.join(model_dir, "attack.csv")
    locality_csv = os.path.join(model_dir, "locality.csv")
    table = read_attack_csv(attack_csv)
    succ_rows = np.flatnonzero(table["success"])
    has_moves = storage.isfile(locality_csv)
    settings = {
        "attack_csv_sha256": rundir.file_sha256(attack_csv),
        "locality_csv_sha256": rundir.file_sha256(locality_csv) if has_moves else None,
        "weights_sha256": provenance.weights_sha256(name, weights),
        "seed": seed,
        "max_distance": max_distance,
        "context_tolerance": locality_controls.CONTEXT_TOLERANCE,
        "context_min_distance": locality_controls.CONTEXT_MIN_DISTANCE,
        "bootstrap": CONTROLS_BOOTSTRAP,
        "rule": locality_controls.VERDICT_RULE,
    }
    if not table["attacked"].any():
        log(f"{name}: no attacked image, no locality controls")
        return None
    cache = os.path.join(model_dir, "controls.json")
    cached, why = integrity.reusable(cache, settings, ["controls.csv"])
    if cached is not None:
        log(f"{name}: reusing the locality controls in {cache}")
        return cached
    if why:
        integrity.note(f"{name}: recomputing the locality controls: {why}")
    if len(succ_rows) and not has_moves:
        raise PropmapsError(
            f"{locality_csv} is missing: delete {model_dir}/locality.json and run the "
            "locality experiment again on this --workdir (it reuses attack.csv)"
        )
    moved = (
        locality_file.read(locality_csv, max_distance=max_distance)
        if len(succ_rows)
        else _empty_locality(max_distance)
    )
    if not np.array_equal(moved["index"], table["index"][succ_rows]) or not (
        np.array_equal(
            np.stack([moved["row"], moved["col"]], 1), table["pixels"][succ_rows, 0, :2]
        )
    ):
        raise PropmapsError(
            f"{locality_csv} does not hold the successful attacks of {attack_csv}: "
            f"delete {model_dir}/locality.json and run the locality experiment again"
        )
    x_test, y_test = dataset.split("test")
    _, module, variables, _ = loaded
    apply_fn = models.make_apply_fn(module)
    start = time.time()
    log(
        f"{name}: locality controls of {len(succ_rows)} successful attacks "
        f"({int(table['attacked'].sum())} clean forwards for the margins, 3 per attack)"
    )
    attacked, per_attack, draws = run_controls(
        apply_fn, variables, table, moved, x_test, y_test, seed, batch_size
    )
    forward_s = time.time() - start
    rng = np.random.default_rng([seed, CONTROLS_BOOTSTRAP_STREAM])
    summary = locality_controls.summarise_controls(
        per_attack, attacked, rng, CONTROLS_BOOTSTRAP
    )
    summary["margin_quartile_cuts"] = [float(c) for c in attacked["cuts"]]
    summary["generation0_successes"] = int(per_attack["generation0"].sum())
    summary["forwards_s"] = forward_s
    summary["wall_time_s"] = time.time() - start
    record = {"settings": settings, **summary}
    if jax.process_index() == 0:
        rundir.write_text(
            os.path.join(model_dir, "controls.csv"),
            controls_csv.controls_csv(attacked, per_attack, draws),
        )
        record["files_sha256"] = integrity.files_sha256(model_dir, ["controls.csv"])
        rundir.write_json(cache, record)
    return record


WITHIN_IMAGE_VERSION = 2
# Per (attack, ring position): what the readings experiment refits across runs.
WITHIN_IMAGE_ROWS = "within_image_rows.npz"


def content_controls_for_model(
    apply_fn,
    variables,
    table,
    x_test,
    y_test,
    images,
    labels,
    pixels,
    nearby_rc,
    moves,
    seed,
    batch_size,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The image-content controls (`content_controls`) of one model's successful
    attacks: another attack's colour at the attack's own and at the nearby position
    (the attacks' own colour distribution, where the older control draws uniform
    RGB), the attack's colour at a position matched on 3x3 context *and* distance
    from the centre, and nearby - random per stratum of the clean margin's logit
    and of generation 0 / search, each with an interval from a bootstrap over
    images. Returns (summary, per-attack arrays)."""
    succ_rows = np.flatnonzero(table["success"])
    index = table["index"][succ_rows]
    draws = content_controls.draw_content_controls(seed, index, images, pixels)
    own, near, matched = batching.map_batches(
        functools.partial(_controls_evaluator(apply_fn), variables),
        [
            images,
            labels,
            pixels,
            nearby_rc,
            draws.attack_colour_own,
            draws.attack_colour_nearby,
            draws.matched_rc,
        ],
        max(1, min(batch_size // 3, len(index))),
    )
    attacked = table["index"][table["attacked"]]
    probs = batching.map_batches(
        functools.partial(_probabilities_program(apply_fn), variables),
        [x_test[attacked]],
        max(1, min(batch_size, len(attacked))),
    )
    margin_logit = content.clean_margin_logit(probs, y_test[attacked])
    in_attacked = np.searchsorted(np.flatnonzero(table["attacked"]), succ_rows)
    found = draws.matched_found
    other_own = own.success.astype(bool)
    other_nearby = near.success.astype(bool)
    matched_success = matched.success.astype(bool)
    summary = content.controls_summary(
        moves,
        other_own,
        other_nearby,
        matched_success,
        draws,
        index,
        margin_logit,
        in_attacked,
        table["generations"][succ_rows] == 0,
        seed,
    )
    arrays = {
        "other_colour_own_success": other_own,
        "other_colour_nearby_success": other_nearby,
        "centre_matched_found": found,
        "centre_matched_success": matched_success,
        "margin_logit": margin_logit[in_attacked].astype(np.float32),
    }
    return summary, arrays


def within_image_for_model(
    name: str,
    model_dir: str,
    weights: str | None,
    loaded: tuple,
    dataset,
    seed: int,
    max_distance: int,
    batch_size: int,
) -> dict[str, Any] | None:
    """Receptive field or image content: one model's measures (`content`), from
    DIR/<model>/attack.csv and locality.csv; DIR/<model>/within_image.json.

    The ring outcomes per position are recomputed (locality.csv keeps their counts
    only) and checked against locality.csv's nearby and random outcomes.
    """
    attack_csv = os.path.join(model_dir, "attack.csv")
    locality_csv = os.path.join(model_dir, "locality.csv")
    table = read_attack_csv(attack_csv)
    succ_rows = np.flatnonzero(table["success"])
    if not len(succ_rows):
        log(f"{name}: no successful attack, no within-image analysis")
        return None
    _, module, variables, _ = loaded
    permutation = getattr(module, "permutation", None)
    settings = {
        "attack_csv_sha256": rundir.file_sha256(attack_csv),
        "locality_csv_sha256": rundir.file_sha256(locality_csv),
        "weights_sha256": provenance.weights_sha256(name, weights),
        "seed": seed,
        "max_distance": max_distance,
        "fit_resamples": content.FIT_RESAMPLES,
        "rate_resamples": content.RATE_RESAMPLES,
        "version": WITHIN_IMAGE_VERSION,
    }
    cache = os.path.join(model_dir, "within_image.json")
    cached, why = integrity.reusable(cache, settings, [WITHIN_IMAGE_ROWS])
    if cached is not None:
        log(f"{name}: reusing the within-image analysis in {cache}")
        return cached
    if why:
        integrity.note(f"{name}: recomputing the within-image analysis: {why}")
    moved = locality_file.read(
        locality_csv, max_distance=max_distance, network=permutation is not None
    )
    x_test, y_test = dataset.split("test")
    index = table["index"][succ_rows]
    images, labels = x_test[index], y_test[index]
    pixels = table["pixels"][succ_rows].astype(np.int32)
    nearby_rc = np.stack([moved["nearby_row"], moved["nearby_col"]], 1)
    random_rc = np.stack([moved["random_row"], moved["random_col"]], 1)
    nearby_rc, random_rc = nearby_rc.astype(np.int32), random_rc.astype(np.int32)
    start = time.time()
    log(f"{name}: within-image analysis of {len(index)} successful attacks")
    apply_fn = models.make_apply_fn(module)
    offsets, _ = locality.chebyshev_offsets(max_distance)
    per_batch = max(1, batch_size // (len(offsets) + 2))
    nearby, random, rings, inside = batching.map_batches(
        functools.partial(locality.moves_program(apply_fn, max_distance), variables),
        [images, labels, pixels, nearby_rc, random_rc],
        per_batch,
    )
    if not (
        np.array_equal(nearby.success, moved["nearby_success"].astype(bool))
        and np.array_equal(random.success, moved["random_success"].astype(bool))
    ):
        raise PropmapsError(
            f"{locality_csv}'s nearby/random outcomes are not this model's: delete "
            f"{model_dir}/locality.json and run the locality experiment again"
        )
    spaces = {"image": (rings.success & inside, inside, None)}
    moves = {
        "nearby": moved["nearby_success"].astype(bool),
        "random": moved["random_success"].astype(bool),
    }
    if permutation is not None:
        netnearby_rc = np.stack(
            [moved["netnearby_row"], moved["netnearby_col"]], 1
        ).astype(np.int32)
        net_nearby, net_rings, net_inside = batching.map_batches(
            functools.partial(
                locality.network_moves_program(
                    apply_fn, max_distance, tuple(permutation)
                ),
                variables,
            ),
            [images, labels, pixels, netnearby_rc],
            per_batch,
        )
        spaces["network"] = (net_rings.success & net_inside, net_inside, permutation)
        moves["network_nearby"] = moved["netnearby_success"].astype(bool)
    controls, control_arrays = content_controls_for_model(
        apply_fn,
        variables,
        table,
        x_test,
        y_test,
        images,
        labels,
        pixels,
        nearby_rc,
        moves,
        seed,
        batch_size,
    )
    result: dict[str, Any] = {
        "moves": content.move_rates(moves, index, seed),
        "controls": controls,
        "spaces": {},
    }
    arrays = {"index": index.astype(np.int32), **control_arrays}
    for space, (success, inside_space, perm) in spaces.items():
        rows = content.ring_rows(
            images, pixels, success, inside_space, max_distance, perm
        )
        result["spaces"][space] = {
            "rings": content.ring_rates(rows, max_distance, seed),
            "fixed_effects": content.distance_effects(rows, seed),
        }
        arrays.update(content.rows_to_arrays(rows, space))
    result["wall_time_s"] = time.time() - start
    record = {"settings": settings, **result}
    if jax.process_index() == 0:
        rundir.write_npz(os.path.join(model_dir, WITHIN_IMAGE_ROWS), arrays)
        record["files_sha256"] = integrity.files_sha256(model_dir, [WITHIN_IMAGE_ROWS])
        rundir.write_json(cache, record)
    return record


def _attack_and_study(
    name: str, workdir: str, weights, loaded: tuple, dataset, config
) -> tuple:
    """(attack summary, locality record) of one model, each reused when done."""
    model_dir = os.path.join(workdir, name)
    num_samples = model_samples(name)
    log(f"{name}: one-pixel attack on {num_samples} samples in {model_dir}")
    summary = attack_experiment.run_attack(
        model_dir,
        model_name=name,
        weights=weights,
        dataset=dataset,
        num_samples=num_samples,
        seed=FLAGS.seed,
        sample=FLAGS.sample,
        config=config,
        target=None,
        slots=FLAGS.slots,
        chunk_size=FLAGS.chunk_size,
        search_dtype=FLAGS.search_dtype,
        loaded=loaded,
    )
    record = locality_for_model(
        name,
        model_dir,
        weights,
        loaded,
        dataset,
        FLAGS.seed,
        FLAGS.max_distance,
        FLAGS.vulnerability_maps,
        FLAGS.batch_size,
    )
    record["controls"] = controls_for_model(
        name,
        model_dir,
        weights,
        loaded,
        dataset,
        FLAGS.seed,
        FLAGS.max_distance,
        FLAGS.batch_size,
    )
    record["within_image"] = within_image_for_model(
        name,
        model_dir,
        weights,
        loaded,
        dataset,
        FLAGS.seed,
        FLAGS.max_distance,
        FLAGS.batch_size,
    )
    log(
        f"{name}: original {report_tables.cell(record['original_all'])}; "
        f"random {report_tables.cell(record['random'])}; "
        f"nearby {report_tables.cell(record['nearby'])}"
    )
    return summary, record


def _compare_nearby(workdir: str, results: dict[str, dict]) -> None:
    """The nearby rate across this run's models, with intervals on the differences
    (`readings.nearby_rate_comparison`), kept in each model's within-image record."""
    names = [n for n in results if results[n].get("within_image")]
    if len(names) < 2:
        return
    runs = {}
    for name in names:
        moved = locality_file.read(os.path.join(workdir, name, locality_file.NAME))
        runs[name] = (moved["index"], moved["nearby_success"].astype(bool))
    comparison = readings.nearby_rate_comparison(runs, FLAGS.seed)
    for name in names:
        results[name]["nearby_comparison"] = comparison


def _write_tables_and_figures(workdir, results, maps, settings, dataset) -> list:
    """table1.md, table1.csv and the figures; the names of the map figures."""
    rundir.write_text(
        os.path.join(workdir, "table1.md"),
        report_tables.table1_markdown(results, settings),
    )
    rundir.write_text(
        os.path.join(workdir, "table1.csv"), report_tables.table1_csv(results)
    )
    plots.distance_figure(results, os.path.join(workdir, "locality_vs_distance.png"))
    if any(r.get("controls") for r in results.values()):
        rundir.write_text(
            os.path.join(workdir, "controls.csv"),
            report_tables.controls_table_csv(results),
        )
        plots.controls_distance_figure(
            results, os.path.join(workdir, "locality_controls.png")
        )
    x_test, _ = dataset.split("test")
    figures = []
    for name, model_maps in maps.items():
        for i, index in enumerate(model_maps["index"]):
            path = os.path.join(workdir, f"vulnerability_map_{name}_{int(index)}.png")
            plots.vulnerability_figure(name, x_test[int(index)], model_maps, i, path)
            figures.append(os.path.basename(path))
    return figures


@common.resumable(DEFAULT_WORKDIR)
def main(argv: list[str]) -> None:
    """Attack each model (or reuse), run the locality study, write tables, figures.

    Flags, the workdir, every model's weights and the data are checked before
    the first attack starts and before anything is written.
    """
    del argv
    common.default_batch_size(4096)
    names = parse_models(FLAGS.models)
    check_flags()
    if FLAGS.distributed:
        common.initialize_distributed()
    workdir = common.require_workdir(create=False, default=DEFAULT_WORKDIR)
    config = AttackConfig(
        pixels=FLAGS.pixels, population=FLAGS.population, generations=FLAGS.generations
    )
    weights = {name: model_weights(name) for name in names}
    loaded = load_models(names, weights)
    start = time.time()
    dataset = common.load_data()
    check_sample_counts(names, len(dataset.x_test))
    for name in names:  # every model computes, before the first attack starts
        common.check_computes(loaded[name], dataset.x_test, name, weights[name])
    estimate = budget.announce_job(
        {
            n: (
                models.make_apply_fn(loaded[n][1]),
                loaded[n][2],
                model_samples(n)
                - chunks.images_done(os.path.join(workdir, n), model_samples(n)),
            )
            for n in names
        },
        {n: model_samples(n) for n in names},
        config,
        log,
    )
    results: dict[str, dict] = {}
    attack_summaries: dict[str, Any] = {}
    maps: dict[str, dict] = {}
    for name in names:
        if common.past_deadline():
            raise common.TimeLimit(f"{', '.join(results)} done, {name} not started")
        later = names[names.index(name) + 1 :]
        attack_experiment.LATER_WORK_S[0] = sum(estimate[n] for n in later)
        with lock.hold(os.path.join(workdir, name), jax.process_index() == 0):
            attack_summaries[name], record = _attack_and_study(
                name, workdir, weights[name], loaded[name], dataset, config
            )
        maps[name] = record.pop("maps")
        results[name] = record
    attack_experiment.LATER_WORK_S[0] = None
    if jax.process_index() != 0:
        return
    settings = {
        "models": names,
        "weights": {
            n: os.path.abspath(w) if w else "bundled" for n, w in weights.items()
        },
        "weights_sha256": {
            n: attack_summaries[n]["settings"].get("weights_sha256") for n in names
        },
        "num_samples": {n: model_samples(n) for n in names},
        "sample": FLAGS.sample,
        "seed": FLAGS.seed,
        "attack": config.to_dict(),
        "max_distance": FLAGS.max_distance,
        "vulnerability_maps": FLAGS.vulnerability_maps,
        "batch_size": FLAGS.batch_size,
        "dataset": dataset.source,
    }
    _compare_nearby(workdir, results)
    figures = _write_tables_and_figures(workdir, results, maps, settings, dataset)
    rundir.write_json(
        os.path.join(workdir, "locality.json"),
        {
            "settings": settings,
            "paper_table1": report_tables.PAPER_TABLE1,
            "models": results,
            "attack_summaries": attack_summaries,
            # What the tables were made from (each model's attack.csv, by content).
            "attack_csv_sha256": {
                n: results[n]["settings"]["attack_csv_sha256"] for n in names
            },
            "vulnerability_map_figures": figures,
            "wall_time_s": time.time() - start,
            "device": common.device_description(),
        },
    )
    log(f"wrote {workdir}/table1.md, table1.csv, locality.json and figures")
    # The result, on stdout (progress and logs go to stderr).
    print(storage.read_text(os.path.join(workdir, "table1.md")), flush=True)
