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

import numpy as np
from absl import flags, logging

from experiments import common, flag_groups
from experiments.report import plots
from experiments.runs import rundir, storage
from propmaps_jax.analysis import paper_examples
from propmaps_jax.errors import PropmapsError
from propmaps_jax.figures import propagation as propagation_figures
from propmaps_jax.models import linen_features
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
) -> tuple[np.ndarray, str, str, dict | None]:
    """(pixels (k, 5), where they come from, output name, the attack.csv row's
    predictions or None) from --pixel/--rgb or DIR/attack.csv (checked against
    --model, --weights and the test split `images`/`labels`), and --move_to."""
    pixels, source, recorded = _flag_or_recorded_pixels(cfg, images, labels)
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


def _flag_or_recorded_pixels(
    cfg: PropagationConfig, images: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, str, dict | None]:
    """(pixels, source, the attack.csv row's predictions) before --move_to."""
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


def paper_figures(
    cfg: PropagationConfig, images: np.ndarray, labels: np.ndarray
) -> None:
    """Figures 2-6 of the paper, each attack chosen by a rule (see the docstring)."""
    workdir = cfg.workdir
    run = attack_csv.load_attack_run(
        workdir, images, labels, model_name=cfg.model, weights=cfg.weights
    )
    _, module, variables, _ = common.load_checked_model(cfg.model, cfg.weights, images)
    figures = paper_examples.paper_figures(
        linen_features(module, cfg.layers),
        variables,
        images,
        labels,
        run.table,
        cfg.signed,
        chosen_by=linen_features(module),
    )
    if not figures:
        raise PropmapsError(
            f"{run.csv_path} holds no attacked image: attack more images first"
        )
    folder = os.path.join(workdir, cfg.paper_folder)
    storage.makedirs(folder)
    for figure in figures:
        plots.save_figures(
            folder, propagation_figures.paper_figure(figure, cfg.model, cfg.columns)
        )
        r = figure.record()
        print(
            f"figure {r['figure']}: test image {r['index']}, {r['pixels']}, p(true) "
            f"{r['prob_true_before']:.1%} -> {r['prob_true_after']:.1%}; {r['rule']}"
        )
    rundir.write_json(
        os.path.join(folder, "figures.json"),
        {
            "model": cfg.model,
            "weights": cfg.weights,
            "signed": cfg.signed,
            "layers": cfg.layers,
            "attack_csv": run.csv_path,
            "figures": [figure.record() for figure in figures],
        },
    )


def one_attack(cfg: PropagationConfig, images: np.ndarray, labels: np.ndarray) -> None:
    """PM_max / PM_avg figures and maps of test image cfg.index."""
    index = cfg.index
    if not 0 <= index < images.shape[0]:
        raise PropmapsError(
            f"--index={index} is outside the test set (0..{images.shape[0] - 1})"
        )
    pixels, source, name, recorded = perturbation_from_flags(cfg, images, labels)
    check_pixels(
        pixels, images.shape[1:], "--move_to" if cfg.move_to is not None else source
    )
    _, module, variables, _ = common.load_checked_model(cfg.model, cfg.weights, images)
    maps = paper_examples.attack_maps(
        linen_features(module, cfg.layers),
        variables,
        images[index],
        int(labels[index]),
        pixels,
        index,
        cfg.signed,
    )
    disagreement = paper_examples.disagreement(maps.result, recorded)
    if disagreement:
        logging.warning(
            "this model's predictions differ from attack.csv (%s)", disagreement
        )
        source += f"; predictions differ, {disagreement}"
    logging.info("perturbation from %s: %s", source, maps.pixels_text)
    folder = os.path.join(cfg.workdir, "propagation")
    storage.makedirs(folder)
    about = f"{cfg.model}, test image {index} ({source})"
    figures = propagation_figures.attack_figures(maps, about, cfg.columns)
    plots.save_figures(folder, {f"{name}_{k}.png": f for k, f in figures.items()})
    npz_path = os.path.join(folder, f"{name}_maps.npz")
    rundir.write_npz(npz_path, maps.arrays())
    print(f"wrote {npz_path}")
    print(maps.summary())


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
