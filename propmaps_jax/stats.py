"""Every statistic of the project, in one place: success rates with Wilson score
intervals, the exact McNemar test of paired proportions, bootstrap counts over
units and percentile intervals, a batched binomial logistic regression (Newton /
IRLS), average ranks and the one Spearman correlation (NumPy, or JAX under `jit`),
a weighted ROC AUC and ROC curve, and the distance of pixels from the image
centre, and a rate as a short table cell.

Why our own and not scipy.stats, where scipy computes the same number (measured on
this project's 2-core CPU, 2026-12-07; the tests check each against scipy): the
Wilson interval is 2.4 us a call against 923 us for
`scipy.stats.binomtest(k, n).proportion_ci(method="wilson")` (equal to 2e-16; the
tables and bootstraps ask for thousands); the exact McNemar test 515 us against
1,118 us for `binomtest(b, b + c, 0.5).pvalue` (equal to 3e-14 relative, down to
p = 1e-79); and the one Spearman correlation runs under `jax.jit` on the device
as well as on NumPy arrays, which `scipy.stats.spearmanr` cannot (164 us against
424 us on NumPy, equal to 2e-16)."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax.errors import PropmapsError


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise PropmapsError(f"invalid counts {successes}/{n}: need 0 <= successes <= n")


def normal_quantile(confidence: float) -> float:
    """z such that a standard normal lies in [-z, z] with probability `confidence`."""
    if not 0.0 < confidence < 1.0:
        raise PropmapsError(f"confidence must lie in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(
    successes: int, n: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Wilson score interval (low, high) for a binomial proportion successes / n.

    With n = 0 nothing is known and the interval is the whole (0, 1).
    """
    successes, n = int(successes), int(n)
    _check_counts(successes, n)
    z = normal_quantile(confidence)
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    # Clamp rounding noise: the exact interval contains 0 (1) when p is 0 (1).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def proportion(successes: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """{successes, n, rate, ci_low, ci_high, confidence} (rate None if n = 0)."""
    low, high = wilson_interval(successes, n, confidence)
    return {
        "successes": int(successes),
        "n": int(n),
        "rate": (int(successes) / int(n)) if n else None,
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
    }


def format_proportion(prop: dict[str, Any], digits: int = 1) -> str:
    """'32.8% (1638/5000; 95% CI 31.5-34.1%)' for a `proportion` dict."""
    if not prop["n"]:
        return f"n/a (0/0; no {prop['confidence']:.0%} CI)"
    return (
        f"{prop['rate']:.{digits}%} ({prop['successes']}/{prop['n']}; "
        f"{prop['confidence']:.0%} CI {100 * prop['ci_low']:.{digits}f}–"
        f"{100 * prop['ci_high']:.{digits}f}%)"
    )


