"""Fairer colour and context controls for the locality study.

The locality study puts a successful attack's colour (row, col, r, g, b) at other
positions of the clean image. `locality_controls` compares it with two controls
that turned out to be unfair in ways the numbers can be traced to:

- its colour control draws a *uniform* random RGB colour, but the attacks' colours
  are extreme: 44-51% of successful attack channel values are exactly 0 or 255,
  against 0.8% for uniform draws. "Attack's colour beats a random colour" then
  measures contrast as much as colour. Here the control colour is the colour of
  *another successful attack of the same run* (`sample_attack_colours`), drawn
  uniformly among the others: the attacks' own colour distribution, extremes
  included, but not this image's attack;
- its context-matched position (3x3 neighbourhood within a tolerance of the attack
  position's, Chebyshev distance >= 3) is not matched on where it sits in the
  image, while 59-68% of the attacked pixels are central. Here the position must
  also lie at the same distance from the image centre, within `centre_tolerance`
  pixels (`sample_context_and_centre_matched`), so a difference between the
  attack's and the matched position cannot be the centre's.

Paired differences of two moves on the same attacks, per stratum, get an interval
from a bootstrap over images (`stratum_differences`, through
`within_image.rate_difference`); no pass/fail threshold is applied here.

Everything is pure; the model forwards are the caller's (`locality.evaluate_moved`
with the drawn colours and positions). Random draws use one key per image,
fold_in(key, dataset_index), of streams of their own (CONTENT_CONTROLS_STREAM), so
they never depend on batching and never reuse the attack's, the protocol's or the
first controls' randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax.analysis import locality, locality_controls, within_image
from propmaps_jax.errors import PropmapsError
from propmaps_jax.types import Images, Perturbation, PRNGKey

CONTENT_CONTROLS_STREAM = 0xC0C0
# Sub-streams: another attack's colour for the attack's own position, an
# independent one for the nearby position, the context-and-centre-matched position.
OWN_COLOUR_STREAM, NEARBY_COLOUR_STREAM, CENTRE_MATCHED_STREAM = 0, 1, 2
# One pixel: candidates lie in an annulus 2 pixels wide around the attack's distance
# from the centre; on a 32x32 image those distances run from 0.7 to 21.9, so the
# tolerance is about 5% of their range.
CENTRE_TOLERANCE = 1.0


class ContentControls(NamedTuple):
    """One seeded draw per successful attack (numpy arrays, N first)."""

    attack_colour_own: np.ndarray  # (N, 3) another attack's colour, own position
    attack_colour_nearby: np.ndarray  # (N, 3) another draw, for the nearby position
    matched_rc: np.ndarray  # (N, 2) context-and-centre-matched (attack's if none)
    matched_found: np.ndarray  # (N,) bool: some position met all three conditions
    matched_candidates: np.ndarray  # (N,) int: how many positions qualified
    matched_context_distance: np.ndarray  # (N,) the drawn position's context distance

    @property
    def drop_rate(self) -> float | None:
        """Fraction of attacks without a matched position (None when N == 0)."""
        found = np.asarray(self.matched_found, bool)
        return float(np.mean(~found)) if found.size else None


# ----- another attack's colour ------------------------------------------------------


def _check_indices(indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise PropmapsError(f"dataset indices must be (N,), got shape {indices.shape}")
    if len(np.unique(indices)) != len(indices):
        raise PropmapsError(
            "dataset indices must be distinct (one successful attack per image): the "
            "other-attack colour is drawn from the run's pool of attacks by index"
        )
    return indices


def other_attack_rows(key: PRNGKey, indices: jax.Array) -> jax.Array:
    """Row (N,) of another attack for each attack, uniform among the other N - 1.

    Image k draws j uniform in 0..N-2 from its own key fold_in(key, k) only; j is
    the j-th of the *other* attacks in the order of their dataset indices (not of
    the batch), so the draw does not depend on batch order. It does depend on the
    pool: adding or removing an attack changes N and the order, hence which
    attack j names. With N == 1 there is no other attack: the row itself is
    returned. Dataset indices must be distinct; jittable.
    """
    indices = jnp.asarray(indices)
    n = indices.shape[0]
    if n <= 1:
        return jnp.arange(n, dtype=jnp.int32)
    order = jnp.argsort(indices).astype(jnp.int32)  # sorted position -> row
    rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    draw = jax.vmap(lambda k: jax.random.randint(k, (), 0, n - 1, jnp.int32))(
        locality.image_keys(key, indices)
    )
    # Skip over the attack's own place in the sorted pool: uniform over the others.
    return order[draw + (draw >= rank).astype(jnp.int32)]


_other_attack_rows = jax.jit(other_attack_rows)


def _stream_key(seed: int, stream: int) -> PRNGKey:
    base = jax.random.fold_in(jax.random.key(seed), CONTENT_CONTROLS_STREAM)
    return jax.random.fold_in(base, stream)


def sample_attack_colours(
    key_seed: int,
    indices: np.ndarray,
    colours: np.ndarray,
    stream: int = OWN_COLOUR_STREAM,
) -> np.ndarray:
    """(N, 3) int32: for each successful attack, another successful attack's colour.

    Args:
      key_seed: the run's seed; the draws use its CONTENT_CONTROLS_STREAM, sub-stream
        `stream`, one key per image fold_in(., dataset index).
      indices: (N,) distinct dataset indices of the run's successful attacks.
      colours: (N, 3) their colours (r, g, b).
      stream: OWN_COLOUR_STREAM or NEARBY_COLOUR_STREAM (independent draws).
    Returns:
      (N, 3): the colour of an attack drawn uniformly among the other N - 1
      (`other_attack_rows`: the index drawn uses only image k's key; which attack
      it names depends on the pool, the run's successful attacks). It can equal
      the attack's own colour when two attacks share a colour. With N == 1 there is
      no other attack and the attack's own colour is returned: callers must report
      that case (the control is then no control).
    """
    indices = _check_indices(indices)
    colours = np.asarray(colours)
    if colours.shape != (len(indices), 3):
        raise PropmapsError(
            f"colours must be (N, 3) for N = {len(indices)} indices, got "
            f"{colours.shape}"
        )
    if len(indices) == 0:
        return np.zeros((0, 3), np.int32)
    rows = np.asarray(_other_attack_rows(_stream_key(key_seed, stream), indices))
    return colours[rows].astype(np.int32)


# ----- context- and centre-matched position -----------------------------------------


def distance_from_centre(
    rows: jax.Array, cols: jax.Array, height: int, width: int
) -> jax.Array:
    """Euclidean distance (float32) of (rows, cols) from ((H - 1) / 2, (W - 1) / 2)."""
    dr = jnp.asarray(rows, jnp.float32) - (height - 1) / 2.0
    dc = jnp.asarray(cols, jnp.float32) - (width - 1) / 2.0
    return jnp.sqrt(dr * dr + dc * dc)


def sample_context_and_centre_matched(
    key: PRNGKey,
    image: jax.Array,
    row: jax.Array,
    col: jax.Array,
    tolerance: float = locality_controls.CONTEXT_TOLERANCE,
    min_distance: int = locality_controls.CONTEXT_MIN_DISTANCE,
    centre_tolerance: float = CENTRE_TOLERANCE,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """One position uniform among the context- and centre-matched ones of one image.

    A candidate's 3x3 window is within `tolerance` of the attack position's
    (`locality_controls.context_candidates`), it lies at Chebyshev distance >=
    `min_distance` from it, and its distance from the image centre differs from
    the attack's by at most `centre_tolerance` pixels. Returns (row, col, found,
    candidates, context distance of the draw); when no position qualifies, found
    is False and the attack's own position is returned (ignore its result).
    """
    height, width = image.shape[0], image.shape[1]
    context, distance = locality_controls.context_candidates(
        image, row, col, tolerance, min_distance
    )
    centre = distance_from_centre(
        jnp.arange(height)[:, None], jnp.arange(width)[None, :], height, width
    )
    same_ring = jnp.abs(centre - centre[row, col]) <= centre_tolerance
    return locality_controls.sample_from_mask(
        key, context & same_ring, distance, row, col
    )


@jax.jit
def _draw(base_key, indices, images, rows, cols, tolerance, min_distance, centre_tol):
    def stream(s):
        return jax.random.fold_in(base_key, s)

    own = other_attack_rows(stream(OWN_COLOUR_STREAM), indices)
    nearby = other_attack_rows(stream(NEARBY_COLOUR_STREAM), indices)
    matched = jax.vmap(
        lambda k, im, r, c: sample_context_and_centre_matched(
            k, im, r, c, tolerance, min_distance, centre_tol
        )
    )(locality.image_keys(stream(CENTRE_MATCHED_STREAM), indices), images, rows, cols)
    return own, nearby, matched


def draw_content_controls(
    seed: int,
    indices: np.ndarray,
    images: Images,
    pixels: Perturbation,
    tolerance: float = locality_controls.CONTEXT_TOLERANCE,
    min_distance: int = locality_controls.CONTEXT_MIN_DISTANCE,
    centre_tolerance: float = CENTRE_TOLERANCE,
) -> ContentControls:
    """The content controls' draws for successful attacks `pixels` (N, 1, 5).

    `images` (N, H, W, C) are the clean images, `indices` (N,) their distinct
    dataset indices: the pool of the other-attack colours is these N attacks
    (`sample_attack_colours`; with N == 1 both colours are the attack's own).
    Per image from fold_in(key, dataset_index) of the content controls' streams of
    `seed`. The drop rate (`ContentControls.drop_rate`) is the fraction of attacks
    for which no position met the three conditions.
    """
    locality.check_one_pixel(pixels)
    pixels = np.asarray(pixels)
    indices = _check_indices(indices)
    if len(indices) != len(pixels) or len(np.shape(images)) != 4:
        raise PropmapsError(
            f"need indices (N,), images (N, H, W, C) and pixels (N, 1, 5), got "
            f"{indices.shape}, {np.shape(images)} and {pixels.shape}"
        )
    colours = pixels[:, 0, 2:].astype(np.int32)
    if len(pixels) == 0:
        empty = np.zeros((0, 3), np.int32)
        return ContentControls(
            empty, empty, *locality_controls.drawn_positions([np.zeros(0)] * 5)
        )
    base = jax.random.fold_in(jax.random.key(seed), CONTENT_CONTROLS_STREAM)
    own, nearby, matched = jax.device_get(
        _draw(
            base,
            jnp.asarray(indices),
            jnp.asarray(images),
            jnp.asarray(pixels[:, 0, 0], jnp.int32),
            jnp.asarray(pixels[:, 0, 1], jnp.int32),
            float(tolerance),
            int(min_distance),
            float(centre_tolerance),
        )
    )
    return ContentControls(
        colours[np.asarray(own)],
        colours[np.asarray(nearby)],
        *locality_controls.drawn_positions(matched),
    )


# ----- paired differences per stratum -----------------------------------------------


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def stratum_differences(
    first: np.ndarray,
    second: np.ndarray,
    strata_labels: np.ndarray,
    strata_names: Sequence[Any],
    clusters: np.ndarray,
    num_resamples: int = 2000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """rate(first) - rate(second) of two moves on the same attacks, per stratum.

    Args:
      first, second: (N,) booleans, the two moves' success on the same attacks.
      strata_labels: (N,) the stratum of each attack (compared with the names).
      strata_names: the strata to report, in order, after "all".
      clusters: (N,) the image of each attack (the bootstrap resamples images).
    Returns:
      One dict per stratum, "all" first: {"stratum", "n", "first_rate",
      "second_rate", "estimate", "lo", "hi"}, the interval the 95% percentile
      interval of `within_image.rate_difference` (seed `seed` in every stratum);
      for an empty stratum n is 0 and the rest None. No threshold is applied.
    """
    labels = np.asarray(strata_labels)
    clusters = np.asarray(clusters)
    if labels.shape != np.shape(first) or clusters.shape != np.shape(first):
        raise PropmapsError(
            f"strata_labels {labels.shape} and clusters {clusters.shape} must have "
            f"the shape of first {np.shape(first)}"
        )
    if "all" in list(strata_names):
        raise PropmapsError('"all" is reported first already: leave it out of names')
    first, second = np.asarray(first), np.asarray(second)
    masks = [("all", np.ones(labels.shape, bool))]
    masks += [(name, labels == name) for name in strata_names]
    out = []
    for name, mask in masks:
        row: dict[str, Any] = {"stratum": name, "n": int(mask.sum())}
        keys = ("first_rate", "second_rate", "estimate", "lo", "hi")
        if not mask.any():
            out.append({**row, **dict.fromkeys(keys)})
            continue
        result = within_image.rate_difference(
            first[mask], second[mask], clusters[mask], num_resamples, seed
        )
        out.append({**row, **{k: _number(result[k]) for k in keys}})
    return out
