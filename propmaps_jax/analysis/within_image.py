"""Statistics within images: positions of one image are not independent samples.

The locality study moves a successful attack's colour to other positions of the
same image (the rings at Chebyshev distance d = 1..D around the attacked pixel,
the nearby neighbour, a random position) and records whether each moved pixel
still fools the model. One image contributes up to 8 d positions to ring d, and
they share everything that makes the image fragile or robust: its clean margin,
its texture, how far it sits from the decision boundary. Counting them as
independent trials (a Wilson interval over positions, or a pooled logistic
regression) makes intervals far too narrow and lets the images' fragility leak
into the distance effect (fragile images have successes at every distance).
So here

- every interval is a *cluster* bootstrap: the images are resampled, each with
  all of its rows (`cluster_bootstrap`, `rate`, `rate_difference`);
- the distance effect is estimated *within* images, by conditional (fixed-effects)
  logistic regression with one stratum per image (`conditional_logit`): each
  image's own baseline log-odds is conditioned away, so what remains is how
  success changes with distance inside an image. Its SE comes model-based and
  clustered by image (sandwich);
- images are put in strata by the logit of their clean top-2 margin,
  log p(true) - log p(runner-up) (`margin_logit`, `logit_margin_strata`), not by
  the probability margin, which saturates: in float32 p(true) = 0.99999 for a
  great many images, and quantiles of tied values collapse into one stratum.

Why our own conditional logit, when statsmodels has `ConditionalLogit` (a test
dependency only, the reference the tests compare with): ours is exact (the
analytic Hessian through the recursion, where statsmodels differentiates the
score numerically for its covariance), scaled so that it cannot overflow (their
recursion multiplies raw exp(x b)), vectorised over strata (theirs is a memoised
Python recursion per stratum: 10 s against our 0.09 s for 300 images of 20-80
rows, too slow to sit inside a bootstrap), reports a failed fit as data instead
of raising, and needs no pandas.

Conditional likelihood (Breslow & Day 1980, ch. 7): a stratum of m rows with k
successes contributes exp(sum_{i in cases} x_i b) / e_k(w_1, ..., w_m), w_i =
exp(x_i b), where e_k is the elementary symmetric polynomial of degree k (the sum
over all k-subsets of the stratum). e_k, its gradient and its Hessian follow from
the recursion e_j(w_1..w_i) = e_j(w_1..w_{i-1}) + w_i e_{j-1}(w_1..w_{i-1})
(Gail, Lubin & Rubinstein 1981), differentiated term by term.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from propmaps_jax import stats
from propmaps_jax.errors import PropmapsError

# A fit whose curvature, scaled to unit diagonal, has a condition number above
# this is called singular: a covariate without variation within any informative
# stratum, or separation that drove one direction's curvature to nothing.
MAX_CONDITION = 1e12
# Step halvings tried before a Newton step is given up as no improvement.
MAX_HALVINGS = 40
MIN_PROBABILITY = 1e-30
# Strata per block of the recursion (see _chunks).
CHUNK = 512
# Newton steps smaller than this (relative to 1 + max |b|) reuse the information.
CHORD_BELOW = 1e-2


# ----- conditional (fixed-effects) logistic regression -----------------------------


class _Strata(NamedTuple):
    """The informative strata, padded to the longest, sorted by k, largest first."""

    x: np.ndarray  # (M, p, G) covariates, centred within strata; 0 on padding
    valid: np.ndarray  # (M, G) a real row, not padding
    k: np.ndarray  # (G,) cases per stratum, <= m / 2 (see _strata)
    length: np.ndarray  # (G,) rows m per stratum
    xy: np.ndarray  # (G, p) sum of x over each stratum's cases
    rows: int  # rows in informative strata


def _strata(y: Any, x: Any, groups: Any) -> _Strata:
    """The informative strata of the data, ready for the recursion.

    Two exact rewrites keep the recursion short and its numbers tame: covariates
    are centred within each stratum (every case set has k rows, so a shift of x
    within a stratum cancels from the likelihood), and a stratum with more cases
    than controls is flipped (y -> 1 - y, x -> -x; e_k(w) = prod(w) e_{m-k}(1/w)
    gives the same likelihood), so that k <= m / 2.
    """
    y = np.asarray(y)
    x = np.asarray(x, np.float64)
    groups = np.asarray(groups)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or y.shape != (x.shape[0],) or groups.shape != y.shape:
        raise PropmapsError(
            f"conditional_logit needs y (n,), X (n, p) and groups (n,), got "
            f"{y.shape}, {x.shape} and {groups.shape}"
        )
    if not np.all((y == 0) | (y == 1)):
        raise PropmapsError("conditional_logit: y must be boolean or 0/1")
    if not np.all(np.isfinite(x)):
        raise PropmapsError("conditional_logit: X holds NaN or infinite values")
    y = y.astype(np.float64)
    _, stratum = np.unique(groups, return_inverse=True)
    stratum = stratum.reshape(-1)
    rows = np.bincount(stratum)
    cases = np.bincount(stratum, weights=y).astype(np.int64)
    informative = (cases > 0) & (cases < rows)
    keep = informative[stratum]
    m, flip = rows[informative], 2 * cases[informative] > rows[informative]
    k = np.where(flip, m - cases[informative], cases[informative])
    # Renumber the informative strata by k, largest first, so that the strata
    # still needing level j of the recursion are a prefix.
    order = np.argsort(-k, kind="stable")
    renumber = np.full(len(rows), -1, np.int64)
    renumber[np.flatnonzero(informative)[order]] = np.arange(len(order))
    g = renumber[stratum[keep]]
    m, flip, k = m[order], flip[order], k[order]
    x_used, y_used = x[keep], y[keep]
    mean = np.zeros((len(k), x.shape[1]))
    np.add.at(mean, g, x_used)
    mean /= np.maximum(m, 1)[:, None]
    x_used = (x_used - mean[g]) * np.where(flip, -1.0, 1.0)[g, None]
    y_used = np.where(flip[g], 1.0 - y_used, y_used)
    # Position of each row within its stratum.
    by_stratum = np.argsort(g, kind="stable")
    start = np.r_[0, np.cumsum(m)[:-1]].astype(np.int64)
    position = np.empty(len(g), np.int64)
    position[by_stratum] = np.arange(len(g)) - start[g[by_stratum]]
    longest = int(m.max()) if len(m) else 0
    padded = np.zeros((longest, x.shape[1], len(k)))
    padded[position, :, g] = x_used
    valid = np.zeros((longest, len(k)), bool)
    valid[position, g] = True
    xy = np.zeros((len(k), x.shape[1]))
    np.add.at(xy, g, x_used * y_used[:, None])
    return _Strata(padded, valid, k, m, xy, int(keep.sum()))


def _weights(strata: _Strata, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w = exp(x b - c) (M, G), 0 on padding; c (G,)), c the mean of the k largest
    x b of each stratum: the k largest w then multiply to 1, so e_k(w) >= 1 and
    the recursion cannot underflow where it matters."""
    eta = np.where(strata.valid, np.einsum("mpg,p->mg", strata.x, beta), -np.inf)
    top = -np.sort(-eta, axis=0)  # descending, padding last
    top = np.where(np.isfinite(top), top, 0.0)
    k = strata.k
    centre = np.take_along_axis(np.cumsum(top, axis=0), k[None, :] - 1, axis=0)[0] / k
    with np.errstate(over="ignore"):
        return np.where(strata.valid, np.exp(eta - centre), 0.0), centre


