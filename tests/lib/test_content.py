"""One model's within-image measures and the readings measures on known answers."""

import numpy as np

from propmaps_jax import models
from propmaps_jax.analysis import content, locality, readings


def test_colour_difference_by_hand():
    images = np.zeros((1, 4, 4, 3), np.uint8)
    images[0, 1, 1] = (100, 100, 100)
    images[0, 2, 3] = (100, 160, 180)
    pixels = np.array([[[1, 1, 0, 0, 0]]])
    got = content.colour_difference(
        images, pixels, np.array([[2, 1]]), np.array([[3, 1]])
    )
    np.testing.assert_allclose(got, [[1.0, 0.0]])  # sqrt(60^2 + 80^2) / 100


def test_ring_rows_keep_the_inside_positions_with_their_distance():
    images = np.random.default_rng(0).integers(0, 256, (2, 6, 6, 3)).astype(np.uint8)
    pixels = np.array([[[0, 0, 1, 2, 3]], [[3, 3, 4, 5, 6]]])
    offsets, distances = locality.chebyshev_offsets(2)
    _, _, inside = locality.offset_positions(
        pixels[:, 0, 0], pixels[:, 0, 1], offsets, 6, 6
    )
    inside = np.asarray(inside)
    success = np.zeros_like(inside)
    success[1, 0] = True
    rows = content.ring_rows(images, pixels, success, inside, 2)
    assert len(rows["attack"]) == inside.sum() == 8 + 24
    assert rows["success"].sum() == 1
    assert set(rows["distance"][rows["attack"] == 0]) == {1.0, 2.0}
    back = content.rows_from_arrays(content.rows_to_arrays(rows, "image"), "image")
    for key in rows:
        np.testing.assert_allclose(back[key], rows[key], rtol=1e-6)


def test_network_ring_rows_are_at_network_distances():
    perm = models.pixel_permutation(3, 6, 6)
    images = np.random.default_rng(1).integers(0, 256, (1, 6, 6, 3)).astype(np.uint8)
    pixels = np.array([[[2, 2, 9, 9, 9]]])
    offsets, _ = locality.chebyshev_offsets(1)
    r, c, inside = locality.network_offset_positions(
        pixels[:, 0, 0], pixels[:, 0, 1], offsets, perm, 6, 6
    )
    rows = content.ring_rows(
        images, pixels, np.ones((1, 8), bool), np.asarray(inside), 1, perm
    )
    moved = images[0, np.asarray(r)[0], np.asarray(c)[0]][np.asarray(inside)[0]]
    want = np.linalg.norm(moved.astype(float) - images[0, 2, 2], axis=-1) / 100
    np.testing.assert_allclose(rows["colour"], want, rtol=1e-6)


def _simulated_rows(slope, colour_effect, n_images, seed, colour_tracks_distance):
    """Ring rows whose success follows a known within-image logistic model."""
    rng = np.random.default_rng(seed)
    attack, distance, colour = [], [], []
    for i in range(n_images):
        for d in range(1, 5):
            k = 8 * d
            attack += [i] * k
            distance += [d] * k
            base = 0.3 * d if colour_tracks_distance else 0.0
            colour += list(base + rng.uniform(0, 1, k))
    attack, distance, colour = map(np.asarray, (attack, distance, colour))
    fragility = rng.normal(0, 1.5, n_images)[attack]
    logit = 1.0 + fragility + slope * distance + colour_effect * colour
    success = rng.uniform(size=len(logit)) < 1 / (1 + np.exp(-logit))
    return {
        "attack": attack,
        "distance": distance.astype(float),
        "success": success,
        "colour": colour,
    }


