"""propmaps_jax.figures.locality: the locality study's figures as library
functions (they return the figure; the experiments save it)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from propmaps_jax import stats  # noqa: E402
from propmaps_jax.figures import locality as figures  # noqa: E402


def test_distance_figure_shows_the_random_pixels_interval():
    rings = [
        {"distance": d, "pooled": stats.proportion(40 - 10 * d, 80)} for d in (1, 2)
    ]
    results = {
        "lenet": {
            "distance": rings,
            "original_all": stats.proportion(20, 50),
            "random": stats.proportion(3, 20),
        },
        # Only successes and n: the interval is computed (Wilson) by the figure.
        "resnet": {
            "distance": rings,
            "original_all": stats.proportion(10, 50),
            "random": {"successes": 0, "n": 10},
        },
    }
    fig = figures.distance_figure(results)
    (ax,) = fig.axes
    try:
        # axhspan: a rectangle over the axes' width, in data units vertically.
        spans = [
            (round(p.get_y(), 6), round(p.get_y() + p.get_height(), 6))
            for p in ax.patches
            if p.get_alpha()
        ]
        for name in ("lenet", "resnet"):
            successes, n = (results[name]["random"][k] for k in ("successes", "n"))
            low, high = stats.wilson_interval(successes, n)
            assert (round(100 * low, 6), round(100 * high, 6)) in spans, spans
        labels = ax.get_legend_handles_labels()[1]
        assert any(
            "lenet: random pixel, 15.0% (3/20); shaded: 95% CI" in t for t in labels
        )
        assert "Chebyshev distance (max(|dr|, |dc|))" in ax.get_xlabel()
    finally:
        plt.close(fig)


def test_vulnerability_figure_marks_the_attack_and_counts_fooled_positions():
    success = np.zeros((1, 4, 4), bool)
    success[0, :, 0] = True  # the first column fools the model: 4 of 16
    maps = {
        "index": np.array([7]),
        "label": np.array([3]),
        "pixels": np.array([[[1, 0, 255, 0, 0]]]),
        "pred": np.where(success, 5, 3),
        "prob_true": np.where(success, 0.2, 0.9).astype(np.float32),
        "success": success,
    }
    fig = figures.vulnerability_figure("tiny", np.zeros((4, 4, 3), np.uint8), maps, 0)
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert any("25.0% of" in t for t in titles), titles
        assert any("pixel (1, 0) set to" in t for t in titles), titles
        assert "test image 7" in fig._suptitle.get_text()
    finally:
        plt.close(fig)
