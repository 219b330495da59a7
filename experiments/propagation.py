"""Propagation maps of one attack (paper figures 2-6).

    python launch.py --experiment=propagation --model=resnet --weights=W --index=I \\
        --workdir=DIR [--pixel=ROW,COL --rgb=R,G,B] [--move_to=ROW,COL]

The perturbation of test image I comes from DIR/attack.csv (its best candidate, also
for a failed attack; a run made with another model, other weights or other data
than --model, --weights and the data given is refused), or from --pixel/--rgb.
--move_to puts the same colour at another position (the paper's counterexamples,
figure 4). Writes
DIR/propagation/<name>_pm_max.png, <name>_pm_avg.png and <name>_maps.npz, where
<name> is I, or I_moved_ROW_COL with --move_to; a model of more than 8 layers
also gets <name>_pm_max_selected.png and _pm_avg_selected.png (8 of its layers,
readable at a page's width).

    python launch.py --experiment=propagation --model=resnet --workdir=DIR \
        --paper_figures [--signed] [--layers=bn_relu]

chooses the attacks of the paper's figures 2-6 from DIR/attack.csv by the rules of
`propmaps_jax.analysis.claims.figure_examples` (on the default maps, so that
--signed and
--layers show the same attacks): figures 2 and 3, PM_max and PM_avg of the
successful attack of median p(true) before the attack; figure 4, its colour moved
to the neighbouring position where p(true) stays highest; figure 5, the failed
attack with the largest last-layer max|dFM| / max FM; figure 6, the same among
failed attacks that lowered p(true) by at most one point. Writes
DIR/paper_figures/figure<N>_<I>_pm_max.png (and _pm_avg.png) and figures.json
(the rules, the attacks, their confidences); --signed and --layers write to
paper_figures_signed/, paper_figures_<layers>/.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from experiments import common, flag_groups
from experiments.report import plots
from experiments.runs import rundir, storage
from propmaps_jax.analysis import paper_examples, propagation
from propmaps_jax.attack.perturb import apply_pixels
from propmaps_jax.errors import PropmapsError
from propmaps_jax.figures import propagation as propagation_figures
from propmaps_jax.models import CIFAR10_CLASSES
from propmaps_jax.results import attack_csv

flags.DEFINE_integer("index", None, "Index of the test image.")
flags.DEFINE_string(
    "pixel", None, "ROW,COL of the changed pixel (with --rgb); default: attack.csv."
)
flags.DEFINE_string("rgb", None, "R,G,B colour (0..255) of the pixel given by --pixel.")
flags.DEFINE_string(
    "move_to", None, "ROW,COL: put the same colour at this position instead."
)
flags.DEFINE_bool(
    "paper_figures",
    False,
    "Figures 2-6 of the paper from DIR/attack.csv, each attack chosen by a rule "
    "(no --index).",
)

FLAGS = flags.FLAGS
# The shared flags this experiment reads (experiments/flag_groups.py).
FLAGS_READ = (*flag_groups.RUN, *flag_groups.MODEL, *flag_groups.FIGURES)


@dataclasses.dataclass(frozen=True)
class PropagationConfig:
    """The settings of one propagation run, read from the flags by `main`."""

    workdir: str
    model: str
    weights: str | None
    signed: bool
    layers: str
    columns: int
    index: int | None = None
    pixel: str | None = None
    rgb: str | None = None
    move_to: str | None = None
    paper_figures: bool = False

    @property
    def paper_folder(self) -> str:
        """paper_figures, or paper_figures_signed / paper_figures_<layers>."""
        return common.maps_folder("paper_figures", self.signed, self.layers)


def parse_ints(text: str, count: int, flag: str, what: str) -> tuple[int, ...]:
    """'12,30' -> (12, 30); a PropmapsError naming the flag when malformed."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or len(parts) != count:
        raise PropmapsError(
            f"--{flag}={text!r} is not {what}: give {count} integers separated by "
            f"commas, e.g. --{flag}={','.join(['12'] * count)}"
        )
    return values


