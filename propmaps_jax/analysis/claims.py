"""The paper's sentences about propagation maps, as numbers (sections 5 and 6).

`CLAIMS` reads each sentence as the paper means it: a `Claim` names the layer(s)
its argument is about, ONE primary statistic (with a line on why it is the
sentence's meaning), the secondary statistics reported beside it, and a verdict
rule computed from the primary only. A `claim_*` function per sentence computes
{"primary", "secondary", "verdict"} from per-image arrays:

1. "close to the maximum" (`claim_close_to_max`): the LAST layer's share of
   successful attacks with max |FM - FM_adv| / max FM >= 0.9; every layer and
   the failed attacks beside it;
2. "the average difference is kept more or less the same throughout the layers"
   (`claim_same_across_layers`): the peak of PM_avg over the layer's max FM
   (what figure 3's colour scale shows), largest / smallest layer mean; the
   spatial means beside it;
3. "failed attacks tend to be farther away from the center"
   (`claim_failed_farther`): the found pixels' central-square share, successful
   against failed; the initial population's best candidate beside it;
4. "influence strongly more than a quarter of the feature map"
   (`claim_quarter`): the last layer's share of successful attacks with PM_max
   above half the max FM on more than a quarter of the positions;
5. "the successful attacks seem to concentrate mostly close to the center"
   (`claim_centre_concentration`): the last layer's mean-map central mass over
   that of the same colours at positions drawn at the attacks' own distances
   from the centre (`distance_matched_positions`); uniform positions beside it;
6. figure 9, "unable to distinguish between successful and failed attacks"
   (`claim_figure9`): failed / successful mean |dFM| per layer; each image's
   |dFM| over its own mean |FM| beside it.

`provenance` says whether the rules were fixed before a run's numbers existed
(prospective) or not (retrospective), from the dates it is given.

The first rules (`VERDICT_RULES`, `centre_comparison`, ...) stay for the code
that reads them. The selection rules of the single-attack figures (2-6) are here
too, as pure functions of the attack table, so that the figures are chosen by
rule.

Host statistics are float64 NumPy; `generation0_best` is a pure JAX function of
one image (jit and vmap it at the call site).
"""

from __future__ import annotations

import dataclasses
import datetime
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

# --- The thresholds, and the first rules (before the claims were read as below).

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


# --- Each claim as the paper means it: one primary statistic, its verdict.

# "very similar behaviour" (figure 9): every layer's failed / successful ratio of
# the mean difference within this factor, the bootstrap interval included.
SIMILAR_FACTOR = 1.25
# "mostly geometry" (figure 7): the last layer's mean map no more than this many
# percentage points more central than the distance-matched control (10% of the
# central square's 25% of positions, the margin of the first rule).
GEOMETRY_MARGIN = 0.025


@dataclasses.dataclass(frozen=True)
class Claim:
    """One sentence of the paper, read as the paper means it.

    `words`: the sentence; `source`: where it stands; `layers`: the layer(s) its
    argument is about; `primary`: the one statistic the verdict is computed from,
    `why`: why that statistic is the sentence's meaning; `secondary`: statistics
    reported beside it, which never change the verdict; `rule`: the verdict rule.
    """

    key: str
    words: str
    source: str
    layers: str
    primary: str
    why: str
    secondary: tuple[str, ...]
    rule: str


