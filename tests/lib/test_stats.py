"""propmaps_jax.stats: ranks and the one Spearman (NumPy and JAX), ROC AUC and
curve, percentile intervals, distances from the centre; against SciPy, brute force
and hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from propmaps_jax import stats


def _ties(rng, shape):
    return rng.integers(0, 5, shape).astype(np.float64)  # many ties


def test_average_ranks_match_scipy_in_numpy_and_jax():
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=(4, 30)), _ties(rng, (3, 2, 25))):
        expected = scipy.stats.rankdata(values, axis=-1) - 1.0
        np.testing.assert_array_equal(stats.average_ranks(values), expected)
        got = jax.jit(stats.average_ranks)(jnp.asarray(values, jnp.float32))
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_average_ranks_hand_case():
    np.testing.assert_array_equal(
        stats.average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [3, 0, 3, 1, 3]
    )


def test_spearman_matches_scipy_along_the_last_axis():
    rng = np.random.default_rng(1)
    x = _ties(rng, (6, 40))
    y = 0.5 * x + rng.normal(size=(6, 40))
    expected = [
        scipy.stats.spearmanr(a, b).statistic for a, b in zip(x, y, strict=True)
    ]
    got = stats.spearman(x, y)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # The JAX path (float32, under jit) computes the same statistic.
    got32 = jax.jit(stats.spearman)(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got32), expected, rtol=1e-5, atol=1e-6)
    # A perfectly monotone pair, and its reverse.
    line = np.arange(10.0)
    assert stats.spearman(line, np.exp(line)) == pytest.approx(1.0)
    assert stats.spearman(line, -(line**3)) == pytest.approx(-1.0)


def test_spearman_is_nan_for_a_constant_row():
    x = np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    y = np.array([[1.0, 2.0, 3.0], [3.0, 3.0, 3.0]])
    assert np.all(np.isnan(stats.spearman(x, y)))
    assert np.all(np.isnan(np.asarray(stats.spearman(jnp.asarray(x), jnp.asarray(y)))))


def test_weighted_auc_hand_case():
    # Positives 0.9, 0.4; negatives 0.4, 0.1: of the 4 pairs, 3 are won and 1 tied.
    scores = np.array([0.9, 0.4, 0.4, 0.1])
    positive = np.array([True, True, False, False])
    assert stats.weighted_auc(scores, positive, np.ones((1, 4)))[0] == 3.5 / 4
    # Weight 2 on the tied positive: pairs (0.9: 2 won) + 2 x (0.4: 1 won, 1 tie).
    got = stats.weighted_auc(scores, positive, np.array([[1.0, 2.0, 1.0, 1.0]]))[0]
    assert got == pytest.approx((2 + 2 * 1.5) / (3 * 2))
    # One class only: undefined.
    assert np.isnan(stats.weighted_auc(scores, np.ones(4, bool), np.ones((1, 4)))[0])


def test_weighted_auc_and_roc_against_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)  # ties
    positive = rng.random(40) < 0.4
    weights = rng.integers(0, 3, (5, 40))
    got = stats.weighted_auc(scores, positive, weights)
    for b in range(5):
        s = np.repeat(scores, weights[b])
        p = np.repeat(positive, weights[b])
        pos, neg = s[p], s[~p]
        expected = (
            (pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])
        ).mean()
        np.testing.assert_allclose(got[b], expected)
    fpr, tpr = stats.roc_curve(scores, positive)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # The trapezoid area under the ROC curve is the AUC with ties counted half.
    np.testing.assert_allclose(
        np.trapezoid(tpr, fpr),
        stats.weighted_auc(scores, positive, np.ones((1, 40)))[0],
    )


def test_percentile_interval_needs_enough_finite_replicates():
    values = np.r_[np.arange(9.0), np.nan, np.inf]
    assert all(math.isnan(v) for v in stats.percentile_interval(values))
    low, high = stats.percentile_interval(values, min_finite=1)
    assert (low, high) == pytest.approx(
        tuple(np.percentile(np.arange(9.0), [2.5, 97.5]))
    )
    assert stats.percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5, 95))


def test_distance_from_centre_and_rings():
    pixels = np.array([[0, 0], [15, 16], [31, 0], [10, 20]])
    np.testing.assert_array_equal(
        stats.distance_from_centre(pixels, 32, 32), [15.5, 0.5, 15.5, 5.5]
    )
    edges = stats.distance_bin_edges(32, 32)
    np.testing.assert_array_equal(edges, np.arange(17.0))
    # Ring d (distance d + 0.5) of a 32x32 image holds (2d + 2)^2 - (2d)^2 pixels.
    fractions = stats.uniform_distance_fractions(32, 32, edges)
    np.testing.assert_allclose(fractions, (8 * np.arange(16) + 4) / 1024)
    summary = stats.distance_stats(np.array([0.5, 1.5, 1.5, 15.5]), edges)
    assert summary["pixels"] == 4 and summary["mean"] == 4.75
    assert summary["median"] == 1.5 and sum(summary["histogram_counts"]) == 4
    assert stats.distance_stats(np.zeros(0), edges) == {"pixels": 0}