# ----- paired proportions, bootstrap over units, logistic regression -------------


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts b and c.

    Under no difference each of the b + c discordant pairs favours either side
    with probability 1/2: p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c,
    1/2), computed exactly with integers (the same as
    scipy.stats.binomtest(b, b + c, 0.5)). No discordant pair: p = 1.
    """
    b, c = int(only_first), int(only_second)
    if b < 0 or c < 0:
        raise PropmapsError(f"discordant counts must be >= 0, got {b} and {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def paired_counts(first: Any, second: Any) -> dict[str, int]:
    """Counts of paired binary outcomes: both, only_first, only_second, neither, n."""
    first = np.asarray(first, bool)
    second = np.asarray(second, bool)
    if first.shape != second.shape or first.ndim != 1:
        raise PropmapsError(
            f"paired outcomes need two arrays of one shape (N,), got {first.shape} "
            f"and {second.shape}"
        )
    return {
        "both": int((first & second).sum()),
        "only_first": int((first & ~second).sum()),
        "only_second": int((~first & second).sum()),
        "neither": int((~first & ~second).sum()),
        "n": int(first.size),
    }


def bootstrap_counts(
    rng: np.random.Generator, n_units: int, resamples: int
) -> np.ndarray:
    """(resamples, n_units) int: how often each unit is drawn in each resample.

    Resampling units (images) with replacement as multinomial counts lets every
    statistic that takes per-unit weights be bootstrapped without copying data.
    """
    if n_units < 1 or resamples < 1:
        raise PropmapsError(
            f"a bootstrap needs >= 1 unit and >= 1 resample, got {n_units} and "
            f"{resamples}"
        )
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=resamples)


def percentile_interval(
    replicates: Any, confidence: float = 0.95, min_finite: int = 10
) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN if too few are finite).

    The percentiles are 100 (1 - confidence) / 2 and 100 minus it, computed in
    floating point (2.500000000000002 and 97.5 at 0.95), as since this function
    first served the locality controls.
    """
    values = np.asarray(replicates, np.float64)
    values = values[np.isfinite(values)]
    if values.size < min_finite:
        return math.nan, math.nan
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def logistic_fit(
    design: Any,
    successes: Any,
    trials: Any,
    weights: Any | None = None,
    iterations: int = 50,
    tolerance: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray]:
    """Binomial logistic regression by Newton's method (IRLS), batched over weights.

    Args:
      design: (R, K) covariates, a column of ones for the intercept included.
      successes, trials: (R,) binomial counts of each row (trials 1: Bernoulli).
      weights: (B, R) row weights (bootstrap counts), or None for one unweighted fit.
    Returns:
      (coefficients (B, K) or (K,), converged (B,) or ()). A fit that does not
      converge (e.g. separation: a covariate that predicts the outcome perfectly)
      gets NaN coefficients and converged False.
    """
    x = np.asarray(design, np.float64)
    y = np.asarray(successes, np.float64)
    m = np.asarray(trials, np.float64)
    single = weights is None
    w = np.ones((1, len(y))) if single else np.asarray(weights, np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or m.shape != y.shape:
        raise PropmapsError(
            f"logistic_fit needs design (R, K) and counts (R,), got {x.shape}, "
            f"{y.shape}, {m.shape}"
        )
    if w.ndim != 2 or w.shape[1] != x.shape[0]:
        raise PropmapsError(f"weights must be (B, {x.shape[0]}), got {w.shape}")
    if np.any((y < 0) | (y > m)):
        raise PropmapsError("logistic_fit: need 0 <= successes <= trials per row")
    k = x.shape[1]
    outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), k * k)  # (R, K*K)
    beta = np.zeros((w.shape[0], k))
    converged = np.zeros(w.shape[0], bool)
    for _ in range(iterations):
        eta = beta @ x.T  # (B, R)
        p = 1.0 / (1.0 + np.exp(-eta))
        gradient = (w * (y - m * p)) @ x
        # Matrix products (BLAS) rather than a three-operand einsum: the bootstrap
        # fits thousands of resamples.
        hessian = ((w * m * p * (1.0 - p)) @ outer).reshape(-1, k, k)
        with np.errstate(invalid="ignore"):
            try:
                step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
            except np.linalg.LinAlgError:
                step = np.stack(
                    [
                        np.linalg.lstsq(h, g, rcond=None)[0]
                        for h, g in zip(hessian, gradient, strict=True)
                    ]
                )
        beta = beta + np.where(converged[:, None], 0.0, step)
        converged |= np.max(np.abs(step), axis=1) < tolerance
        if converged.all():
            break
    # Separation drives coefficients off to infinity, a covariate without spread
    # (e.g. a resample of one group only) leaves them unidentified (a singular
    # curvature): call those fits failed.
    with np.errstate(invalid="ignore", divide="ignore"):
        identified = np.linalg.cond(hessian) < 1e10
    converged &= identified & np.all(np.isfinite(beta), axis=1)
    converged &= np.all(np.abs(beta) < 30, axis=1)
    beta = np.where(converged[:, None], beta, np.nan)
    return (beta[0], converged[0]) if single else (beta, converged)


