"""The locality study's run directory, one model at a time: DIR/<model>/.

`attack_and_study` runs one model's steps: the attack (`attack_run`), then the
study, its controls and the within-image analysis. Each step takes what the
steps before it computed, in memory (the attack's rows, the study's moves, and
the SHA-256 of the bytes written for them: attack.csv, locality.csv), computes
through `propmaps_jax.analysis.locality_study`, and writes its files once, with
a JSON record that marks it done: locality.csv, vulnerability_maps.npz and
locality.json (`locality_for_model`); controls.csv and controls.json
(`controls_for_model`); within_image_rows.npz and within_image.json
(`within_image_for_model`). A step is reused, not recomputed, when its record
holds the same settings (the input files and the weights by content, and the
study's own settings) and its files are intact (`integrity.reusable`); a reused
step's results are read back once (the attack's attack.csv, the study's
locality.csv) and passed on in the same way. The settings dicts here are what
committed runs under docs/results/ recorded, so their keys and values must not
change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments import common
from experiments.report.progress import Progress, say
from experiments.runs import attack_run, integrity, rundir, storage
from propmaps_jax import models, stats
from propmaps_jax.analysis import content, locality, locality_controls, readings
from propmaps_jax.analysis import locality_study as study_lib
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import checkpoint
from propmaps_jax.results import controls_csv, provenance
from propmaps_jax.results import locality_csv as locality_file
from propmaps_jax.results.attack_csv import CSV_NAME, AttackRun, check_dataset

WITHIN_IMAGE_VERSION = 2
# Per (attack, ring position): what the readings experiment refits across runs.
WITHIN_IMAGE_ROWS = "within_image_rows.npz"


def _model_log(name: str) -> Callable[[str], None]:
    """Progress lines of one model (stderr), prefixed with its name."""
    return lambda message: say(f"{name}: {message}")


# The controls' and the within-image records (DIR/<model>/NAME) and the files
# beside them that they vouch for (locality.json: `_reuse`).
RECORD_FILES = {
    "controls.json": ["controls.csv"],
    "within_image.json": [WITHIN_IMAGE_ROWS],
}


def _reused(
    name: str, model_dir: str, record_name: str, settings: dict, what: str
) -> dict | None:
    """The record DIR/<model>/`record_name` when made with these settings and its
    files are intact (`integrity.reusable`), else None; one line says which."""
    cache = os.path.join(model_dir, record_name)
    cached, why = integrity.reusable(cache, settings, RECORD_FILES[record_name])
    if cached is not None:
        say(f"{name}: reusing the {what} in {cache}")
    elif why:
        integrity.note(f"{name}: recomputing the {what}: {why}")
    return cached


def _write_step(
    model_dir: str, record_name: str, record: dict, files: dict[str, bytes]
) -> None:
    """A step's `files` ({name: bytes}) in DIR/<model>/, then its record
    `record_name` with their hashes (which marks the step done)."""
    for name, data in files.items():
        rundir.write_bytes(os.path.join(model_dir, name), data)
    record["files_sha256"] = {
        name: hashlib.sha256(data).hexdigest() for name, data in files.items()
    }
    rundir.write_json(os.path.join(model_dir, record_name), record)


def _reuse(
    name: str, model_dir: str, settings: dict, table: dict, network: bool
) -> tuple[dict, dict[str, np.ndarray], str | None] | None:
    """The stored study of DIR/<model>/ when made with these settings and its files
    are intact (`integrity.reusable`), else None (one line says why): its record
    with its maps, its moves read back once from locality.csv, checked to hold
    the successful attacks of `table` (attack.csv's rows), and that file's
    SHA-256 (None without a successful attack)."""
    cache = os.path.join(model_dir, "locality.json")
    cached, why = integrity.reusable(cache, settings, ["vulnerability_maps.npz"])
    if cached is not None:  # read only when the study would be reused
        maps = integrity.read_npz(os.path.join(model_dir, "vulnerability_maps.npz"))
        if maps is None:
            cached, why = None, "vulnerability_maps.npz is truncated or unreadable"
    if cached is None:
        if why:
            integrity.note(f"{name}: recomputing the locality study: {why}")
        return None
    say(f"{name}: reusing the locality results in {cache}")
    cached["maps"] = maps
    max_distance, succ_rows = settings["max_distance"], np.flatnonzero(table["success"])
    if not len(succ_rows):
        return cached, study_lib.moves_table(table, {}, max_distance), None
    path = os.path.join(model_dir, locality_file.NAME)
    if not storage.isfile(path):
        raise PropmapsError(f"{path} is missing: {locality_file.rerun_locality(path)}")
    data = storage.read_bytes(path)
    moved = locality_file.parse(
        path, data.decode(), max_distance=max_distance, network=network
    )
    if not np.array_equal(moved["index"], table["index"][succ_rows]) or not (
        np.array_equal(
            np.stack([moved["row"], moved["col"]], 1), table["pixels"][succ_rows, 0, :2]
        )
    ):
        raise PropmapsError(
            f"{path} does not hold the successful attacks of "
            f"{os.path.join(model_dir, CSV_NAME)}: delete {cache} and run the "
            "locality experiment again"
        )
    return cached, moved, hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class ModelRun:
    """One model's attack run and what the steps after it (the study, its
    controls, the within-image analysis) take from the experiment: each step
    reads it and records `inputs` (with its own settings) to be reused."""

    name: str
    model_dir: str
    weights_sha256: str
    loaded: tuple  # `common.load_model`'s (config, module, variables, meta)
    dataset: Any
    run: AttackRun
    seed: int
    max_distance: int
    batch_size: int

    def model(self):
        """(apply_fn, variables, pixel permutation or None)."""
        _, module, variables, _ = self.loaded
        permutation = getattr(module, "permutation", None)
        return models.make_apply_fn(module), variables, permutation

    def attacked_images(self) -> tuple[np.ndarray, np.ndarray]:
        """The test images and labels of the run's rows, in its order."""
        x_test, y_test = self.dataset.split("test")
        index = self.run.table["index"]
        return x_test[index], y_test[index]

    def inputs(self, locality_sha256: str | None) -> dict[str, Any]:
        """What a step after the study is made from, the first settings of its
        record (controls.json, within_image.json): reused only when all are equal."""
        return {
            "attack_csv_sha256": self.run.csv_sha256,
            "locality_csv_sha256": locality_sha256,
            "weights_sha256": self.weights_sha256,
            "seed": self.seed,
            "max_distance": self.max_distance,
        }


