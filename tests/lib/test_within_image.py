"""Statistics within images: the conditional logit against statsmodels and hand
cases, the cluster bootstrap and the rates built on it, and the margin strata."""

import math
import warnings

import numpy as np
import pytest

from propmaps_jax import stats
from propmaps_jax.analysis import within_image as wi
from propmaps_jax.errors import PropmapsError


def _simulate(num_strata, low, high, seed, coef=(0.7, -0.4)):
    """Rows of images with fixed effects: y ~ alpha_image + x b, x = (noise, d)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(low, high + 1, num_strata)
    groups = np.repeat(rng.permutation(10 * num_strata)[:num_strata], rows)
    x = np.c_[rng.normal(size=len(groups)), rng.integers(1, 6, len(groups))]
    # Image baselines spread widely: some images mostly succeed (k > m / 2, the
    # flipped strata), some never (dropped), most in between.
    alpha = np.repeat(rng.normal(0.5, 2.0, num_strata), rows)
    y = rng.random(len(groups)) < 1.0 / (1.0 + np.exp(-(alpha + x @ np.array(coef))))
    return y, x, groups


# ----- conditional_logit ------------------------------------------------------------


def test_conditional_logit_matches_statsmodels():
    from statsmodels.discrete.conditional_models import ConditionalLogit

    y, x, groups = _simulate(150, 10, 30, seed=0)
    fit = wi.conditional_logit(y, x, groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its note on the dropped strata
        model = ConditionalLogit(y.astype(float), x, groups=groups)
        reference = model.fit(method="newton", disp=False)
    assert fit["converged"]
    np.testing.assert_allclose(fit["coef"], reference.params, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit["se"], reference.bse, rtol=1e-5)
    assert fit["n_groups_used"] == model._n_groups
    assert fit["n_rows_used"] == model.nobs
    # Some strata were flipped (more cases than controls), some dropped.
    per_image = np.bincount(np.unique(groups, return_inverse=True)[1], weights=y)
    sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
    assert np.any(2 * per_image > sizes) and np.any(per_image == 0)
    # The clustered SE: the sandwich of statsmodels' own per-image scores and its
    # (numerical) Hessian at our estimate, with the G / (G - 1) factor.
    scores = np.array([model.score_grp(g, fit["coef"]) for g in range(model._n_groups)])
    bread = np.linalg.inv(-model.hessian(fit["coef"]))
    g = model._n_groups
    sandwich = bread @ (scores.T @ scores * g / (g - 1)) @ bread
    np.testing.assert_allclose(fit["se_cluster"], np.sqrt(np.diag(sandwich)), 1e-5)
    assert fit["loglik"] == pytest.approx(model.loglike(fit["coef"]), rel=1e-10)


def test_conditional_logit_matched_pairs_is_log_n10_over_n01():
    # 1:1 matched pairs, one binary covariate: only discordant pairs inform, and
    # the conditional MLE is log(n10 / n01), its SE sqrt(1 / n10 + 1 / n01).
    n10, n01, both, neither = 30, 12, 9, 14
    case_x = np.r_[np.ones(n10), np.zeros(n01), np.ones(both), np.zeros(neither)]
    control_x = np.r_[np.zeros(n10), np.ones(n01), np.ones(both), np.zeros(neither)]
    pairs = len(case_x)
    x = np.stack([case_x, control_x], axis=1).reshape(-1, 1)
    y = np.tile([True, False], pairs)
    groups = np.repeat(np.arange(pairs), 2)
    fit = wi.conditional_logit(y, x, groups)
    assert fit["converged"] and fit["n_groups_used"] == pairs
    assert fit["coef"][0] == pytest.approx(math.log(n10 / n01), abs=1e-10)
    assert fit["se"][0] == pytest.approx(math.sqrt(1 / n10 + 1 / n01), rel=1e-9)
    # log L = n10 log(n10 / (n10 + n01)) + n01 log(n01 / (n10 + n01))
    #         + (both + neither) log(1 / 2)
    expected = (
        n10 * math.log(n10 / (n10 + n01))
        + n01 * math.log(n01 / (n10 + n01))
        + (both + neither) * math.log(0.5)
    )
    assert fit["loglik"] == pytest.approx(expected, rel=1e-12)


def test_uninformative_strata_are_dropped_without_changing_the_fit():
    y, x, groups = _simulate(60, 5, 30, seed=1)
    fit = wi.conditional_logit(y, x, groups)
    rng = np.random.default_rng(2)
    extra = 25
    sizes = rng.integers(1, 40, extra)
    extra_groups = np.repeat(groups.max() + 1 + np.arange(extra), sizes)
    extra_y = np.repeat(np.arange(extra) % 2 == 0, sizes)  # all 1 or all 0
    extra_x = rng.normal(5.0, 3.0, (len(extra_y), 2))
    padded = wi.conditional_logit(
        np.r_[extra_y, y], np.r_[extra_x, x], np.r_[extra_groups, groups]
    )
    assert padded["converged"]
    assert padded["n_groups_used"] == fit["n_groups_used"]
    assert padded["n_rows_used"] == fit["n_rows_used"] < len(y)
    for key in ("coef", "se", "loglik"):
        np.testing.assert_allclose(padded[key], fit[key], rtol=1e-12)
    # The clustered SE's factor counts the informative strata only.
    np.testing.assert_allclose(padded["se_cluster"], fit["se_cluster"], rtol=1e-12)


def test_conditional_logit_symmetries():
    # Swapping successes and failures negates the coefficients; relabelling and
    # reordering images and rows changes nothing.
    y, x, groups = _simulate(80, 5, 40, seed=3)
    fit = wi.conditional_logit(y, x, groups)
    swapped = wi.conditional_logit(~y, x, groups)
    np.testing.assert_allclose(swapped["coef"], -fit["coef"], rtol=1e-9)
    np.testing.assert_allclose(swapped["se"], fit["se"], rtol=1e-9)
    order = np.random.default_rng(4).permutation(len(y))
    shuffled = wi.conditional_logit(y[order], x[order], -7 * groups[order])
    np.testing.assert_allclose(shuffled["coef"], fit["coef"], rtol=1e-9)
    np.testing.assert_allclose(shuffled["se_cluster"], fit["se_cluster"], rtol=1e-9)
    # A constant added to x within an image cancels, however large.
    offsets = np.random.default_rng(5).normal(0.0, 1e4, (groups.max() + 1, 2))
    shifted = wi.conditional_logit(y, x + offsets[groups], groups)
    np.testing.assert_allclose(shifted["coef"], fit["coef"], rtol=1e-9)
    np.testing.assert_allclose(shifted["se"], fit["se"], rtol=1e-9)
    # A 1-D X is one covariate.
    one = wi.conditional_logit(y, x[:, 1], groups)
    np.testing.assert_allclose(
        one["coef"], wi.conditional_logit(y, x[:, 1:], groups)["coef"], rtol=1e-12
    )


def test_conditional_logit_failures_are_reported_not_raised():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(30), 10)
    x = rng.normal(size=(300, 1))
    # Complete separation: within every image, exactly the rows above its median
    # succeed; the likelihood rises for ever as the coefficient grows.
    median = np.repeat(np.median(x[:, 0].reshape(30, 10), axis=1), 10)
    separated = wi.conditional_logit(x[:, 0] > median, x, groups)
    # Quasi-complete separation: the other images have one x for all their rows
    # (informative, 0 < k < m, but flat in b): still no finite estimate.
    flat = x.copy()
    flat[200:, 0] = np.repeat(np.arange(10.0), 10)
    y = np.where(np.arange(300) < 200, x[:, 0] > median, np.arange(300) % 10 < 3)
    quasi = wi.conditional_logit(y, flat, groups)
    assert quasi["n_groups_used"] == 30
    # A covariate constant within each image is not identified.
    constant = np.c_[x, np.repeat(rng.normal(size=30), 10)]
    singular = wi.conditional_logit(rng.random(300) < 0.5, constant, groups)
    # One informative image is too few.
    lonely = wi.conditional_logit(
        np.r_[True, False, True, True], np.arange(4.0)[:, None], [0, 0, 1, 1]
    )
    for fit in (separated, quasi, singular, lonely):
        assert fit["converged"] is False
        assert np.all(np.isnan(fit["coef"])) and np.all(np.isnan(fit["se"]))
        assert np.all(np.isnan(fit["se_cluster"]))
    assert lonely["n_groups_used"] == 1
    with pytest.raises(PropmapsError):
        wi.conditional_logit(np.r_[0, 2, 1], np.zeros((3, 1)), [0, 0, 0])
    with pytest.raises(PropmapsError):
        wi.conditional_logit(np.r_[0, 1], np.zeros((3, 1)), [0, 0, 0])


def _reference_loglik(y, x, groups, coef):
    """The conditional log-likelihood by the recursion in log space (logaddexp):
    slow, but it cannot overflow whatever the scale; strata of one length."""
    _, image = np.unique(groups, return_inverse=True)
    order = np.argsort(image, kind="stable")
    m = len(y) // (image.max() + 1)
    eta = (x @ coef)[order].reshape(-1, m)
    cases = y[order].reshape(-1, m)
    k = cases.sum(1)
    log_e = np.full((len(k), m + 1), -np.inf)
    log_e[:, 0] = 0.0
    for i in range(m):
        log_e[:, 1:] = np.logaddexp(log_e[:, 1:], eta[:, i, None] + log_e[:, :-1])
    informative = (k > 0) & (k < m)
    total = (eta * cases).sum(1) - log_e[np.arange(len(k)), k]
    return float(total[informative].sum())


def test_conditional_logit_on_long_strata_and_strong_effects():
    # 300 images of 100 positions, strong effects: x b spans ~40 within an image
    # and k reaches 50, where exp(x b) products leave float64 (statsmodels'
    # recursion overflows here). The estimate is the maximum of the log-space
    # reference likelihood.
    y, x, groups = _simulate(300, 100, 100, seed=6, coef=(4.0, -2.0))
    fit = wi.conditional_logit(y, x, groups)
    assert fit["converged"]
    np.testing.assert_allclose(fit["coef"], [4.0, -2.0], atol=0.5)
    best = _reference_loglik(y, x, groups, fit["coef"])
    assert fit["loglik"] == pytest.approx(best, rel=1e-10)
    for step in np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [1, 1]]) * 1e-4:
        assert _reference_loglik(y, x, groups, fit["coef"] + step) < best
    assert np.all(fit["se_cluster"] > 0) and np.all(np.isfinite(fit["se"]))


# ----- the cluster bootstrap, rates -------------------------------------------------


def _correlated(num_clusters, size, seed):
    """Outcomes that share their cluster's rate: 0.05 or 0.95 per cluster."""
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(num_clusters), size)
    rate = np.repeat(np.where(rng.random(num_clusters) < 0.5, 0.05, 0.95), size)
    return rng.random(len(clusters)) < rate, clusters