def perturbation_from_flags(
    cfg: PropagationConfig, images: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, str, dict | None]:
    """(pixels (k, 5), where they come from, the attack.csv row or None) from
    --pixel/--rgb or DIR/attack.csv (checked against --model, --weights and the
    test split `images`/`labels`)."""
    index = cfg.index
    if cfg.pixel is not None or cfg.rgb is not None:
        if cfg.pixel is None or cfg.rgb is None:
            raise PropmapsError(
                "--pixel and --rgb go together: give both (e.g. --pixel=12,30 "
                "--rgb=255,0,0) or neither to read the perturbation from attack.csv"
            )
        row, col = parse_ints(cfg.pixel, 2, "pixel", "ROW,COL")
        colour = parse_ints(cfg.rgb, 3, "rgb", "R,G,B")
        if any(not 0 <= c <= 255 for c in colour):
            raise PropmapsError(f"--rgb={cfg.rgb}: each colour must be in 0..255")
        return np.array([[row, col, *colour]], np.int64), "--pixel/--rgb", None
    run = attack_csv.load_attack_run(
        cfg.workdir, images, labels, model_name=cfg.model, weights=cfg.weights
    )
    path, table = run.csv_path, run.table
    rows = np.flatnonzero(table["index"] == index)
    if rows.size == 0:
        known = table["index"]
        listed = ", ".join(str(i) for i in known[:8]) + (
            ", ..." if known.size > 8 else ""
        )
        raise PropmapsError(
            f"test image {index} is not in {path} (it holds {known.size} images: "
            f"{listed or 'none'}); pick one of them or give --pixel and --rgb"
        )
    row = int(rows[0])
    if not table["attacked"][row]:
        raise PropmapsError(
            f"test image {index} was not attacked (the model misclassified it "
            f"already, see {path}); pick another --index or give --pixel and --rgb"
        )
    outcome = "successful" if table["success"][row] else "failed (best candidate)"
    recorded = {k: int(table[k][row]) for k in ("pred_before", "pred_after")}
    return (
        np.asarray(table["pixels"][row], np.int64),
        f"attack.csv, {outcome}",
        recorded,
    )


def check_pixels(pixels: np.ndarray, image_shape: tuple[int, ...], flag: str) -> None:
    """PropmapsError unless every (row, col) lies inside the image."""
    height, width = image_shape[:2]
    for row, col in pixels[:, :2]:
        if not (0 <= row < height and 0 <= col < width):
            raise PropmapsError(
                f"pixel ({row}, {col}) from {flag} lies outside the {height}x{width} "
                f"image: rows must be in 0..{height - 1} and columns in 0..{width - 1}"
            )
    if np.any((pixels[:, 2:] < 0) | (pixels[:, 2:] > 255)):
        raise PropmapsError(f"colours from {flag} must be in 0..255")


def class_name(index: int, num_classes: int) -> str:
    """CIFAR-10 name of a class (its number for other class counts)."""
    return CIFAR10_CLASSES[index] if num_classes == len(CIFAR10_CLASSES) else str(index)


def _perturbation(
    cfg: PropagationConfig, images: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, str, str, dict | None]:
    """(pixels (k, 5), where they come from, output name, the attack.csv row's
    predictions or None) from the flags."""
    pixels, source, recorded = perturbation_from_flags(cfg, images, labels)
    name = str(cfg.index)
    if cfg.move_to is not None:
        if pixels.shape[0] != 1:
            raise PropmapsError(
                f"--move_to moves a one-pixel perturbation; this one has "
                f"{pixels.shape[0]} pixels"
            )
        row, col = parse_ints(cfg.move_to, 2, "move_to", "ROW,COL")
        pixels = pixels.copy()
        pixels[0, :2] = (row, col)
        source += f", moved to ({row}, {col})"
        name += f"_moved_{row}_{col}"
        recorded = None  # attack.csv's predictions are of the unmoved pixel
    return pixels, source, name, recorded