def _elementary(
    w: np.ndarray, x: np.ndarray, k: np.ndarray, length: np.ndarray, order: int
) -> np.ndarray:
    """e_k(w) per stratum and its derivatives with respect to b: (Q, G) of rows
    e_k, then for order >= 1 its gradient (p rows), then for order 2 the upper
    triangle of its Hessian (p (p + 1) / 2 rows, in np.triu_indices order).

    w (M, G), x (M, p, G). Level j of the recursion holds e_j of the first i + 1
    rows, for each row i: the cumulative sum over rows of w_i e_{j-1}(rows before
    i). With d w_i / d b = w_i x_i, level j's gradient is the cumulative sum of
    w_i (x_i e_{j-1} + d e_{j-1}), its Hessian that of w_i (x_i x_i' e_{j-1} +
    x_i d e_{j-1}' + d e_{j-1} x_i' + d2 e_{j-1}); the three are kept in one
    array (rows, Q, strata). Only what e_k of the whole stratum needs is
    computed: level j for the strata with k >= j (a prefix: k is sorted largest
    first), for rows j - 1 (fewer rows cannot hold j cases) to m - 1 - (k - j)
    (later rows would leave too few to reach k cases); a stratum's rows past its
    length m are padding with w = 0.
    """
    rows, n_strata = w.shape
    p = x.shape[1]
    first, second = np.triu_indices(p)
    # coefficient[i]: what level j - 1's e multiplies in row i of level j, besides
    # w_i itself: w_i x_i for the gradient, w_i x_i x_i' for the Hessian.
    parts = [w[:, None]]
    if order >= 1:
        wx = w[:, None] * x
        parts.append(wx)
    if order >= 2:
        parts.append(wx[:, first] * x[:, second])
    coefficient = np.concatenate(parts, axis=1)
    k_max = int(k.max())
    # active[j]: strata with k >= j; last[j]: the last row level j needs.
    active = np.searchsorted(-k, -np.arange(k_max + 2), side="right")
    span = np.maximum.accumulate(length - k)  # max of m - k over strata 0..g
    result = np.empty((coefficient.shape[1], n_strata))
    state = None
    for j in range(1, k_max + 1):
        n, top = active[j], min(rows - 1, int(span[active[j] - 1]) + j - 1) + 1
        band = slice(j - 1, top)
        if j == 1:
            state = coefficient[:top, :, :n].copy()
        else:
            # Rows j - 1..top - 1 of level j from rows j - 2.. of level j - 1.
            prev = state[: top - (j - 1), :, :n]
            state = w[band, None, :n] * prev
            state[:, 1:] += coefficient[band, 1:, :n] * prev[:, :1]
            if order >= 2:
                # x_i d e_{j-1}' + d e_{j-1} x_i', pair by pair (no fancy indexing).
                for q, (a, b) in enumerate(zip(first, second, strict=True)):
                    cross = wx[band, a, :n] * prev[:, 1 + b]
                    if a != b:
                        cross += wx[band, b, :n] * prev[:, 1 + a]
                    else:
                        cross *= 2.0
                    state[:, 1 + p + q] += cross
        # The cumulative sum over rows, one row at a time: faster than np.cumsum
        # along a leading axis, as each addition runs over all strata at once.
        for i in range(1, len(state)):
            np.add(state[i], state[i - 1], out=state[i])
        done = slice(active[j + 1], n)  # strata with k == j end here
        result[:, done] = state[-1, :, done]
    return result


