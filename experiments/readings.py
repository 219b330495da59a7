"""Receptive field or image content: the measured tests, the verdict, the comparison.

    python launch.py --experiment=readings --workdir=docs/results/readings_cpu \
        --runs=lenet_perm=docs/results/lenet_perm_2000_cpu/lenet_perm,\
mlp=docs/results/mlp_2000_cpu/mlp,...

Reads each model folder's locality.csv and within_image_rows.npz (written by the
locality experiment) and computes the tests of `propmaps_jax.analysis.readings`,
whose predictions and rule were committed before the numbers. `--runs` names
`label=DIR/<model>` pairs; the labels the tests use are lenet_perm, mlp, lenet_k3,
lenet_k7, lenet (the paper's LeNet), jpeg and lossless (the Keras LeNet on the
first training images, as JPEG-decoded and as lossless); any other label (e.g.
resnet, mlp_seed1) joins the comparison of nearby rates across networks, which
takes every run on the test split. A test whose runs are not given is "not
measured". Writes DIR/readings.md, readings.json and readings_distance.png.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
from absl import flags

from experiments import common
from experiments.report import plots
from experiments.runs import integrity, rundir, storage
from propmaps_jax.analysis import content, readings
from propmaps_jax.errors import PropmapsError
from propmaps_jax.figures import readings as readings_figures
from propmaps_jax.results import locality_csv as locality_file

flags.DEFINE_string(
    "runs",
    None,
    "Comma-separated label=DIR/<model> of locality runs (labels: lenet_perm, mlp, "
    "lenet_k3, lenet_k7, lenet, jpeg, lossless; others join the comparison).",
)

FLAGS = flags.FLAGS
FLAGS_READ = ("workdir", "seed", "runs")
ROWS_FILE = "within_image_rows.npz"
ROLES = ("lenet_perm", "mlp", "lenet_k3", "lenet_k7", "lenet", "jpeg", "lossless")
TRAIN_SPLIT_ROLES = ("jpeg", "lossless")
FIGURE_NAMES = {
    "jpeg": "Keras LeNet, JPEG, train",
    "lossless": "Keras LeNet, lossless, train",
}


def parse_runs(text: str | None) -> dict[str, str]:
    """{label: model folder} of --runs, checked to exist."""
    if not text:
        raise PropmapsError(
            "--runs is empty: give label=DIR/<model> pairs, e.g. "
            "--runs=lenet_perm=docs/results/lenet_perm_2000_cpu/lenet_perm"
        )
    runs = {}
    for item in text.split(","):
        label, sep, path = item.strip().partition("=")
        if not sep or not label or not path:
            raise PropmapsError(f"--runs: {item!r} is not label=DIR/<model>")
        if label in runs:
            raise PropmapsError(f"--runs names {label!r} twice")
        runs[label] = path
    return runs


def load_run(label: str, folder: str) -> dict[str, Any]:
    """A model folder's moves (locality.csv) and ring rows (within_image_rows.npz)."""
    rows_path = os.path.join(folder, ROWS_FILE)
    csv_path = os.path.join(folder, locality_file.NAME)
    if not storage.isfile(rows_path) or not storage.isfile(csv_path):
        raise PropmapsError(
            f"--runs {label}={folder}: no {locality_file.NAME} and {ROWS_FILE} "
            "there; run the locality experiment on its workdir first "
            "(python launch.py --experiment=locality --workdir=... --models=...)"
        )
    arrays = integrity.read_npz(rows_path)
    if arrays is None or "index" not in arrays:
        raise PropmapsError(
            f"{rows_path} is truncated or unreadable: delete it and "
            "within_image.json beside it, and run the locality experiment again"
        )
    network = "network_attack" in arrays
    moved = locality_file.read(csv_path, network=network)
    if not np.array_equal(moved["index"], arrays["index"]):
        raise PropmapsError(
            f"{rows_path} does not belong to {csv_path}: delete it and "
            "within_image.json beside it, and run the locality experiment again"
        )
    run = {"index": arrays["index"].astype(np.int64), "moved": moved, "spaces": {}}
    for space in ("image", "network"):
        if f"{space}_attack" in arrays:
            rows = content.rows_from_arrays(arrays, space)
            rows["image"] = run["index"]
            run["spaces"][space] = rows
    summary = integrity.read_json_record(os.path.join(folder, "within_image.json"))
    run["within_image"] = summary or {}
    attack = integrity.read_json_record(os.path.join(folder, "attack_summary.json"))
    settings = (attack or {}).get("settings", {})
    run["first_n"] = (
        int(settings["num_samples"]) if settings.get("sample") == "first" else None
    )
    return run


def _success(run: dict, column: str) -> np.ndarray:
    return run["moved"][column].astype(bool)