CLAIMS: tuple[Claim, ...] = (
    Claim(
        key="close_to_max",
        words=(
            "reaching absolute difference values that are close to the maximum "
            "value of the original feature maps in a given layer"
        ),
        source="abstract and conclusions; figure 2",
        layers="the last layer",
        primary=(
            f"share of successful attacks whose last-layer max|FM - FM_adv| / max FM "
            f">= {CLOSE_TO_MAX:g} (Wilson interval)"
        ),
        why=(
            "the paper's argument is that a successful pixel's influence culminates "
            "strong in the last layers (5.2, figure 2); in the first convolution any "
            "extreme-coloured pixel reaches the maximum, whatever the outcome"
        ),
        secondary=(
            "the same share in every layer, at 0.5 and 0.9, for successful and "
            "failed attacks",
        ),
        rule=(
            "holds if the primary's Wilson interval lies above 50%; 'sometimes' if "
            "it lies above 5%; else 'rarely'"
        ),
    ),
    Claim(
        key="same_across_layers",
        words=(
            "this average difference is kept more or less the same throughout the "
            "layers"
        ),
        source="section 5, figure 3",
        layers="every layer",
        primary=(
            "per successful attack and layer, the peak (max over positions) of "
            "PM_avg divided by the layer's max FM; the largest / smallest layer mean "
            "(bootstrap interval over attacks)"
        ),
        why=(
            "figure 3 draws PM_avg with each layer's colour scale topped at the "
            "layer's max FM: what looks the same from layer to layer is the "
            "brightness of the bright spot, not the mean over a mostly dark map "
            "(which grows as the map spreads)"
        ),
        secondary=(
            "the raw peak of PM_avg per layer",
            "the spatial mean of PM_avg raw, divided by the layer's mean |FM| and "
            "by its max FM (the former statistic)",
            "the same for failed attacks",
        ),
        rule=(
            f"holds if the largest / smallest layer mean of the primary is at most "
            f"{SAME_FACTOR:g}, the interval's upper end included; fails if the "
            "interval's lower end exceeds it; else undecided"
        ),
    ),
    Claim(
        key="failed_farther_from_centre",
        words=(
            "failed attacks tend to be farther away from the center of the image "
            "and spread more equally than their successful counterparts"
        ),
        source="section 6, figures 7 and 8",
        layers="the input image (the attacked pixel's position)",
        primary=(
            "share of the found pixels in the central square, successful against "
            "failed attacks (Wilson intervals); the same statistic for every model"
        ),
        why=(
            "the sentence is about where the attacks lie, and the found pixel is "
            "the attack for both outcomes"
        ),
        secondary=(
            "the share of positions in the central square (uniform positions)",
            "each attack's best candidate of its initial population (effort-matched)",
        ),
        rule=(
            "holds if the successful attacks' interval lies above the failed ones'; "
            "'reversed' if below; else 'no difference between outcomes'"
        ),
    ),
    Claim(
        key="quarter_of_last_map",
        words=(
            "In the last layer, the perturbation spread enough to influence "
            "strongly more than a quarter of the feature map."
        ),
        source="section 5.1, figure 2",
        layers="the last layer",
        primary=(
            f"share of successful attacks whose last-layer PM_max exceeds "
            f"{STRONG_FRACTION:g} x max FM on more than {QUARTER:.0%} of the "
            "positions (Wilson interval)"
        ),
        why=(
            "the sentence's own words: 'strongly' is above half of figure 2's "
            "colour scale (the layer's max FM), in the last layer, on a quarter"
        ),
        secondary=(
            "the same for failed attacks",
            f"at {0.1:g} x max FM",
            "the mean strongly reached fraction",
        ),
        rule=(
            "holds if the primary's Wilson interval lies above 50%; 'sometimes' if "
            "above 5%; else 'rarely'"
        ),
    ),
    Claim(
        key="centre_concentration",
        words=(
            "The successful attacks seem to concentrate mostly close to the center "
            "of the image. In deeper layers, the influence expands and increase in "
            "intensity, specially at its center."
        ),
        source="section 6, figure 7",
        layers="the last layer's mean PM_avg map (figure 7's deepest panel)",
        primary=(
            "central-square mass share of the last layer's mean PM_avg over "
            "successful attacks minus the same for their colours put at positions "
            "drawn at each attack's own distance from the centre (distance-matched "
            "control), in percentage points"
        ),
        why=(
            "that figure 7 is central follows already from where the attacks lie "
            "(most found pixels are central) and from padding; the figure says "
            "something more only if the influence is more central than pixels at "
            "the same distances give"
        ),
        secondary=(
            "the mass share of the attacks' map, of the distance-matched and of "
            "the uniform-position control, and the share of positions",
            "the successful attacks' pixels in the central square",
            "the same for failed attacks",
        ),
        rule=(
            f"'mostly geometry' if the excess is within +-{100 * GEOMETRY_MARGIN:g} "
            "points (the attacks' distances from the centre and padding give the "
            f"picture); 'beyond geometry' if above +{100 * GEOMETRY_MARGIN:g}; "
            "'less central than the attacks' distances' if below"
        ),
    ),
    Claim(
        key="figure9_similar",
        words=(
            "The average difference is also unable to distinghish between "
            "successful and failed attacks, with both having very similar behavior."
        ),
        source="section 6, figure 9",
        layers="every layer",
        primary=(
            "per layer, failed / successful ratio of the mean |FM - FM_adv| over "
            "attacks (figure 9's two curves), bootstrap interval over attacks"
        ),
        why="figure 9 plots those two curves, unnormalised",
        secondary=(
            "the same ratio with each image's |FM - FM_adv| divided by its own "
            "mean |FM| (an image with strong activations moves more)",
            "which outcome is higher in each layer, under both",
        ),
        rule=(
            f"holds ('similar') if every layer's ratio interval lies within "
            f"1/{SIMILAR_FACTOR:g}..{SIMILAR_FACTOR:g}; 'differ' if some layer's "
            "interval lies wholly outside; else undecided"
        ),
    ),
)
CLAIM = {claim.key: claim for claim in CLAIMS}


