"""Saving figures into a run directory.

No flags here, so every experiment can import it. `save_figure` writes a figure
atomically; the figures themselves are library functions (`propmaps_jax.figures`).
"""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.runs import rundir  # noqa: E402


def save_figure(fig: plt.Figure, path: str, dpi: int = 110) -> None:
    """Atomically write `fig` as a PNG and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    rundir.write_bytes(path, buffer.getvalue())


def save_figures(
    folder: str, figures: dict[str, plt.Figure], echo: bool = True
) -> None:
    """`save_figure` of each {file name: figure} in `folder`; with `echo`, a
    "wrote PATH" line for each."""
    for name, fig in figures.items():
        path = os.path.join(folder, name)
        save_figure(fig, path)
        if echo:
            print(f"wrote {path}")