def measure(runs: dict[str, dict], seed: int) -> dict[str, dict]:
    """Every test of `readings.PREDICTIONS` whose runs are given."""
    out: dict[str, dict] = {}
    if "lenet_perm" in runs:
        perm = runs["lenet_perm"]
        if "netnearby_success" not in perm["moved"]:
            raise PropmapsError(
                "--runs lenet_perm=...: that run has no network-space moves (its model "
                "has no pixel permutation); give a run of the lenet_perm model"
            )
        out["perm_network_vs_image"] = readings.paired_difference(
            _success(perm, "netnearby_success"),
            _success(perm, "nearby_success"),
            perm["index"],
            seed,
        )
        out["perm_image_vs_random"] = readings.paired_difference(
            _success(perm, "nearby_success"),
            _success(perm, "random_success"),
            perm["index"],
            seed,
        )
    if "mlp" in runs:
        mlp = runs["mlp"]
        out["mlp_nearby_vs_random"] = readings.paired_difference(
            _success(mlp, "nearby_success"),
            _success(mlp, "random_success"),
            mlp["index"],
            seed,
        )
    if "lenet_k7" in runs and "lenet_k3" in runs:
        out["kernel_decay"] = readings.slope_difference(
            runs["lenet_k7"]["spaces"]["image"],
            runs["lenet_k3"]["spaces"]["image"],
            seed,
        )
    if "lenet" in runs:
        fixed = runs["lenet"]["within_image"]["spaces"]["image"]["fixed_effects"]
        out["colour_adjusted_distance"] = dict(fixed["colour_adjusted_distance"])
    if "jpeg" in runs and "lossless" in runs:
        jpeg, lossless = runs["jpeg"], runs["lossless"]
        out["jpeg_vs_lossless"] = readings.encoding_difference(
            jpeg["index"],
            _success(jpeg, "nearby_success"),
            lossless["index"],
            _success(lossless, "nearby_success"),
            seed,
        )
    # A test without an interval (a fit that did not converge) is not measured.
    return {k: v for k, v in out.items() if v.get("lo") is not None}


def compare_nearby(runs: dict[str, dict], seed: int) -> dict[str, Any]:
    """The nearby rate across networks on the same test images: those of the
    smallest run (each run sampled the first N test images)."""
    counts = [run["first_n"] for run in runs.values()]
    limit = None if None in counts or not counts else min(counts)
    compared = {}
    for label, run in runs.items():
        keep = (
            np.ones(len(run["index"]), bool) if limit is None else run["index"] < limit
        )
        compared[label] = (run["index"][keep], _success(run, "nearby_success")[keep])
    comparison = readings.nearby_rate_comparison(compared, seed)
    comparison["first_test_images"] = limit
    return comparison


def markdown(decision: dict, comparison: dict, runs: dict[str, str]) -> str:
    """DIR/readings.md."""
    lines = [
        "# Receptive field or image content",
        "",
        "Predictions and rule: `propmaps_jax/analysis/readings.py` (committed before "
        "the numbers). Intervals: 95%, bootstrap over images.",
        "",
        readings.verdict_markdown(decision),
        "",
        "## The nearby rate across networks (test images)",
        "",
        "The paper says the nearby rate is about the same across networks. Each "
        "model's nearby rate over its successful attacks on the same test images "
        + (
            f"(the first {comparison['first_test_images']:,}, the smallest run's)"
            if comparison.get("first_test_images")
            else "(each run's own)"
        )
        + "; differences with one bootstrap over test images; 'zero' = within "
        "±5 points.",
        "",
        "| model | nearby rate (95% CI) | successful attacks |",
        "| --- | --- | --- |",
    ]
    for label, r in comparison["rates"].items():
        lines.append(f"| {label} | {_pct(r)} | {r['n']} |")
    lines += ["", "| difference | points (95% CI) | class |", "| --- | --- | --- |"]
    for pair, d in comparison["differences"].items():
        lines.append(f"| {pair} | {_pct(d, signed=True)} | {d['class']} |")
    lines += ["", "Runs:", ""]
    lines += [f"- {label}: `{path}`" for label, path in runs.items()]
    return "\n".join(lines) + "\n"


def _pct(r: dict, signed: bool = False) -> str:
    if r["estimate"] is None:
        return "n/a"
    sign = "+" if signed else ""
    lo = "?" if r["lo"] is None else f"{100 * r['lo']:{sign}.1f}"
    hi = "?" if r["hi"] is None else f"{100 * r['hi']:{sign}.1f}"
    return f"{100 * r['estimate']:{sign}.1f} ({lo} to {hi})"


def main(argv: list[str]) -> None:
    """Measure the tests, decide, compare the nearby rates, write the report."""
    del argv
    paths = parse_runs(FLAGS.runs)
    workdir = common.require_workdir(FLAGS.workdir)
    start = time.time()
    runs = {label: load_run(label, path) for label, path in paths.items()}
    print(f"readings: measuring {len(runs)} runs", file=sys.stderr, flush=True)
    measured = measure(runs, FLAGS.seed)
    decision = readings.decide(measured)
    compared_runs = {k: v for k, v in runs.items() if k not in TRAIN_SPLIT_ROLES}
    comparison = compare_nearby(compared_runs, FLAGS.seed)
    record = {
        "runs": paths,
        "seed": FLAGS.seed,
        "measured": measured,
        "decision": decision,
        "comparison": comparison,
        "wall_time_s": time.time() - start,
        "device": common.device_description(),
    }
    rundir.write_json(os.path.join(workdir, "readings.json"), record)
    rundir.write_text(
        os.path.join(workdir, "readings.md"), markdown(decision, comparison, paths)
    )
    curves = {}
    for label, run in runs.items():
        if run["within_image"]:
            name = FIGURE_NAMES.get(label, label)
            curves[f"{name} ({len(run['index'])} successful attacks)"] = run[
                "within_image"
            ]
    plots.save_figure(
        readings_figures.readings_distance_figure(curves),
        os.path.join(workdir, "readings_distance.png"),
    )
    print(readings.verdict_markdown(decision))
