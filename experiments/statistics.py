"""Propagation maps over many attacks (paper section 6, figures 7-9, plus numbers).

    python launch.py --experiment=statistics --model=resnet --weights=W --workdir=DIR

Reads every attacked image of DIR/attack.csv (a failed attack contributes its best
candidate; a run made with another model, other weights or other data than the
ones given is refused, and so is one whose predictions the model does not
reproduce), streams them in batches through one jitted step that adds the
propagation maps to running sums on the device (only per-image scalars come back
to the host), and writes to DIR/statistics/:

- mean_pm_avg_successful.png, mean_pm_avg_failed.png (figures 7/8): per layer the
  mean PM_avg over successful / failed attacks, each panel scaled to its own max;
- layer_means.png (figure 9): per layer the mean |FM - FM_adv| over all feature
  maps for successful and failed attacks, beside the mean original feature map;
- distance_from_centre.png: where the attacked pixels lie (Chebyshev distance
  max(|dr|, |dc|) from the image centre, one bin per square ring, beside the share
  of positions in each ring: where pixels chosen at random would lie);
- per_layer.csv and summary.json: per layer and outcome the mean and 95th
  percentile of max|dFM| / max FM, the fraction of attacks where it reaches 1, the
  spread (fraction of positions where PM_max > 10% of the layer's original max),
  the mean |dFM| and mean FM; per outcome the distance of the pixel from the centre;
- mean_maps.npz: the mean PM_avg and PM_max maps per layer and outcome.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from experiments import common, plots, results, rundir
from propmaps_jax import propagation
from propmaps_jax.errors import PropmapsError
from propmaps_jax.perturb import apply_pixels_batch

FLAGS = flags.FLAGS

OUTCOMES = ("successful", "failed", "all")
DISTANCE_BIN_WIDTH = 1.0
DISTANCE_METRIC = "Chebyshev distance (max(|dr|, |dc|))"


def _nan_to_none(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def _nan_stat(fn, values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(fn(values)) if values.size else float("nan")


def per_outcome_layer_stats(
    scalars: dict[str, np.ndarray], mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-layer statistics (L,) over the attacks selected by `mask` (N,).

    `scalars[name]` are per-image values (N, L) from `propagation.layer_summaries`.
    """
    num_layers = scalars["max_ratio"].shape[1]
    out: dict[str, np.ndarray] = {}
    for stat, source, fn in (
        ("max_ratio_mean", "max_ratio", np.mean),
        ("max_ratio_p95", "max_ratio", lambda v: np.percentile(v, 95)),
        ("reaches_max_fraction", "max_ratio", lambda v: np.mean(v >= 1.0)),
        ("spread_mean", "spread", np.mean),
        ("spread_p95", "spread", lambda v: np.percentile(v, 95)),
        ("mean_abs_diff", "mean_abs_diff", np.mean),
        ("mean_fm", "mean_fm", np.mean),
        ("mean_abs_fm", "mean_abs_fm", np.mean),
    ):
        values = scalars[source][mask]
        out[stat] = np.array(
            [_nan_stat(fn, values[:, j]) for j in range(num_layers)], np.float64
        )
    return out