def _chunks(strata: _Strata) -> list[tuple[slice, int]]:
    """(strata, rows) of each block of CHUNK strata: similar k in one block keeps
    the band of rows tight and the arrays in cache."""
    return [
        (slice(s, s + CHUNK), int(strata.length[s : s + CHUNK].max()))
        for s in range(0, len(strata.k), CHUNK)
    ]


def _evaluate(
    strata: _Strata, beta: np.ndarray, order: int
) -> tuple[float, np.ndarray | None, np.ndarray | None]:
    """(log-likelihood, scores per stratum (G, p) for order >= 1, information
    (p, p) for order 2) at beta; -inf and NaN where they cannot be computed.

    The score of a stratum is sum_{cases} x - E[S], its information Var[S], S the
    sum of x over a k-subset drawn with probability prod(w) / e_k(w).
    """
    w, centre = _weights(strata, beta)
    p = strata.x.shape[1]
    if not np.all(np.isfinite(w)):
        return -math.inf, np.full((len(strata.k), p), np.nan), np.full((p, p), np.nan)
    # Steps far out (halved later, or separation) may overflow: -inf, not a warning.
    with np.errstate(invalid="ignore", over="ignore"):
        parts = [
            _elementary(
                w[:rows, s], strata.x[:rows, :, s], strata.k[s], strata.length[s], order
            )
            for s, rows in _chunks(strata)
        ]
    table = np.concatenate(parts, axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        loglik = float(np.sum(strata.xy @ beta - strata.k * centre - np.log(table[0])))
        moments = table[1:] / table[0]
    if not math.isfinite(loglik):
        loglik = -math.inf
    if order == 0:
        return loglik, None, None
    mean = moments[:p].T
    scores = strata.xy - mean
    if order == 1:
        return loglik, scores, None
    first, second = np.triu_indices(p)
    covariance = moments[p:].T - mean[:, first] * mean[:, second]
    information = np.zeros((p, p))
    information[first, second] = covariance.sum(0)
    information[second, first] = information[first, second]
    return loglik, scores, information


def _singular(information: np.ndarray) -> bool:
    """Whether the information matrix is not positive definite or near singular."""
    diagonal = np.diag(information)
    if not np.all(np.isfinite(information)) or np.any(diagonal <= 0):
        return True
    scale = 1.0 / np.sqrt(diagonal)
    scaled = information * scale[:, None] * scale[None, :]
    return bool(np.linalg.cond(scaled) > MAX_CONDITION)


def conditional_logit(
    y: Any,
    X: Any,
    groups: Any,
    max_iter: int = 50,
    tol: float = 1e-10,
    start: Any = None,
) -> dict[str, Any]:
    """Conditional (fixed-effects) logistic regression of y on X, strata = groups.

    Args:
      y: (n,) bool or 0/1 outcomes.
      X: (n, p) covariates, without an intercept (it is conditioned away, as is
        anything constant within a stratum). A 1-D X is one covariate.
      groups: (n,) stratum ids (the image of each row).
      max_iter: Newton-Raphson iterations at most (each step halved until the
        log-likelihood does not fall).
      tol: converged when no coefficient moves by more than tol (1 + max |b|).
      start: (p,) coefficients to start Newton-Raphson from (default zeros), e.g.
        the full sample's estimate for a bootstrap resample (fewer iterations).
    Returns:
      {"coef" (p,), "se" (p,) model-based from the exact information, "se_cluster"
      (p,) sandwich clustered by stratum with the G / (G - 1) small-sample factor
      (as Stata's clogit, vce(cluster)), "loglik", "n_groups_used", "n_rows_used",
      "converged", "iterations"}. Strata whose outcomes are all 0 or all 1 carry no
      information and are dropped. With fewer than 2 informative strata, a
      singular information (a covariate without variation within strata) or no
      convergence (separation drives a coefficient to infinity) the result has
      converged False and NaN coef and SEs; it never raises for a fit that fails.

    Time (measured 2026-12 on the 2-core development machine while it ran other
    work, load ~5, NumPy 2.4; best of 2): 2,000 images of 80 rows fit in 0.18 s
    (p = 1), 0.48 s (p = 2) and 0.82 s (p = 3) with success rates spread over
    0..1, 0.56 s at p = 3 with rare successes, 1.2 s at p = 3 in the worst case
    (k = m / 2 in every image); 5,000 images of 100 rows at p = 3 in 1.9 s
    (spread), 4.0 s (worst). The cost grows with the sum over images of
    min(k, m - k) times their length, and with p (p + 1) / 2.
    """
    strata = _strata(y, X, groups)
    p, n_strata = strata.x.shape[1], len(strata.k)
    result: dict[str, Any] = {
        "coef": np.full(p, np.nan),
        "se": np.full(p, np.nan),
        "se_cluster": np.full(p, np.nan),
        "loglik": math.nan,
        "n_groups_used": n_strata,
        "n_rows_used": strata.rows,
        "converged": False,
        "iterations": 0,
    }
    if n_strata < 2:
        return result
    beta = np.zeros(p) if start is None else np.array(start, np.float64).reshape(p)
    if not np.all(np.isfinite(beta)):
        beta = np.zeros(p)
    loglik, scores, information = _evaluate(strata, beta, 2)
    exact, converged = True, False
    for iteration in range(1, max_iter + 1):
        result["iterations"] = iteration
        if not math.isfinite(loglik) or _singular(information):
            return result
        step = np.linalg.solve(information, scores.sum(0))
        # Judged on the full step, not a halved one: under separation the full
        # step stays near 1 per iteration while the likelihood flattens out.
        size = np.max(np.abs(step)) / (1.0 + np.max(np.abs(beta)))
        if size <= tol:
            converged = True
            break
        # Near the estimate the information barely changes from one step to the
        # next: reusing it (a chord step) costs only the gradient, about a third
        # of the information's recursion, and still gains ~3 digits a step.
        exact = size > CHORD_BELOW
        order = 2 if exact else 1
        slack = 1e-12 * (1.0 + abs(loglik))
        for halving in range(MAX_HALVINGS):
            trial = beta + step * 0.5**halving
            # The full step is nearly always taken: evaluate it with derivatives.
            evaluated = _evaluate(strata, trial, order if halving == 0 else 0)
            if evaluated[0] >= loglik - slack:
                break
        else:
            return result  # no step improves the likelihood
        if halving:
            evaluated = _evaluate(strata, trial, order)
        beta = trial
        loglik, scores = evaluated[0], evaluated[1]
        if exact:
            information = evaluated[2]
    if not converged:
        return result
    if not exact:  # the SEs need the information at the estimate itself
        loglik, scores, information = _evaluate(strata, beta, 2)
    if not math.isfinite(loglik) or _singular(information):
        return result
    covariance = np.linalg.inv(information)
    meat = scores.T @ scores * (n_strata / (n_strata - 1))
    sandwich = covariance @ meat @ covariance
    result.update(
        coef=beta,
        se=np.sqrt(np.diag(covariance)),
        se_cluster=np.sqrt(np.diag(sandwich)),
        loglik=loglik,
        converged=True,
    )
    return result


# ----- intervals over images: the cluster bootstrap ---------------------------------


def _cluster_rows(clusters: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows sorted by cluster, first position of each cluster, rows per cluster)."""
    clusters = np.asarray(clusters)
    if clusters.ndim != 1 or clusters.size == 0:
        raise PropmapsError(
            f"a cluster bootstrap needs clusters (n,) with n >= 1, got shape "
            f"{clusters.shape}"
        )
    _, index = np.unique(clusters, return_inverse=True)
    index = index.reshape(-1)
    order = np.argsort(index, kind="stable")
    counts = np.bincount(index)
    return order, np.r_[0, np.cumsum(counts)[:-1]], counts


def _draws(num_clusters: int, num_resamples: int, seed: int) -> np.ndarray:
    """(num_resamples, num_clusters) cluster indices drawn with replacement."""
    if num_resamples < 1:
        raise PropmapsError(f"num_resamples must be >= 1, got {num_resamples}")
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.integers(0, num_clusters, size=(num_resamples, num_clusters))


def _interval(replicates: np.ndarray, confidence: float) -> tuple[Any, Any, int]:
    """(lo, hi, failed): percentile interval over the replicates without a NaN."""
    finite = np.all(np.isfinite(replicates.reshape(len(replicates), -1)), axis=1)
    kept = replicates[finite]
    if replicates.ndim == 1:
        lo, hi = stats.percentile_interval(kept, confidence)
    else:
        bounds = [
            stats.percentile_interval(kept[:, i], confidence)
            for i in range(replicates.shape[1])
        ]
        lo, hi = (np.array(b) for b in zip(*bounds, strict=True))
    return lo, hi, int((~finite).sum())


def cluster_bootstrap(
    statistic: Callable[[np.ndarray], Any],
    clusters: Any,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Percentile interval of `statistic(rows)` over resamples of whole clusters.

    Each resample draws as many cluster ids as there are, with replacement
    (Generator(PCG64(seed))), and passes the rows of the drawn clusters, a cluster
    drawn twice contributing its rows twice (fixed-effects statistics: give each
    copy its own stratum with `resampled_strata`). The statistic returns a float
    or a 1-D array (lo and hi are then arrays); replicates holding a NaN (a fit
    that did not converge) are dropped and counted as failed.

    Returns {"estimate": statistic(all rows), "lo", "hi", "num_resamples",
    "num_clusters", "failed"}; lo and hi are NaN with fewer than 10 replicates left.
    """
    order, start, counts = _cluster_rows(clusters)
    estimate = statistic(np.arange(len(order)))
    replicates = []
    for drawn in _draws(len(counts), num_resamples, seed):
        lengths = counts[drawn]
        # Rows of the drawn clusters, one block per draw, without a Python loop.
        offsets = np.repeat(start[drawn] - np.cumsum(lengths) + lengths, lengths)
        replicates.append(statistic(order[offsets + np.arange(lengths.sum())]))
    replicates = np.asarray(replicates, np.float64)
    lo, hi, failed = _interval(replicates, confidence)
    return {
        "estimate": estimate,
        "lo": lo,
        "hi": hi,
        "num_resamples": int(num_resamples),
        "num_clusters": len(counts),
        "failed": failed,
    }


def resampled_strata(rows: Any, groups: Any) -> np.ndarray:
    """Stratum ids (len(rows),) for resampled rows, one stratum per drawn copy.

    A cluster drawn twice must enter a fixed-effects fit as two images, not as one
    image of twice the rows (that would be a different conditional likelihood):
    the t-th occurrence of a row goes to stratum (group, t).
    """
    rows = np.asarray(rows)
    groups = np.asarray(groups)[rows]
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    first = np.r_[True, sorted_rows[1:] != sorted_rows[:-1]]
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))
    occurrence = np.empty(len(rows), np.int64)
    occurrence[order] = np.arange(len(rows)) - run_start
    _, strata = np.unique(np.stack([groups, occurrence]), axis=1, return_inverse=True)
    return strata.reshape(-1)


