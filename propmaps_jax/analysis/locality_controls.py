"""Controls for the locality study: receptive field, or a fragile image?

Table 1 compares the attack's colour moved to an adjacent pixel (nearby) with the
same colour moved to a random pixel. Two things besides a "vulnerable receptive
field" make nearby win: some images are fragile (many of their pixels fool the
model; DE finds those in its initial population, generation 0), and images are
smooth (an adjacent pixel has nearly the same surroundings). This module holds
what separates them, as pure functions (the locality experiment runs them):

- fragility strata: each successful attack is put in a stratum by whether DE found
  it at generation 0 or by search, and by the clean image's margin
  p(true) - max p(other) in quartiles over the attacked images; nearby and random
  are compared within each stratum on the same images (McNemar's exact test);
- colour or place: per successful attack one seeded draw each of a random colour
  at the attack's own position ("this place"), a random colour at the nearby
  move's position ("near this place, any colour"), and the attack's colour at a
  random position whose 3x3 neighbourhood in the clean image is close in colour
  to that of the attack's position ("these surroundings", context-matched);
- distance after fragility: a logistic model of success over the image-position
  pairs of the rings (d = 1..D) and the random move, against the Chebyshev
  distance, with and without the clean margin and the generation-0 indicator,
  with intervals from a bootstrap over images;
- a verdict rule fixed before the numbers (VERDICT_RULE), applied by `verdict`.

It lives beside `locality.py` rather than in it: `locality.py` is the paper's
protocol (moves, rings, vulnerability maps), this module is our test of its
reading, with its own key streams; it reuses the protocol's samplers.
Random draws use one key per image, fold_in(key, dataset_index), of streams of
their own (CONTROLS_STREAM), so they never depend on batching and never reuse the
attack's or the protocol's randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax import stats
from propmaps_jax.analysis import locality
from propmaps_jax.types import ApplyFn, Images, Labels, Perturbation, Variables

CONTROLS_STREAM = 0xC0D7
OWN_COLOUR_STREAM, NEARBY_COLOUR_STREAM, CONTEXT_STREAM = 0, 1, 2
# Context match: the mean absolute difference over the 27 values (3x3 pixels,
# 3 channels, 0..255) of two 3x3 windows of the clean image (edges replicated).
# 12 is about 5% of the range. For comparison (measured afterwards, on the bundled
# LeNet's 412 successful attacks of the first 1,000 test images): the nearby
# move's window differs from the attack's by a median of 16.5, the drawn
# context-matched one by 10.0; no position qualified for 117 of the 412. The
# table reports these beside the rates, so the reader can judge the match.
CONTEXT_TOLERANCE = 12.0
# Candidates at Chebyshev distance >= 3 from the attack: their 3x3 window shares no
# pixel with the attack position's, so a match is "similar surroundings
# elsewhere", not "the same surroundings".
CONTEXT_MIN_DISTANCE = 3
# The verdict rule, fixed before the numbers were seen (see VERDICT_RULE).
MIN_STRATUM = 20
ALPHA = 0.05
VERDICT_RULE = (
    "Rule (fixed before the numbers, applied by the code): locality beyond "
    "fragility is *supported* when (1) in every stratum holding at least "
    f"{MIN_STRATUM} successful attacks (found at generation 0, found by search, "
    "each quartile of the clean margin) the nearby move succeeds more often than "
    "the random move on the same images by McNemar's exact test (two-sided "
    f"p < {ALPHA:g}, more nearby-only than random-only successes), and (2) the "
    "distance coefficient of the logistic model adjusted for the clean margin and "
    "the generation-0 indicator is negative with its 95% bootstrap interval (over "
    "images) below 0. It is *not supported* when in some such stratum random "
    f"beats nearby (p < {ALPHA:g}) or the adjusted coefficient's interval lies at "
    "or above 0; otherwise *inconclusive*. Each control row (C1-C4) states which "
    f"side wins by McNemar's exact test (p < {ALPHA:g}) or that no difference is "
    "shown."
)
STRATA = ("all", "generation 0", "search", "margin Q1", "margin Q2")
STRATA += ("margin Q3", "margin Q4")
# Rates per stratum, over successful attacks: the name and the label of each.
MOVES = (
    ("nearby", "nearby pixel, attack's colour"),
    ("random", "random pixel, attack's colour"),
    ("own_random_colour", "attack's pixel, random colour"),
    ("nearby_random_colour", "nearby pixel, random colour"),
    ("context", "context-matched pixel, attack's colour"),
)
# Paired controls: (id, first, second, what "first beats second" says).
PAIRED_CONTROLS = (
    (
        "C1",
        "nearby",
        "random",
        "place: the attack's colour works near the attack, not anywhere",
    ),
    (
        "C2",
        "nearby",
        "nearby_random_colour",
        "colour: near the attack, the attack's colour beats a random colour",
    ),
    (
        "C3",
        "context",
        "random",
        "surroundings: similar surroundings elsewhere beat a random place",
    ),
    (
        "C4",
        "nearby",
        "context",
        "proximity beyond surroundings: adjacent beats similar surroundings elsewhere",
    ),
)


class Controls(NamedTuple):
    """One seeded draw per successful attack (numpy arrays, N first)."""

    own_colour: np.ndarray  # (N, 3) random colour at the attack's position
    nearby_colour: np.ndarray  # (N, 3) random colour at the nearby position
    context_rc: np.ndarray  # (N, 2) context-matched position (the attack's if none)
    context_found: np.ndarray  # (N,) bool: some position within the tolerance
    context_candidates: np.ndarray  # (N,) int: how many positions qualified
    context_distance: np.ndarray  # (N,) the drawn position's context distance
    nearby_context_distance: np.ndarray  # (N,) the nearby move's context distance


def clean_margin(probs: jax.Array, labels: jax.Array) -> jax.Array:
    """p(true class) - the largest other probability, (N,), from probs (N, C)."""
    probs = jnp.asarray(probs, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    true = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, probs.shape[1], dtype=bool), -1.0, probs)
    return true - jnp.max(others, axis=1)


def window_features(image: jax.Array) -> jax.Array:
    """(H, W, 27): the 3x3 window of every pixel (edges replicated), float32."""
    height, width = image.shape[0], image.shape[1]
    padded = jnp.pad(jnp.asarray(image, jnp.float32), ((1, 1), (1, 1), (0, 0)), "edge")
    shifts = [
        padded[1 + dr : 1 + dr + height, 1 + dc : 1 + dc + width]
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
    ]
    return jnp.concatenate(shifts, axis=-1)


def context_distance(image: jax.Array, row: jax.Array, col: jax.Array) -> jax.Array:
    """(H, W): mean |difference| of every pixel's 3x3 window and (row, col)'s."""
    features = window_features(image)
    return jnp.mean(jnp.abs(features - features[row, col]), axis=-1)


def context_candidates(
    image: jax.Array,
    row: jax.Array,
    col: jax.Array,
    tolerance: float,
    min_distance: int,
) -> tuple[jax.Array, jax.Array]:
    """(mask (H, W) of context-matched positions, context distance (H, W))."""
    height, width = image.shape[0], image.shape[1]
    distance = context_distance(image, row, col)
    rr = jnp.arange(height)[:, None]
    cc = jnp.arange(width)[None, :]
    far = jnp.maximum(jnp.abs(rr - row), jnp.abs(cc - col)) >= min_distance
    return far & (distance <= tolerance), distance


def sample_context_matched(
    key: jax.Array,
    image: jax.Array,
    row: jax.Array,
    col: jax.Array,
    tolerance: float = CONTEXT_TOLERANCE,
    min_distance: int = CONTEXT_MIN_DISTANCE,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """One position uniform among the context-matched ones of one image.

    Returns (row, col, found, candidates, context distance of the draw); when no
    position qualifies, found is False and the attack's own position is returned
    (its result must be ignored).
    """
    mask, distance = context_candidates(image, row, col, tolerance, min_distance)
    return sample_from_mask(key, mask, distance, row, col)


def sample_from_mask(
    key: jax.Array, mask: jax.Array, distance: jax.Array, row: jax.Array, col: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """One position uniform among `mask` (H, W): (row, col, found, candidates,
    `distance` (H, W) at the draw); with an empty mask, found is False and
    (row, col) is returned (its result must be ignored)."""
    width = mask.shape[1]
    flat = mask.reshape(-1)
    found = jnp.any(flat)
    logits = jnp.where(flat, 0.0, -jnp.inf)
    choice = jax.random.categorical(key, jnp.where(found, logits, 0.0))
    choice = jnp.where(found, choice, row * width + col)
    return (
        choice // width,
        choice % width,
        found,
        flat.sum().astype(jnp.int32),
        distance.reshape(-1)[choice],
    )


def drawn_positions(
    draws: Sequence[jax.Array],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(position (N, 2) int32, found (N,) bool, candidates (N,) int32, distance
    (N,) float32) of N `sample_from_mask` draws, as the controls record them."""
    row, col, found, count, distance = (np.asarray(x) for x in draws)
    return (
        np.stack([row, col], axis=1).astype(np.int32),
        found.astype(bool),
        count.astype(np.int32),
        distance.astype(np.float32),
    )


