"""Figures of the salience study (`propmaps_jax.analysis.salience`): the examples'
maps, the attention capture per group of changes, the ROC curves of P2;
`study_figures` draws all three of a `SalienceStudy`.

Every function takes host arrays (NumPy) and returns a matplotlib figure; saliency
maps are shown as each map's share of its total mass per pixel, so that one colour
scale (with its colour bar) serves every saliency panel of a figure. Saving is the
caller's (`experiments.report.plots.save_figure`); matplotlib is imported here, not
by `import propmaps_jax`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.patches import Rectangle

from propmaps_jax.analysis.salience import MEASURES, SalienceStudy
from propmaps_jax.models import CIFAR10_CLASSES

GROUP_COLOURS = {
    "successful": "tab:red",
    "failed": "tab:blue",
    "nearby": "tab:orange",
    "random": "tab:green",
}
UNIFORM_3X3 = 9 / 1024  # the 3x3 share of a uniform 32x32 map


def _class_name(c: int) -> str:
    return CIFAR10_CLASSES[c] if 0 <= c < len(CIFAR10_CLASSES) else str(c)


def _shares(maps: np.ndarray) -> np.ndarray:
    total = maps.sum(axis=(-2, -1), keepdims=True)
    return np.where(total > 0, maps / np.where(total > 0, total, 1.0), 0.0)


def _mark(ax: plt.Axes, row: int, col: int) -> None:
    # A square just around the pixel, drawn twice to show on dark and light maps.
    for colour, width in (("black", 2.2), ("cyan", 1.0)):
        ax.add_patch(
            Rectangle(
                (col - 1.5, row - 1.5),
                3,
                3,
                fill=False,
                edgecolor=colour,
                linewidth=width,
            )
        )


def _bare(ax: plt.Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def examples_figure(
    images: np.ndarray,
    maps: dict[str, np.ndarray],
    labels: np.ndarray,
    success: np.ndarray,
    indices: np.ndarray,
    positions: np.ndarray,
    layer: str,
    title: str,
) -> plt.Figure:
    """One row per attack: clean, changed, saliency before / after, last-layer PM.

    `maps` is the output of `saliency.analyse_changes(..., return_maps=True)` for
    these images, `positions` (n, 2) the (row, col) of each attack's pixel; only
    the attack's own pixel (change 0) is shown; `layer` names the PM's layer. The
    box marks the 3x3 window whose share of the saliency mass is the attention
    capture.
    """
    n = len(images)
    before = _shares(maps["maps_before_true"][:, 0])
    after_true = _shares(maps["maps_after_true"][:, 0])
    after_new = _shares(maps["maps_after_new"][:, 0])
    pm = maps["pm_last"][:, 0]
    top = max(float(np.max([before, after_true, after_new])), 1e-12)
    sal_norm = PowerNorm(0.5, vmin=0.0, vmax=top)
    pm_norm = Normalize(0.0, max(float(pm.max()), 1e-12))
    fig, axes = plt.subplots(
        n, 6, figsize=(13.5, 2.35 * n + 0.9), squeeze=False, layout="constrained"
    )
    columns = (
        "clean image",
        "changed image",
        "saliency before\n(true class)",
        "saliency after\n(true class)",
        "saliency after\n(class predicted after)",
        f"PM max = max_k |FM - FM_adv|\n({layer})",
    )
    for i in range(n):
        row, col = (int(v) for v in positions[i])
        label, pred = int(labels[i]), int(maps["pred_after"][i, 0])
        outcome = "successful" if success[i] else "failed"
        ax = axes[i, 0]
        ax.imshow(images[i].astype(np.uint8), interpolation="nearest")
        _mark(ax, row, col)
        ax.set_ylabel(
            f"test {int(indices[i])}\n{outcome}",
            fontsize=9,
            color=GROUP_COLOURS[outcome],
        )
        ax.set_title(f"true: {_class_name(label)}", fontsize=8)
        ax = axes[i, 1]
        ax.imshow(
            np.clip(maps["changed"][i, 0], 0, 255).astype(np.uint8),
            interpolation="nearest",
        )
        _mark(ax, row, col)
        p = float(maps["prob_true_after"][i, 0])
        ax.set_title(f"predicted: {_class_name(pred)}\np(true) = {p:.2f}", fontsize=8)
        for j, sal in enumerate((before, after_true, after_new), start=2):
            ax = axes[i, j]
            sal_image = ax.imshow(
                sal[i], cmap="magma", norm=sal_norm, interpolation="nearest"
            )
            _mark(ax, row, col)
            share = sal[i][max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2].sum()
            ax.set_title(f"3x3 share {share:.1%}", fontsize=8)
        ax = axes[i, 5]
        pm_image = ax.imshow(pm[i], cmap="inferno", norm=pm_norm)
        ax.set_title(f"max {float(pm[i].max()):.3g}", fontsize=8)
        for ax in axes[i]:
            _bare(ax)
    for j, name in enumerate(columns):
        axes[0, j].annotate(
            name,
            (0.5, 1.32),
            xycoords="axes fraction",
            ha="center",
            va="bottom",
            fontsize=9,
            fontweight="bold",
        )
    bar = fig.colorbar(
        sal_image,
        ax=axes[:, 2:5],
        location="bottom",
        shrink=0.6,
        label="share of the map's saliency mass per pixel (square-root scale)",
    )
    # Ticks evenly spaced on the square-root scale, so that their labels never meet.
    ticks = top * np.linspace(0.0, 1.0, 5) ** 2
    bar.set_ticks(ticks, labels=[f"{t:.2%}" for t in ticks])
    fig.colorbar(
        pm_image, ax=axes[:, 5], location="bottom", label="PM max (shared scale)"
    )
    fig.suptitle(
        f"One-pixel attacks and saliency: {title}\n(box: the changed pixel's 3x3 "
        "window)",
        fontsize=11,
    )
    return fig


def capture_figure(
    capture: dict[str, dict[str, dict[str, np.ndarray]]], title: str
) -> plt.Figure:
    """Box plots of the 3x3 share before and after, per class and group of changes.

    `capture[cls][group]["before" | "after"]` are per-change shares (n,).
    """
    classes = list(capture)
    fig, axes = plt.subplots(
        1, len(classes), figsize=(6.2 * len(classes), 4.6), sharey=True, squeeze=False
    )
    # Log scale: the lower limit follows the data (zero shares drawn at the floor).
    everything = np.concatenate(
        [v.ravel() for c in capture.values() for g in c.values() for v in g.values()]
        + [np.ones(1)]
    )
    positive = everything[everything > 0]
    floor = max(1e-6, 0.5 * float(positive.min())) if positive.size else 1e-6
    for ax, cls in zip(axes[0], classes, strict=True):
        groups = list(capture[cls])
        for g, group in enumerate(groups):
            for k, when in enumerate(("before", "after")):
                values = np.clip(capture[cls][group][when], floor, 1.0)
                if values.size == 0:
                    continue
                box = ax.boxplot(
                    values,
                    positions=[3 * g + k],
                    widths=0.8,
                    patch_artist=True,
                    showfliers=True,
                    showmeans=True,
                    meanprops={
                        "marker": "D",
                        "markerfacecolor": "white",
                        "markeredgecolor": "black",
                        "markersize": 5,
                    },
                    flierprops={"markersize": 2, "alpha": 0.4},
                    medianprops={"color": "black"},
                )
                box["boxes"][0].set_facecolor(
                    GROUP_COLOURS[group] if when == "after" else "lightgrey"
                )
        ax.axhline(UNIFORM_3X3, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(
            [3 * g + 0.5 for g in range(len(groups))],
            [f"{group}\n(n = {capture[cls][group]['after'].size})" for group in groups],
        )
        ax.set_yscale("log")
        ax.set_ylim(floor * 0.8, 1.2)
        what = "true class" if cls == "true" else "class predicted after"
        ax.set_title(f"saliency of the {what}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel(
        "share of saliency mass in the changed\npixel's 3x3 window (log scale)"
    )
    fig.legend(
        handles=[
            Rectangle((0, 0), 1, 1, facecolor="lightgrey", edgecolor="black"),
            Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black"),
            plt.Line2D(
                [], [], marker="D", color="white", markeredgecolor="black", ls="none"
            ),
            plt.Line2D([], [], color="grey", linestyle="--"),
        ],
        labels=[
            "before the change (grey)",
            "after the change (coloured box)",
            "mean (P1 compares means)",
            f"uniform map ({UNIFORM_3X3:.2%})",
        ],
        loc="lower center",
        ncol=4,
        fontsize=9,
        bbox_to_anchor=(0.5, -0.06),
    )
    fig.suptitle(
        f"Attention capture per outcome: {title}\nsuccessful / failed: the "
        "attack's pixel; nearby / random: its colour moved (successful attacks)",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def roc_figure(roc: dict, measures: dict[str, str], title: str) -> plt.Figure:
    """P2: ROC curves of each disturbance measure as a detector of a class change.

    `roc[(cls, measure)]` = {"fpr", "tpr", "row"} with the verdict table's row.
    """
    classes = list(dict.fromkeys(cls for cls, _ in roc))
    fig, axes = plt.subplots(
        1, len(classes), figsize=(5.2 * len(classes), 5.0), squeeze=False
    )
    colours = dict(zip(measures, ("tab:purple", "tab:brown"), strict=False))
    for ax, cls in zip(axes[0], classes, strict=True):
        for measure, text in measures.items():
            curve = roc[(cls, measure)]
            row = curve["row"]
            ax.plot(
                curve["fpr"],
                curve["tpr"],
                color=colours[measure],
                linewidth=1.8,
                label=f"{text}\nAUC {row['estimate']:.3f} "
                f"(95% CI {row['ci_low']:.3f}-{row['ci_high']:.3f})",
            )
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="chance")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate (class unchanged)")
        ax.set_ylabel("true positive rate (class changed)")
        what = "true class" if cls == "true" else "class predicted after"
        ax.set_title(f"saliency of the {what}", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"P2: does saliency disturbance predict a class change? {title}\n"
        "all changes (original, nearby, random) of all attacked images",
        fontsize=11,
    )
    fig.tight_layout()
    return fig


def study_figures(study: SalienceStudy, title: str) -> dict[str, plt.Figure]:
    """{file name: figure} of a salience study (`salience.study_attacks`):
    examples.png (when it kept example maps), attention_capture.png, roc.png;
    `title` ends each figure's title (the model and the saliency method)."""
    figures = {}
    if study.example_maps is not None:
        chosen = study.chosen
        height, width = study.last_shape[:2]
        figures["examples.png"] = examples_figure(
            study.images[chosen],
            study.example_maps,
            study.labels[chosen],
            study.success[chosen],
            study.indices[chosen],
            study.changes[chosen, 0, :2],
            f"{study.last_layer}, {height}x{width}",
            title,
        )
    figures["attention_capture.png"] = capture_figure(study.capture(), title)
    figures["roc.png"] = roc_figure(study.roc, MEASURES, title)
    return figures