def _disagreement(result, recorded: dict | None, num_classes: int) -> str:
    """'' when this run predicts what attack.csv records, else how they differ.

    With the run's model and weights a prediction flips only at a near tie (another
    device or precision); the figure then says so instead of contradicting itself.
    """
    if recorded is None:
        return ""
    ours = {
        "pred_before": int(np.argmax(result["probs"])),
        "pred_after": int(np.argmax(result["probs_adv"])),
    }
    differ = [k for k in ours if ours[k] != recorded[k]]
    return "; ".join(
        f"{k}: attack.csv {class_name(recorded[k], num_classes)}, here "
        f"{class_name(ours[k], num_classes)}"
        for k in differ
    )


def _captions(result, label, pixels, num_classes) -> tuple[str, str, str]:
    """(caption of the natural image, of the perturbed one, the pixels as text)."""
    probs, probs_adv = result["probs"], result["probs_adv"]
    before, after = int(np.argmax(probs)), int(np.argmax(probs_adv))
    changed = "class changed" if after != before else "class unchanged"
    pixel_text = "; ".join(
        f"({r}, {c}) -> RGB ({cr}, {cg}, {cb})" for r, c, cr, cg, cb in pixels
    )
    natural = (
        f"natural, true class: {class_name(label, num_classes)}\n"
        f"predicted {class_name(before, num_classes)} {probs[before]:.1%}"
    )
    true_prob = (
        f", {class_name(label, num_classes)} {probs_adv[label]:.1%}"
        if after != label
        else ""
    )
    perturbed = (
        f"perturbed: {changed}\npredicted {class_name(after, num_classes)} "
        f"{probs_adv[after]:.1%}{true_prob}\npixel {pixel_text}"
    )
    return natural, perturbed, pixel_text


def _analyze_attack(cfg, module, variables, config, image, label, pixels) -> tuple:
    """(perturbed image, the maps of this one attack (`maps_of_result` of one
    image), (natural, perturbed) captions, pixels as text) of the perturbation
    `pixels` (k, 5) on the clean `image`."""
    perturbed = np.asarray(apply_pixels(jnp.asarray(image), jnp.asarray(pixels)))
    maps = propagation.maps_of_result(
        module, variables, image[None], pixels[None], cfg.signed, cfg.layers
    )
    result = {
        "order": maps["order"],
        "probs": maps["probs"][0],
        "probs_adv": maps["probs_adv"][0],
        "pm": {r: {n: m[0] for n, m in pm.items()} for r, pm in maps["pm"].items()},
        "summaries": {k: v[0] for k, v in maps["summaries"].items()},
    }
    natural, perturbed_caption, pixel_text = _captions(
        result, label, pixels, config.num_classes
    )
    return perturbed, result, (natural, perturbed_caption), pixel_text


def _figures(
    cfg,
    name,
    index,
    source,
    result,
    image,
    perturbed,
    pixels,
    captions,
    folder="propagation",
    heading=None,
):
    """DIR/<folder>/<name>_pm_max.png and _pm_avg.png, and their _selected
    versions for a model of many layers (`heading`: {reduce: the
    first line of the title})."""
    # A model of many layers also gets the figures of a few of them, readable at
    # the size a page shows them (`propagation_figures.SELECTED_LAYERS`).
    many = len(result["order"]) > propagation_figures.SELECTED_LAYERS
    for selected, suffix in ((False, ""), (True, "_selected"))[: 1 + many]:
        figures = propagation_figures.attack_maps_figures(
            result,
            image,
            perturbed,
            pixels,
            captions,
            f"{cfg.model}, test image {index} ({source})",
            signed=cfg.signed,
            layers=cfg.layers,
            columns=cfg.columns,
            heading=heading,
            selected=selected,
        )
        for reduce, fig in figures.items():
            path = os.path.join(cfg.workdir, folder, f"{name}_pm_{reduce}{suffix}.png")
            plots.save_figure(fig, path)
            print(f"wrote {path}")


