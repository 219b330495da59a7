"""The content controls: other-attack colours, centre-matched draws, differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax.analysis import content_controls as cc
from propmaps_jax.analysis import locality_controls as lc
from propmaps_jax.errors import PropmapsError

INDICES = np.array([11, 3, 40, 7, 9, 25])
COLOURS = np.array(
    [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [9, 9, 9]]
)


def _rows_drawn(drawn: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """The row of `colours` each drawn colour is (colours all distinct)."""
    return np.array([int(np.flatnonzero((colours == c).all(1))[0]) for c in drawn])


def test_other_attack_colour_is_never_the_attacks_own():
    for seed in range(30):
        drawn = cc.sample_attack_colours(seed, INDICES, COLOURS)
        assert drawn.shape == (6, 3) and drawn.dtype == np.int32
        rows = _rows_drawn(drawn, COLOURS)
        assert np.all(rows != np.arange(6)), seed


def test_other_attack_colour_is_uniform_over_the_others():
    indices, colours = INDICES[:4], COLOURS[:4]
    counts = np.zeros((4, 4), int)
    for seed in range(150):
        rows = _rows_drawn(cc.sample_attack_colours(seed, indices, colours), colours)
        counts[np.arange(4), rows] += 1
    assert np.all(np.diag(counts) == 0)
    others = counts[~np.eye(4, dtype=bool)]
    # Every other attack drawn; 1/3 each, expected 50 of 150 (sd 5.8): a loose band.
    assert np.all(others >= 1)
    assert np.all((others >= 25) & (others <= 75)), counts


def test_other_attack_colour_does_not_depend_on_batch_order():
    whole = cc.sample_attack_colours(0, INDICES, COLOURS)
    for perm_seed in range(3):
        perm = np.random.default_rng(perm_seed).permutation(6)
        permuted = cc.sample_attack_colours(0, INDICES[perm], COLOURS[perm])
        np.testing.assert_array_equal(permuted, whole[perm])
    # The other sub-stream and another seed are other draws.
    nearby = cc.sample_attack_colours(0, INDICES, COLOURS, cc.NEARBY_COLOUR_STREAM)
    assert not np.array_equal(nearby, whole)
    assert not np.array_equal(cc.sample_attack_colours(1, INDICES, COLOURS), whole)


def test_one_attack_returns_its_own_colour_and_duplicates_are_refused():
    drawn = cc.sample_attack_colours(0, INDICES[:1], COLOURS[1:2])
    np.testing.assert_array_equal(drawn, COLOURS[1:2])
    assert cc.sample_attack_colours(0, INDICES[:0], COLOURS[:0]).shape == (0, 3)
    with pytest.raises(PropmapsError):
        cc.sample_attack_colours(0, np.array([3, 3]), COLOURS[:2])


def test_distance_from_centre():
    rows, cols = jnp.array([0, 1, 31, 0, 15]), jnp.array([0, 1, 31, 31, 16])
    d = cc.distance_from_centre(rows, cols, 32, 32)
    corner, inner = 15.5 * math.sqrt(2), 14.5 * math.sqrt(2)
    np.testing.assert_allclose(d, [corner, inner, corner, corner, math.sqrt(0.5)], 1e-6)
    assert float(cc.distance_from_centre(1, 1, 3, 3)) == 0.0


# A 12x12 noise image (centre (5.5, 5.5)), attack at (2, 5), distance 3.536 from the
# centre. Its window is planted at (9, 6) (the mirror image: same centre distance,
# Chebyshev 7) and at (9, 10) (Chebyshev 7, but centre distance 5.70: off by 2.17).
ROW, COL, TOL, MIN_DIST = 2, 5, 6.0, 3


def _image(mirror_shift: float = 0.0) -> np.ndarray:
    image = np.random.default_rng(1).integers(0, 256, (12, 12, 3)).astype(np.float32)
    window = image[ROW - 1 : ROW + 2, COL - 1 : COL + 2].copy()
    image[8:11, 5:8] = window + mirror_shift
    image[8:11, 9:12] = window + 2.0
    return image


def _qualifying(image: np.ndarray, centre_tol: float) -> np.ndarray:
    """Independent float64 mask of the positions meeting all three conditions."""
    f = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), "edge")

    def win(r, c):
        return f[r : r + 3, c : c + 3].reshape(-1)

    rr, cc_ = np.indices((12, 12))
    context = np.array(
        [
            [np.abs(win(r, c) - win(ROW, COL)).mean() for c in range(12)]
            for r in range(12)
        ]
    )
    far = np.maximum(np.abs(rr - ROW), np.abs(cc_ - COL)) >= MIN_DIST
    centre = np.hypot(rr - 5.5, cc_ - 5.5)
    same = np.abs(centre - centre[ROW, COL]) <= centre_tol
    return (context <= TOL) & far & same


def test_centre_matched_draw_meets_all_three_conditions():
    image = _image()
    want = _qualifying(image, 1.0)
    assert want[9, 6] and not want[9, 10] and want.sum() >= 1
    # The context match alone takes (9, 10) too: the centre condition drops it.
    context, _ = lc.context_candidates(jnp.asarray(image), ROW, COL, TOL, MIN_DIST)
    assert bool(context[9, 10]) and bool(context[9, 6])
    for key in jax.random.split(jax.random.key(0), 10):
        r, c, found, count, d = cc.sample_context_and_centre_matched(
            key, jnp.asarray(image), ROW, COL, TOL, MIN_DIST, 1.0
        )
        assert bool(found) and int(count) == want.sum()
        assert want[int(r), int(c)] and float(d) <= TOL
    # A wide centre tolerance gives back the plain context-matched candidates.
    *_, count_wide, _ = cc.sample_context_and_centre_matched(
        key, jnp.asarray(image), ROW, COL, TOL, MIN_DIST, 100.0
    )
    *_, count_plain, _ = lc.sample_context_matched(
        key, jnp.asarray(image), ROW, COL, TOL, MIN_DIST
    )
    assert int(count_wide) == int(count_plain) == int(context.sum()) >= 2


def test_centre_matched_draw_reports_not_found():
    # The mirror copy no longer matches the context; (9, 10) is off-centre.
    image = _image(mirror_shift=20.0)
    assert not _qualifying(image, 1.0).any()
    r, c, found, count, _ = cc.sample_context_and_centre_matched(
        jax.random.key(0), jnp.asarray(image), ROW, COL, TOL, MIN_DIST, 1.0
    )
    assert not bool(found) and int(count) == 0 and (int(r), int(c)) == (ROW, COL)


def test_draw_content_controls_per_image_and_batch_order():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 8, 8, 3)).astype(np.uint8)
    positions = [(0, 0), (3, 4), (7, 7), (2, 5), (4, 1), (6, 2)]
    pixels = np.array(
        [[[r, c, *COLOURS[i]]] for i, (r, c) in enumerate(positions)], np.int32
    )
    whole = cc.draw_content_controls(0, INDICES, images, pixels, tolerance=80.0)
    assert all(len(field) == 6 for field in whole)
    own_rows = _rows_drawn(whole.attack_colour_own, COLOURS)
    near_rows = _rows_drawn(whole.attack_colour_nearby, COLOURS)
    assert np.all(own_rows != np.arange(6)) and np.all(near_rows != np.arange(6))
    np.testing.assert_array_equal(
        whole.attack_colour_own, cc.sample_attack_colours(0, INDICES, COLOURS)
    )
    assert whole.drop_rate == pytest.approx(np.mean(~whole.matched_found))
    perm = np.array([3, 0, 5, 1, 4, 2])
    permuted = cc.draw_content_controls(
        0, INDICES[perm], images[perm], pixels[perm], tolerance=80.0
    )
    for a, b in zip(whole, permuted, strict=True):
        np.testing.assert_array_equal(b, a[perm])
    # Matched positions use only each image's key: a smaller pool keeps them.
    part = cc.draw_content_controls(0, INDICES[2:], images[2:], pixels[2:], 80.0)
    for name in ("matched_rc", "matched_found", "matched_candidates"):
        np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[2:])
    one = cc.draw_content_controls(0, INDICES[:1], images[:1], pixels[:1], 80.0)
    np.testing.assert_array_equal(one.attack_colour_own, COLOURS[:1])
    np.testing.assert_array_equal(one.attack_colour_nearby, COLOURS[:1])


def test_stratum_differences_exact_rates_and_empty_stratum():
    first = np.array([1, 1, 1, 0, 1, 1, 0, 0], bool)
    second = np.array([0, 1, 0, 0, 0, 0, 0, 0], bool)
    labels = np.array(["a", "a", "a", "a", "b", "b", "b", "b"])
    clusters = np.array([0, 0, 1, 2, 3, 4, 5, 6])
    rows = cc.stratum_differences(
        first, second, labels, ["a", "b", "c"], clusters, num_resamples=300
    )
    assert [r["stratum"] for r in rows] == ["all", "a", "b", "c"]
    expected = {
        "all": (8, 5 / 8, 1 / 8),
        "a": (4, 3 / 4, 1 / 4),
        "b": (4, 2 / 4, 0.0),
    }
    for r in rows[:3]:
        n, f, s = expected[r["stratum"]]
        assert r["n"] == n
        assert r["first_rate"] == pytest.approx(f)
        assert r["second_rate"] == pytest.approx(s)
        assert r["estimate"] == pytest.approx(f - s)
        assert r["lo"] <= r["estimate"] <= r["hi"]
        assert r["lo"] < r["hi"]
    assert rows[3] == {
        "stratum": "c",
        "n": 0,
        "first_rate": None,
        "second_rate": None,
        "estimate": None,
        "lo": None,
        "hi": None,
    }
    # Every attack differs the same way: every resample gives 1, a zero-width interval.
    same = cc.stratum_differences(
        np.ones(4, bool), np.zeros(4, bool), np.zeros(4, int), [0], np.arange(4), 50
    )
    assert [(r["estimate"], r["lo"], r["hi"]) for r in same] == [(1.0, 1.0, 1.0)] * 2
    with pytest.raises(PropmapsError):
        cc.stratum_differences(first, second, labels, ["all"], clusters)
