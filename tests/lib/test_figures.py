"""The figures of propagation maps (propmaps_jax.figures.propagation), in-process."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from propmaps_jax.figures import propagation as propagation_figures  # noqa: E402


@pytest.mark.parametrize(
    "panels, columns, min_rows, grid",
    [
        (2, 6, 2, (2, 1)),  # LeNet beside its two images: no empty cells
        (2, 6, 1, (1, 2)),
        (7, 6, 2, (2, 4)),
        (33, 6, 2, (6, 6)),  # ResNet-32
        (12, 6, 1, (2, 6)),
        (1, 6, 2, (2, 1)),
    ],
)
def test_panel_grid_fits_the_panels(panels, columns, min_rows, grid):
    rows, cols = propagation_figures.panel_grid(panels, columns, min_rows)
    assert (rows, cols) == grid
    assert rows * cols >= panels
    # No empty column and (beyond the rows the images need) no empty row.
    assert cols <= panels and (rows <= min_rows or (rows - 1) * cols < panels)


def _colour_bar_tops(fig):
    """{panel title's first line: the top tick label of its colour bar}."""
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_title()]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    tops = {}
    for panel, bar in zip(panels[2:], bars, strict=True):
        tops[panel.get_title().splitlines()[0]] = (
            bar.get_yticklabels()[-1].get_text(),
            bar.get_ylabel(),
        )
    return tops


def test_lenet_figure_fills_its_grid_and_pm_avg_has_its_own_scale():
    rng = np.random.default_rng(0)
    shapes = {"conv1": (28, 28, 6), "conv2": (10, 10, 16)}
    pm_avg = {n: rng.uniform(0, 0.5, s[:2]) for n, s in shapes.items()}
    fm_max = {"conv1": 11.5, "conv2": 13.4}
    image = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    pixels = np.array([[12, 10, 0, 60, 154]])
    common = (image, image, pixels, "natural", "perturbed", "title", "note")
    own = propagation_figures.single_attack_figure(
        pm_avg, shapes, None, *common, bar_title="PM_avg"
    )
    on_fm = propagation_figures.single_attack_figure(pm_avg, shapes, fm_max, *common)
    try:
        # Two images, two panels, two colour bars: nothing else, nothing empty.
        assert len(own.axes) == 6
        width, height = own.get_size_inches()
        assert width < 8, width  # was 15.5 inches wide, mostly empty
        tops = _colour_bar_tops(own)
        for name in shapes:  # each bar tops at its own map's maximum, labelled
            assert tops[name] == (f"{pm_avg[name].max():.3g}", "PM_avg")
        assert _colour_bar_tops(on_fm)["conv2"][0] == "13.4"
    finally:
        plt.close(own)
        plt.close(on_fm)


def test_distance_histogram_names_its_metric_and_shows_uniform():
    edges = np.arange(17.0)
    uniform = (8 * np.arange(16) + 4) / 1024
    fig = propagation_figures.distance_histogram_figure(
        {"successful": np.array([0.5, 3.5, 15.5]), "failed": np.array([7.5])},
        edges,
        "Attacked pixels: Chebyshev distance (max(|dr|, |dc|)) from the centre",
        "Chebyshev distance (max(|dr|, |dc|)) of the attacked pixel",
        uniform=uniform,
    )
    try:
        (ax,) = fig.axes
        assert ax.get_xlabel().startswith("Chebyshev distance (max(|dr|, |dc|))")
        assert "Chebyshev distance" in ax.get_title()
        labels = ax.get_legend_handles_labels()[1]
        assert labels[0].startswith("every position once")
        assert "successful (n=3, median 3.5)" in labels
    finally:
        plt.close(fig)


def _attack_maps(layers: int, before: int = 8, after: int = 0):
    from propmaps_jax.analysis.paper_examples import AttackMaps

    order = {f"conv{i}": (6, 6, 2) for i in range(layers)}
    probs, probs_adv = np.full(10, 0.05), np.full(10, 0.04)
    probs[before], probs_adv[after] = 0.55, 0.64
    result = {
        "order": order,
        "probs": probs,
        "probs_adv": probs_adv,
        "pm": {r: {n: np.ones((6, 6)) for n in order} for r in ("max", "avg")},
        "summaries": {"fm_max": np.full(layers, 2.0)},
    }
    image = np.zeros((8, 8, 3), np.uint8)
    return AttackMaps(4, 8, image, image, np.array([[1, 2, 255, 0, 0]]), result)


def test_attack_captions_say_classes_confidences_and_the_pixel():
    natural, perturbed = propagation_figures.attack_captions(_attack_maps(2))
    assert natural == "natural, true class: ship\npredicted ship 55.0%"
    assert perturbed == (
        "perturbed: class changed\npredicted airplane 64.0%, ship 4.0%\n"
        "pixel (1, 2) -> RGB (255, 0, 0)"
    )
    _, same = propagation_figures.attack_captions(_attack_maps(2, 8, 8))
    assert same.startswith("perturbed: class unchanged\npredicted ship 64.0%\n")


def test_attack_figures_and_the_paper_figure_files():
    from propmaps_jax.analysis.paper_examples import PaperFigure

    few = propagation_figures.attack_figures(_attack_maps(2), "lenet, test image 4")
    many = propagation_figures.attack_figures(_attack_maps(9), "resnet")
    paper = propagation_figures.paper_figure(
        PaperFigure("5", "the rule", "attack.csv, failed", _attack_maps(2)), "lenet"
    )
    try:
        assert list(few) == ["pm_max", "pm_avg"]
        assert list(many) == [
            "pm_max",
            "pm_avg",
            "pm_max_selected",
            "pm_avg_selected",
        ]
        # The selected figures: 8 of the 9 layers, the images' two panels.
        panels = [ax for ax in many["pm_max_selected"].axes if ax.get_title()]
        assert len(panels) == 2 + propagation_figures.SELECTED_LAYERS
        assert list(paper) == ["figure5_4_pm_max.png", "figure5_4_pm_avg.png"]
        titles = {k: f._suptitle.get_text() for k, f in paper.items()}
        assert titles["figure5_4_pm_max.png"].startswith(
            "Figure 5 of the paper, chosen by rule: the rule.\n"
        )
        assert "(which shows its PM_max)" in titles["figure5_4_pm_avg.png"]
        assert "lenet, test image 4 (attack.csv, failed)" in " ".join(
            titles["figure5_4_pm_max.png"].split()
        )
    finally:
        for fig in (*few.values(), *many.values(), *paper.values()):
            plt.close(fig)