def _maps_arrays(result, image, perturbed, pixels, label, index, signed) -> dict:
    """The contents of DIR/propagation/<name>_maps.npz."""
    order = result["order"]
    arrays: dict[str, np.ndarray] = {
        "layers": np.array(list(order)),
        "shapes": np.array([order[n] for n in order], np.int64),
        "image": image,
        "perturbed": perturbed,
        "pixels": pixels,
        "label": np.array(label),
        "index": np.array(index),
        "probs": result["probs"],
        "probs_adv": result["probs_adv"],
        "signed": np.array(signed),
    }
    arrays.update(result["summaries"])
    for reduce in ("max", "avg"):
        arrays.update({f"pm_{reduce}/{n}": result["pm"][reduce][n] for n in order})
    return arrays


def _print_summary(index, label, pixel_text, result, num_classes) -> None:
    probs, probs_adv = result["probs"], result["probs_adv"]
    before, after = int(np.argmax(probs)), int(np.argmax(probs_adv))
    print(
        f"test image {index}: {class_name(before, num_classes)} {probs[before]:.1%} -> "
        f"{class_name(after, num_classes)} {probs_adv[after]:.1%} "
        f"(true {class_name(label, num_classes)}), perturbation {pixel_text}"
    )
    print(f"{'layer':<28} {'HxWxK':>9} {'max|dFM|/maxFM':>15} {'spread>10%':>11}")
    order, summaries = result["order"], result["summaries"]
    for i, n in enumerate(order):
        print(
            f"{n:<28} {'x'.join(map(str, order[n])):>9} "
            f"{summaries['max_ratio'][i]:>15.3f} {summaries['spread'][i]:>11.1%}"
        )


def paper_figures(
    cfg: PropagationConfig, images: np.ndarray, labels: np.ndarray
) -> None:
    """Figures 2-6 of the paper, each attack chosen by a rule (see the docstring)."""
    workdir = cfg.workdir
    run = attack_csv.load_attack_run(
        workdir, images, labels, model_name=cfg.model, weights=cfg.weights
    )
    table = run.table
    loaded = common.load_model(cfg.model, cfg.weights)
    common.check_computes(loaded, images, cfg.model, cfg.weights)
    config, module, variables, _ = loaded
    examples = paper_examples.paper_figure_examples(
        module, variables, images, labels, table
    )
    if not examples:
        raise PropmapsError(
            f"{run.csv_path} holds no attacked image: attack more images first"
        )
    folder = cfg.paper_folder
    storage.makedirs(os.path.join(workdir, folder))
    record = []
    for figure, row, pixels, rule in examples:
        if figure == "3":
            continue  # drawn with figure 2 (the same attack's PM_avg)
        index, label = int(table["index"][row]), int(table["label"][row])
        image = images[index]
        perturbed, result, captions, pixel_text = _analyze_attack(
            cfg, module, variables, config, image, label, pixels
        )
        outcome = "successful" if table["success"][row] else "failed (best candidate)"
        source = f"attack.csv, {outcome}" if figure != "4" else "moved pixel"
        name = f"figure{'2_3' if figure == '2' else figure}_{index}"
        heading = {
            reduce: (
                f"Figure {'2' if reduce == 'max' else '3'} of the paper"
                if figure == "2"
                else f"Figure {figure} of the paper"
                + ("" if reduce == "max" else " (which shows its PM_max)")
            )
            + f", chosen by rule: {rule}.\n"
            for reduce in ("max", "avg")
        }
        _figures(
            cfg,
            name,
            index,
            source,
            result,
            image,
            perturbed,
            pixels,
            captions,
            folder=folder,
            heading=heading,
        )
        probs, probs_adv = result["probs"], result["probs_adv"]
        record.append(
            {
                "figure": "2 and 3" if figure == "2" else figure,
                "rule": rule,
                "index": index,
                "label": label,
                "pixels": pixel_text,
                "pred_before": int(np.argmax(probs)),
                "confidence_before": float(np.max(probs)),
                "prob_true_before": float(probs[label]),
                "pred_after": int(np.argmax(probs_adv)),
                "confidence_after": float(np.max(probs_adv)),
                "prob_true_after": float(probs_adv[label]),
                "last_layer_max_ratio": float(result["summaries"]["max_ratio"][-1]),
                "last_layer_spread_strong": float(
                    result["summaries"]["spread_strong"][-1]
                ),
                "files": [f"{name}_pm_max.png", f"{name}_pm_avg.png"],
            }
        )
        print(
            f"figure {record[-1]['figure']}: test image {index}, {pixel_text}, "
            f"p(true) {probs[label]:.1%} -> {probs_adv[label]:.1%}; {rule}"
        )
    rundir.write_json(
        os.path.join(workdir, folder, "figures.json"),
        {
            "model": cfg.model,
            "weights": cfg.weights,
            "signed": cfg.signed,
            "layers": cfg.layers,
            "attack_csv": run.csv_path,
            "figures": record,
        },
    )