def random_colour(key: jax.Array) -> jax.Array:
    """A colour (3,) int32 uniform over 0..255 per channel."""
    return jax.random.randint(key, (3,), 0, 256, jnp.int32)


@jax.jit
def _draw(base_key, indices, images, rows, cols, nearby_rc, tolerance, min_distance):
    keys = {
        s: locality.image_keys(jax.random.fold_in(base_key, s), indices)
        for s in (OWN_COLOUR_STREAM, NEARBY_COLOUR_STREAM, CONTEXT_STREAM)
    }
    own = jax.vmap(random_colour)(keys[OWN_COLOUR_STREAM])
    near = jax.vmap(random_colour)(keys[NEARBY_COLOUR_STREAM])
    context = jax.vmap(
        lambda k, im, r, c: sample_context_matched(k, im, r, c, tolerance, min_distance)
    )(keys[CONTEXT_STREAM], images, rows, cols)
    nearby_distance = jax.vmap(
        lambda im, r, c, nr, nc: context_distance(im, r, c)[nr, nc]
    )(images, rows, cols, nearby_rc[:, 0], nearby_rc[:, 1])
    return own, near, context, nearby_distance


def draw_controls(
    seed: int,
    indices: np.ndarray,
    images: Images,
    pixels: Perturbation,
    nearby_rc: np.ndarray,
    tolerance: float = CONTEXT_TOLERANCE,
    min_distance: int = CONTEXT_MIN_DISTANCE,
) -> Controls:
    """The controls' draws for successful attacks `pixels` (N, 1, 5) on clean images.

    Per image from fold_in(key, dataset_index) of the controls' own streams of
    `seed`; `nearby_rc` (N, 2): the protocol's nearby positions (the random colour
    "nearby" is put there, so it is paired with the nearby row).
    """
    locality.check_one_pixel(pixels)
    pixels = np.asarray(pixels)
    if len(pixels) == 0:
        empty = np.zeros((0, 3), np.int32)
        return Controls(
            empty, empty, *drawn_positions([np.zeros(0)] * 5), np.zeros(0, np.float32)
        )
    base = jax.random.fold_in(jax.random.key(seed), CONTROLS_STREAM)
    own, near, context, nearby_distance = jax.device_get(
        _draw(
            base,
            jnp.asarray(indices),
            jnp.asarray(images),
            jnp.asarray(pixels[:, 0, 0], jnp.int32),
            jnp.asarray(pixels[:, 0, 1], jnp.int32),
            jnp.asarray(nearby_rc, jnp.int32),
            float(tolerance),
            int(min_distance),
        )
    )
    return Controls(
        np.asarray(own, np.int32),
        np.asarray(near, np.int32),
        *drawn_positions(context),
        np.asarray(nearby_distance, np.float32),
    )