def test_cluster_bootstrap_is_seeded_and_wider_than_rows_for_correlated_data():
    success, clusters = _correlated(40, 25, seed=0)

    def mean(rows):
        return success[rows].mean()

    one = wi.cluster_bootstrap(mean, clusters, num_resamples=400, seed=3)
    again = wi.cluster_bootstrap(mean, clusters, num_resamples=400, seed=3)
    other = wi.cluster_bootstrap(mean, clusters, num_resamples=400, seed=4)
    assert (one["lo"], one["hi"]) == (again["lo"], again["hi"])
    assert (one["lo"], one["hi"]) != (other["lo"], other["hi"])
    assert one["estimate"] == success.mean()
    assert one["num_clusters"] == 40 and one["num_resamples"] == 400
    assert one["failed"] == 0
    naive = wi.cluster_bootstrap(mean, np.arange(len(success)), 400, seed=3)
    # Design effect 1 + (m - 1) ICC, ICC ~ 0.8 here: the image interval is about
    # sqrt(20) ~ 4.5 times the naive one; ask for twice.
    assert one["hi"] - one["lo"] > 2.0 * (naive["hi"] - naive["lo"])
    assert one["lo"] < success.mean() < one["hi"]


def test_cluster_bootstrap_resamples_whole_clusters():
    clusters = np.repeat([10, 20, 30, 40], [1, 2, 3, 4])[::-1]  # unsorted ids
    size = {10: 1, 20: 2, 30: 3, 40: 4}
    seen = []

    def record(rows):
        seen.append(rows)
        return float(len(rows))

    out = wi.cluster_bootstrap(record, clusters, num_resamples=50, seed=1)
    assert out["estimate"] == 10.0
    np.testing.assert_array_equal(seen[0], np.arange(10))
    for rows in seen[1:]:
        ids, counts = np.unique(clusters[rows], return_counts=True)
        # A cluster drawn t times contributes all of its rows t times; 4 draws.
        draws = [c / size[i] for i, c in zip(ids, counts, strict=True)]
        assert all(d == int(d) for d in draws) and sum(draws) == 4
    assert any(len(np.unique(r)) < len(r) for r in seen[1:])  # some drawn twice