def claim_record(claim: Claim, result: dict[str, Any]) -> dict[str, Any]:
    """The reported entry of a claim: its reading (`Claim`) beside `result`
    ({"primary", "secondary", "verdict"} of a `claim_*` function)."""
    return {
        "words": claim.words,
        "source": claim.source,
        "layers": claim.layers,
        "primary_statistic": claim.primary,
        "why": claim.why,
        "secondary_statistics": list(claim.secondary),
        "rule": claim.rule,
        **result,
    }


def _outcome_masks(success: np.ndarray) -> dict[str, np.ndarray]:
    success = np.asarray(success, bool)
    return {"successful": success, "failed": ~success}


def claim_close_to_max(
    max_ratio: np.ndarray, success: np.ndarray, layers: Sequence[str]
) -> dict[str, Any]:
    """Claim 1 from max|dFM| / max FM (N, L): the last layer's share is primary."""
    masks = _outcome_masks(success)
    shares = {o: reach_shares(np.asarray(max_ratio)[m]) for o, m in masks.items()}
    close = f"{CLOSE_TO_MAX:g}"
    primary = shares["successful"][close][-1]
    best = int(np.argmax([s["rate"] or 0 for s in shares["successful"][close]]))
    return {
        "primary": {"layer": layers[-1], "threshold": CLOSE_TO_MAX, **primary},
        "secondary": {
            "failed_last_layer": shares["failed"][close][-1],
            "per_layer": {"layers": list(layers), **shares},
            "best_layer": layers[best],
        },
        "verdict": close_to_max_verdict([primary]),
    }


