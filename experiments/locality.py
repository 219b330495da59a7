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

import dataclasses
import os
import time
from typing import Any

import jax
from absl import flags

from experiments import common, flag_groups
from experiments.report import plots
from experiments.report import tables as report_tables
from experiments.report.progress import say
from experiments.runs import attack_run, budget, chunks, locality_run, rundir, stopping
from propmaps_jax import models
from propmaps_jax.errors import PropmapsError
from propmaps_jax.figures import locality as locality_figures

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


@dataclasses.dataclass(frozen=True)
class LocalityConfig:
    """The locality job, as `main` reads it from the flags."""

    models: tuple[str, ...]
    weights: dict[str, str | None]  # --weights_<model>; None: the bundled checkpoint
    num_samples: dict[str, int]  # per model: --num_samples_<model> or --num_samples
    own_num_samples: dict[str, int | None]  # --num_samples_<model> as given
    attack: attack_run.AttackOptions  # --num_samples is attack.num_samples
    max_distance: int
    vulnerability_maps: int
    batch_size: int
    cifar10_path: str | None = None  # --cifar10_path (None: $CIFAR10_PATH or cache)
    data_split: str = "test"  # --data_split


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


def check_config(config: LocalityConfig, attack_flags_given: list[str]) -> None:
    """Settings that make no sense for the locality study: a clear error.

    `attack_flags_given`: the attack experiment's --model / --weights, if given."""
    if config.attack.config.pixels != 1:
        raise PropmapsError(
            f"--pixels={config.attack.config.pixels}: the locality study moves one "
            "pixel; use --pixels=1"
        )
    if config.attack.target is not None:
        raise PropmapsError(
            "--target: the locality study uses untargeted attacks (success = the "
            "prediction differs from the label); drop --target"
        )
    for name in attack_flags_given:
        raise PropmapsError(
            f"--{name} belongs to the attack experiment; for the locality study "
            "use --models=a,b and --weights_<model>=PATH"
        )
    for name, count in config.own_num_samples.items():
        if count is not None and count < 1:
            raise PropmapsError(f"--num_samples_{name} must be >= 1, got {count}")
        if count is not None and name not in config.models:
            raise PropmapsError(
                f"--num_samples_{name} is given but {name!r} is not in "
                f"--models={','.join(config.models)}"
            )
    config.attack.check()
    if config.max_distance < 1:
        raise PropmapsError(f"--max_distance must be >= 1, got {config.max_distance}")
    if config.vulnerability_maps < 0:
        raise PropmapsError(
            f"--vulnerability_maps must be >= 0, got {config.vulnerability_maps}"
        )


def check_sample_counts(config: LocalityConfig, num_test: int) -> None:
    """Each model's sample count fits the test split; the error names its flag."""
    for name in config.models:
        own = config.own_num_samples.get(name) is not None
        flag = f"num_samples_{name}" if own else "num_samples"
        if config.num_samples[name] > num_test:
            raise PropmapsError(
                f"--{flag}={config.num_samples[name]} exceeds the {num_test} test "
                "images"
            )


def _write_tables_and_figures(
    workdir, results, maps, settings, dataset
) -> tuple[str, list]:
    """table1.md, table1.csv and the figures; (table1.md's text, the names of the
    map figures)."""
    table1 = report_tables.table1_markdown(results, settings)
    rundir.write_text(os.path.join(workdir, "table1.md"), table1)
    rundir.write_text(
        os.path.join(workdir, "table1.csv"), report_tables.table1_csv(results)
    )
    plots.save_figure(
        locality_figures.distance_figure(results),
        os.path.join(workdir, "locality_vs_distance.png"),
    )
    if any(r.get("controls") for r in results.values()):
        rundir.write_text(
            os.path.join(workdir, "controls.csv"),
            report_tables.controls_table_csv(results),
        )
        plots.save_figure(
            locality_figures.controls_distance_figure(results),
            os.path.join(workdir, "locality_controls.png"),
        )
    x_test, _ = dataset.split("test")
    figures = []
    for name, model_maps in maps.items():
        for i, index in enumerate(model_maps["index"]):
            path = os.path.join(workdir, f"vulnerability_map_{name}_{int(index)}.png")
            plots.save_figure(
                locality_figures.vulnerability_figure(
                    name, x_test[int(index)], model_maps, i
                ),
                path,
            )
            figures.append(os.path.basename(path))
    return table1, figures