def one_attack(cfg: PropagationConfig, images: np.ndarray, labels: np.ndarray) -> None:
    """PM_max / PM_avg figures and maps of test image cfg.index."""
    index = cfg.index
    if not 0 <= index < images.shape[0]:
        raise PropmapsError(
            f"--index={index} is outside the test set (0..{images.shape[0] - 1})"
        )
    pixels, source, name, recorded = _perturbation(cfg, images, labels)
    check_pixels(
        pixels, images.shape[1:], "--move_to" if cfg.move_to is not None else source
    )
    loaded = common.load_model(cfg.model, cfg.weights)
    common.check_computes(loaded, images, cfg.model, cfg.weights)
    config, module, variables, _ = loaded
    image, label = images[index], int(labels[index])
    perturbed, result, captions, pixel_text = _analyze_attack(
        cfg, module, variables, config, image, label, pixels
    )
    disagreement = _disagreement(result, recorded, config.num_classes)
    if disagreement:
        logging.warning(
            "this model's predictions differ from attack.csv (%s)", disagreement
        )
        source += f"; predictions differ, {disagreement}"
    logging.info("perturbation from %s: %s", source, pixel_text)
    storage.makedirs(os.path.join(cfg.workdir, "propagation"))
    _figures(cfg, name, index, source, result, image, perturbed, pixels, captions)
    npz_path = os.path.join(cfg.workdir, "propagation", f"{name}_maps.npz")
    rundir.write_npz(
        npz_path,
        _maps_arrays(result, image, perturbed, pixels, label, index, cfg.signed),
    )
    print(f"wrote {npz_path}")
    _print_summary(index, label, pixel_text, result, config.num_classes)


def main(argv: list[str]) -> None:
    """Compute and plot PM_max / PM_avg of one perturbed test image (or figures
    2-6 of the paper with --paper_figures)."""
    del argv
    cfg = PropagationConfig(
        # Not created here: a mistyped --workdir is not left behind by an error.
        workdir=common.require_workdir(FLAGS.workdir, create=False),
        model=FLAGS.model,
        weights=FLAGS.weights,
        signed=FLAGS.signed,
        layers=FLAGS.layers,
        columns=FLAGS.columns,
        index=FLAGS.index,
        pixel=FLAGS.pixel,
        rgb=FLAGS.rgb,
        move_to=FLAGS.move_to,
        paper_figures=FLAGS.paper_figures,
    )
    if cfg.paper_figures:
        if any(v is not None for v in (cfg.index, cfg.pixel, cfg.rgb, cfg.move_to)):
            raise PropmapsError(
                "--paper_figures chooses the attacks itself: drop --index, --pixel, "
                "--rgb and --move_to"
            )
        images, labels = common.load_data(FLAGS.cifar10_path, FLAGS.data_split).split(
            "test"
        )
        paper_figures(cfg, images, labels)
        return
    if cfg.index is None:
        raise PropmapsError("--index is required: the test image to analyse")
    # Data before the model: bad input is reported without compiling anything.
    images, labels = common.load_data(FLAGS.cifar10_path, FLAGS.data_split).split(
        "test"
    )
    one_attack(cfg, images, labels)