def _rates(
    columns: list[np.ndarray],
    clusters: Any,
    num_resamples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(rates (len(columns),), replicates (R, len(columns)), number of clusters).

    The same draws as `cluster_bootstrap` with the same seed: a resample's rate is
    the drawn clusters' successes over their rows (per-cluster sums, no copies).
    """
    order, start, counts = _cluster_rows(clusters)
    sums = np.stack([np.add.reduceat(c[order], start) for c in columns], axis=1)
    drawn = _draws(len(counts), num_resamples, seed)
    replicates = sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1)[:, None]
    return sums.sum(0) / counts.sum(), replicates, len(counts)


def _outcome(name: str, values: Any, clusters: Any) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1 or values.shape != np.shape(clusters):
        raise PropmapsError(
            f"{name} must be (n,) like clusters {np.shape(clusters)}, got "
            f"{values.shape}"
        )
    return values.astype(bool).astype(np.float64)


def rate(
    success: Any,
    clusters: Any,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Success rate of boolean rows (n,) with a cluster-bootstrap interval.

    For ring success rates by distance, where each image contributes up to 8 d
    positions to ring d. Returns {"estimate", "lo", "hi", "successes", "n",
    "num_clusters", "num_resamples", "failed"}; no rows: estimate, lo, hi NaN.
    """
    success = _outcome("success", success, clusters)
    out = {"successes": int(success.sum()), "n": int(success.size)}
    if success.size == 0:
        nan = {"estimate": math.nan, "lo": math.nan, "hi": math.nan}
        return {**nan, **out, "num_clusters": 0, "num_resamples": 0, "failed": 0}
    estimate, replicates, num_clusters = _rates(
        [success], clusters, num_resamples, seed
    )
    lo, hi, failed = _interval(replicates[:, 0], confidence)
    return {
        "estimate": float(estimate[0]),
        "lo": lo,
        "hi": hi,
        **out,
        "num_clusters": num_clusters,
        "num_resamples": int(num_resamples),
        "failed": failed,
    }


def rate_difference(
    first: Any,
    second: Any,
    clusters: Any,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """rate(first) - rate(second) of paired boolean rows (n,), cluster-bootstrapped.

    Both are measured on the same rows (e.g. nearby and random move of each
    attack), so each resample takes both from the same drawn clusters. Returns
    {"estimate", "lo", "hi", "first_rate", "second_rate", "n", "num_clusters",
    "num_resamples", "failed"}; no rows: the rates and the interval NaN.
    """
    first = _outcome("first", first, clusters)
    second = _outcome("second", second, clusters)
    if first.size == 0:
        nan = {key: math.nan for key in ("estimate", "lo", "hi")}
        return {
            **nan,
            "first_rate": math.nan,
            "second_rate": math.nan,
            "n": 0,
            "num_clusters": 0,
            "num_resamples": 0,
            "failed": 0,
        }
    rates, replicates, num_clusters = _rates(
        [first, second], clusters, num_resamples, seed
    )
    lo, hi, failed = _interval(replicates[:, 0] - replicates[:, 1], confidence)
    return {
        "estimate": float(rates[0] - rates[1]),
        "lo": lo,
        "hi": hi,
        "first_rate": float(rates[0]),
        "second_rate": float(rates[1]),
        "n": int(first.size),
        "num_clusters": num_clusters,
        "num_resamples": int(num_resamples),
        "failed": failed,
    }


# ----- strata of the clean margin, on the logit scale -------------------------------


def margin_logit(prob_true: Any, prob_other: Any) -> np.ndarray:
    """log p(true) - log p(runner-up), float64, p clipped to [1e-30, 1].

    The log-odds between the two top classes: it keeps separating images whose
    p(true) has rounded to the same float32 value near 1 (their p(runner-up)
    still differ by orders of magnitude).
    """
    true = np.clip(np.asarray(prob_true, np.float64), MIN_PROBABILITY, 1.0)
    other = np.clip(np.asarray(prob_other, np.float64), MIN_PROBABILITY, 1.0)
    return np.log(true) - np.log(other)


def logit_margin_strata(
    margin_logit: Any, num_strata: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(stratum 0..num_strata - 1 of each image, edges (num_strata + 1,)).

    Quantile strata of the margin logit: edges are its 0, 1/s, .., 1 quantiles; a
    value equal to an inner edge goes to the lower stratum (as
    `stats.quartile_groups`).
    """
    values = np.asarray(margin_logit, np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values)):
        raise PropmapsError(
            "logit_margin_strata needs a non-empty (n,) array of finite margin "
            "logits (use margin_logit, which clips the probabilities)"
        )
    if num_strata < 1:
        raise PropmapsError(f"num_strata must be >= 1, got {num_strata}")
    edges = np.quantile(values, np.linspace(0.0, 1.0, num_strata + 1))
    return np.searchsorted(edges[1:-1], values, side="left"), edges
