"""The paper's sentences about propagation maps, as numbers (sections 5 and 6).

Each sentence of the paper that the maps are meant to support is turned into a
statistic over attacks with an interval, and a verdict rule fixed here, before any
number was looked at:

- "differences reach values close to the original feature maps' maximum":
  per layer, the share of attacks whose max |FM - FM_adv| / max FM reaches 0.5
  and 0.9 (Wilson intervals), `reach_shares`;
- "this average difference is kept more or less the same throughout the layers":
  the mean PM_avg per layer under a normalisation (none, the layer's mean |FM|,
  its max FM) and the ratio largest / smallest layer mean with a bootstrap
  interval over attacks, `layer_profile`;
- "failed attacks tend to be farther away from the center": the share of
  attacked pixels in the central square against the share of positions there
  (what uniform positions give), for the found pixels and, effort-matched, for
  the best candidate of the initial population (`generation0_best`), which every
  attack evaluated whatever its outcome;
- "the perturbation spread enough to influence strongly more than a quarter of
  the feature map": the share of attacks whose last-layer PM_max exceeds a stated
  fraction of the layer's max FM on more than a quarter of the positions;
- "the successful attacks seem to concentrate mostly close to the center": the
  share of a mean map's mass in the central square (`centre_mass`), beside the
  same for the attacks' colours put at uniformly drawn positions
  (`uniform_positions`), a control for what padding geometry alone gives.

The selection rules of the single-attack figures (2-6) are here too, as pure
functions of the attack table, so that the figures are chosen by rule.

Host statistics are float64 NumPy; `generation0_best` is a pure JAX function of
one image (jit and vmap it at the call site).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax import stats
from propmaps_jax.attack import de as attack_de
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.errors import PropmapsError
from propmaps_jax.types import ApplyFn, PRNGKey, Variables

# --- The rules, fixed before the numbers were seen.

REACH_THRESHOLDS = (0.5, 0.9)
# "close to the maximum": max|dFM| / max FM >= 0.9 in most attacks (the Wilson
# interval's lower end above one half) in at least one layer.
CLOSE_TO_MAX = 0.9
# "more or less the same": every layer's mean within a factor of 2 of every
# other's (largest / smallest <= 2, the bootstrap interval's upper end too).
SAME_FACTOR = 2.0
# The central square: the positions whose Chebyshev distance from the centre is
# below a quarter of the side (on 32x32: the 16x16 square, 25% of positions).
CENTRE_SIDE_FRACTION = 0.5
# "influence strongly": PM_max above half the layer's original maximum;
# "more than a quarter of the feature map": on more than 25% of its positions.
STRONG_FRACTION = 0.5
QUARTER = 0.25
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

VERDICT_RULES = {
    "close_to_max": (
        f"holds if, in at least one layer, the share of attacks whose max|dFM| / "
        f"max FM >= {CLOSE_TO_MAX} has a 95% Wilson interval above 50%; "
        "'sometimes' if its interval lies above 5% in some layer; else 'rarely'"
    ),
    "same_across_layers": (
        f"holds for a normalisation if the largest per-layer mean is at most "
        f"{SAME_FACTOR:g} times the smallest, the bootstrap interval's upper end "
        "included; fails if the interval's lower end exceeds it; else undecided "
        "(undecided too when a layer's mean is <= 0, as signed means can be)"
    ),
    "successful_near_centre": (
        "holds if the share of successful attacks' pixels in the central square "
        "exceeds the share of positions there (Wilson interval above it) and "
        "exceeds the failed attacks' share (intervals apart); 'no difference' if "
        "the two outcomes' intervals overlap"
    ),
    "quarter_of_last_map": (
        f"holds if most successful attacks (Wilson interval above 50%) have last-"
        f"layer PM_max > {STRONG_FRACTION:g} x max FM on more than "
        f"{QUARTER:.0%} of the positions; 'sometimes' if the interval lies "
        "above 5%; else 'rarely'"
    ),
    "centre_concentration": (
        "the last layer's mean PM_avg map concentrates in the centre beyond "
        "geometry if its central-square mass share exceeds that of the same "
        "colours at uniform positions by more than the share of positions "
        "there times 0.1 (10% of the uniform share); else it is geometry"
    ),
}


# --- Intervals.


def share(mask: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The share of True in `mask` with its Wilson interval (`stats.proportion`)."""
    mask = np.asarray(mask, bool).reshape(-1)
    return stats.proportion(int(mask.sum()), int(mask.size), confidence)