def quartile_groups(values: Any, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    """(group 0..3 of each value, cut points (3,)): quartiles of `reference`.

    Group 0 holds values up to the first quartile of the reference, group 3
    those above the third; a value equal to a cut point goes to the lower group.
    """
    reference = np.asarray(reference, np.float64)
    if reference.size == 0:
        raise PropmapsError("quartiles of an empty reference")
    cuts = np.quantile(reference, [0.25, 0.5, 0.75])
    return np.searchsorted(cuts, np.asarray(values, np.float64), side="left"), cuts


# ----- ranks and Spearman, ROC -----------------------------------------------------


def average_ranks(values: Any) -> Any:
    """Ranks 0..P-1 along the last axis (..., P), ties given their average rank.

    NumPy in, NumPy float64 out; a JAX array (or a tracer, under `jit`) in, JAX
    float32 out (the ranks are exact half-integers either way).
    """
    if isinstance(values, jax.Array):
        sorted_values = jnp.sort(values, axis=-1)

        def ranks_1d(sorted_row: jax.Array, row: jax.Array) -> jax.Array:
            low = jnp.searchsorted(sorted_row, row, side="left")
            high = jnp.searchsorted(sorted_row, row, side="right")
            return (low + high - 1).astype(jnp.float32) / 2.0

        flat_sorted = sorted_values.reshape(-1, values.shape[-1])
        flat = values.reshape(-1, values.shape[-1])
        return jax.vmap(ranks_1d)(flat_sorted, flat).reshape(values.shape)
    values = np.asarray(values)
    order = np.argsort(values, axis=-1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=-1)
    size = values.shape[-1]
    position = np.broadcast_to(np.arange(size), values.shape)
    # Each run of equal values spans sorted positions first..last; its rank is
    # their mean.
    starts = np.ones(values.shape, bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = np.ones(values.shape, bool)
    ends[..., :-1] = starts[..., 1:]
    first = np.maximum.accumulate(np.where(starts, position, 0), axis=-1)
    last = np.flip(
        np.minimum.accumulate(np.flip(np.where(ends, position, size), -1), axis=-1),
        -1,
    )
    ranks = np.empty(values.shape, np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0, axis=-1)
    return ranks


def spearman(x: Any, y: Any) -> Any:
    """Spearman rank correlation along the last axis (..., P), ties averaged.

    NaN where x or y is constant along the axis (its ranks have no spread). NumPy
    arrays in: NumPy float64 out; JAX arrays in: a pure, jittable JAX computation
    in float32 (the saliency maps' comparison, `saliency.rank_correlation`).
    """
    xp = jnp if isinstance(x, jax.Array) or isinstance(y, jax.Array) else np
    if xp is jnp:
        x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    rx, ry = average_ranks(x), average_ranks(y)
    rx = rx - xp.mean(rx, axis=-1, keepdims=True)
    ry = ry - xp.mean(ry, axis=-1, keepdims=True)
    denominator = xp.sqrt(xp.sum(rx * rx, axis=-1) * xp.sum(ry * ry, axis=-1))
    return xp.where(
        denominator > 0,
        xp.sum(rx * ry, axis=-1) / xp.where(denominator > 0, denominator, 1.0),
        xp.nan,
    )


def weighted_auc(scores: Any, positive: Any, weights: Any) -> np.ndarray:
    """ROC AUC (B,) of `scores` (m,) for labels `positive` (m,) under weights (B, m).

    AUC = P(score of a positive > score of a negative) + P(tie) / 2, each item
    counted with its weight (bootstrap counts); NaN without both classes.
    """
    scores, positive = np.asarray(scores), np.asarray(positive)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    pos = positive[order].astype(np.float64)
    w = np.asarray(weights)[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w_pos = np.add.reduceat(w * pos, starts, axis=1)
    w_neg = np.add.reduceat(w * (1.0 - pos), starts, axis=1)
    neg_below = np.cumsum(w_neg, axis=1) - w_neg
    numerator = np.sum(w_pos * (neg_below + 0.5 * w_neg), axis=1)
    denominator = w_pos.sum(1) * w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def roc_curve(scores: Any, positive: Any) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds, from (0, 0)."""
    scores, positive = np.asarray(scores), np.asarray(positive)
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order].astype(np.float64)
    last = np.r_[s[1:] != s[:-1], True]  # one point per distinct threshold
    tp, fp = np.cumsum(pos)[last], np.cumsum(1.0 - pos)[last]
    return (
        np.r_[0.0, fp / max(fp[-1], 1.0)] if fp.size else np.zeros(1),
        np.r_[0.0, tp / max(tp[-1], 1.0)] if tp.size else np.zeros(1),
    )


# ----- where pixels lie: distance from the image centre ----------------------------


# How `distance_from_centre` measures, as the figures and summaries name it.
DISTANCE_METRIC = "Chebyshev distance (max(|dr|, |dc|))"


def distance_from_centre(pixels: Any, height: int, width: int) -> np.ndarray:
    """Chebyshev distance max(|dr|, |dc|) of pixels (..., >= 2) (row, col first)
    from the image centre ((height - 1) / 2, (width - 1) / 2).

    The rings of the locality study are Chebyshev rings too: on a 32x32 image the
    distances are 0.5, 1.5, .., 15.5, one value per square ring of pixels.
    """
    pixels = np.asarray(pixels)
    centre_row, centre_col = (height - 1) / 2.0, (width - 1) / 2.0
    return np.maximum(
        np.abs(pixels[..., 0] - centre_row), np.abs(pixels[..., 1] - centre_col)
    )


def distance_bin_edges(height: int, width: int, bin_width: float = 1.0) -> np.ndarray:
    """Histogram edges 0, 1, 2, ..: one bin per square ring around the centre."""
    largest = max(height - 1, width - 1) / 2.0
    return np.arange(0.0, math.floor(largest) + 2.0, bin_width)


def uniform_distance_fractions(
    height: int, width: int, bin_edges: np.ndarray
) -> np.ndarray:
    """Fraction of all image positions per distance bin: where pixels chosen
    uniformly at random would lie (outer rings hold more positions)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    everywhere = distance_from_centre(np.stack([rows, cols], -1), height, width)
    counts, _ = np.histogram(everywhere, bins=bin_edges)
    return counts / everywhere.size


def distance_stats(distances: np.ndarray, bin_edges: np.ndarray) -> dict[str, Any]:
    """Mean, median, quartiles and histogram of pixel distances from the centre."""
    if distances.size == 0:
        return {"pixels": 0}
    counts, _ = np.histogram(distances, bins=bin_edges)
    q1, median, q3 = np.percentile(distances, [25, 50, 75])
    return {
        "pixels": int(distances.size),
        "mean": float(np.mean(distances)),
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "histogram_edges": [float(e) for e in bin_edges],
        "histogram_counts": [int(c) for c in counts],
    }


def short_cell(prop: dict[str, Any], empty: str = "n/a (0/0)", unit: str = "") -> str:
    """'32.8% (1638/5000; 31.5–34.1)': rate (count; interval in percent, then `unit`).

    `empty`: the text of a proportion over no item.
    """
    if not prop["n"]:
        return empty
    return (
        f"{prop['rate']:.1%} ({prop['successes']}/{prop['n']}; "
        f"{100 * prop['ci_low']:.1f}–{100 * prop['ci_high']:.1f}{unit})"
    )
