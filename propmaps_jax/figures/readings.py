"""The readings experiment's figure: success of the attack's colour against distance,
one panel per model (receptive field or image content). Matplotlib is imported here
only, never by `import propmaps_jax`."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def readings_distance_figure(records: dict[str, dict]) -> Figure:
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
        ax.set_title(textwrap.fill(label, 30), fontsize=10.5)
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
    return fig