def distance_from_centre(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Chebyshev distance max(|dr|, |dc|) of pixels (..., >= 2) (row, col first)
    from the image centre ((height - 1) / 2, (width - 1) / 2).

    The rings of the locality study are Chebyshev rings too: on a 32x32 image the
    distances are 0.5, 1.5, .., 15.5, one value per square ring of pixels.
    """
    centre_row, centre_col = (height - 1) / 2.0, (width - 1) / 2.0
    return np.maximum(
        np.abs(pixels[..., 0] - centre_row), np.abs(pixels[..., 1] - centre_col)
    )


def distance_bin_edges(height: int, width: int) -> np.ndarray:
    """Histogram edges 0, 1, 2, ..: one bin per square ring around the centre."""
    largest = max(height - 1, width - 1) / 2.0
    return np.arange(0.0, math.floor(largest) + 2.0, DISTANCE_BIN_WIDTH)


def uniform_distance_fractions(
    height: int, width: int, bin_edges: np.ndarray
) -> np.ndarray:
    """Fraction of all image positions per distance bin: where pixels chosen
    uniformly at random would lie (outer rings hold more positions)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    everywhere = distance_from_centre(np.stack([rows, cols], -1), height, width)
    counts, _ = np.histogram(everywhere, bins=bin_edges)
    return counts / everywhere.size


def distance_stats(distances: np.ndarray, bin_edges: np.ndarray) -> dict:
    """Mean, median, quartiles and histogram of pixel distances from the centre."""
    if distances.size == 0:
        return {"pixels": 0}
    counts, _ = np.histogram(distances, bins=bin_edges)
    q1, median, q3 = np.percentile(distances, [25, 50, 75])
    return {
        "pixels": int(distances.size),
        "mean": float(np.mean(distances)),
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "histogram_edges": [float(e) for e in bin_edges],
        "histogram_counts": [int(c) for c in counts],
    }


def _attacked(run: results.AttackRun) -> dict[str, np.ndarray]:
    """The attacked rows of an attack run: index, pixels, success, pred_after, and
    the number of rows that were not attacked."""
    table = run.table
    attacked = np.flatnonzero(table["attacked"])
    if attacked.size == 0:
        raise PropmapsError(
            f"{run.csv_path} holds no attacked image (all were misclassified before "
            "the attack or it is empty): attack more images first"
        )
    rows = {k: table[k][attacked] for k in ("index", "pixels", "success", "pred_after")}
    rows["not_attacked"] = int(table["index"].size - attacked.size)
    return rows


def _stream(module, variables, shapes, images, rows, batch_size, signed):
    """(running sums, per-image scalars {name: (N, L)}, predictions after) of every
    attack, in batches through one jitted step (sums stay on the device)."""
    order = list(shapes)

    def step(state, v, batch_images, batch_pixels, batch_success, valid):
        perturbed = apply_pixels_batch(batch_images, batch_pixels)
        return propagation.accumulate_statistics(
            state, module, v, batch_images, perturbed, batch_success, valid, signed
        )

    step = jax.jit(step, donate_argnums=0)
    state = propagation.init_statistics(shapes)
    indices, pixels, success = rows["index"], rows["pixels"], rows["success"]
    total = indices.size
    scalars = {
        name: np.empty((total, len(order)), np.float64)
        for name in propagation.SUMMARY_NAMES
    }
    predicted = np.empty((total,), np.int64)
    progress = common.Progress(total, "attacks")
    for begin in range(0, total, batch_size):
        end = min(begin + batch_size, total)
        # Pad the last batch by repeating its first row (masked out) to keep one shape.
        take = np.concatenate(
            [np.arange(begin, end), np.full(batch_size - (end - begin), begin)]
        )
        valid = np.arange(batch_size) < end - begin
        state, out = step(
            state,
            variables,
            jnp.asarray(images[indices[take]]),
            jnp.asarray(pixels[take]),
            jnp.asarray(success[take]),
            jnp.asarray(valid),
        )
        out = jax.device_get(out)
        count = end - begin
        for name in propagation.SUMMARY_NAMES:
            scalars[name][begin:end] = np.stack(
                [out["summaries"][layer][name][:count] for layer in order], axis=1
            )
        predicted[begin:end] = np.argmax(out["logits_adv"][:count], axis=-1)
        progress.update(end, successes=int(success[:end].sum()))
    return jax.device_get(state), scalars, predicted


def _mean_maps(state, counts: dict[str, int], order: list[str]) -> dict:
    """{"pm_avg/successful": {layer: (H, W)}, ...}: the mean maps per outcome."""
    # Outcome index 0 = failed, 1 = successful (see init_statistics).
    mean_maps = {}
    for outcome, slot in (("failed", 0), ("successful", 1)):
        n = max(counts[outcome], 1)
        for reduce in ("avg", "max"):
            mean_maps[f"pm_{reduce}/{outcome}"] = {
                layer: state[f"pm_{reduce}_sum"][layer][slot] / n for layer in order
            }
    return mean_maps


def _per_layer_csv(shapes, layer_stats, masks) -> str:
    header = ["layer", "height", "width", "channels", "outcome", "attacks"] + list(
        layer_stats["all"]
    )
    csv_rows = []
    for j, layer in enumerate(shapes):
        for outcome in OUTCOMES:
            n = int(masks[outcome].sum())
            csv_rows.append(
                [layer, *shapes[layer], outcome, n]
                + [f"{layer_stats[outcome][s][j]:.6g}" for s in layer_stats[outcome]]
            )
    return rundir.csv_text(header, csv_rows)


def _figures(out_dir, mean_maps, shapes, counts, layer_stats, distances, bins):
    """Figures 7, 8 and 9 of the paper and the distance histogram."""
    order, total = list(shapes), sum(counts.values())
    what = "FM - FM_adv" if FLAGS.signed else "|FM - FM_adv|"
    for figure, outcome in (("7", "successful"), ("8", "failed")):
        path = os.path.join(out_dir, f"mean_pm_avg_{outcome}.png")
        if counts[outcome] == 0:
            logging.info("no %s attacks: no %s", outcome, path)
            continue
        fig = plots.mean_maps_figure(
            mean_maps[f"pm_avg/{outcome}"],
            shapes,
            f"Mean PM_avg (mean over channels of {what}) over {counts[outcome]} "
            f"{outcome} attacks, {FLAGS.model} (figure {figure} of the paper)",
            "colour scale of each layer: 0 .. the maximum of its mean map "
            "(not scaled to the feature maps)",
            columns=FLAGS.columns,
            bar_title="mean PM_avg",
        )
        plots.save_figure(fig, path)
        print(f"wrote {path}")

    # Pre-activation conv outputs are often negative on average: compare the mean
    # |dFM| with the mean magnitude |FM| of the original maps (log scale); the signed
    # mean FM is in per_layer.csv.
    curves = {
        f"successful ({counts['successful']}): mean |FM - FM_adv|": layer_stats[
            "successful"
        ]["mean_abs_diff"],
        f"failed ({counts['failed']}): mean |FM - FM_adv|": layer_stats["failed"][
            "mean_abs_diff"
        ],
        "original feature maps: mean |FM| (all attacked images)": layer_stats["all"][
            "mean_abs_fm"
        ],
    }
    all_values = np.concatenate([np.asarray(c) for c in curves.values()])
    log_scale = bool(np.all(all_values[np.isfinite(all_values)] > 0))
    fig = plots.layer_means_figure(
        order,
        curves,
        f"Mean over all feature maps (positions and channels) per layer, "
        f"{FLAGS.model}, {total} attacks (figure 9 of the paper)",
        "mean value" + (" (log scale)" if log_scale else ""),
        log_scale=log_scale,
    )
    path = os.path.join(out_dir, "layer_means.png")
    plots.save_figure(fig, path)
    print(f"wrote {path}")

    bin_edges, uniform = bins
    fig = plots.distance_histogram_figure(
        {o: distances[o] for o in ("successful", "failed")},
        bin_edges,
        f"Attacked pixels: {DISTANCE_METRIC} from the image centre, {FLAGS.model}",
        f"{DISTANCE_METRIC} of the attacked pixel from the image centre (pixels)",
        uniform=uniform,
    )
    path = os.path.join(out_dir, "distance_from_centre.png")
    plots.save_figure(fig, path)
    print(f"wrote {path}")


def _print_table(out_dir, order, counts, layer_stats) -> None:
    print(
        f"{sum(counts.values())} attacks ({counts['successful']} successful, "
        f"{counts['failed']} failed); results in {out_dir}"
    )
    print(f"{'layer':<26} {'outcome':<11} {'ratio mean':>10} {'p95':>7} {'spread':>7}")
    for j, layer in enumerate(order):
        for outcome in ("successful", "failed"):
            s = layer_stats[outcome]
            print(
                f"{layer:<26} {outcome:<11} {s['max_ratio_mean'][j]:>10.3f} "
                f"{s['max_ratio_p95'][j]:>7.3f} {s['spread_mean'][j]:>7.1%}"
            )


def _summary(
    csv_path,
    rows,
    counts,
    mismatches,
    distance_by_outcome,
    bin_edges,
    uniform,
    order,
    layer_stats,
) -> dict:
    """summary.json (without its wall time): counts, distances, per-layer numbers."""
    return {
        "model": FLAGS.model,
        "weights": FLAGS.weights,
        "attack_csv": csv_path,
        "signed_maps": FLAGS.signed,
        "spread_threshold": propagation.SPREAD_THRESHOLD,
        "attacks": int(rows["index"].size),
        "successful": counts["successful"],
        "failed": counts["failed"],
        "not_attacked": rows["not_attacked"],
        "pred_after_mismatches": mismatches,
        "distance_from_centre": {
            "metric": f"{DISTANCE_METRIC} from the image centre, in pixels",
            **{o: distance_stats(distance_by_outcome[o], bin_edges) for o in OUTCOMES},
            "uniform_histogram_fractions": [float(f) for f in uniform],
        },
        "per_layer": {
            layer: {
                outcome: {
                    s: _nan_to_none(layer_stats[outcome][s][j])
                    for s in layer_stats[outcome]
                }
                for outcome in OUTCOMES
            }
            for j, layer in enumerate(order)
        },
        "device": common.device_description(),
    }


def main(argv: list[str]) -> None:
    """Stream all attacks of DIR/attack.csv through the maps and write statistics."""
    del argv
    common.default_batch_size(64)
    start = time.time()
    # Not created here: a mistyped --workdir is not left behind by an error.
    workdir = common.require_workdir(create=False)
    # Data before the model: bad input is reported without compiling anything.
    images, labels = common.load_data().split("test")
    run = results.load_attack_run(
        workdir, images, labels, model_name=FLAGS.model, weights=FLAGS.weights
    )
    csv_path = run.csv_path
    rows = _attacked(run)
    config, module, variables, _ = common.load_model(FLAGS.model, FLAGS.weights)
    shapes = propagation.layer_shapes(module, variables, config.image_shape)
    order = list(shapes)
    state, scalars, predicted = _stream(
        module, variables, shapes, images, rows, FLAGS.batch_size, FLAGS.signed
    )
    success, total = rows["success"], rows["index"].size
    counts = {"failed": int(state["count"][0]), "successful": int(state["count"][1])}
    mismatches = int(np.sum(predicted != rows["pred_after"]))
    # Before anything is written: the model must predict what attack.csv records
    # (the one check of runs recorded without a weights hash; a few near ties
    # may flip on another device).
    results.require_predictions_match(csv_path, mismatches, total)
    if mismatches:
        logging.warning(
            "%d of %d perturbed images are now predicted differently from the "
            "pred_after column of attack.csv (another model or data set?)",
            mismatches,
            total,
        )

    masks = {"successful": success, "failed": ~success, "all": np.ones_like(success)}
    layer_stats = {o: per_outcome_layer_stats(scalars, masks[o]) for o in OUTCOMES}
    height, width = images.shape[1:3]
    distances = distance_from_centre(rows["pixels"], height, width)
    bin_edges = distance_bin_edges(height, width)
    distance_by_outcome = {o: distances[masks[o]].reshape(-1) for o in OUTCOMES}
    uniform = uniform_distance_fractions(height, width, bin_edges)

    out_dir = os.path.join(workdir, "statistics")
    os.makedirs(out_dir, exist_ok=True)
    mean_maps = _mean_maps(state, counts, order)
    rundir.write_npz(
        os.path.join(out_dir, "mean_maps.npz"),
        {
            "layers": np.array(order),
            "counts": np.array([counts["failed"], counts["successful"]]),
            **{
                f"{key}/{layer}": value
                for key, maps in mean_maps.items()
                for layer, value in maps.items()
            },
        },
    )
    rundir.write_text(
        os.path.join(out_dir, "per_layer.csv"),
        _per_layer_csv(shapes, layer_stats, masks),
    )
    summary = _summary(
        csv_path,
        rows,
        counts,
        mismatches,
        distance_by_outcome,
        bin_edges,
        uniform,
        order,
        layer_stats,
    )
    summary["seconds"] = round(time.time() - start, 2)
    rundir.write_json(os.path.join(out_dir, "summary.json"), summary)
    _figures(
        out_dir,
        mean_maps,
        shapes,
        counts,
        layer_stats,
        distance_by_outcome,
        (bin_edges, uniform),
    )
    _print_table(out_dir, order, counts, layer_stats)
