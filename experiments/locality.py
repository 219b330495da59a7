"""Locality analysis (paper, section 7, Table 1): the project's main job.

    python launch.py --experiment=locality --models=lenet,resnet --num_samples=5000 \
        --workdir=DIR

For each model: runs (or reuses) the one-pixel attack in DIR/<model>/ (the attack
experiment's flags --num_samples --population --generations --sample --slots
--chunk_size apply), then moves the colour of every successful attack on the clean
image: to one random adjacent pixel (nearby), to one random other pixel (random),
to every position at Chebyshev distance 1..--max_distance, and, for the first
--vulnerability_maps successful images, to every position (vulnerability maps).

Writes DIR/table1.md, DIR/table1.csv, DIR/locality.json, DIR/locality_vs_distance.png,
DIR/vulnerability_map_<model>_<index>.png and, per model, DIR/<model>/locality.csv
(one row per successful attack), DIR/<model>/vulnerability_maps.npz and
DIR/<model>/locality.json (reused when run again with the same settings).
Models: the bundled checkpoints, or --weights_<model>=PATH (ours or a Keras .h5).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import flags

import experiments.attack as attack_experiment
from experiments import common, plots
from experiments.results import read_attack_csv
from propmaps_jax import checkpoint, locality, models, stats
from propmaps_jax.attack import AttackConfig
from propmaps_jax.errors import PropmapsError

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
flags.DEFINE_integer(
    "vulnerability_maps", 3, "Successful images per model that get a vulnerability map."
)
flags.DEFINE_integer(
    "max_distance", 4, "Largest Chebyshev distance of the success-vs-distance study."
)

FLAGS = flags.FLAGS

# The paper's Table 1 (5,000 CIFAR-10 test samples): original / random / nearby.
PAPER_TABLE1 = {
    "lenet": {"original": 0.59, "random": 0.049, "nearby": 0.331, "successes": 2934},
    "resnet": {"original": 0.33, "random": 0.031, "nearby": 0.313, "successes": 1638},
}
PAPER_NAMES = {"lenet": "LeNet", "resnet": "ResNet"}
ROWS = (
    ("original_all", "original one-pixel attack (over all samples)"),
    (
        "original_correct",
        "original one-pixel attack (over correctly classified samples)",
    ),
    ("random", "on random pixels"),
    ("nearby", "on nearby pixels"),
)
# Separates the locality draws from the attack's, which use fold_in(key(seed), index).
LOCALITY_STREAM = 0x10CA1
NEARBY_STREAM, RANDOM_STREAM = 0, 1


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
    if FLAGS.max_distance < 1:
        raise PropmapsError(f"--max_distance must be >= 1, got {FLAGS.max_distance}")
    if FLAGS.vulnerability_maps < 0:
        raise PropmapsError(
            f"--vulnerability_maps must be >= 0, got {FLAGS.vulnerability_maps}"
        )


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
    print(message, file=sys.stderr, flush=True)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _batch_evaluator(logits_fn, height: int, width: int, max_distance: int):
    """Jitted: nearby, random and ring outcomes of a fixed-size batch of images."""
    offsets, _ = locality.chebyshev_offsets(max_distance)

    @jax.jit
    def evaluate(images, labels, pixels, nearby_rc, random_rc):
        nearby = locality.evaluate_moved(
            logits_fn, images, labels, pixels, nearby_rc[:, 0], nearby_rc[:, 1]
        )
        random = locality.evaluate_moved(
            logits_fn, images, labels, pixels, random_rc[:, 0], random_rc[:, 1]
        )
        rings, inside = locality.evaluate_offsets(
            logits_fn, images, labels, pixels, offsets
        )
        return nearby, random, rings, inside

    return evaluate


def study_model(
    name: str,
    logits_fn,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    pixels: np.ndarray,
    seed: int,
    max_distance: int,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Per successful attack: nearby/random positions and outcomes, ring successes."""
    n, height, width = len(indices), images.shape[1], images.shape[2]
    base = jax.random.fold_in(jax.random.key(seed), LOCALITY_STREAM)
    rows, cols = pixels[:, 0, 0], pixels[:, 0, 1]
    nearby_rc = np.stack(
        locality.sample_nearby(
            jax.random.fold_in(base, NEARBY_STREAM), indices, rows, cols, height, width
        ),
        axis=1,
    )
    random_rc = np.stack(
        locality.sample_random(
            jax.random.fold_in(base, RANDOM_STREAM), indices, rows, cols, height, width
        ),
        axis=1,
    )
    offsets, distances = locality.chebyshev_offsets(max_distance)
    per_batch = max(1, batch_size // (len(offsets) + 2))
    evaluate = _batch_evaluator(logits_fn, height, width, max_distance)
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
    progress = common.Progress(n, what="images")
    for start in range(0, n, per_batch):
        # Pad the last batch (repeating images) so every call has the same shapes.
        take = np.arange(start, start + per_batch) % n
        count = min(per_batch, n - start)
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
    return out


def vulnerability_maps(
    logits_fn,
    images: np.ndarray,
    labels: np.ndarray,
    pixels: np.ndarray,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """The colour of each attack at every position of its clean image: (V, H, W)."""
    height, width = images.shape[1], images.shape[2]
    chunk = min(batch_size, height * width)
    compute = jax.jit(
        lambda image, label, colour: locality.vulnerability_map(
            logits_fn, image, label, colour, chunk
        )
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
    rings = []
    for d in range(1, max_distance + 1):
        at_d = study["distances"] == d
        inside = study["ring_inside"][:, at_d]
        success = study["ring_success"][:, at_d]
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
    result["distance"] = rings
    return result


def write_model_csv(path: str, table, succ_rows, study) -> None:
    """DIR/<model>/locality.csv: one row per successful attack."""
    distances = study["distances"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    max_d = int(distances.max())
    writer.writerow(
        ["index", "label", "row", "col", "r", "g", "b"]
        + ["nearby_row", "nearby_col", "nearby_pred", "nearby_success"]
        + ["random_row", "random_col", "random_pred", "random_success"]
        + [f"ring{d}_{what}" for d in range(1, max_d + 1) for what in ("n", "success")]
    )
    for i, row in enumerate(succ_rows):
        ring = []
        for d in range(1, max_d + 1):
            at_d = distances == d
            ring += [
                int(study["ring_inside"][i, at_d].sum()),
                int(study["ring_success"][i, at_d].sum()),
            ]
        writer.writerow(
            [int(table["index"][row]), int(table["label"][row])]
            + [int(v) for v in table["pixels"][row, 0]]
            + [int(v) for v in study["nearby_rc"][i]]
            + [int(study["nearby_pred"][i]), int(study["nearby_success"][i])]
            + [int(v) for v in study["random_rc"][i]]
            + [int(study["random_pred"][i]), int(study["random_success"][i])]
            + ring
        )
    common.write_text(path, buffer.getvalue())


def locality_for_model(
    name: str,
    model_dir: str,
    weights: str | None,
    dataset,
    seed: int,
    max_distance: int,
    num_maps: int,
    batch_size: int,
) -> dict[str, Any]:
    """The locality study of one model from DIR/<model>/attack.csv (reused if done)."""
    attack_csv = os.path.join(model_dir, "attack.csv")
    table = read_attack_csv(attack_csv)
    locality.check_one_pixel(table["pixels"])
    settings = {
        "attack_csv_sha256": file_sha256(attack_csv),
        "weights": weights or "bundled",
        "seed": seed,
        "max_distance": max_distance,
        "vulnerability_maps": num_maps,
    }
    cache = os.path.join(model_dir, "locality.json")
    maps_path = os.path.join(model_dir, "vulnerability_maps.npz")
    if os.path.isfile(cache) and os.path.isfile(maps_path):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("settings") == settings:
            log(f"{name}: reusing the locality results in {cache}")
            with np.load(maps_path) as npz:
                cached["maps"] = {k: npz[k] for k in npz.files}
            return cached

    x_test, y_test = dataset.split("test")
    index = table["index"]
    if index.max(initial=-1) >= len(x_test) or np.any(y_test[index] != table["label"]):
        raise PropmapsError(
            f"{attack_csv} does not match this CIFAR-10 test set (indices or labels "
            "differ): use the dataset of the attack or a fresh --workdir"
        )
    _, module, variables, _ = common.load_model(name, weights)
    logits_fn = models.make_logits_fn(module, variables)
    succ_rows = np.flatnonzero(table["success"])
    images, labels = x_test[index[succ_rows]], y_test[index[succ_rows]]
    pixels = table["pixels"][succ_rows].astype(np.int32)
    start = time.time()
    if len(succ_rows):
        study = study_model(
            name,
            logits_fn,
            images,
            labels,
            index[succ_rows],
            pixels,
            seed,
            max_distance,
            batch_size,
        )
    else:
        offsets, distances = locality.chebyshev_offsets(max_distance)
        study = {
            "nearby_success": np.zeros(0, bool),
            "random_success": np.zeros(0, bool),
            "ring_success": np.zeros((0, len(offsets)), bool),
            "ring_inside": np.zeros((0, len(offsets)), bool),
            "distances": distances,
        }
    num_maps = min(num_maps, len(succ_rows))
    if num_maps:
        log(f"{name}: vulnerability maps of {num_maps} images")
    maps = (
        vulnerability_maps(
            logits_fn,
            images[:num_maps],
            labels[:num_maps],
            pixels[:num_maps],
            batch_size,
        )
        if num_maps
        else {}
    )
    maps_arrays = {
        "index": index[succ_rows[:num_maps]],
        "label": labels[:num_maps],
        "pixels": pixels[:num_maps],
        **{k: v for k, v in maps.items()},
    }
    result = summarise(table, study, max_distance)
    result["vulnerability_maps"] = []
    for i in range(num_maps):
        row, col = (int(v) for v in pixels[i, 0, :2])
        result["vulnerability_maps"].append(
            {
                "index": int(maps_arrays["index"][i]),
                "fooling_positions": stats.proportion(
                    int(maps["success"][i].sum()), maps["success"][i].size
                ),
                # Consistency with the attack: its own position must fool the model.
                "success_at_attack_position": bool(maps["success"][i, row, col]),
                "prob_true_at_attack_position": float(maps["prob_true"][i, row, col]),
                "attack_prob_true_after": float(table["prob_true_after"][succ_rows[i]]),
            }
        )
    if jax.process_index() != 0:  # only the main process writes
        return {"settings": settings, **result, "maps": maps_arrays}
    if len(succ_rows):
        write_model_csv(
            os.path.join(model_dir, "locality.csv"), table, succ_rows, study
        )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **maps_arrays)
    checkpoint.atomic_write_bytes(maps_path, buffer.getvalue())
    result["locality_wall_time_s"] = time.time() - start
    record = {"settings": settings, **result}
    common.write_json(cache, record)  # written last: marks the model as done
    record["maps"] = maps_arrays
    return record


# ----- outputs -----------------------------------------------------------------


def _cell(prop: dict[str, Any]) -> str:
    return stats.format_proportion(prop)


def table1_markdown(results: dict[str, dict], settings: dict[str, Any]) -> str:
    """DIR/table1.md: ours next to the paper's, plus the success-vs-distance table."""
    names = list(results)
    header = ["", *(f"{n} (ours)" for n in names)]
    paper_cols = [n for n in names if n in PAPER_TABLE1]
    header += [f"{PAPER_NAMES[n]} (paper)" for n in paper_cols]
    lines = [
        "# Table 1: success rate of the one-pixel attack and of its pixel moved",
        "",
        f"CIFAR-10 test set, {settings['num_samples']} samples "
        f"(sample={settings['sample']}, seed {settings['seed']}); one-pixel attack by "
        f"differential evolution, population {settings['attack']['population']}, "
        f"{settings['attack']['generations']} generations. Random and nearby: the "
        "colour of each successful attack is put once per image at another position "
        "of the clean image (nearby: one of the 8 adjacent pixels inside the image; "
        "random: any other pixel), so their denominator is the number of successful "
        "attacks. Each cell: rate (count; 95% Wilson interval).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    paper_key = {"original_all": "original", "random": "random", "nearby": "nearby"}
    for key, label in ROWS:
        cells = [label, *(_cell(results[n][key]) for n in names)]
        for n in paper_cols:
            if key in paper_key:
                rate = PAPER_TABLE1[n][paper_key[key]]
                text = f"{rate:.1%}" if key != "original_all" else f"{rate:.0%}"
                if key == "original_all":
                    text += f" ({PAPER_TABLE1[n]['successes']}/5000)"
                cells.append(text)
            else:
                cells.append("not reported")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracy on the samples: "
        + "; ".join(f"{n} {_cell(results[n]['accuracy_on_samples'])}" for n in names)
        + ". Only correctly classified samples are attacked.",
        "",
        "## Beyond the paper: success rate vs Chebyshev distance",
        "",
        "The colour of each successful attack put at every position at Chebyshev "
        "distance d inside the image (d = 1: all 8 neighbours). Cells: successes over "
        "all (image, position) pairs. Positions of one image are not independent, "
        "so these Wilson intervals are narrower than the true uncertainty.",
        "",
        "| distance | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for i in range(settings["max_distance"]):
        cells = [str(i + 1) + (" (all neighbours)" if i == 0 else "")]
        cells += [_cell(results[n]["distance"][i]["pooled"]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        "| random pixel (baseline) | "
        + " | ".join(_cell(results[n]["random"]) for n in names)
        + " |"
    )
    return "\n".join(lines) + "\n"


def table1_csv(results: dict[str, dict]) -> str:
    """DIR/table1.csv: a row per Table 1 row, rate/count/interval columns per model."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = list(results)
    fields = ("rate", "successes", "n", "ci_low", "ci_high", "paper_rate")
    writer.writerow(["row"] + [f"{n}_{f}" for n in names for f in fields])
    paper_key = {"original_all": "original", "random": "random", "nearby": "nearby"}
    for key, label in ROWS:
        row: list[Any] = [label]
        for n in names:
            prop = results[n][key]
            paper = PAPER_TABLE1.get(n, {}).get(paper_key.get(key, ""), "")
            row += [
                "" if prop["rate"] is None else f"{prop['rate']:.6f}",
                prop["successes"],
                prop["n"],
                f"{prop['ci_low']:.6f}",
                f"{prop['ci_high']:.6f}",
                paper,
            ]
        writer.writerow(row)
    return buffer.getvalue()


def distance_figure(results: dict[str, dict], path: str) -> None:
    """Success rate vs Chebyshev distance with Wilson bars; random rate dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, res) in enumerate(results.items()):
        colour = colours[i % len(colours)]
        rings = res["distance"]
        d = np.array([r["distance"] for r in rings])
        rate = np.array([r["pooled"]["rate"] or 0.0 for r in rings])
        low = np.array([r["pooled"]["ci_low"] for r in rings])
        high = np.array([r["pooled"]["ci_high"] for r in rings])
        n_images = res["original_all"]["successes"]
        ax.errorbar(
            d,
            100 * rate,
            yerr=100 * np.stack([rate - low, high - rate]),
            marker="o",
            capsize=4,
            color=colour,
            label=f"{name}: pixel at distance d ({n_images} successful attacks)",
        )
        random_rate = res["random"]["rate"] or 0.0
        ax.axhline(
            100 * random_rate,
            color=colour,
            linestyle="--",
            label=f"{name}: random pixel ({100 * random_rate:.1f}%)",
        )
    ax.set_xticks(range(1, max(len(r["distance"]) for r in results.values()) + 1))
    ax.set_xlabel("Chebyshev distance from the attacked pixel")
    ax.set_ylabel("success rate of the moved pixel (%)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        "Locality: the attack's colour moved to distance d\n(95% Wilson intervals)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plots.save_figure(fig, path)


def vulnerability_figure(
    name: str, image: np.ndarray, maps: dict[str, np.ndarray], i: int, path: str
) -> None:
    """Attacked image with the pixel marked; success and p(true) at every position."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    row, col, r, g, b = (int(v) for v in maps["pixels"][i, 0])
    label = int(maps["label"][i])
    success, prob_true = maps["success"][i], maps["prob_true"][i]
    adversarial = np.array(image, copy=True)
    adversarial[row, col] = (r, g, b)
    classes = models.CIFAR10_CLASSES

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))

    def mark(ax, colour, margin=0.0):
        ax.add_patch(
            Rectangle(
                (col - 0.5 - margin, row - 0.5 - margin),
                1 + 2 * margin,
                1 + 2 * margin,
                fill=False,
                edgecolor=colour,
                linewidth=2,
            )
        )
        ax.set_xlabel("column")
        ax.set_ylabel("row")

    axes[0].imshow(adversarial, interpolation="nearest")
    mark(axes[0], "red", margin=1.0)  # around the pixel, so its colour shows
    axes[0].set_title(
        f"attacked image: label {classes[label]}, predicted "
        f"{classes[int(maps['pred'][i, row, col])]}\npixel ({row}, {col}) set to "
        f"RGB ({r}, {g}, {b}) (inside the red box)",
        fontsize=9,
    )
    shown = axes[1].imshow(
        success.astype(float),
        cmap=ListedColormap(["#dfe7f2", "#c0392b"]),
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    mark(axes[1], "black")
    axes[1].set_title(
        f"fooled (prediction != {classes[label]}) at\n{success.mean():.1%} of "
        "positions (black box: attack)",
        fontsize=9,
    )
    bar = fig.colorbar(shown, ax=axes[1], ticks=[0.25, 0.75], fraction=0.046)
    bar.ax.set_yticklabels(["correct", "fooled"])
    shown = axes[2].imshow(
        prob_true, cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
    )
    mark(axes[2], "red")
    axes[2].set_title(
        f"p({classes[label]}) with the colour at each position\n"
        f"(min {prob_true.min():.2f}, max {prob_true.max():.2f}; red box: attack)",
        fontsize=9,
    )
    bar = fig.colorbar(shown, ax=axes[2], fraction=0.046)
    bar.set_label(f"softmax p({classes[label]}), 0..1")
    fig.suptitle(
        f"Vulnerability map, {name}, test image {int(maps['index'][i])}: "
        f"the attack's colour put at each of the {success.size} positions"
    )
    plots.save_figure(fig, path)


def main(argv: list[str]) -> None:
    """Attack each model (or reuse), run the locality study, write tables, figures."""
    del argv
    common.default_batch_size(4096)
    names = parse_models(FLAGS.models)
    check_flags()
    weights = {name: model_weights(name) for name in names}
    if FLAGS.distributed:
        attack_experiment.initialize_distributed()
    workdir = FLAGS.workdir or DEFAULT_WORKDIR
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    dataset = common.load_data()
    config = AttackConfig(
        pixels=FLAGS.pixels, population=FLAGS.population, generations=FLAGS.generations
    )
    results: dict[str, dict] = {}
    attack_summaries: dict[str, Any] = {}
    maps: dict[str, dict] = {}
    for name in names:
        model_dir = os.path.join(workdir, name)
        log(f"{name}: one-pixel attack on {FLAGS.num_samples} samples in {model_dir}")
        attack_summaries[name] = attack_experiment.run_attack(
            model_dir,
            model_name=name,
            weights=weights[name],
            dataset=dataset,
            num_samples=FLAGS.num_samples,
            seed=FLAGS.seed,
            sample=FLAGS.sample,
            config=config,
            target=None,
            slots=FLAGS.slots,
            chunk_size=FLAGS.chunk_size,
        )
        record = locality_for_model(
            name,
            model_dir,
            weights[name],
            dataset,
            FLAGS.seed,
            FLAGS.max_distance,
            FLAGS.vulnerability_maps,
            FLAGS.batch_size,
        )
        maps[name] = record.pop("maps")
        results[name] = record
        log(
            f"{name}: original {_cell(record['original_all'])}; "
            f"random {_cell(record['random'])}; nearby {_cell(record['nearby'])}"
        )

    if jax.process_index() != 0:
        return
    settings = {
        "models": names,
        "weights": {n: w or "bundled" for n, w in weights.items()},
        "num_samples": FLAGS.num_samples,
        "sample": FLAGS.sample,
        "seed": FLAGS.seed,
        "attack": config.to_dict(),
        "max_distance": FLAGS.max_distance,
        "vulnerability_maps": FLAGS.vulnerability_maps,
        "batch_size": FLAGS.batch_size,
        "dataset": dataset.source,
    }
    common.write_text(
        os.path.join(workdir, "table1.md"), table1_markdown(results, settings)
    )
    common.write_text(os.path.join(workdir, "table1.csv"), table1_csv(results))
    distance_figure(results, os.path.join(workdir, "locality_vs_distance.png"))
    x_test, _ = dataset.split("test")
    figures = []
    for name in names:
        for i, index in enumerate(maps[name]["index"]):
            path = os.path.join(workdir, f"vulnerability_map_{name}_{int(index)}.png")
            vulnerability_figure(name, x_test[int(index)], maps[name], i, path)
            figures.append(os.path.basename(path))
    common.write_json(
        os.path.join(workdir, "locality.json"),
        {
            "settings": settings,
            "paper_table1": PAPER_TABLE1,
            "models": results,
            "attack_summaries": attack_summaries,
            "vulnerability_map_figures": figures,
            "wall_time_s": time.time() - start,
            "device": common.device_description(),
        },
    )
    log(f"wrote {workdir}/table1.md, table1.csv, locality.json and figures")
    log(open(os.path.join(workdir, "table1.md")).read())
