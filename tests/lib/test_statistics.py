"""The statistics streams' host parts and the study in one call, the attacks of
figures 2-6, and the figures of many attacks (propmaps_jax.analysis.statistics,
paper_examples, figures.propagation.statistics_figures and study_figures)."""

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from propmaps_jax import models  # noqa: E402
from propmaps_jax.analysis import paper_examples, statistics  # noqa: E402
from propmaps_jax.attack.perturb import apply_pixels_batch  # noqa: E402
from propmaps_jax.errors import PropmapsError  # noqa: E402
from propmaps_jax.figures import propagation as propagation_figures  # noqa: E402
from propmaps_jax.results import statistics_json  # noqa: E402


def _table(attacked):
    n = len(attacked)
    return {
        "index": np.arange(n) + 10,
        "attacked": np.asarray(attacked, bool),
        "label": np.zeros(n, np.int64),
        "pixels": np.zeros((n, 1, 5), np.int64),
        "success": np.arange(n) % 2 == 0,
        "pred_after": np.zeros(n, np.int64),
        "generations": np.zeros(n, np.int64),
        "prob_true_before": np.ones(n),
        "prob_true_after": np.ones(n),
    }


def test_attacked_rows_keep_the_attacked_and_count_the_others():
    rows = statistics.attacked_rows(_table([True, False, True, True]), "run.csv")
    assert rows["index"].tolist() == [10, 12, 13]
    assert rows["success"].tolist() == [True, True, False]
    assert rows["not_attacked"] == 1
    with pytest.raises(PropmapsError, match="run.csv holds no attacked image"):
        statistics.attacked_rows(_table([False, False]), "run.csv")


def test_generation0_problem_says_why_it_cannot_be_recomputed():
    assert "no attack_summary.json" in statistics.generation0_problem({})
    assert "targeted" in statistics.generation0_problem({"target": 3})
    assert "does not record population" in statistics.generation0_problem(
        {"seed": 0, "pixels": 1, "generations": 5}
    )
    full = {"seed": 0, "pixels": 1, "population": 8, "generations": 5}
    assert statistics.generation0_problem(full) is None


def test_mean_maps_divide_the_sums_by_the_counts():
    state = {
        f"pm_{r}_sum": {"conv1": np.stack([np.full((2, 2), 6.0), np.full((2, 2), 4.0)])}
        for r in ("avg", "max")
    }
    maps = statistics.mean_maps(state, {"failed": 3, "successful": 0}, ["conv1"])
    assert maps["pm_avg/failed"]["conv1"][0, 0] == 2.0
    assert maps["pm_max/successful"]["conv1"][0, 0] == 4.0  # no attack: the sum


def test_neighbour_prob_true_is_p_true_of_the_moved_colour(tiny_lenet, random_images):
    module, variables = tiny_lenet
    image, label = random_images[0], 3
    pixel = np.array([[0, 5, 255, 0, 0]])
    got = paper_examples.neighbour_prob_true(
        models.make_apply_fn(module), variables, image, label, pixel
    )
    assert sorted(got) == [(0, 4), (0, 6), (1, 4), (1, 5), (1, 6)]
    moved = np.repeat(pixel[None], len(got), axis=0)
    moved[:, 0, :2] = sorted(got)
    batch = np.broadcast_to(image, (len(got), *image.shape)).astype(np.float32)
    probs = jax.nn.softmax(
        models.make_apply_fn(module)(variables, apply_pixels_batch(batch, moved))
    )
    np.testing.assert_allclose(
        [got[p] for p in sorted(got)], np.asarray(probs)[:, label], rtol=1e-5
    )


def test_statistics_figures_one_per_outcome_with_attacks():
    shapes = {"conv1": (4, 4, 2), "conv2": (2, 2, 3)}
    maps = {
        f"pm_avg/{o}": {n: np.ones(s[:2]) for n, s in shapes.items()}
        for o in ("successful", "failed")
    }
    stats = {
        o: {k: np.array([1.0, 2.0]) for k in ("mean_abs_diff", "mean_abs_fm")}
        for o in ("successful", "failed", "all")
    }
    edges = np.arange(4.0)
    figures = propagation_figures.statistics_figures(
        maps,
        shapes,
        {"successful": 2, "failed": 0},
        stats,
        {"successful": np.array([0.5, 1.5]), "failed": np.array([])},
        (edges, np.full(3, 1 / 3)),
        model="lenet",
    )
    try:
        assert list(figures) == [
            "mean_pm_avg_successful.png",
            "layer_means.png",
            "distance_from_centre.png",
        ]
    finally:
        for fig in figures.values():
            plt.close(fig)