def evaluate_controls(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    labels: Labels,
    pixels: Perturbation,
    nearby_rc: jax.Array,
    own_colour: jax.Array,
    nearby_colour: jax.Array,
    context_rc: jax.Array,
) -> tuple[locality.Outcome, locality.Outcome, locality.Outcome]:
    """Outcomes (N,) of the random colour at the attack's and the nearby position
    and of the attack's colour at the context-matched position; jittable."""
    locality.check_one_pixel(pixels)
    pixels = jnp.asarray(pixels, jnp.int32)

    def with_colour(colour):
        return pixels.at[:, 0, 2:].set(jnp.asarray(colour, jnp.int32))

    own = locality.evaluate_moved(
        apply_fn,
        variables,
        images,
        labels,
        with_colour(own_colour),
        pixels[:, 0, 0],
        pixels[:, 0, 1],
    )
    near = locality.evaluate_moved(
        apply_fn,
        variables,
        images,
        labels,
        with_colour(nearby_colour),
        nearby_rc[:, 0],
        nearby_rc[:, 1],
    )
    context = locality.evaluate_moved(
        apply_fn, variables, images, labels, pixels, context_rc[:, 0], context_rc[:, 1]
    )
    return own, near, context


def clean_probabilities(
    apply_fn: ApplyFn, variables: Variables, images: Images
) -> jax.Array:
    """Softmax (N, C) of the model on clean images (N, H, W, C); jittable."""
    logits = apply_fn(variables, jnp.asarray(images).astype(jnp.float32))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


