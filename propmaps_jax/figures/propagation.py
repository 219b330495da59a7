"""Figures of propagation maps: one attack's maps (paper figures 2-6), the mean maps
over many attacks (figures 7/8), the layer means (figure 9) and where the attacked
pixels lie.

Each function takes host arrays (NumPy) in forward layer order, or the records of
`propmaps_jax.analysis.paper_examples` (`attack_figures` of an `AttackMaps`,
`paper_figure` of a `PaperFigure`, `study_figures` of a
`statistics.StatisticsStudy`), and returns matplotlib figures; saving them is
the caller's (the experiments write them atomically with
`experiments.report.plots.save_figure`). matplotlib is imported here, not by
`import propmaps_jax`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Circle

from propmaps_jax import stats
from propmaps_jax.analysis.paper_examples import AttackMaps, PaperFigure, class_name
from propmaps_jax.analysis.statistics import StatisticsStudy


def layer_title(name: str, shape: Sequence[int]) -> str:
    """Panel title on two lines: 'stage2_block1/conv1' and '16x16x32'."""
    return f"{name}\n{'x'.join(str(int(s)) for s in shape)}"


def _format_scale(value: float) -> str:
    return f"{value:.3g}"


def _draw_layer_panels(
    fig: plt.Figure,
    grid_cells: list,
    maps: dict[str, np.ndarray],
    shapes: dict[str, Sequence[int]],
    vmax: dict[str, float] | None,
    signed: bool,
    colorbar_label: str,
    bar_title: str = "",
    font_scale: float = 1.0,
) -> None:
    """One panel per layer with its own colour bar (titled `bar_title`), in the
    given grid cells; `vmax` None: each panel scaled to its own map's maximum;
    `font_scale` multiplies every text size (the selected-layer figures')."""
    for cell, (name, pm) in zip(grid_cells, maps.items(), strict=False):
        ax = fig.add_subplot(cell)
        if vmax is not None:
            top = float(vmax[name])
        else:
            top = float(np.nanmax(np.abs(pm))) if pm.size else 0.0
        top = top if np.isfinite(top) and top > 0 else 1.0
        low = -top if signed else 0.0
        image = ax.imshow(
            pm,
            cmap="RdBu_r" if signed else "inferno",
            vmin=low,
            vmax=top,
            interpolation="nearest",
        )
        over = float(np.nanmax(pm)) > top
        under = signed and float(np.nanmin(pm)) < low
        extend = {
            (False, False): "neither",
            (True, False): "max",
            (False, True): "min",
            (True, True): "both",
        }
        bar = fig.colorbar(
            image,
            ax=ax,
            fraction=0.046,
            pad=0.03,
            ticks=[low, 0.0, top] if signed else [0.0, top],
            extend=extend[(over, under)],
        )
        bar.ax.set_yticklabels(
            [_format_scale(t) for t in ([low, 0.0, top] if signed else [0.0, top])]
        )
        bar.ax.tick_params(labelsize=6 * font_scale, length=2, pad=1)
        if bar_title:
            bar.set_label(bar_title, fontsize=6 * font_scale, labelpad=1)
        ax.set_title(
            layer_title(name, shapes[name]),
            fontsize=7 * font_scale,
            pad=2,
            linespacing=1.1,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    if colorbar_label and grid_cells:
        fig.text(
            0.99,
            0.0,
            colorbar_label,
            ha="right",
            va="bottom",
            fontsize=8 * font_scale,
        )


def _show_image(
    ax: plt.Axes,
    image: np.ndarray,
    pixels: np.ndarray | None,
    title: str,
    font_scale: float = 1.0,
) -> None:
    ax.imshow(np.asarray(image, np.uint8), interpolation="nearest")
    if pixels is not None:
        for row, col in np.asarray(pixels)[:, :2]:
            # A ring around the pixel (not over it), drawn twice so it shows on dark
            # and on light images.
            for colour, width in (("black", 2.6), ("lime", 1.3)):
                ax.add_patch(
                    Circle(
                        (col, row),
                        2.2,
                        fill=False,
                        edgecolor=colour,
                        linewidth=width,
                    )
                )
    ax.set_title(title, fontsize=8 * font_scale)
    ax.set_xticks([])
    ax.set_yticks([])


def panel_grid(panels: int, columns: int, min_rows: int = 1) -> tuple[int, int]:
    """(rows, columns) of a grid for `panels` layer panels, at most `columns` wide
    and at least `min_rows` high, with the panels spread evenly over the rows so
    that no row or column is left empty (LeNet's two layers: 2 x 1 beside the two
    images, not one row of 6 with five empty cells)."""
    panels = max(panels, 1)
    rows = max(min_rows, math.ceil(panels / max(1, columns)))
    return rows, math.ceil(panels / rows)


# Figures of more layers than this (ResNet-32's 33) also come as a figure of this
# many layers, evenly spaced from the first to the last, drawn larger: the full
# figure's text is unreadable at the ~900 px a page shows it.
SELECTED_LAYERS = 8
SELECTED_FONT_SCALE = 1.6


def _size_scale(font_scale: float) -> float:
    """How much larger the panels are drawn when the text is `font_scale` larger:
    less than the text, so that the text is larger on the page (1 for 1)."""
    return 1.0 + (font_scale - 1.0) / 3.0


def selected_layers(order: Sequence[str], count: int = SELECTED_LAYERS) -> list[str]:
    """`count` layers of `order`, evenly spaced, first and last included (all of
    them when there are no more than `count`)."""
    order = list(order)
    if len(order) <= count:
        return order
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, count)).astype(int))
    return [order[i] for i in picks]


