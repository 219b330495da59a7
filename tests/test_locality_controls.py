"""The locality controls: statistics against closed forms / scipy, the draws."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from propmaps_jax import locality, stats
from propmaps_jax import locality_controls as lc
from propmaps_jax.errors import PropmapsError


@pytest.mark.parametrize("b,c", [(0, 0), (3, 0), (7, 2), (20, 31), (148, 23)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else scipy.stats.binomtest(b, b + c, 0.5).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)
    # Closed form for c = 0: p = 2 / 2^b.
    if c == 0 and b:
        assert stats.mcnemar_exact(b, 0) == pytest.approx(min(1.0, 2.0 / 2**b))
    with pytest.raises(PropmapsError):
        stats.mcnemar_exact(-1, 2)


def test_paired_test_counts_and_winner():
    first = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 1], bool)
    second = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    t = lc.paired_test(first, second)
    assert (t["both"], t["only_first"], t["only_second"], t["neither"]) == (1, 7, 1, 1)
    assert t["difference"] == pytest.approx(0.6)
    assert t["mcnemar_p"] == pytest.approx(2 * (1 + 8) / 2**8)  # 0.0703
    assert t["winner"] == "none shown"
    assert lc.paired_test(np.ones(8, bool), np.zeros(8, bool))["winner"] == "first"
    assert lc.paired_test(np.zeros(8, bool), np.ones(8, bool))["winner"] == "second"


def test_logistic_fit_binary_covariate_is_the_log_odds():
    # Two groups: the MLE is the saturated model, logit of each group's rate.
    design = np.array([[1.0, 0.0], [1.0, 1.0]])
    successes, trials = np.array([3.0, 12.0]), np.array([10.0, 16.0])
    beta, ok = stats.logistic_fit(design, successes, trials)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    assert ok
    np.testing.assert_allclose(beta, [logit(0.3), logit(0.75) - logit(0.3)], 1e-9)
    # Bernoulli rows give the same fit as their binomial sums; weights = copies.
    rows = np.repeat(design, [10, 16], axis=0)
    y = np.r_[np.ones(3), np.zeros(7), np.ones(12), np.zeros(4)]
    np.testing.assert_allclose(stats.logistic_fit(rows, y, np.ones(26))[0], beta, 1e-9)
    weights = np.array([[2.0, 2.0], [1.0, 0.0]])
    b2, ok2 = stats.logistic_fit(design, successes, trials, weights)
    np.testing.assert_allclose(b2[0], beta, 1e-9)
    # One group only: the slope is not identified, the fit is reported failed.
    assert not ok2[1] and np.all(np.isnan(b2[1]))


def test_logistic_fit_separation_is_a_failed_fit():
    design = np.array([[1.0, 0.0], [1.0, 1.0]])
    beta, ok = stats.logistic_fit(design, np.array([0.0, 5.0]), np.array([5.0, 5.0]))
    assert not ok and np.all(np.isnan(beta))


def test_bootstrap_counts_and_percentile_interval():
    counts = stats.bootstrap_counts(np.random.default_rng(0), 7, 50)
    assert counts.shape == (50, 7) and np.all(counts.sum(1) == 7)
    assert stats.percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert all(math.isnan(v) for v in stats.percentile_interval([1.0, np.nan]))


def test_quartile_groups():
    groups, cuts = stats.quartile_groups([0.0, 1.0, 2.0, 2.5, 9.0], np.arange(9.0))
    np.testing.assert_allclose(cuts, [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(groups, [0, 0, 0, 1, 3])


def test_clean_margin():
    probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    np.testing.assert_allclose(lc.clean_margin(probs, jnp.array([0, 2])), [0.5, -0.1])


def test_context_matched_draw_respects_the_tolerance():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (12, 12, 3)).astype(np.float32)
    row, col = 5, 6
    # Two planted copies of the attack position's window: far (3, 3 away) and
    # near (distance 2, excluded: its window overlaps the attack's).
    window = image[row - 1 : row + 2, col - 1 : col + 2].copy()
    image[1:4, 1:4] = window  # centre (2, 2): Chebyshev distance 4
    image[8:11, 7:10] = window + 5.0  # centre (9, 8): distance 4, diff 5
    mask, distance = lc.context_candidates(jnp.asarray(image), row, col, 6.0, 3)
    # Independent float64 check of the distance at the planted centres.
    f = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), "edge")

    def win(r, c):
        return f[r : r + 3, c : c + 3].reshape(-1)

    expected = np.array(
        [
            [np.abs(win(r, c) - win(row, col)).mean() for c in range(12)]
            for r in range(12)
        ]
    )
    np.testing.assert_allclose(distance, expected, atol=1e-4)
    want = (expected <= 6.0) & (
        np.maximum(*np.abs(np.indices((12, 12)) - np.array([row, col])[:, None, None]))
        >= 3
    )
    np.testing.assert_array_equal(mask, want)
    assert want[2, 2] and want[9, 8] and not want[row, col]
    keys = jax.random.split(jax.random.key(0), 20)
    draws = [
        lc.sample_context_matched(k, jnp.asarray(image), row, col, 6.0, 3) for k in keys
    ]
    for r, c, found, count, d in draws:
        assert bool(found) and int(count) == want.sum()
        assert want[int(r), int(c)] and float(d) <= 6.0
    # Tolerance 0 with no exact copy far away: nothing qualifies, reported.
    image[1:4, 1:4] += 1.0
    image[8:11, 7:10] += 1.0
    r, c, found, count, _ = lc.sample_context_matched(
        keys[0], jnp.asarray(image), row, col, 0.0, 3
    )
    assert not bool(found) and int(count) == 0 and (int(r), int(c)) == (row, col)


def test_draw_controls_per_image_keys_do_not_depend_on_batching():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 8, 8, 3)).astype(np.uint8)
    pixels = np.array(
        [[[r, c, 1, 2, 3]] for r, c in [(0, 0), (3, 4), (7, 7), (2, 5), (4, 1)]]
    )
    indices = np.array([11, 3, 40, 7, 9])
    nearby, _ = locality.protocol_moves(
        0, indices, pixels[:, 0, 0], pixels[:, 0, 1], 8, 8
    )
    whole = lc.draw_controls(0, indices, images, pixels, nearby, tolerance=80.0)
    part = lc.draw_controls(0, indices[2:], images[2:], pixels[2:], nearby[2:], 80.0)
    for a, b in zip(whole, part, strict=True):
        np.testing.assert_array_equal(a[2:], b)
    assert np.all((whole.own_colour >= 0) & (whole.own_colour <= 255))
    assert not np.array_equal(whole.own_colour, whole.nearby_colour)
    other = lc.draw_controls(1, indices, images, pixels, nearby, tolerance=80.0)
    assert not np.array_equal(whole.own_colour, other.own_colour)