# ----- statistics of the controls (NumPy; from the per-attack arrays) -------------


def strata_masks(generation0: np.ndarray, quartile: np.ndarray) -> dict[str, Any]:
    """{stratum name: boolean mask (N,)} over successful attacks, in STRATA order."""
    generation0 = np.asarray(generation0, bool)
    quartile = np.asarray(quartile)
    masks = {"all": np.ones(generation0.shape, bool)}
    masks["generation 0"] = generation0
    masks["search"] = ~generation0
    for q in range(4):
        masks[f"margin Q{q + 1}"] = quartile == q
    return masks


def paired_test(first: np.ndarray, second: np.ndarray) -> dict[str, Any]:
    """Paired binary outcomes: counts, difference of rates, McNemar exact p, winner."""
    counts = stats.paired_counts(first, second)
    b, c, n = counts["only_first"], counts["only_second"], counts["n"]
    p = stats.mcnemar_exact(b, c)
    winner = "none shown"
    if p < ALPHA and b != c:
        winner = "first" if b > c else "second"
    return {
        **counts,
        "difference": (b - c) / n if n else None,
        "mcnemar_p": p,
        "winner": winner,
    }


def ring_rates(ring_n: np.ndarray, ring_success: np.ndarray) -> list[dict]:
    """Pooled Wilson rate per ring (columns d = 1..D) over the rows given."""
    return [
        stats.proportion(int(ring_success[:, d].sum()), int(ring_n[:, d].sum()))
        for d in range(ring_n.shape[1])
    ]