def bootstrap_indices(n: int, seed: int, resamples: int) -> np.ndarray:
    """(resamples, n) indices of resamples with replacement, from `seed`."""
    if n < 1:
        raise PropmapsError("a bootstrap needs at least one item")
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def bootstrap_mean(
    values: np.ndarray,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """{mean, ci_low, ci_high, n}: the mean of `values` (N,) with a percentile
    bootstrap interval over the N items (non-finite values dropped)."""
    values = np.asarray(values, np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    idx = bootstrap_indices(values.size, seed, resamples)
    low, high = stats.percentile_interval(
        values[idx].mean(axis=1), confidence, min_finite=1
    )
    return {
        "mean": float(values.mean()),
        "ci_low": low,
        "ci_high": high,
        "n": values.size,
    }


# --- "close to the maximum".


def reach_shares(
    max_ratio: np.ndarray, thresholds: Sequence[float] = REACH_THRESHOLDS
) -> dict[str, list[dict[str, Any]]]:
    """{str(t): [share of attacks with max_ratio >= t, per layer]} from (N, L)."""
    max_ratio = np.asarray(max_ratio, np.float64)
    return {
        f"{t:g}": [share(max_ratio[:, j] >= t) for j in range(max_ratio.shape[1])]
        for t in thresholds
    }


def close_to_max_verdict(shares_at_threshold: list[dict[str, Any]]) -> str:
    """The verdict of `VERDICT_RULES["close_to_max"]` from the shares at 0.9."""
    lows = [s["ci_low"] for s in shares_at_threshold if s["n"]]
    if any(low > 0.5 for low in lows):
        return "holds"
    if any(low > 0.05 for low in lows):
        return "sometimes"
    return "rarely"


# --- "more or less the same across layers".


def layer_profile(
    values: np.ndarray,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Per-layer means of `values` (N, L) with bootstrap intervals over attacks,
    and largest / smallest layer mean (attacks resampled jointly over layers)
    and last / first, each with its interval."""
    values = np.asarray(values, np.float64)
    n, num_layers = values.shape
    finite = np.all(np.isfinite(values), axis=1)
    values = values[finite]
    if values.shape[0] == 0:
        raise PropmapsError("no attack with finite values in every layer")
    idx = bootstrap_indices(values.shape[0], seed, resamples)
    means = values.mean(axis=0)
    replicates = values[idx].mean(axis=1)  # (resamples, L)
    per_layer = []
    for j in range(num_layers):
        low, high = stats.percentile_interval(
            replicates[:, j], confidence, min_finite=1
        )
        per_layer.append({"mean": float(means[j]), "ci_low": low, "ci_high": high})

    def ratio(num: np.ndarray, den: np.ndarray, rep_num, rep_den) -> dict:
        with np.errstate(divide="ignore", invalid="ignore"):
            low, high = stats.percentile_interval(
                rep_num / rep_den, confidence, min_finite=1
            )
            return {"ratio": float(num / den), "ci_low": low, "ci_high": high}

    return {
        "n": int(values.shape[0]),
        "dropped": int(n - values.shape[0]),
        "per_layer": per_layer,
        "largest_over_smallest": ratio(
            means.max(), means.min(), replicates.max(1), replicates.min(1)
        ),
        "last_over_first": ratio(
            means[-1], means[0], replicates[:, -1], replicates[:, 0]
        ),
    }


def same_across_layers_verdict(profile: dict[str, Any]) -> str:
    """The verdict of `VERDICT_RULES["same_across_layers"]`."""
    if min(layer["mean"] for layer in profile["per_layer"]) <= 0:
        # Signed maps: a mean at or below 0 makes the ratio meaningless.
        return "undecided (a layer's mean is <= 0: no ratio)"
    r = profile["largest_over_smallest"]
    if r["ci_high"] <= SAME_FACTOR:
        return "holds"
    if r["ci_low"] > SAME_FACTOR:
        return "fails"
    return "undecided"


# --- Positions: the centre.


def central_square(height: int, width: int) -> np.ndarray:
    """(H, W) bool: the central square, `CENTRE_SIDE_FRACTION` of each side."""
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    half_h = CENTRE_SIDE_FRACTION * height / 2.0
    half_w = CENTRE_SIDE_FRACTION * width / 2.0
    return (np.abs(rows - (height - 1) / 2.0) < half_h) & (
        np.abs(cols - (width - 1) / 2.0) < half_w
    )


def in_centre(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,) bool: the first pixel's (row, col) of each (N, k, 5) in the centre."""
    pixels = np.asarray(pixels)
    square = central_square(height, width)
    return square[pixels[:, 0, 0], pixels[:, 0, 1]]


def centre_comparison(
    pixels: np.ndarray, success: np.ndarray, height: int, width: int
) -> dict[str, Any]:
    """Shares of successful and failed attacks' pixels in the central square,
    beside the share of positions there, with the verdict of
    `VERDICT_RULES["successful_near_centre"]`."""
    inside = in_centre(pixels, height, width)
    success = np.asarray(success, bool)
    uniform = float(central_square(height, width).mean())
    ok, failed = share(inside[success]), share(inside[~success])
    apart = ok["ci_low"] > failed["ci_high"]
    above_uniform = ok["ci_low"] > uniform
    if ok["n"] == 0 or failed["n"] == 0:
        verdict = "undecided (an outcome without attacks)"
    elif apart and above_uniform:
        verdict = "holds"
    elif ok["ci_high"] < failed["ci_low"]:
        verdict = "reversed (failed nearer the centre)"
    elif not apart:
        verdict = "no difference between outcomes"
    else:
        verdict = "nearer than failed, not above uniform"
    return {
        "successful": ok,
        "failed": failed,
        "uniform_share": uniform,
        "verdict": verdict,
    }


def centre_mass(mean_map: np.ndarray) -> float:
    """Share of an (H, W) map's total |value| in its central square (signed maps:
    of their magnitude)."""
    mean_map = np.abs(np.asarray(mean_map, np.float64))
    total = mean_map.sum()
    if not total > 0:
        return float("nan")
    return float(mean_map[central_square(*mean_map.shape)].sum() / total)


def centre_concentration_verdict(actual: float, control: float, uniform: float) -> str:
    """The verdict of `VERDICT_RULES["centre_concentration"]`."""
    if not (np.isfinite(actual) and np.isfinite(control)):
        return "undecided"
    if actual - control > 0.1 * uniform:
        return "beyond geometry"
    return "geometry (no more than the uniform-position control)"


def uniform_positions(
    key: PRNGKey, indices: np.ndarray, height: int, width: int
) -> np.ndarray:
    """(N, 2) int positions drawn uniformly, one per dataset index (from
    fold_in(key, index): independent of order and batching)."""

    def one(index):
        k = jax.random.fold_in(key, index)
        return jax.random.randint(k, (2,), 0, jnp.asarray([height, width]))

    return np.asarray(jax.vmap(one)(jnp.asarray(indices, jnp.int32)), np.int64)


# --- "more than a quarter of the last maps".


def quarter_verdict(prop: dict[str, Any]) -> str:
    """The verdict of `VERDICT_RULES["quarter_of_last_map"]`."""
    if prop["n"] == 0:
        return "undecided"
    if prop["ci_low"] > 0.5:
        return "holds"
    if prop["ci_low"] > 0.05:
        return "sometimes"
    return "rarely"


# --- Effort-matched positions: the initial population's best candidate.


def generation0_best(
    key_of_image: PRNGKey,
    apply_fn: ApplyFn,
    variables: Variables,
    image: jax.Array,
    label: jax.Array,
    config: attack_de.AttackConfig,
) -> dict[str, jax.Array]:
    """The initial population of one image's attack, scored (untargeted).

    `key_of_image` is `attack_de.image_key(key, dataset_index)`: the population is
    the one the attack drew. Returns {"best": pixels (k, 5) of the lowest
    p(label) (DE's best member), "best_prob_true", "reported": what the attack
    reports after generation 0 (the most confident success, else the best),
    "success": bool, any success in the population}.
    """
    image_shape = tuple(image.shape)
    gen_key = attack_de.generation_key(key_of_image, jnp.int32(0))
    vectors = attack_de.initial_population(gen_key, config, image_shape)
    pixels = attack_de.decode_candidates(vectors, image_shape)
    images = jnp.broadcast_to(image, (pixels.shape[0], *image_shape))
    logits = apply_fn(variables, apply_pixels_batch(images, pixels))
    fit, success, prob_true, _ = attack_de.fitness(logits, label, jnp.int32(-1))
    best_at = jnp.argmin(fit)
    success_at = jnp.argmin(jnp.where(success, fit, jnp.inf))
    any_success = jnp.any(success)
    return {
        "best": pixels[best_at],
        "best_prob_true": prob_true[best_at],
        "reported": jnp.where(any_success, pixels[success_at], pixels[best_at]),
        "success": any_success,
    }


# --- Selection rules of the single-attack figures.


def median_row(values: np.ndarray, mask: np.ndarray) -> int:
    """Row of the (lower) median of `values` among rows where `mask`; ties: the
    first row."""
    rows = np.flatnonzero(np.asarray(mask, bool))
    if rows.size == 0:
        raise PropmapsError("no row to choose the median from")
    order = rows[np.argsort(np.asarray(values)[rows], kind="stable")]
    return int(order[(rows.size - 1) // 2])


def argmax_row(values: np.ndarray, mask: np.ndarray) -> int:
    """Row of the largest finite `values` among rows where `mask`; ties: first."""
    values = np.asarray(values, np.float64)
    allowed = np.asarray(mask, bool) & np.isfinite(values)
    if not allowed.any():
        raise PropmapsError("no row to choose the largest value from")
    return int(np.flatnonzero(allowed)[np.argmax(values[allowed])])


def neighbours(row: int, col: int, height: int, width: int) -> list[tuple[int, int]]:
    """The positions at Chebyshev distance 1 inside the image, row-major."""
    return [
        (row + dr, col + dc)
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
        if (dr or dc) and 0 <= row + dr < height and 0 <= col + dc < width
    ]


# Figure 6's condition: the paper's counterexample lost about one percentage point
# of confidence ("from 100% to 99%").
SMALL_DROP = 0.01


def figure_examples(
    table: dict[str, np.ndarray], last_layer_max_ratio: np.ndarray
) -> dict[str, dict[str, Any]]:
    """The attacks shown in figures 2-6, chosen by rule from an attack table.

    `table`: arrays of attack.csv (experiments.runs.attack_csv.read_attack_csv) with
    "attacked", "success", "index", "prob_true_before", "prob_true_after";
    `last_layer_max_ratio` (N,): max |dFM| / max FM in the last layer (NaN where
    not computed). Returns {figure: {"row", "rule"}} for "2" (and "3", the same
    attack: the paper shows PM_max and PM_avg of one sample), "5" and "6";
    figure 4 (the figure-2 pixel moved by one) is chosen with `moved_by_one`.
    """
    attacked = np.asarray(table["attacked"], bool)
    success = np.asarray(table["success"], bool) & attacked
    failed = attacked & ~np.asarray(table["success"], bool)
    before = np.asarray(table["prob_true_before"], np.float64)
    drop = before - np.asarray(table["prob_true_after"], np.float64)
    out: dict[str, dict[str, Any]] = {}
    if success.any():
        row = median_row(before, success)
        rule = (
            "the successful attack whose image the model classified with the "
            "median confidence p(true) among the successful attacks"
        )
        out["2"] = out["3"] = {"row": row, "rule": rule}
    if failed.any():
        out["5"] = {
            "row": argmax_row(last_layer_max_ratio, failed),
            "rule": "the failed attack with the largest last-layer max|dFM| / max FM",
        }
        small = failed & (drop <= SMALL_DROP)
        if small.any():
            out["6"] = {
                "row": argmax_row(last_layer_max_ratio, small),
                "rule": (
                    "among failed attacks that lowered p(true) by at most "
                    f"{100 * SMALL_DROP:g} percentage point, the one with the largest "
                    "last-layer "
                    "max|dFM| / max FM"
                ),
            }
        else:
            out["6"] = {
                "row": int(np.flatnonzero(failed)[np.argmin(drop[failed])]),
                "rule": (
                    f"no failed attack lowered p(true) by at most {100 * SMALL_DROP:g} "
                    "percentage point: the failed attack with the smallest drop"
                ),
            }
    return out


def moved_by_one(prob_true_at: dict[tuple[int, int], float]) -> tuple[int, int]:
    """Figure 4's position: of the neighbours (Chebyshev distance 1) of a
    successful pixel, the one where the same colour leaves p(true) highest (the
    move that most undoes the attack); ties: row-major first."""
    if not prob_true_at:
        raise PropmapsError("no neighbour to move the pixel to")
    positions = sorted(prob_true_at)
    return positions[int(np.argmax([prob_true_at[p] for p in positions]))]
