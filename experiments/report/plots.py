"""Saving figures, and the locality study's figures (distance, controls, readings).

No flags here, so every experiment can import it. `save_figure` writes a figure
atomically into a run directory; the figures of propagation maps and of the
salience study are library functions (`propmaps_jax.figures`).
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.runs import rundir  # noqa: E402
from propmaps_jax import stats  # noqa: E402
from propmaps_jax.models import CIFAR10_CLASSES  # noqa: E402


def save_figure(fig: plt.Figure, path: str, dpi: int = 110) -> None:
    """Atomically write `fig` as a PNG and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    rundir.write_bytes(path, buffer.getvalue())


# ----- locality (Table 1's companions) ------------------------------------------


def _with_interval(prop: dict) -> dict:
    """A proportion record with its 95% Wilson interval (computed from successes/n
    when the record lacks it)."""
    if prop.get("ci_low") is not None and prop.get("ci_high") is not None:
        return prop
    successes, n = int(prop["successes"]), int(prop["n"])
    low, high = stats.wilson_interval(successes, n)
    return {
        **prop,
        "rate": successes / n if n else None,
        "ci_low": low,
        "ci_high": high,
    }


def distance_figure(results: dict[str, dict], path: str) -> None:
    """Success rate vs Chebyshev distance with Wilson bars; the random pixel's rate
    dashed, with its Wilson interval as a band."""

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
        random = _with_interval(res["random"])
        if random["rate"] is not None:
            ax.axhline(
                100 * random["rate"],
                color=colour,
                linestyle="--",
                label=f"{name}: random pixel, {100 * random['rate']:.1f}% "
                f"({random['successes']}/{random['n']}); shaded: 95% CI "
                f"{100 * random['ci_low']:.1f}-{100 * random['ci_high']:.1f}%",
            )
            ax.axhspan(
                100 * random["ci_low"],
                100 * random["ci_high"],
                color=colour,
                alpha=0.15,
                lw=0,
            )
    ax.set_xticks(range(1, max(len(r["distance"]) for r in results.values()) + 1))
    ax.set_xlabel("Chebyshev distance (max(|dr|, |dc|)) from the attacked pixel")
    ax.set_ylabel("success rate of the moved pixel (%)")
    ax.set_ylim(bottom=-1)  # a random rate of 0% stays visible above the axis
    ax.set_title(
        "Locality: the attack's colour moved to Chebyshev distance d\n"
        "(95% Wilson intervals; random pixel: dashed line, shaded interval)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


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


def vulnerability_figure(
    name: str, image: np.ndarray, maps: dict[str, np.ndarray], i: int, path: str
) -> None:
    """Attacked image with the pixel marked; success and p(true) at every position."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    row, col, r, g, b = (int(v) for v in maps["pixels"][i, 0])
    label = int(maps["label"][i])
    success, prob_true = maps["success"][i], maps["prob_true"][i]
    adversarial = np.array(image, copy=True)
    adversarial[row, col] = (r, g, b)
    classes = CIFAR10_CLASSES

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
    save_figure(fig, path)


def controls_distance_figure(results: dict[str, dict], path: str) -> None:
    """Success vs Chebyshev distance per fragility stratum (locality controls).

    One row of two panels per model: by generation (0 vs search) and by clean-margin
    quartile; rings d = 1..D with Wilson bars (image-position pairs pooled), and at
    the right the random move ("r") of each stratum.
    """
    names = [n for n, r in results.items() if r.get("controls")]
    fig, axes = plt.subplots(
        len(names), 2, figsize=(11, 3.8 * len(names)), squeeze=False, sharey="row"
    )
    groups = (
        ("by generation", ("all", "generation 0", "search")),
        (
            "by clean margin (Q1: least confident)",
            tuple(f"margin Q{q}" for q in range(1, 5)),
        ),
    )
    colours = {
        "all": "black",
        "generation 0": "tab:red",
        "search": "tab:blue",
        **{f"margin Q{q}": plt.cm.viridis(0.85 - 0.27 * (q - 1)) for q in range(1, 5)},
    }
    for i, name in enumerate(names):
        strata = results[name]["controls"]["strata"]
        for j, (title, members) in enumerate(groups):
            ax = axes[i, j]
            max_d = len(strata["all"]["rings"])
            for k, stratum in enumerate(members):
                s = strata[stratum]
                props = [_with_interval(p) for p in [*s["rings"], s["random"]]]
                rate = np.array(
                    [np.nan if p["rate"] is None else p["rate"] for p in props]
                )
                low = np.array([p["ci_low"] for p in props])
                high = np.array([p["ci_high"] for p in props])
                x = np.arange(1, max_d + 2) + (k - (len(members) - 1) / 2) * 0.06
                ax.errorbar(
                    x[:-1],
                    100 * rate[:-1],
                    yerr=100 * np.stack([rate - low, high - rate])[:, :-1],
                    marker="o",
                    capsize=3,
                    color=colours[stratum],
                    label=f"{stratum} ({s['successful_attacks']} attacks)",
                )
                ax.errorbar(
                    x[-1:],
                    100 * rate[-1:],
                    yerr=100 * np.stack([rate - low, high - rate])[:, -1:],
                    marker="s",
                    capsize=3,
                    linestyle="none",
                    color=colours[stratum],
                )
            ax.set_xticks(range(1, max_d + 2))
            ax.set_xticklabels([str(d) for d in range(1, max_d + 1)] + ["random"])
            ax.set_xlabel(
                "Chebyshev distance d of the moved colour (or a random pixel)"
            )
            if j == 0:
                ax.set_ylabel("success rate of the moved pixel (%)")
            ax.set_ylim(bottom=-2)
            ax.grid(alpha=0.3)
            ax.set_title(f"{name}: {title}")
            ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(
        "Locality within fragility strata: the attack's colour moved to distance d "
        "(95% Wilson bars, pooled pairs)",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)