def stratum_summary(per_attack: dict[str, np.ndarray], mask: np.ndarray) -> dict:
    """Every rate of one stratum of successful attacks, and nearby vs random."""
    found = per_attack["context_found"][mask]
    out = {
        "successful_attacks": int(mask.sum()),
        "rings": ring_rates(
            per_attack["ring_n"][mask], per_attack["ring_success"][mask]
        ),
        "nearby_vs_random": paired_test(
            per_attack["nearby_success"][mask], per_attack["random_success"][mask]
        ),
    }
    for move, _ in MOVES:
        success = per_attack[f"{move}_success"][mask]
        if move == "context":
            success = success[found]
        out[move] = stats.proportion(int(success.sum()), int(success.size))
    out["context_not_found"] = int((~found).sum())
    return out


def distance_design(
    per_attack: dict[str, np.ndarray], adjusted: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(design (R, K), successes (R,), trials (R,), image (R,)) of the distance model.

    Rows: per successful attack, one per ring d = 1..D (binomial: its successes
    over its positions inside the image) and one for the random move (Bernoulli,
    at its own Chebyshev distance). Columns: intercept, distance, and when
    `adjusted` the clean margin and the generation-0 indicator.
    """
    ring_n, ring_s = per_attack["ring_n"], per_attack["ring_success"]
    n, rings = ring_n.shape
    distance = np.concatenate(
        [
            np.broadcast_to(np.arange(1, rings + 1, dtype=np.float64), (n, rings)),
            per_attack["random_distance"][:, None].astype(np.float64),
        ],
        axis=1,
    )
    successes = np.concatenate([ring_s, per_attack["random_success"][:, None]], axis=1)
    trials = np.concatenate([ring_n, np.ones((n, 1), np.int64)], axis=1)
    image = np.broadcast_to(np.arange(n)[:, None], distance.shape)
    columns = [np.ones_like(distance), distance]
    if adjusted:
        columns.append(np.broadcast_to(per_attack["margin"][:, None], distance.shape))
        columns.append(
            np.broadcast_to(
                per_attack["generation0"][:, None].astype(np.float64), distance.shape
            )
        )
    keep = (trials > 0).reshape(-1)
    design = np.stack([c.reshape(-1) for c in columns], axis=1)[keep]
    return (
        design,
        successes.reshape(-1)[keep].astype(np.float64),
        trials.reshape(-1)[keep].astype(np.float64),
        image.reshape(-1)[keep],
    )


COEFFICIENTS = {
    False: ("intercept", "distance"),
    True: ("intercept", "distance", "margin", "generation0"),
}


def distance_model(
    per_attack: dict[str, np.ndarray],
    adjusted: bool,
    rng: np.random.Generator,
    resamples: int,
) -> dict[str, Any]:
    """The logistic distance model: coefficients with bootstrap-over-images 95% CIs."""
    design, successes, trials, image = distance_design(per_attack, adjusted)
    names = COEFFICIENTS[adjusted]
    n_images = len(per_attack["ring_n"])
    result: dict[str, Any] = {"images": n_images, "rows": int(len(trials))}
    # Below MIN_STRATUM attacks the fit is not made: on a handful of images the
    # rows are often separable and every resample refits the same data, which
    # would print a zero-width "interval" that means nothing.
    result["too_few"] = n_images < MIN_STRATUM
    if result["too_few"]:
        for name in names:
            result[name] = {"estimate": None, "ci_low": None, "ci_high": None}
        result["bootstrap_failed"] = 0
        return result
    estimate, _ = stats.logistic_fit(design, successes, trials)
    weights = stats.bootstrap_counts(rng, n_images, resamples)[:, image]
    replicates, converged = stats.logistic_fit(design, successes, trials, weights)
    for j, name in enumerate(names):
        low, high = stats.percentile_interval(replicates[:, j])
        result[name] = {
            "estimate": _finite(estimate[j]),
            "ci_low": _finite(low),
            "ci_high": _finite(high),
        }
    result["bootstrap_failed"] = int((~converged).sum())
    return result


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def summarise_controls(
    per_attack: dict[str, np.ndarray],
    attacked: dict[str, np.ndarray],
    rng: np.random.Generator,
    resamples: int,
) -> dict[str, Any]:
    """Strata, paired controls, distance models and the verdict of one model.

    per_attack (successful attacks, N): generation0, margin, quartile, ring_n and
    ring_success (N, D), random_distance, context_found, and `<move>_success` for
    each of MOVES. attacked (all attacked images): margin, quartile, success.
    """
    masks = strata_masks(per_attack["generation0"], per_attack["quartile"])
    strata = {name: stratum_summary(per_attack, masks[name]) for name in STRATA}
    for q in range(4):
        in_q = attacked["quartile"] == q
        strata[f"margin Q{q + 1}"]["original_correct"] = stats.proportion(
            int(attacked["success"][in_q].sum()), int(in_q.sum())
        )
    strata["all"]["original_correct"] = stats.proportion(
        int(attacked["success"].sum()), int(attacked["success"].size)
    )
    found = per_attack["context_found"]
    controls = []
    for cid, first, second, meaning in PAIRED_CONTROLS:
        use = found if "context" in (first, second) else np.ones(found.shape, bool)
        test = paired_test(
            per_attack[f"{first}_success"][use], per_attack[f"{second}_success"][use]
        )
        controls.append(
            {"id": cid, "first": first, "second": second, "meaning": meaning, **test}
        )
    models = {
        "unadjusted": distance_model(per_attack, False, rng, resamples),
        "adjusted": distance_model(per_attack, True, rng, resamples),
    }
    return {
        "strata": strata,
        "controls": controls,
        "distance_models": models,
        "context": {
            "tolerance": CONTEXT_TOLERANCE,
            "min_distance": CONTEXT_MIN_DISTANCE,
            "not_found": int((~found).sum()),
            "successful_attacks": int(found.size),
            "median_candidates": _median(per_attack["context_candidates"][found]),
            "median_distance_drawn": _median(per_attack["context_distance"][found]),
            "median_distance_nearby": _median(per_attack["nearby_context_distance"]),
        },
        "verdict": verdict(strata, models["adjusted"]),
        "rule": VERDICT_RULE,
    }


def _median(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def verdict(strata: dict[str, dict], adjusted: dict[str, Any]) -> dict[str, Any]:
    """VERDICT_RULE applied: 'supported', 'not supported' or 'inconclusive'."""
    reasons = []
    counted = [
        s
        for s in STRATA[1:]
        if strata[s]["successful_attacks"] >= MIN_STRATUM  # "all" is not a stratum
    ]
    tests = {s: strata[s]["nearby_vs_random"] for s in counted}
    nearby_wins = [s for s in counted if tests[s]["winner"] == "first"]
    random_wins = [s for s in counted if tests[s]["winner"] == "second"]
    slope = adjusted["distance"]
    low, high = slope["ci_low"], slope["ci_high"]
    slope_negative = high is not None and high < 0
    slope_not_negative = low is not None and low >= 0
    if not counted:
        reasons.append(f"no stratum holds {MIN_STRATUM} successful attacks")
    if random_wins:
        reasons.append("random beats nearby in " + ", ".join(random_wins))
    missing = [s for s in counted if s not in nearby_wins]
    if missing:
        reasons.append("nearby does not beat random in " + ", ".join(missing))
    if adjusted.get("too_few"):
        reasons.append(
            f"the distance model is not fitted on fewer than {MIN_STRATUM} "
            "successful attacks"
        )
    elif slope_not_negative:
        reasons.append("the adjusted distance coefficient's interval lies at/above 0")
    elif not slope_negative:
        reasons.append("the adjusted distance coefficient's interval includes 0")
    if random_wins or slope_not_negative:
        outcome = "not supported"
    elif counted and not missing and slope_negative:
        outcome = "supported"
    else:
        outcome = "inconclusive"
    return {
        "outcome": outcome,
        "strata_counted": counted,
        "reasons": reasons or ["every condition of the rule holds"],
    }
