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
from experiments.runs import (
    attack_csv,
    attack_run,
    budget,
    locality_run,
    lock,
    rundir,
    storage,
)
from experiments.runs import locality_csv as locality_file
from propmaps_jax import checkpoint, models
from propmaps_jax.analysis import readings
from propmaps_jax.attack import AttackConfig
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


def check_weights(name: str, weights: str | None) -> None:
    """A model without --weights_<name> needs its bundled checkpoint."""
    if weights is None and not os.path.isfile(checkpoint.bundled_checkpoint_path(name)):
        raise PropmapsError(
            f"no bundled checkpoint for model {name!r} (it has not been trained yet); "
            f"pass --weights_{name}=PATH (a checkpoint of ours or a Keras .h5 file)"
        )


def _attack_and_study(
    name: str,
    workdir: str,
    config: LocalityConfig,
    loaded: tuple,
    dataset,
    later_work_s: float,
) -> tuple:
    """(attack summary, locality record) of one model, each reused when done."""
    model_dir = os.path.join(workdir, name)
    weights, seed = config.weights[name], config.attack.seed
    say(
        f"{name}: one-pixel attack on {config.num_samples[name]} samples in {model_dir}"
    )
    summary = attack_run.run_attack(
        model_dir,
        model_name=name,
        weights=weights,
        dataset=dataset,
        loaded=loaded,
        later_work_s=later_work_s,
        **dataclasses.replace(
            config.attack, num_samples=config.num_samples[name]
        ).arguments(),
    )
    steps = (name, model_dir, weights, loaded, dataset, seed, config.max_distance)
    record = locality_run.locality_for_model(
        *steps, config.vulnerability_maps, config.batch_size
    )
    record["controls"] = locality_run.controls_for_model(*steps, config.batch_size)
    record["within_image"] = locality_run.within_image_for_model(
        *steps, config.batch_size
    )
    say(
        f"{name}: original {report_tables.cell(record['original_all'])}; "
        f"random {report_tables.cell(record['random'])}; "
        f"nearby {report_tables.cell(record['nearby'])}"
    )
    return summary, record


def _compare_nearby(workdir: str, results: dict[str, dict], seed: int) -> None:
    """The nearby rate across this run's models, with intervals on the differences
    (`readings.nearby_rate_comparison`), kept in each model's within-image record."""
    names = [n for n in results if results[n].get("within_image")]
    if len(names) < 2:
        return
    runs = {}
    for name in names:
        moved = locality_file.read(os.path.join(workdir, name, locality_file.NAME))
        runs[name] = (moved["index"], moved["nearby_success"].astype(bool))
    comparison = readings.nearby_rate_comparison(runs, seed)
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
        attack=attack_run.AttackOptions(
            num_samples=FLAGS.num_samples,
            seed=FLAGS.seed,
            sample=FLAGS.sample,
            config=AttackConfig(
                pixels=FLAGS.pixels,
                population=FLAGS.population,
                generations=FLAGS.generations,
            ),
            target=attack_run.parse_target(FLAGS.target),
            slots=FLAGS.slots,
            chunk_size=FLAGS.chunk_size,
            search_dtype=FLAGS.search_dtype,
        ),
        max_distance=FLAGS.max_distance,
        vulnerability_maps=FLAGS.vulnerability_maps,
        batch_size=FLAGS.batch_size,
    )
    check_config(
        config, [n for n in ("model", "weights") if n in FLAGS and FLAGS[n].present]
    )
    if FLAGS.distributed:
        common.initialize_distributed()
    workdir = common.require_workdir(create=False, default=DEFAULT_WORKDIR)
    run(workdir, config)


def run(workdir: str, config: LocalityConfig) -> None:
    """The locality job of `config` in `workdir`: every model's attack and study,
    then DIR/table1.md, table1.csv, controls.csv, locality.json and the figures."""
    names, weights, seed = list(config.models), config.weights, config.attack.seed
    for name in names:
        check_weights(name, weights[name])
    loaded = load_models(names, weights)
    start = time.time()
    dataset = common.load_data()
    check_sample_counts(config, len(dataset.x_test))
    for name in names:  # every model computes, before the first attack starts
        common.check_computes(loaded[name], dataset.x_test, name, weights[name])
    estimate = budget.announce_job(
        {
            n: (
                models.make_apply_fn(loaded[n][1]),
                loaded[n][2],
                config.num_samples[n]
                - attack_csv.images_done(
                    os.path.join(workdir, n), config.num_samples[n]
                ),
            )
            for n in names
        },
        config.num_samples,
        config.attack.config,
        say,
    )
    results: dict[str, dict] = {}
    attack_summaries: dict[str, Any] = {}
    maps: dict[str, dict] = {}
    for name in names:
        if common.past_deadline():
            raise common.TimeLimit(f"{', '.join(results)} done, {name} not started")
        later = names[names.index(name) + 1 :]
        with lock.hold(os.path.join(workdir, name), jax.process_index() == 0):
            attack_summaries[name], record = _attack_and_study(
                name,
                workdir,
                config,
                loaded[name],
                dataset,
                sum(estimate[n] for n in later),
            )
        maps[name] = record.pop("maps")
        results[name] = record
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
    _compare_nearby(workdir, results, seed)
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
    say(f"wrote {workdir}/table1.md, table1.csv, locality.json and figures")
    # The result, on stdout (progress and logs go to stderr).
    print(storage.read_text(os.path.join(workdir, "table1.md")), flush=True)