def main(argv: list[str]) -> None:
    """Attack each model (or reuse), run the locality study, write tables, figures.

    Flags, the workdir, every model's weights and the data are checked before
    the first attack starts and before anything is written.
    """
    del argv
    stopping.start_deadline(FLAGS.max_minutes)
    batch_size = common.default_batch_size(FLAGS.batch_size, 4096)
    names = parse_models(FLAGS.models)
    own_num_samples = {
        n: FLAGS[f"num_samples_{n}"].value for n in models.MODEL_REGISTRY
    }
    config = LocalityConfig(
        models=tuple(names),
        weights={n: FLAGS[f"weights_{n}"].value for n in names},
        num_samples={
            n: FLAGS.num_samples if own_num_samples[n] is None else own_num_samples[n]
            for n in names
        },
        own_num_samples=own_num_samples,
        attack=attack_run.attack_options(FLAGS),
        max_distance=FLAGS.max_distance,
        vulnerability_maps=FLAGS.vulnerability_maps,
        batch_size=batch_size,
        cifar10_path=FLAGS.cifar10_path,
        data_split=FLAGS.data_split,
    )
    check_config(
        config, [n for n in ("model", "weights") if n in FLAGS and FLAGS[n].present]
    )
    if FLAGS.distributed:
        common.initialize_distributed(
            FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
        )
    workdir = common.require_workdir(FLAGS.workdir or DEFAULT_WORKDIR, create=False)
    run(workdir, config)


def run(workdir: str, config: LocalityConfig) -> None:
    """The locality job of `config` in `workdir`: every model's attack and study,
    then DIR/table1.md, table1.csv, controls.csv, locality.json and the figures."""
    names, weights, seed = list(config.models), config.weights, config.attack.seed
    for name in names:
        locality_run.check_weights(name, weights[name])
    loaded = locality_run.load_models(names, weights)
    start = time.time()
    dataset = common.load_data(config.cifar10_path, config.data_split)
    check_sample_counts(config, len(dataset.x_test))
    for name in names:  # every model computes, before the first attack starts
        common.check_computes(loaded[name], dataset.x_test, name, weights[name])
    estimate = budget.announce_job(
        {
            n: (
                models.make_apply_fn(loaded[n][1]),
                loaded[n][2],
                config.num_samples[n]
                - chunks.images_done(os.path.join(workdir, n), config.num_samples[n]),
            )
            for n in names
        },
        config.num_samples,
        config.attack.config,
        say,
    )
    options = {  # each model's attack: its own sample count
        n: dataclasses.replace(config.attack, num_samples=config.num_samples[n])
        for n in names
    }
    results: dict[str, dict] = {}
    attack_summaries: dict[str, Any] = {}
    maps: dict[str, dict] = {}
    moves: dict[str, dict] = {}
    for i, name in enumerate(names):
        if stopping.past_deadline():
            raise stopping.TimeLimit(f"{', '.join(names[:i])} done, {name} not started")
        studied = locality_run.attack_and_study(
            name,
            os.path.join(workdir, name),
            weights[name],
            loaded[name],
            dataset,
            options[name],
            max_distance=config.max_distance,
            num_maps=config.vulnerability_maps,
            batch_size=config.batch_size,
            later_work_s=sum(estimate[n] for n in names[i + 1 :]),
        )
        if studied is None:  # another process of a multi-host run: the attack only
            continue
        attack_summaries[name], results[name], moves[name] = studied
        maps[name] = results[name].pop("maps")
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
        "num_samples": dict(config.num_samples),
        "sample": config.attack.sample,
        "seed": seed,
        "attack": config.attack.config.to_dict(),
        "max_distance": config.max_distance,
        "vulnerability_maps": config.vulnerability_maps,
        "batch_size": config.batch_size,
        "dataset": dataset.source,
    }
    locality_run.compare_nearby(results, moves, seed)
    table1, figures = _write_tables_and_figures(
        workdir, results, maps, settings, dataset
    )
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
    say(f"wrote {workdir}/table1.md, table1.csv, locality.json and figures")
    # The result, on stdout (progress and logs go to stderr): Table 1 and the
    # verdicts last, so that they do not scroll away.
    path = os.path.join(workdir, "table1.md")
    print(report_tables.table1_summary(table1, path), flush=True)
