"""The locality study's figures: success by distance, by fragility stratum, and
vulnerability maps.

Each function takes the records the locality study returns (`summarise`'s rates,
`controls_study`'s strata, `study_attacks`' map arrays) and returns a matplotlib
figure; saving it is the caller's (the experiments write PNGs at 110 dpi with a
tight bounding box). Matplotlib is imported with this module only, never by
`import propmaps_jax`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from propmaps_jax import stats
from propmaps_jax.models import CIFAR10_CLASSES


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


def distance_figure(results: dict[str, dict]) -> Figure:
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
    return fig


def vulnerability_figure(
    name: str, image: np.ndarray, maps: dict[str, np.ndarray], i: int
) -> Figure:
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
    return fig


def controls_distance_figure(results: dict[str, dict]) -> Figure:
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
    return fig
