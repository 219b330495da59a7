"""Propagation maps over many attacks (paper section 6, figures 7-9, plus numbers).

    python launch.py --experiment=statistics --model=resnet --weights=W --workdir=DIR

Reads every attacked image of DIR/attack.csv (a failed attack contributes its best
candidate; a run made with another model, other weights or other data than the
ones given is refused, and so is one whose predictions the model does not
reproduce), streams them through the maps (`propmaps_jax.analysis.statistics`:
running sums on the device, per-image scalars on the host), and writes to
DIR/statistics/:

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
- mean_maps.npz: the mean PM_avg and PM_max maps per layer and outcome;
- claims.json and claims.md: the paper's sentences read as the paper means them
  (`propmaps_jax.analysis.claims.CLAIMS`; the format:
  `propmaps_jax.results.claims_json`, the
  markdown: `propmaps_jax.analysis.claims_markdown`). The effort-matched secondary
  of "failed attacks farther from the centre" is each attack's best candidate of
  its initial population (recomputed from the run's seed, kept in
  DIR/generation0.npz); "concentrate close to the center" compares the last
  layer's mean PM_avg map with the same colours at positions drawn at each
  attack's own distance from the centre and at uniform positions
  (mean_pm_avg_uniform_positions.png). Each claims file says whether its rules
  were fixed before the run's numbers existed (prospective) or not.

--signed and --layers=conv_relu|bn_relu write to statistics_signed/,
statistics_conv_relu/, ... (the default maps: statistics/).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from absl import flags, logging

from experiments import common, flag_groups
from experiments.report import plots
from experiments.report.progress import Progress
from experiments.runs import integrity, rundir, storage
from propmaps_jax import stats
from propmaps_jax.analysis import propagation, statistics
from propmaps_jax.analysis.claims_markdown import claims_table
from propmaps_jax.figures import propagation as propagation_figures
from propmaps_jax.results import _io, attack_csv, claims_json, hashing

FLAGS = flags.FLAGS
# The shared flags this experiment reads (experiments/flag_groups.py).
FLAGS_READ = (
    *flag_groups.RUN,
    *flag_groups.MODEL,
    *flag_groups.FIGURES,
    "batch_size",
    "seed",
)

OUTCOMES = statistics.OUTCOMES
GENERATION0_NAME = "generation0.npz"


@dataclasses.dataclass(frozen=True)
class StatisticsConfig:
    """The settings of one statistics run, read from the flags by `main`."""

    workdir: str
    model: str
    weights: str | None
    batch_size: int
    seed: int
    signed: bool
    layers: str
    columns: int

    @property
    def output_folder(self) -> str:
        """statistics, or statistics_signed / statistics_<layers> for other maps."""
        return common.maps_folder("statistics", self.signed, self.layers)


def _progress(total: int, what: str):
    return Progress(total, what).update


def _generation0(module, variables, images, rows, summary, workdir):
    """`statistics.generation0_best_candidates`, or a string saying why it cannot
    be computed. Kept in DIR/generation0.npz, reused when it is of the same
    attacks and settings (the maps chosen do not change it)."""
    settings = (summary or {}).get("settings", {})
    problem = statistics.generation0_problem(settings)
    if problem is not None:
        return problem
    record = statistics.generation0_record(settings)
    path = os.path.join(workdir, GENERATION0_NAME)
    kept = integrity.read_npz(path)  # None when missing, truncated or unreadable
    needed_arrays = ("best", "reported", "success", "index", "settings")
    if (
        kept is not None
        and all(k in kept for k in needed_arrays)
        and str(kept["settings"]) == record
        and np.array_equal(kept["index"], rows["index"])
    ):
        logging.info("initial populations' best candidates from %s", path)
        return {k: kept[k] for k in ("best", "reported", "success")}
    if storage.exists(path):
        integrity.note(
            f"recomputing {GENERATION0_NAME}: unreadable, or of other attacks or "
            "settings"
        )
    out = statistics.generation0_best_candidates(
        module, variables, images, rows, settings, progress=_progress
    )
    rundir.write_npz(
        path, {**out, "index": rows["index"], "settings": np.array(record)}
    )
    return out


def _figures(cfg, out_dir, mean_maps, shapes, counts, layer_stats, distances, bins):
    """Figures 7, 8 and 9 of the paper and the distance histogram."""
    figures = propagation_figures.statistics_figures(
        mean_maps,
        shapes,
        counts,
        layer_stats,
        distances,
        bins,
        model=cfg.model,
        signed=cfg.signed,
        columns=cfg.columns,
    )
    for outcome in ("successful", "failed"):
        if counts[outcome] == 0:
            path = os.path.join(out_dir, f"mean_pm_avg_{outcome}.png")
            logging.info("no %s attacks: no %s", outcome, path)
    for name, fig in figures.items():
        path = os.path.join(out_dir, name)
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
    cfg, csv_path, rows, counts, mismatches, distances, bins, order, layer_stats
):
    """summary.json (without its wall time): counts, distances, per-layer numbers."""
    bin_edges, uniform = bins
    return {
        "model": cfg.model,
        "weights": cfg.weights,
        "attack_csv": csv_path,
        "signed_maps": cfg.signed,
        "layers": cfg.layers,
        "spread_threshold": propagation.SPREAD_THRESHOLD,
        "attacks": int(rows["index"].size),
        "successful": counts["successful"],
        "failed": counts["failed"],
        "not_attacked": rows["not_attacked"],
        "pred_after_mismatches": mismatches,
        "distance_from_centre": {
            "metric": f"{propagation_figures.DISTANCE_METRIC} from the image centre, "
            "in pixels",
            **{o: stats.distance_stats(distances[o], bin_edges) for o in OUTCOMES},
            "uniform_histogram_fractions": [float(f) for f in uniform],
        },
        "per_layer": {
            layer: {
                outcome: {
                    s: hashing.finite_json(layer_stats[outcome][s][j])
                    for s in layer_stats[outcome]
                }
                for outcome in OUTCOMES
            }
            for j, layer in enumerate(order)
        },
        "device": common.device_description(),
    }


def run(cfg: StatisticsConfig, images: np.ndarray, labels: np.ndarray) -> None:
    """Stream all attacks of cfg.workdir/attack.csv and write the statistics."""
    start = time.time()
    workdir = cfg.workdir
    attack_run = attack_csv.load_attack_run(
        workdir, images, labels, model_name=cfg.model, weights=cfg.weights
    )
    csv_path = attack_run.csv_path
    rows = statistics.attacked_rows(attack_run.table, csv_path)
    loaded = common.load_model(cfg.model, cfg.weights)
    common.check_computes(loaded, images, cfg.model, cfg.weights)
    config, module, variables, _ = loaded
    filter_fn, _ = propagation.layer_selection(cfg.layers)
    shapes = propagation.layer_shapes(module, variables, config.image_shape, filter_fn)
    order = list(shapes)
    maps_of = dict(signed=cfg.signed, layers=cfg.layers, progress=_progress)
    state, scalars, predicted = statistics.stream_statistics(
        module, variables, shapes, images, rows, cfg.batch_size, **maps_of
    )
    success, total = rows["success"], rows["index"].size
    counts = {"failed": int(state["count"][0]), "successful": int(state["count"][1])}
    mismatches = int(np.sum(predicted != rows["pred_after"]))
    # Before anything is written: the model must predict what attack.csv records
    # (the one check of runs recorded without a weights hash; a few near ties
    # may flip on another device).
    attack_csv.require_predictions_match(csv_path, mismatches, total)
    if mismatches:
        logging.warning(
            "%d of %d perturbed images are now predicted differently from the "
            "pred_after column of attack.csv (another model or data set?)",
            mismatches,
            total,
        )

    if rows["pixels"].shape[1] == 1:
        control_states = statistics.control_statistics(
            module, variables, shapes, images, rows, cfg.batch_size, cfg.seed, **maps_of
        )
    else:
        control_states = {}
        logging.info("no control positions: attacks of more than one pixel")
    generation0 = _generation0(
        module, variables, images, rows, attack_run.summary, workdir
    )

    masks = {"successful": success, "failed": ~success, "all": np.ones_like(success)}
    layer_stats = {
        o: propagation.per_outcome_layer_stats(scalars, masks[o]) for o in OUTCOMES
    }
    height, width = images.shape[1:3]
    distances = stats.distance_from_centre(rows["pixels"], height, width)
    bin_edges = stats.distance_bin_edges(height, width)
    distance_by_outcome = {o: distances[masks[o]].reshape(-1) for o in OUTCOMES}
    bins = (bin_edges, stats.uniform_distance_fractions(height, width, bin_edges))

    out_dir = os.path.join(workdir, cfg.output_folder)
    storage.makedirs(out_dir)
    mean_maps = statistics.mean_maps(state, counts, order)
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
        _io.csv_text(*statistics.per_layer_rows(shapes, layer_stats, masks)),
    )
    summary = _summary(
        cfg,
        csv_path,
        rows,
        counts,
        mismatches,
        distance_by_outcome,
        bins,
        order,
        layer_stats,
    )
    control_maps = {
        name: statistics.mean_maps(s, counts, order)
        for name, s in control_states.items()
    }
    report = {
        "schema": claims_json.SCHEMA,
        **statistics.claims_report(
            rows,
            scalars,
            order,
            mean_maps,
            control_maps,
            generation0,
            (height, width),
            cfg.signed,
            cfg.layers,
        ),
    }
    # Before claims.json is written: an earlier one's dates count.
    report["provenance"] = claims_json.run_provenance(csv_path, out_dir, start)
    rundir.write_json(os.path.join(out_dir, claims_json.NAME), report)
    table = claims_table(report)
    rundir.write_text(os.path.join(out_dir, "claims.md"), table)
    if control_maps and counts["successful"]:
        fig = propagation_figures.mean_maps_figure(
            control_maps["uniform_positions"]["pm_avg/successful"],
            shapes,
            f"Control: mean PM_avg of the {counts['successful']} successful attacks' "
            f"colours put at uniformly drawn positions, {cfg.model} (compare "
            "figure 7: what padding geometry alone gives)",
            "colour scale of each layer: 0 .. the maximum of its mean map",
            columns=cfg.columns,
            bar_title="mean PM_avg",
        )
        plots.save_figure(
            fig, os.path.join(out_dir, "mean_pm_avg_uniform_positions.png")
        )
    summary["seconds"] = round(time.time() - start, 2)
    rundir.write_json(os.path.join(out_dir, "summary.json"), summary)
    _figures(
        cfg, out_dir, mean_maps, shapes, counts, layer_stats, distance_by_outcome, bins
    )
    _print_table(out_dir, order, counts, layer_stats)
    print(table)


def main(argv: list[str]) -> None:
    """Stream all attacks of DIR/attack.csv through the maps and write statistics."""
    del argv
    batch_size = common.default_batch_size(FLAGS.batch_size, 64)
    cfg = StatisticsConfig(
        # Not created here: a mistyped --workdir is not left behind by an error.
        workdir=common.require_workdir(FLAGS.workdir, create=False),
        model=FLAGS.model,
        weights=FLAGS.weights,
        batch_size=batch_size,
        seed=FLAGS.seed,
        signed=FLAGS.signed,
        layers=FLAGS.layers,
        columns=FLAGS.columns,
    )
    # Data before the model: bad input is reported without compiling anything.
    images, labels = common.load_data(FLAGS.cifar10_path, FLAGS.data_split).split(
        "test"
    )
    run(cfg, images, labels)