def test_cluster_bootstrap_drops_nan_replicates_and_takes_arrays():
    success, clusters = _correlated(30, 8, seed=2)

    def two(rows):
        if 0 not in clusters[rows]:  # about (29/30)^30 ~ 36% of resamples
            return np.array([np.nan, 0.0])
        return np.array([success[rows].mean(), len(rows)])

    out = wi.cluster_bootstrap(two, clusters, num_resamples=300, seed=0)
    assert 60 < out["failed"] < 160
    assert out["lo"].shape == (2,) and out["hi"].shape == (2,)
    assert out["lo"][1] == out["hi"][1] == 240.0  # all clusters have 8 rows
    assert out["lo"][0] < out["estimate"][0] < out["hi"][0]


def test_resampled_strata_give_each_copy_its_own_image():
    groups = np.array([7, 7, 7, 9, 9])
    rows = np.array([0, 1, 2, 3, 4, 0, 1, 2])  # image 7 drawn twice
    strata = wi.resampled_strata(rows, groups)
    assert len(np.unique(strata)) == 3
    assert len(np.unique(strata[:3])) == 1 and len(np.unique(strata[5:])) == 1
    assert strata[0] != strata[5] and strata[3] == strata[4] != strata[0]
    # A bootstrap fit on copies equals a fit on the copies made by hand.
    y, x, image = _simulate(30, 4, 12, seed=7)
    drawn = np.r_[np.flatnonzero(image == image[0]), np.arange(len(y))]
    by_copy = wi.conditional_logit(
        y[drawn], x[drawn], wi.resampled_strata(drawn, image)
    )
    by_hand = np.r_[np.full((image == image[0]).sum(), -1), image]
    expected = wi.conditional_logit(y[drawn], x[drawn], by_hand)
    np.testing.assert_allclose(by_copy["coef"], expected["coef"], rtol=1e-12)
    merged = wi.conditional_logit(y[drawn], x[drawn], image[drawn])
    if merged["n_groups_used"] < by_copy["n_groups_used"]:
        assert merged["n_groups_used"] == by_copy["n_groups_used"] - 1