def test_study_attacks_of_a_tiny_model_against_numpy(tiny_lenet, random_images):
    """An installed user's call: the statistics of six one-pixel attacks on a tiny
    LeNet; the first layer's mean PM_avg map against a float64 NumPy computation
    (a VALID convolution is linear: FM - FM_adv is the kernel times the pixel's
    normalised change, the bias cancels) and the distances by hand."""
    module, variables = tiny_lenet
    images = random_images
    pixels = np.array(
        [[[r, c, 255 * (r % 2), 0, 255]] for r, c in [(0, 0), (5, 9), (16, 16)]]
        + [[[r, c, 0, 255, 30]] for r, c in [(31, 2), (10, 27), (14, 17)]],
        np.int64,
    )
    index = np.array([0, 2, 3, 4, 6, 7])
    perturbed = apply_pixels_batch(images[index].astype(np.float32), pixels)
    apply_fn = models.make_apply_fn(module)
    rows = {
        "index": index,
        "label": np.asarray(apply_fn(variables, images[index])).argmax(-1),
        "pixels": pixels,
        "success": np.array([True, True, True, False, False, False]),
        "pred_after": np.asarray(apply_fn(variables, perturbed)).argmax(-1),
        "generations": np.array([0, 3, 5, 5, 5, 5]),
        "not_attacked": 2,
    }
    settings = {"seed": 0, "pixels": 1, "population": 8, "generations": 5}
    study = statistics.study_attacks(
        models.linen_features(module),
        variables,
        images,
        rows,
        batch_size=4,
        attack_settings=settings,
    )
    assert study.order == ["conv1", "conv2"] and study.mismatches == 0
    assert study.counts == {"successful": 3, "failed": 3}
    assert set(study.control_maps) == {"uniform_positions", "distance_matched"}
    assert study.generation0["best"].shape == (6, 1, 5)

    kernel = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)
    std = np.asarray(models.nets.CIFAR10_STD)
    expected = np.zeros((28, 28))
    for (r, c, *rgb), i in zip(pixels[:3, 0], index[:3], strict=True):
        delta = (images[i, r, c].astype(np.float64) - rgb) / std
        d_fm = np.zeros((28, 28, 3))
        for dr in range(5):
            for dc in range(5):
                if 0 <= r - dr < 28 and 0 <= c - dc < 28:
                    d_fm[r - dr, c - dc] = delta @ kernel[dr, dc]
        expected += np.abs(d_fm).mean(-1) / 3
    np.testing.assert_allclose(
        study.mean_maps["pm_avg/successful"]["conv1"], expected, rtol=1e-4, atol=1e-6
    )
    distances = np.maximum(abs(pixels[:, 0, 0] - 15.5), abs(pixels[:, 0, 1] - 15.5))
    np.testing.assert_array_equal(study.distances["failed"], distances[3:])

    # The files' contents come from the study alone.
    assert study.mean_maps_arrays()["counts"].tolist() == [3, 3]
    header, csv_rows = study.per_layer_rows()
    assert [r[:5] for r in csv_rows[:3]] == [
        ["conv1", 28, 28, 3, o] for o in ("successful", "failed", "all")
    ]
    report = study.claims_report("conv")
    assert report["counts"] == {"successful": 3, "failed": 3, "all": 6}
    summary = statistics_json.summary(study, "lenet_tiny", None, "a.csv", "conv", {})
    assert summary["attacks"] == 6 and summary["not_attacked"] == 2
    figures = propagation_figures.study_figures(study, "lenet_tiny")
    try:
        assert "mean_pm_avg_uniform_positions.png" in figures
    finally:
        for fig in figures.values():
            plt.close(fig)

    # A model that does not predict the recorded pred_after is refused.
    with pytest.raises(PropmapsError, match="run.csv was not made by this model"):
        statistics.study_attacks(
            models.linen_features(module),
            variables,
            images,
            {**rows, "pred_after": rows["pred_after"] + 1},
            batch_size=4,
            source="run.csv",
        )
