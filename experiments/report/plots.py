"""Figures of propagation maps, shared by experiments/propagation.py and statistics.py.

No flags here, so both experiments can import it. Every function takes host arrays
(NumPy) in forward layer order and returns or saves a matplotlib figure.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle  # noqa: E402

from experiments.runs import rundir  # noqa: E402


def save_figure(fig: plt.Figure, path: str, dpi: int = 110) -> None:
    """Atomically write `fig` as a PNG and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    rundir.write_bytes(path, buffer.getvalue())


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
) -> None:
    """One panel per layer with its own colour bar (titled `bar_title`), in the
    given grid cells; `vmax` None: each panel scaled to its own map's maximum."""
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
        bar.ax.tick_params(labelsize=6, length=2, pad=1)
        if bar_title:
            bar.set_label(bar_title, fontsize=6, labelpad=1)
        ax.set_title(
            layer_title(name, shapes[name]), fontsize=7, pad=2, linespacing=1.1
        )
        ax.set_xticks([])
        ax.set_yticks([])
    if colorbar_label and grid_cells:
        fig.text(0.99, 0.0, colorbar_label, ha="right", va="bottom", fontsize=8)


def _show_image(
    ax: plt.Axes, image: np.ndarray, pixels: np.ndarray | None, title: str
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
    ax.set_title(title, fontsize=8)
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
    left = min(4.3, max(2.4, 1.8 * (rows // 2) - 0.4))
    width = left + 0.4 + 2.05 * columns
    fig, grid, title, note = _panel_figure(
        width, rows, columns + 1, title, colorbar_label, [left] + [2.05] * columns
    )
    half = rows // 2
    _show_image(fig.add_subplot(grid[:half, 0]), image, pixels, caption_natural)
    _show_image(fig.add_subplot(grid[half:, 0]), perturbed, pixels, caption_perturbed)
    cells = [grid[i // columns, 1 + i % columns] for i in range(n)]
    _draw_layer_panels(fig, cells, maps, shapes, fm_max, signed, note, bar_title)
    fig.suptitle(title, fontsize=11, y=0.995)
    return fig


def _panel_figure(
    width: float,
    rows: int,
    columns: int,
    title: str,
    colorbar_label: str,
    width_ratios: list[float] | None = None,
) -> tuple[plt.Figure, Any, str, str]:
    """(figure, grid, wrapped title, wrapped colour-bar note) of a grid of panels
    `width` inches wide, 1.8 inches a row, with room above for the title and
    below for the note."""
    title, note = _wrap(title, width), _wrap(colorbar_label, width, points=8.0)
    top = 0.3 + 0.22 * (title.count("\n") + 1)
    bottom = 0.1 + 0.16 * (note.count("\n") + 1)
    height = top + bottom + 1.8 * rows
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


def mean_maps_figure(
    maps: dict[str, np.ndarray],
    shapes: dict[str, Sequence[int]],
    title: str,
    colorbar_label: str,
    columns: int = 6,
    bar_title: str = "",
) -> plt.Figure:
    """Figures 7/8: one panel per layer, each scaled to its own maximum."""
    n = len(maps)
    rows, columns = panel_grid(n, columns)
    width = max(2.05 * columns, 4.0)
    fig, grid, title, note = _panel_figure(width, rows, columns, title, colorbar_label)
    cells = [grid[i // columns, i % columns] for i in range(n)]
    _draw_layer_panels(fig, cells, maps, shapes, None, False, note, bar_title)
    fig.suptitle(title, fontsize=11, y=0.995)
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


def readings_distance_figure(records: dict[str, dict], path: str) -> None:
    """One panel per model: success of the attack's colour moved to Chebyshev
    distance d (image space; network space too for a pixel-permuted model) and at a
    random position, 95% intervals from a bootstrap over images."""
    labels = list(records)
    columns = min(4, max(1, len(labels)))
    rows = -(-len(labels) // columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(3.4 * columns, 3.0 * rows + 0.6),
        squeeze=False,
        sharey=True,
    )
    styles = {
        "image": ("C0", "o", "image space"),
        "network": ("C3", "s", "network space"),
    }
    for ax, label in zip(axes.flat, labels, strict=False):
        record = records[label]
        for space, data in record.get("spaces", {}).items():
            colour, marker, name = styles[space]
            rings = [r for r in data["rings"] if r["rate"] is not None]
            d = np.array([r["distance"] for r in rings])
            rate = np.array([r["rate"] for r in rings])
            low = np.array([r["lo"] for r in rings])
            high = np.array([r["hi"] for r in rings])
            ax.errorbar(
                d,
                100 * rate,
                yerr=100 * np.stack([rate - low, high - rate]),
                color=colour,
                marker=marker,
                capsize=3,
                label=name,
            )
        random = record.get("moves", {}).get("rates", {}).get("random")
        if random and random["estimate"] is not None:
            ax.axhline(
                100 * random["estimate"],
                color="0.3",
                linestyle="--",
                label="random position",
            )
            ax.axhspan(
                100 * random["lo"], 100 * random["hi"], color="0.3", alpha=0.15, lw=0
            )
        ax.set_title(label, fontsize=10.5)
        ax.set_xlabel("Chebyshev distance d")
        ax.set_xticks(
            range(
                1,
                1
                + max(
                    (len(v["rings"]) for v in record.get("spaces", {}).values()),
                    default=1,
                ),
            )
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("success of the moved colour (%)")
    for ax in list(axes.flat)[len(labels) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Receptive field or image content: the attack's colour moved to distance d\n"
        "(95% intervals, bootstrap over images; dashed: a random position)",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)