def test_distance_effects_recover_a_known_slope_and_see_through_colour():
    # 200 images and 20 resamples (300 and 30 until 2026-12-07: 6.7 -> 3.7 s; the
    # intervals hold their true values by wider margins, -0.6 in [-0.64, -0.53]).
    # Content world: success depends on colour only, colour grows with distance.
    rows = _simulated_rows(0.0, -3.0, 200, 0, colour_tracks_distance=True)
    fit = content.distance_effects(rows, seed=0, num_resamples=20)
    assert fit["distance"]["hi"] < 0  # distance alone looks negative
    adjusted = fit["colour_adjusted_distance"]
    assert adjusted["lo"] < 0 < adjusted["hi"]  # but not once colour is in
    assert fit["colour"]["hi"] < -2
    # Receptive-field world: distance matters at equal colour.
    rows = _simulated_rows(-0.6, 0.0, 200, 1, colour_tracks_distance=True)
    fit = content.distance_effects(rows, seed=0, num_resamples=20)
    adjusted = fit["colour_adjusted_distance"]
    assert adjusted["lo"] < -0.6 < adjusted["hi"] < 0


def test_distance_effects_not_fitted_on_few_images():
    rows = _simulated_rows(-0.5, 0.0, 10, 2, colour_tracks_distance=False)
    fit = content.distance_effects(rows, seed=0, num_resamples=10)
    assert fit["distance"]["estimate"] is None and "informative" in fit["not_fitted"]


def test_move_rates_differences_against_random():
    nearby = np.array([1, 1, 0, 1, 0, 0, 1, 1], bool)
    random = np.array([0, 0, 0, 1, 0, 0, 0, 0], bool)
    network = np.array([1, 0, 0, 0, 0, 0, 0, 0], bool)
    out = content.move_rates(
        {"nearby": nearby, "random": random, "network_nearby": network},
        np.arange(8),
        0,
    )
    assert out["rates"]["nearby"]["estimate"] == 5 / 8
    assert out["differences"]["nearby - random"]["estimate"] == 4 / 8
    assert out["differences"]["network_nearby - nearby"]["estimate"] == -4 / 8
    assert set(out["differences"]) == {
        "nearby - random",
        "network_nearby - random",
        "network_nearby - nearby",
    }


def test_encoding_difference_pairs_by_image():
    jpeg_index = np.array([5, 1, 9, 3])
    jpeg_nearby = np.array([1, 1, 0, 1], bool)
    lossless_index = np.array([3, 5, 7])
    lossless_nearby = np.array([0, 1, 1], bool)
    out = readings.encoding_difference(
        jpeg_index, jpeg_nearby, lossless_index, lossless_nearby
    )
    # Images 3 and 5 in both: JPEG 1, 1 against lossless 0, 1.
    assert out["images_in_both"] == 2
    assert out["estimate"] == 0.5


def test_slope_difference_sees_a_slower_decay():
    slow = _simulated_rows(-0.2, 0.0, 200, 3, colour_tracks_distance=False)
    fast = _simulated_rows(-0.8, 0.0, 200, 4, colour_tracks_distance=False)
    for rows in (slow, fast):
        rows["image"] = np.arange(200) + 1000  # the same test images
    # 20 resamples (30 until 2026-12-07: the interval moved by 0.003).
    out = readings.slope_difference(slow, fast, seed=0, num_resamples=20)
    assert 0.2 < out["lo"] < out["estimate"] < out["hi"]
    assert abs(out["estimate"] - 0.6) < 0.25
    same = readings.slope_difference(slow, slow, seed=0, num_resamples=10)
    assert same["estimate"] == same["lo"] == same["hi"] == 0


def test_nearby_rate_comparison_on_hand_numbers():
    a = (np.array([0, 1, 2, 3]), np.array([1, 1, 0, 0], bool))
    b = (np.array([1, 2, 5]), np.array([1, 1, 1], bool))
    out = readings.nearby_rate_comparison({"a": a, "b": b})
    assert out["rates"]["a"]["estimate"] == 0.5 and out["rates"]["b"]["n"] == 3
    diff = out["differences"]["a - b"]
    assert diff["estimate"] == -0.5 and diff["lo"] <= -0.5 <= diff["hi"]
    assert diff["class"] in (readings.NEGATIVE, readings.INCONCLUSIVE)