def locality_for_model(
    step: ModelRun, num_maps: int
) -> tuple[dict[str, Any], dict[str, np.ndarray], str | None]:
    """(record, moves, locality.csv's SHA-256 or None without a successful attack):
    the locality study of one model's attack run (reused if done).

    The study is reused when made from the same attack.csv and weights (both by
    content) and settings; its moves are then read back from
    DIR/<model>/locality.csv, once.
    """
    name, model_dir, run = step.name, step.model_dir, step.run
    table = run.table
    locality.check_one_pixel(table["pixels"])
    settings = {
        "attack_csv_sha256": run.csv_sha256,
        "weights_sha256": step.weights_sha256,
        "seed": step.seed,
        "max_distance": step.max_distance,
        "vulnerability_maps": num_maps,
    }
    apply_fn, variables, permutation = step.model()
    reused = _reuse(name, model_dir, settings, table, permutation is not None)
    if reused is not None:
        return reused
    succ_rows = np.flatnonzero(table["success"])
    check_dataset(run.csv_path, table, *step.dataset.split("test"))
    start = time.time()
    progress = Progress(len(succ_rows), what="images")
    result, study, maps_arrays = study_lib.study_attacks(
        apply_fn,
        variables,
        table,
        *step.attacked_images(),
        seed=step.seed,
        max_distance=step.max_distance,
        num_maps=num_maps,
        batch_size=step.batch_size,
        permutation=permutation,
        log=_model_log(name),
        on_batch=progress.update,
    )
    result["locality_wall_time_s"] = time.time() - start
    record = {"settings": settings, **result}
    files = {}
    if len(succ_rows):
        files[locality_file.NAME] = locality_file.text(table, succ_rows, study).encode()
    files["vulnerability_maps.npz"] = rundir.npz_bytes(maps_arrays)
    _write_step(model_dir, "locality.json", record, files)
    record["maps"] = maps_arrays
    moved = study_lib.moves_table(table, study, step.max_distance)
    return record, moved, record["files_sha256"].get(locality_file.NAME)


def controls_for_model(
    step: ModelRun, moved: dict[str, np.ndarray], locality_sha256: str | None
) -> dict[str, Any] | None:
    """The controls of one model's attack run and its study's moves (`moved`,
    locality.csv's rows; `locality_sha256`: that file's SHA-256).

    Reused (DIR/<model>/controls.json) when made from the same two files, weights
    and settings; writes DIR/<model>/controls.csv and controls.json.
    """
    name, model_dir, table = step.name, step.model_dir, step.run.table
    settings = {
        **step.inputs(locality_sha256),
        "context_tolerance": locality_controls.CONTEXT_TOLERANCE,
        "context_min_distance": locality_controls.CONTEXT_MIN_DISTANCE,
        "bootstrap": study_lib.CONTROLS_BOOTSTRAP,
        "rule": locality_controls.VERDICT_RULE,
    }
    if not table["attacked"].any():
        say(f"{name}: no attacked image, no locality controls")
        return None
    cached = _reused(name, model_dir, "controls.json", settings, "locality controls")
    if cached is not None:
        return cached
    apply_fn, variables, _ = step.model()
    summary, attacked, per_attack, draws = study_lib.controls_study(
        apply_fn,
        variables,
        table,
        moved,
        *step.attacked_images(),
        step.seed,
        step.batch_size,
        log=_model_log(name),
    )
    record = {"settings": settings, **summary}
    text = controls_csv.controls_csv(attacked, per_attack, draws)
    _write_step(model_dir, "controls.json", record, {"controls.csv": text.encode()})
    return record