def _selected(maps: dict[str, np.ndarray], layers: list[str]) -> dict:
    return {name: maps[name] for name in layers}


def single_attack_figure(
    maps: dict[str, np.ndarray],
    shapes: dict[str, Sequence[int]],
    fm_max: dict[str, float] | None,
    image: np.ndarray,
    perturbed: np.ndarray,
    pixels: np.ndarray,
    caption_natural: str,
    caption_perturbed: str,
    title: str,
    colorbar_label: str,
    signed: bool = False,
    columns: int = 6,
    bar_title: str = "",
    font_scale: float = 1.0,
) -> plt.Figure:
    """Figures 2-6: the natural and perturbed image, then a panel per layer.

    Each panel's colour scale runs from 0 to `fm_max[layer]`, the maximum of that
    layer's original feature maps (symmetric around 0 when `signed`), or with
    `fm_max` None to the maximum of the panel's own map.
    """
    n = len(maps)
    rows, columns = panel_grid(n, columns, min_rows=2)
    # The images' column as wide as an image is tall (half the panel rows), within
    # what their captions need and what a page allows.
    size = _size_scale(font_scale)
    # The captions grow with the text.
    left = min(4.3, max(2.4, 1.8 * (rows // 2) - 0.4)) * font_scale
    width = left + 0.4 * size + 2.05 * size * columns
    fig, grid, title, note = _panel_figure(
        width,
        rows,
        columns + 1,
        title,
        colorbar_label,
        [left] + [2.05 * size] * columns,
        font_scale,
    )
    half = rows // 2
    _show_image(
        fig.add_subplot(grid[:half, 0]), image, pixels, caption_natural, font_scale
    )
    _show_image(
        fig.add_subplot(grid[half:, 0]),
        perturbed,
        pixels,
        caption_perturbed,
        font_scale,
    )
    cells = [grid[i // columns, 1 + i % columns] for i in range(n)]
    _draw_layer_panels(
        fig, cells, maps, shapes, fm_max, signed, note, bar_title, font_scale
    )
    fig.suptitle(title, fontsize=11 * font_scale, y=0.995)
    return fig


def _panel_figure(
    width: float,
    rows: int,
    columns: int,
    title: str,
    colorbar_label: str,
    width_ratios: list[float] | None = None,
    font_scale: float = 1.0,
) -> tuple[plt.Figure, Any, str, str]:
    """(figure, grid, wrapped title, wrapped colour-bar note) of a grid of panels
    `width` inches wide, 1.8 inches a row, with room above for the title and
    below for the note."""
    title = _wrap(title, width, points=11.0 * font_scale)
    note = _wrap(colorbar_label, width, points=8.0 * font_scale)
    top = 0.3 + 0.22 * font_scale * (title.count("\n") + 1)
    bottom = 0.1 + 0.16 * font_scale * (note.count("\n") + 1)
    height = top + bottom + 1.8 * _size_scale(font_scale) * rows
    fig = plt.figure(figsize=(width, height))
    grid = fig.add_gridspec(
        rows,
        columns,
        width_ratios=width_ratios,
        wspace=0.45,
        hspace=0.5,
        top=1.0 - top / height,
        bottom=bottom / height,
    )
    return fig, grid, title, note


def _wrap(text: str, width_inches: float, points: float = 11.0) -> str:
    """`text` broken into lines that fit a figure `width_inches` wide."""
    characters = max(30, int(width_inches * 72 / (0.55 * points)))
    return "\n".join(textwrap.fill(line, characters) for line in text.split("\n"))


# PM_max is drawn on the scale of the original feature maps (how much of a layer's
# activity the pixel moves); PM_avg, a mean over channels, is far below that scale
# (on it the maps look black), so each of its panels has its own scale.
SCALES = {
    "max": (
        "max",
        "colour scale of each layer: {range} of its original feature maps "
        "(arrow: the map exceeds it)",
    ),
    "avg": (
        "mean",
        "colour scale of each layer: {range} of its own PM_avg map (its own scale: "
        "a mean over channels lies far below the feature maps' maximum); compare "
        "layers by the numbers on the colour bars",
    ),
}
# What the maps of each layer kind (`models.LAYER_KINDS`) are taken of.
MAPS_OF = {
    "conv": "convolution outputs",
    "conv_relu": "ReLU(convolution outputs)",
    "bn_relu": "ReLU(BatchNorm outputs)",
}


def attack_maps_figures(
    result: dict[str, Any],
    image: np.ndarray,
    perturbed: np.ndarray,
    pixels: np.ndarray,
    captions: tuple[str, str],
    about: str,
    signed: bool = False,
    layers: str = "conv",
    columns: int = 6,
    heading: dict[str, str] | None = None,
    selected: bool = False,
) -> dict[str, plt.Figure]:
    """{"max": PM_max figure, "avg": PM_avg figure} of one attack (paper figures
    2-6): `result` holds one image's "order" {layer: shape}, "pm" {reduce: {layer:
    (H, W)}} and "summaries" {name: (layers,)} (`propagation.maps_of_result` of one
    image); `captions`: of the natural and the perturbed image; `about`: the end
    of the title (model, image, where the perturbation comes from); `heading`:
    {reduce: the first line of the title}; `selected`: only `selected_layers`,
    four to a row, drawn larger."""
    order = result["order"]
    fm_max = dict(zip(order, result["summaries"]["fm_max"], strict=True))
    difference = "FM - FM_adv" if signed else "|FM - FM_adv|"
    shown = selected_layers(order) if selected else list(order)
    if selected:
        about = f"{about}; {len(shown)} of its {len(order)} layers"
        columns = 4
    figures = {}
    for reduce, (what, note) in SCALES.items():
        first = (heading or {}).get(reduce, "")
        title = (
            f"{first}PM_{reduce} = {what} over channels of {difference} "
            f"({MAPS_OF.get(layers, 'layer outputs')}), {about}"
        )
        figures[reduce] = single_attack_figure(
            _selected(result["pm"][reduce], shown),
            order,
            fm_max if reduce == "max" else None,
            image,
            perturbed,
            pixels,
            captions[0],
            captions[1],
            title,
            note.format(range="-maximum .. +maximum" if signed else "0 .. the maximum"),
            signed=signed,
            columns=columns,
            bar_title=f"PM_{reduce}",
            font_scale=SELECTED_FONT_SCALE if selected else 1.0,
        )
    return figures


def attack_captions(maps: AttackMaps) -> tuple[str, str]:
    """(caption of the natural image, of the perturbed one) of one attack: true
    class, the predictions and confidences, the changed pixels."""
    probs, probs_adv = maps.result["probs"], maps.result["probs_adv"]
    label, num_classes = maps.label, maps.num_classes
    before, after = int(np.argmax(probs)), int(np.argmax(probs_adv))
    changed = "class changed" if after != before else "class unchanged"
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
        f"{probs_adv[after]:.1%}{true_prob}\npixel {maps.pixels_text}"
    )
    return natural, perturbed


def attack_figures(
    maps: AttackMaps,
    about: str,
    columns: int = 6,
    heading: dict[str, str] | None = None,
) -> dict[str, plt.Figure]:
    """{"pm_max": figure, "pm_avg": figure} of one attack's maps
    (`paper_examples.attack_maps`), and for a model of more than `SELECTED_LAYERS`
    layers also "pm_max_selected" and "pm_avg_selected" (a few of its layers,
    readable at the size a page shows them); `about` and `heading` as in
    `attack_maps_figures`."""
    many = len(maps.result["order"]) > SELECTED_LAYERS
    captions = attack_captions(maps)
    out = {}
    for selected, suffix in ((False, ""), (True, "_selected"))[: 1 + many]:
        figures = attack_maps_figures(
            maps.result,
            maps.image,
            maps.perturbed,
            maps.pixels,
            captions,
            about,
            signed=maps.signed,
            layers=maps.layers,
            columns=columns,
            heading=heading,
            selected=selected,
        )
        out.update({f"pm_{reduce}{suffix}": fig for reduce, fig in figures.items()})
    return out


def paper_figure(
    figure: PaperFigure, model: str, columns: int = 6
) -> dict[str, plt.Figure]:
    """{file name: figure} of one of the paper's figures 2-6
    (`paper_examples.paper_figures`) of the model named `model`: PM_max and PM_avg,
    titled with the figure's number and the rule that chose its attack."""
    heading = {
        reduce: (
            f"Figure {'2' if reduce == 'max' else '3'} of the paper"
            if figure.figure == "2"
            else f"Figure {figure.figure} of the paper"
            + ("" if reduce == "max" else " (which shows its PM_max)")
        )
        + f", chosen by rule: {figure.rule}.\n"
        for reduce in ("max", "avg")
    }
    about = f"{model}, test image {figure.maps.index} ({figure.source})"
    figures = attack_figures(figure.maps, about, columns, heading)
    return {f"{figure.name}_{suffix}.png": fig for suffix, fig in figures.items()}


def mean_maps_figure(
    maps: dict[str, np.ndarray],
    shapes: dict[str, Sequence[int]],
    title: str,
    colorbar_label: str,
    columns: int = 6,
    bar_title: str = "",
    font_scale: float = 1.0,
) -> plt.Figure:
    """Figures 7/8: one panel per layer, each scaled to its own maximum."""
    n = len(maps)
    rows, columns = panel_grid(n, columns)
    width = max(2.05 * _size_scale(font_scale) * columns, 4.0)
    fig, grid, title, note = _panel_figure(
        width, rows, columns, title, colorbar_label, font_scale=font_scale
    )
    cells = [grid[i // columns, i % columns] for i in range(n)]
    _draw_layer_panels(
        fig, cells, maps, shapes, None, False, note, bar_title, font_scale
    )
    fig.suptitle(title, fontsize=11 * font_scale, y=0.995)
    return fig


def layer_means_figure(
    layers: Sequence[str],
    curves: dict[str, np.ndarray],
    title: str,
    ylabel: str,
    log_scale: bool = True,
) -> plt.Figure:
    """Figure 9: one line per curve over the layers (names on the x axis, rotated)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2.0), 4.6))
    x = np.arange(len(layers))
    markers = ("o", "s", "^", "d", "v")
    for i, (label, values) in enumerate(curves.items()):
        values = np.asarray(values, np.float64)
        if np.all(np.isnan(values)):
            continue
        ax.plot(
            x, values, marker=markers[i % len(markers)], ms=3.5, lw=1.2, label=label
        )
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=70, ha="right", fontsize=7)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def distance_histogram_figure(
    distances: dict[str, np.ndarray],
    bin_edges: np.ndarray,
    title: str,
    xlabel: str,
    uniform: np.ndarray | None = None,
) -> plt.Figure:
    """Histogram (fraction of attacks) of the pixel's distance from the image centre,
    beside `uniform`: the fraction of positions per bin (pixels chosen at random)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if uniform is not None:
        ax.stairs(
            uniform,
            bin_edges,
            color="0.45",
            linestyle=":",
            lw=1.6,
            label="every position once (where random pixels would lie)",
        )
    for label, values in distances.items():
        values = np.asarray(values, np.float64)
        if values.size == 0:
            continue
        weights = np.full(values.shape, 1.0 / values.size)
        ax.hist(
            values,
            bins=bin_edges,
            weights=weights,
            histtype="step",
            lw=1.6,
            label=f"{label} (n={values.size}, median {np.median(values):.1f})",
        )
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("fraction of attacks (of positions: dotted)")
    ax.set_title(_wrap(title, 6.4, points=10.0), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(0, 1.4 * ax.get_ylim()[1])  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def statistics_figures(
    mean_maps: dict[str, dict[str, np.ndarray]],
    shapes: dict[str, Sequence[int]],
    counts: dict[str, int],
    layer_stats: dict[str, dict[str, np.ndarray]],
    distances: dict[str, np.ndarray],
    bins: tuple[np.ndarray, np.ndarray],
    model: str,
    signed: bool = False,
    columns: int = 6,
) -> dict[str, plt.Figure]:
    """{file name: figure} of the maps over many attacks: figures 7 and 8 of the
    paper (mean_pm_avg_<outcome>.png, for each outcome with attacks), figure 9
    (layer_means.png) and distance_from_centre.png.

    `mean_maps`: `statistics.mean_maps`; `layer_stats`: {outcome:
    `propagation.per_outcome_layer_stats`}; `distances`: {outcome: each attacked
    pixel's Chebyshev distance from the centre}; `bins`: (bin edges, the share of
    positions per bin)."""
    figures = {}
    order, total = list(shapes), sum(counts.values())
    what = "FM - FM_adv" if signed else "|FM - FM_adv|"
    for figure, outcome in (("7", "successful"), ("8", "failed")):
        if counts[outcome] == 0:
            continue
        title = (
            f"Mean PM_avg (mean over channels of {what}) over {counts[outcome]} "
            f"{outcome} attacks, {model} (figure {figure} of the paper)"
        )
        note = (
            "colour scale of each layer: 0 .. the maximum of its mean map "
            "(not scaled to the feature maps)"
        )
        maps = mean_maps[f"pm_avg/{outcome}"]
        figures[f"mean_pm_avg_{outcome}.png"] = mean_maps_figure(
            maps, shapes, title, note, columns=columns, bar_title="mean PM_avg"
        )
        if len(order) > SELECTED_LAYERS:
            shown = selected_layers(order)
            figures[f"mean_pm_avg_{outcome}_selected.png"] = mean_maps_figure(
                _selected(maps, shown),
                shapes,
                f"{title}; {len(shown)} of its {len(order)} layers",
                note,
                columns=4,
                bar_title="mean PM_avg",
                font_scale=SELECTED_FONT_SCALE,
            )

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
    figures["layer_means.png"] = layer_means_figure(
        order,
        curves,
        f"Mean over all feature maps (positions and channels) per layer, "
        f"{model}, {total} attacks (figure 9 of the paper)",
        "mean value" + (" (log scale)" if log_scale else ""),
        log_scale=log_scale,
    )

    bin_edges, uniform = bins
    figures["distance_from_centre.png"] = distance_histogram_figure(
        {o: distances[o] for o in ("successful", "failed")},
        bin_edges,
        f"Attacked pixels: {stats.DISTANCE_METRIC} from the image centre, {model}",
        f"{stats.DISTANCE_METRIC} of the attacked pixel from the image centre (pixels)",
        uniform=uniform,
    )
    return figures


def study_figures(
    study: StatisticsStudy, model: str, columns: int = 6
) -> dict[str, plt.Figure]:
    """{file name: figure} of a statistics study of the model named `model`:
    `statistics_figures` and, when the controls ran and some attack succeeded,
    mean_pm_avg_uniform_positions.png (the successful attacks' colours at
    uniformly drawn positions: what padding geometry alone gives)."""
    figures = statistics_figures(
        study.mean_maps,
        study.shapes,
        study.counts,
        study.layer_stats,
        study.distances,
        (study.bin_edges, study.uniform),
        model=model,
        signed=study.signed,
        columns=columns,
    )
    successful = study.counts["successful"]
    if study.control_maps and successful:
        figures["mean_pm_avg_uniform_positions.png"] = mean_maps_figure(
            study.control_maps["uniform_positions"]["pm_avg/successful"],
            study.shapes,
            f"Control: mean PM_avg of the {successful} successful attacks' "
            f"colours put at uniformly drawn positions, {model} (compare "
            "figure 7: what padding geometry alone gives)",
            "colour scale of each layer: 0 .. the maximum of its mean map",
            columns=columns,
            bar_title="mean PM_avg",
        )
    return figures