def claim_same_across_layers(
    scalars: dict[str, np.ndarray], success: np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """Claim 2 from per-image scalars {name: (N, L)} (`propagation.SUMMARY_NAMES`):
    the peak of PM_avg over the layer's max FM is primary."""
    masks = _outcome_masks(success)
    diff = scalars["mean_abs_diff"]
    with np.errstate(divide="ignore", invalid="ignore"):
        readings = {
            "peak PM_avg / max FM": scalars["pm_avg_peak"] / scalars["fm_max"],
            "peak PM_avg": scalars["pm_avg_peak"],
            "mean PM_avg": diff,
            "mean PM_avg / mean |FM|": diff / scalars["mean_abs_fm"],
            "mean PM_avg / max FM": diff / scalars["fm_max"],
        }
    profiles: dict[str, dict[str, Any]] = {}
    for name, values in readings.items():
        profiles[name] = {}
        for outcome, mask in masks.items():
            try:
                profile = layer_profile(values[mask], seed)
                profile["verdict"] = same_across_layers_verdict(profile)
            except PropmapsError:  # no attack, or none finite in every layer
                profile = {"n": 0, "verdict": "undecided (no attack with values)"}
            profiles[name][outcome] = profile
    primary_name = "peak PM_avg / max FM"
    primary = profiles[primary_name]["successful"]
    return {
        "primary": {"statistic": primary_name, **primary},
        "secondary": profiles,
        "verdict": primary["verdict"],
    }


def outcome_centre_verdict(successful: dict[str, Any], failed: dict[str, Any]) -> str:
    """The verdict of claim 3 from the two outcomes' central shares."""
    if not successful["n"] or not failed["n"]:
        return "undecided (an outcome without attacks)"
    if successful["ci_low"] > failed["ci_high"]:
        return "holds"
    if successful["ci_high"] < failed["ci_low"]:
        return "reversed (failed nearer the centre)"
    return "no difference between outcomes"


def claim_failed_farther(
    pixels: np.ndarray,
    success: np.ndarray,
    height: int,
    width: int,
    generation0_best: np.ndarray | None = None,
) -> dict[str, Any]:
    """Claim 3: the found pixels' central share by outcome is primary;
    `generation0_best` (N, k, 5), the initial population's best, beside it."""
    masks = _outcome_masks(success)
    inside = in_centre(pixels, height, width)
    ok, failed = share(inside[masks["successful"]]), share(inside[masks["failed"]])
    secondary: dict[str, Any] = {
        "uniform_share": float(central_square(height, width).mean())
    }
    if generation0_best is not None:
        at0 = in_centre(generation0_best, height, width)
        g_ok, g_failed = share(at0[masks["successful"]]), share(at0[masks["failed"]])
        secondary["generation0"] = {
            "successful": g_ok,
            "failed": g_failed,
            "verdict_if_primary": outcome_centre_verdict(g_ok, g_failed),
        }
    return {
        "primary": {"successful": ok, "failed": failed},
        "secondary": secondary,
        "verdict": outcome_centre_verdict(ok, failed),
    }


def claim_quarter(
    spread_strong_last: np.ndarray, spread_last: np.ndarray, success: np.ndarray
) -> dict[str, Any]:
    """Claim 4 from the last layer's strongly / weakly reached fractions (N,)."""
    masks = _outcome_masks(success)
    strong = {o: share(spread_strong_last[m] > QUARTER) for o, m in masks.items()}
    return {
        "primary": strong["successful"],
        "secondary": {
            "failed": strong["failed"],
            "weak_threshold": {
                o: share(spread_last[m] > QUARTER) for o, m in masks.items()
            },
            "mean_spread_strong": {
                o: bootstrap_mean(spread_strong_last[m]) for o, m in masks.items()
            },
        },
        "verdict": quarter_verdict(strong["successful"]),
    }


def matched_concentration_verdict(excess: float) -> str:
    """The verdict of claim 5 from the excess central mass over the
    distance-matched control (a share difference, not points)."""
    if not np.isfinite(excess):
        return "undecided"
    if excess > GEOMETRY_MARGIN:
        return "beyond geometry (more central than the attacks' distances give)"
    if excess < -GEOMETRY_MARGIN:
        return "less central than the attacks' distances give"
    return "mostly geometry (the attacks' distances from the centre and padding)"


def claim_centre_concentration(
    last_maps: dict[str, dict[str, np.ndarray]],
    pixels: np.ndarray,
    success: np.ndarray,
    image_shape: tuple[int, int],
) -> dict[str, Any]:
    """Claim 5 from the last layer's mean PM_avg maps (H, W) and the attacks'
    pixels in images of `image_shape` (height, width):
    `last_maps[source][outcome]` for source "attacks", "distance_matched" and
    "uniform_positions" (a missing source: NaN); the excess of the successful
    attacks' central mass over the distance-matched control's is primary."""
    masks = _outcome_masks(success)
    inside = in_centre(pixels, *image_shape)
    per_outcome = {}
    for outcome in masks:
        mass = {
            source: centre_mass(maps[outcome]) if outcome in maps else float("nan")
            for source, maps in last_maps.items()
        }
        per_outcome[outcome] = {
            "central_mass_share": mass,
            "excess_over_distance_matched": mass["attacks"]
            - mass.get("distance_matched", float("nan")),
            "pixels_in_central_square": share(inside[masks[outcome]]),
        }
    excess = per_outcome["successful"]["excess_over_distance_matched"]
    return {
        "primary": {"excess": excess, "margin": GEOMETRY_MARGIN},
        "secondary": {
            **per_outcome,
            "share_of_positions": float(
                central_square(*last_maps["attacks"]["successful"].shape).mean()
            ),
        },
        "verdict": matched_concentration_verdict(excess),
    }


def outcome_ratio(
    successful: np.ndarray,
    failed: np.ndarray,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> list[dict[str, Any]]:
    """Per layer, mean(failed) / mean(successful) of (Ns, L) and (Nf, L) values,
    with a percentile bootstrap interval (each outcome resampled on its own)."""
    successful = np.asarray(successful, np.float64)
    failed = np.asarray(failed, np.float64)
    successful = successful[np.all(np.isfinite(successful), axis=1)]
    failed = failed[np.all(np.isfinite(failed), axis=1)]
    if successful.shape[0] == 0 or failed.shape[0] == 0:
        raise PropmapsError("a ratio of outcomes needs attacks of both outcomes")
    rep_ok = successful[bootstrap_indices(successful.shape[0], seed, resamples)]
    rep_failed = failed[bootstrap_indices(failed.shape[0], seed + 1, resamples)]
    with np.errstate(divide="ignore", invalid="ignore"):
        replicates = rep_failed.mean(axis=1) / rep_ok.mean(axis=1)  # (R, L)
        ratios = failed.mean(axis=0) / successful.mean(axis=0)
    out = []
    for j in range(successful.shape[1]):
        low, high = stats.percentile_interval(
            replicates[:, j], confidence, min_finite=1
        )
        out.append({"ratio": float(ratios[j]), "ci_low": low, "ci_high": high})
    return out


def similar_outcomes_verdict(ratios: list[dict[str, Any]]) -> str:
    """The verdict of claim 6 (figure 9) from per-layer `outcome_ratio`s."""
    low, high = 1.0 / SIMILAR_FACTOR, SIMILAR_FACTOR
    if any(r["ci_low"] is None or r["ci_high"] is None for r in ratios):
        return "undecided"
    if all(low <= r["ci_low"] and r["ci_high"] <= high for r in ratios):
        return "holds (similar)"
    if any(r["ci_low"] > high or r["ci_high"] < low for r in ratios):
        return "differ"
    return "undecided"


def claim_figure9(
    mean_abs_diff: np.ndarray,
    mean_abs_fm: np.ndarray,
    success: np.ndarray,
    layers: Sequence[str],
    seed: int = 0,
) -> dict[str, Any]:
    """Claim 6 from per-image mean |dFM| and mean |FM| (N, L): the failed /
    successful ratio of the raw means (figure 9's curves) is primary; the ratio of
    each image's |dFM| over its own mean |FM| beside it."""
    masks = _outcome_masks(success)
    if not (masks["successful"].any() and masks["failed"].any()):
        return {
            "primary": None,
            "secondary": {},
            "verdict": "undecided (an outcome without attacks)",
        }
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = mean_abs_diff / mean_abs_fm

    def reading(values):
        ratios = outcome_ratio(
            values[masks["successful"]], values[masks["failed"]], seed
        )
        return {
            "layers": list(layers),
            "failed_over_successful": ratios,
            "failed_higher_in_layers": [
                name for name, r in zip(layers, ratios, strict=True) if r["ratio"] > 1
            ],
        }

    raw, own = reading(mean_abs_diff), reading(normalised)
    return {
        "primary": raw,
        "secondary": {"divided_by_own_mean_abs_fm": own},
        "verdict": similar_outcomes_verdict(raw["failed_over_successful"]),
    }


def distance_matched_positions(
    key: PRNGKey, indices: np.ndarray, positions: np.ndarray, height: int, width: int
) -> np.ndarray:
    """(N, 2) int positions, each drawn uniformly among the positions at the same
    Chebyshev distance from the centre as `positions` (N, 2) (the attacks' own
    distance distribution), one per dataset index from fold_in(key, index)."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ring = stats.distance_from_centre(np.stack([rows, cols], -1), height, width)
    ring = jnp.asarray(ring.reshape(-1))
    wanted = jnp.asarray(
        stats.distance_from_centre(np.asarray(positions), height, width)
    )

    def one(index, distance):
        k = jax.random.fold_in(key, index)
        flat = jax.random.categorical(k, jnp.where(ring == distance, 0.0, -jnp.inf))
        return jnp.stack([flat // width, flat % width])

    drawn = jax.vmap(one)(jnp.asarray(indices, jnp.int32), wanted)
    return np.asarray(drawn, np.int64)


# --- Provenance: were the rules fixed before the numbers?


def provenance(
    rules_committed: str | None,
    numbers_first_seen: str | None,
    rules_modified: bool = False,
) -> dict[str, Any]:
    """Whether a run's verdicts are prospective or retrospective.

    Args:
      rules_committed: ISO 8601 date of the last commit that changed this file
        (`git log -1 --format=%cI -- propmaps_jax/analysis/claims.py`), None when
        unknown (no git).
      numbers_first_seen: ISO 8601 date of the earliest moment the run's numbers
        were known (its attack results or an earlier claims file), None if
        unknown.
      rules_modified: the file has uncommitted changes (the rules are not fixed).

    Returns:
      {"status": "prospective" | "retrospective" | "unknown", "rules_committed",
      "numbers_first_seen", "why"}: prospective only when the last change of the
      rules was committed before the numbers existed.
    """
    out = {"rules_committed": rules_committed, "numbers_first_seen": numbers_first_seen}
    if rules_modified:
        return {
            **out,
            "status": "retrospective",
            "why": "the rules have uncommitted changes: not fixed before any number",
        }
    if rules_committed is None or numbers_first_seen is None:
        return {
            **out,
            "status": "unknown",
            "why": "the rules' commit date or the numbers' date is unknown",
        }
    committed = datetime.datetime.fromisoformat(rules_committed)
    seen = datetime.datetime.fromisoformat(numbers_first_seen)
    if committed.tzinfo is None or seen.tzinfo is None:
        raise PropmapsError("provenance dates need a time zone (ISO 8601 with offset)")
    if committed < seen:
        return {
            **out,
            "status": "prospective",
            "why": "the rules were last changed before the run's numbers existed",
        }
    return {
        **out,
        "status": "retrospective",
        "why": "the rules were last changed after the run's numbers were known",
    }


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

    `table`: arrays of attack.csv (propmaps_jax.results.attack_csv.read_attack_csv)
    with "attacked", "success", "index", "prob_true_before", "prob_true_after";
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