def within_image_for_model(
    step: ModelRun, moved: dict[str, np.ndarray], locality_sha256: str | None
) -> dict[str, Any] | None:
    """Receptive field or image content: one model's measures (`content`), from
    its attack run and its study's moves (`moved`, locality.csv's rows);
    DIR/<model>/within_image.json.

    The ring outcomes per position are recomputed (locality.csv keeps their counts
    only) and checked against locality.csv's nearby and random outcomes.
    """
    name, model_dir, table = step.name, step.model_dir, step.run.table
    if not table["success"].any():
        say(f"{name}: no successful attack, no within-image analysis")
        return None
    apply_fn, variables, permutation = step.model()
    settings = {
        **step.inputs(locality_sha256),
        "fit_resamples": content.FIT_RESAMPLES,
        "rate_resamples": content.RATE_RESAMPLES,
        "version": WITHIN_IMAGE_VERSION,
    }
    cached = _reused(
        name, model_dir, "within_image.json", settings, "within-image analysis"
    )
    if cached is not None:
        return cached
    try:
        result, arrays = study_lib.within_image_study(
            apply_fn,
            variables,
            table,
            moved,
            *step.attacked_images(),
            step.seed,
            step.max_distance,
            step.batch_size,
            permutation,
            log=_model_log(name),
        )
    except study_lib.OutcomesMismatch:
        locality_csv = os.path.join(model_dir, locality_file.NAME)
        raise PropmapsError(
            f"{locality_csv}'s nearby/random outcomes are not this model's: delete "
            f"{model_dir}/locality.json and run the locality experiment again"
        ) from None
    record = {"settings": settings, **result}
    rows = rundir.npz_bytes(arrays)
    _write_step(model_dir, "within_image.json", record, {WITHIN_IMAGE_ROWS: rows})
    return record


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


def attack_and_study(
    name: str,
    model_dir: str,
    weights: str | None,
    loaded: tuple,
    dataset,
    options: attack_run.AttackOptions,
    *,
    max_distance: int,
    num_maps: int,
    batch_size: int,
    later_work_s: float | None = None,
) -> tuple[dict, dict, dict[str, np.ndarray]] | None:
    """(attack summary, locality record, moves) of one model in DIR/<model>/: the
    attack (`attack_run.run_attack` with `options`), then the study, its controls
    and the within-image analysis, each reused when done; each step takes what
    the steps before it computed (or read back, once, when reused). None on the
    processes of a multi-host run other than the first: they take part in the
    attack only.
    """
    say(f"{name}: one-pixel attack on {options.num_samples} samples in {model_dir}")
    run = attack_run.run_attack(
        model_dir,
        model_name=name,
        weights=weights,
        dataset=dataset,
        loaded=loaded,
        later_work_s=later_work_s,
        **options.arguments(),
    )
    if run is None:
        return None
    step = ModelRun(
        name,
        model_dir,
        provenance.weights_sha256(name, weights),
        loaded,
        dataset,
        run,
        options.seed,
        max_distance,
        batch_size,
    )
    record, moved, locality_sha256 = locality_for_model(step, num_maps)
    record["controls"] = controls_for_model(step, moved, locality_sha256)
    record["within_image"] = within_image_for_model(step, moved, locality_sha256)
    say(
        f"{name}: original {stats.format_proportion(record['original_all'])}; "
        f"random {stats.format_proportion(record['random'])}; "
        f"nearby {stats.format_proportion(record['nearby'])}"
    )
    return run.summary, record, moved


def compare_nearby(
    results: dict[str, dict], moves: dict[str, dict[str, np.ndarray]], seed: int
) -> None:
    """The nearby rate across this run's models (their `moves`), with intervals on
    the differences (`readings.nearby_rate_comparison`), kept in each model's
    within-image record."""
    names = [n for n in results if results[n].get("within_image")]
    if len(names) < 2:
        return
    runs = {
        name: (moves[name]["index"], moves[name]["nearby_success"].astype(bool))
        for name in names
    }
    comparison = readings.nearby_rate_comparison(runs, seed)
    for name in names:
        results[name]["nearby_comparison"] = comparison
