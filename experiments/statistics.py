"""Propagation maps over many attacks (paper section 6, figures 7-9, plus numbers).

    python launch.py --experiment=statistics --model=resnet --weights=W --workdir=DIR

Reads every attacked image of DIR/attack.csv (a failed attack contributes its best
candidate; a run made with another model, other weights or other data than the
ones given is refused, and so is one whose predictions the model does not
reproduce), streams them through the maps in one library call
(`propmaps_jax.analysis.statistics.study_attacks`: running sums on the device,
per-image scalars on the host), and writes to
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
from propmaps_jax import models
from propmaps_jax.analysis import statistics
from propmaps_jax.analysis.claims_markdown import claims_table
from propmaps_jax.figures import propagation as propagation_figures
from propmaps_jax.results import _io, attack_csv, claims_json, statistics_json

FLAGS = flags.FLAGS
# The shared flags this experiment reads (experiments/flag_groups.py).
FLAGS_READ = (
    *flag_groups.RUN,
    *flag_groups.MODEL,
    *flag_groups.FIGURES,
    "batch_size",
    "seed",
)

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


def _kept_generation0(path: str, settings: dict, rows: dict) -> dict | None:
    """The initial populations' best candidates kept in DIR/generation0.npz when
    they are of the same attacks and settings (the maps chosen do not change
    them), else None (recomputed by the study)."""
    if statistics.generation0_problem(settings) is not None:
        return None
    kept = integrity.read_npz(path)  # None when missing, truncated or unreadable
    needed_arrays = ("best", "reported", "success", "index", "settings")
    if (
        kept is not None
        and all(k in kept for k in needed_arrays)
        and str(kept["settings"]) == statistics.generation0_record(settings)
        and np.array_equal(kept["index"], rows["index"])
    ):
        logging.info("initial populations' best candidates from %s", path)
        return {k: kept[k] for k in ("best", "reported", "success")}
    if storage.exists(path):
        integrity.note(
            f"recomputing {GENERATION0_NAME}: unreadable, or of other attacks or "
            "settings"
        )
    return None


def run(cfg: StatisticsConfig, images: np.ndarray, labels: np.ndarray) -> None:
    """Stream all attacks of cfg.workdir/attack.csv and write the statistics."""
    start = time.time()
    workdir = cfg.workdir
    attack_run = attack_csv.load_attack_run(
        workdir, images, labels, model_name=cfg.model, weights=cfg.weights
    )
    csv_path = attack_run.csv_path
    rows = statistics.attacked_rows(attack_run.table, csv_path)
    _, module, variables, _ = common.load_checked_model(cfg.model, cfg.weights, images)
    settings = (attack_run.summary or {}).get("settings", {})
    generation0_path = os.path.join(workdir, GENERATION0_NAME)
    kept = _kept_generation0(generation0_path, settings, rows)
    # Refused before anything is written when the model does not predict what
    # attack.csv records.
    study = statistics.study_attacks(
        models.linen_features(module, cfg.layers),
        variables,
        images,
        rows,
        cfg.batch_size,
        cfg.seed,
        cfg.signed,
        attack_settings=settings,
        generation0=kept,
        source=csv_path,
        progress=_progress,
    )
    if study.mismatches:
        logging.warning(
            "%d of %d perturbed images are now predicted differently from the "
            "pred_after column of attack.csv (another model or data set?)",
            study.mismatches,
            rows["index"].size,
        )
    if not study.control_maps:
        logging.info("no control positions: attacks of more than one pixel")
    if kept is None and not isinstance(study.generation0, str):
        record = np.array(statistics.generation0_record(settings))
        rundir.write_npz(
            generation0_path,
            {**study.generation0, "index": rows["index"], "settings": record},
        )

    out_dir = os.path.join(workdir, cfg.output_folder)
    storage.makedirs(out_dir)
    rundir.write_npz(os.path.join(out_dir, "mean_maps.npz"), study.mean_maps_arrays())
    rundir.write_text(
        os.path.join(out_dir, "per_layer.csv"), _io.csv_text(*study.per_layer_rows())
    )
    report = {"schema": claims_json.SCHEMA, **study.claims_report(cfg.layers)}
    # Before claims.json is written: an earlier one's dates count.
    report["provenance"] = claims_json.run_provenance(csv_path, out_dir, start)
    rundir.write_json(os.path.join(out_dir, claims_json.NAME), report)
    table = claims_table(report)
    rundir.write_text(os.path.join(out_dir, "claims.md"), table)
    for outcome in ("successful", "failed"):
        if study.counts[outcome] == 0:
            path = os.path.join(out_dir, f"mean_pm_avg_{outcome}.png")
            logging.info("no %s attacks: no %s", outcome, path)
    plots.save_figures(
        out_dir, propagation_figures.study_figures(study, cfg.model, cfg.columns)
    )
    summary = statistics_json.summary(
        study, cfg.model, cfg.weights, csv_path, cfg.layers, common.device_description()
    )
    summary["seconds"] = round(time.time() - start, 2)
    rundir.write_json(os.path.join(out_dir, "summary.json"), summary)
    counts = study.counts
    print(
        f"{sum(counts.values())} attacks ({counts['successful']} successful, "
        f"{counts['failed']} failed); results in {out_dir}"
    )
    print(study.layer_table())
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