def test_rate_is_row_weighted_and_uses_the_bootstraps_draws():
    # Cluster A: one row, a success; cluster B: three rows, none: 1 / 4.
    out = wi.rate([True, False, False, False], ["A", "B", "B", "B"], 200, seed=0)
    assert out["estimate"] == 0.25 and (out["successes"], out["n"]) == (1, 4)
    assert out["num_clusters"] == 2
    # Resamples hold AA (1), AB or BA (1/4) or BB (0): the interval is [0, 1].
    assert (out["lo"], out["hi"]) == (0.0, 1.0)
    success, clusters = _correlated(50, 12, seed=5)
    fast = wi.rate(success, clusters, num_resamples=300, seed=9)
    slow = wi.cluster_bootstrap(lambda r: success[r].mean(), clusters, 300, seed=9)
    assert fast["lo"] == pytest.approx(slow["lo"], abs=1e-12)
    assert fast["hi"] == pytest.approx(slow["hi"], abs=1e-12)
    empty = wi.rate(np.zeros(0, bool), np.zeros(0, int))
    assert empty["n"] == 0 and math.isnan(empty["estimate"])


def test_rate_difference_hand_numbers_and_pairing():
    # Image A (2 positions): first succeeds at both, second at neither; image B
    # (2 positions): both fail. Rates 1/2 and 0, difference 1/2; resamples AA
    # (1), AB or BA (1/2), BB (0).
    first = np.array([True, True, False, False])
    second = np.array([False, False, False, False])
    clusters = np.array([0, 0, 1, 1])
    out = wi.rate_difference(first, second, clusters, num_resamples=500, seed=0)
    assert out["estimate"] == 0.5
    assert (out["first_rate"], out["second_rate"]) == (0.5, 0.0)
    assert (out["lo"], out["hi"]) == (0.0, 1.0)
    assert out["n"] == 4 and out["num_clusters"] == 2
    # Paired: equal outcomes differ by exactly 0 in every resample.
    success, image = _correlated(30, 10, seed=6)
    same = wi.rate_difference(success, success, image, num_resamples=200)
    assert (same["estimate"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    # Against the generic bootstrap of the same difference.
    other = np.roll(success, 3)
    fast = wi.rate_difference(success, other, image, num_resamples=200, seed=2)
    slow = wi.cluster_bootstrap(
        lambda r: success[r].mean() - other[r].mean(), image, 200, seed=2
    )
    assert fast["lo"] == pytest.approx(slow["lo"], abs=1e-12)
    assert fast["hi"] == pytest.approx(slow["hi"], abs=1e-12)
    with pytest.raises(PropmapsError):
        wi.rate_difference(first, second[:3], clusters)


# ----- margin strata ----------------------------------------------------------------


def test_margin_logit_is_stable():
    got = wi.margin_logit(
        np.array([1.0, 0.5, 0.99999, 0.3], np.float32),
        np.array([1e-8, 0.25, 0.0, 0.3], np.float32),
    )
    assert got.dtype == np.float64
    np.testing.assert_allclose(
        got,
        [
            -math.log(float(np.float32(1e-8))),
            math.log(2.0),
            math.log(float(np.float32(0.99999))) + 30 * math.log(10),
            0.0,
        ],
        rtol=1e-12,
    )


def test_logit_strata_do_not_collapse_when_probabilities_saturate():
    # 400 confident images: p(runner-up) from 1e-10 to 1e-5, so in float32 most
    # p(true) are one of two values, 0.99999 or 1.
    rng = np.random.default_rng(8)
    runner_up = (10.0 ** rng.uniform(-10, -5, 400)).astype(np.float32)
    true = (1.0 - runner_up.astype(np.float64)).astype(np.float32)
    true[:150] = np.float32(0.99999)
    assert np.sort(np.unique(true, return_counts=True)[1])[-2:].sum() > 250
    labels, edges = wi.logit_margin_strata(wi.margin_logit(true, runner_up))
    assert edges.shape == (5,) and np.all(np.diff(edges) > 0)
    np.testing.assert_array_equal(np.bincount(labels, minlength=4), [100] * 4)
    # The probability margin ties: its quartile strata come out lopsided.
    prob_groups, _ = stats.quartile_groups(true - runner_up, true - runner_up)
    assert np.bincount(prob_groups, minlength=4).max() >= 150
    with pytest.raises(PropmapsError):
        wi.logit_margin_strata(np.array([1.0, np.nan]))
