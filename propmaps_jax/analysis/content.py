"""Receptive field or image content: one model's measures, clustered by image.

The locality study gives, per successful attack, the outcome of the attack's colour
at a nearby and at a random position and at every position of the rings around the
attacked pixel (`locality`). Positions of one image share its fragility, so:

- every rate over image-position pairs gets an interval from a bootstrap over
  images (`within_image.cluster_bootstrap`), never a Wilson interval over pairs;
- the effect of distance is estimated *within* images: a conditional (fixed-effects)
  logistic regression of ring success on Chebyshev distance, one stratum per image
  (`within_image.conditional_logit`), so an image-level covariate (margin, how easy
  the image was) can neither confound it nor change its scale;
- the same model with the **colour difference** between the moved-to pixel's
  original value and the attacked pixel's original value as a second covariate
  (Euclidean distance in RGB, 0..255 per channel, per 100 units). Under the image-
  content reading, distance adds little once the colour difference is in (a
  neighbour only works because it looks like the attacked pixel); under the
  receptive-field reading its coefficient stays.

For a pixel-permuted model the rings are also taken in the network's coordinates
(`locality.network_offset_positions`): distance is then the network-space
Chebyshev distance, the colour difference still the image's.

Everything here is NumPy on the host: the forwards are done by the caller.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from propmaps_jax.analysis import content_controls, locality, within_image

# Bootstrap resamples of the fixed-effects fits (each resample refits both models)
# and of the rates; the seed's stream is separate from the controls' draws.
FIT_RESAMPLES = 200
RATE_RESAMPLES = 2000
COLOUR_SCALE = 100.0  # the colour difference's unit, in 0..255 RGB distance


def colour_difference(
    images: np.ndarray, pixels: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """(N, P) RGB distance / COLOUR_SCALE between each clean image's pixel at
    (rows, cols) (N, P) and at its attack's position (pixels (N, 1, 5))."""
    images = np.asarray(images, np.float64)
    n = len(images)
    attacked = images[np.arange(n), pixels[:, 0, 0], pixels[:, 0, 1]]  # (N, 3)
    moved = images[np.arange(n)[:, None], rows, cols]  # (N, P, 3)
    return np.linalg.norm(moved - attacked[:, None, :], axis=-1) / COLOUR_SCALE


def ring_rows(
    images: np.ndarray,
    pixels: np.ndarray,
    ring_success: np.ndarray,
    ring_inside: np.ndarray,
    max_distance: int,
    permutation: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One row per (attack, ring position inside the image): the attack's row in
    its run (`attack`), Chebyshev distance, success, colour difference.

    `ring_success`/`ring_inside` (N, P) are at the offsets of
    `locality.chebyshev_offsets(max_distance)`, in image space, or with
    `permutation` in the network's coordinates of that pixel-permuted model.
    """
    offsets, distances = locality.chebyshev_offsets(max_distance)
    height, width = images.shape[1], images.shape[2]
    rows_attacked, cols_attacked = pixels[:, 0, 0], pixels[:, 0, 1]
    if permutation is None:
        rows, cols, _ = locality.offset_positions(
            rows_attacked, cols_attacked, offsets, height, width
        )
    else:
        rows, cols, _ = locality.network_offset_positions(
            rows_attacked, cols_attacked, offsets, permutation, height, width
        )
    rows, cols = np.asarray(rows), np.asarray(cols)
    colour = colour_difference(images, pixels, rows, cols)
    inside = np.asarray(ring_inside, bool)
    n = len(pixels)
    return {
        "attack": np.broadcast_to(np.arange(n)[:, None], inside.shape)[inside],
        "distance": np.broadcast_to(distances[None, :], inside.shape)[inside].astype(
            np.float64
        ),
        "success": np.asarray(ring_success, bool)[inside],
        "colour": colour[inside],
    }


def rows_to_arrays(rows: dict[str, np.ndarray], space: str) -> dict[str, np.ndarray]:
    """`ring_rows` as compact arrays named `<space>_<column>` (a run's file)."""
    return {
        f"{space}_attack": rows["attack"].astype(np.int32),
        f"{space}_distance": rows["distance"].astype(np.int8),
        f"{space}_success": rows["success"].astype(bool),
        f"{space}_colour": rows["colour"].astype(np.float32),
    }


def rows_from_arrays(
    arrays: dict[str, np.ndarray], space: str
) -> dict[str, np.ndarray]:
    """The `ring_rows` of one space back from `rows_to_arrays`' arrays."""
    return {
        "attack": arrays[f"{space}_attack"].astype(np.int64),
        "distance": arrays[f"{space}_distance"].astype(np.float64),
        "success": arrays[f"{space}_success"].astype(bool),
        "colour": arrays[f"{space}_colour"].astype(np.float64),
    }


# A resample's fit starts from the full sample's estimate and stops at this
# tolerance: far below the resamples' spread, and about half the iterations.
RESAMPLE_TOL = 1e-7


def _fit_both(
    rows: dict[str, np.ndarray], strata: np.ndarray, start: np.ndarray
) -> np.ndarray:
    """[distance alone; distance, colour adjusted] coefficients of one resample."""
    plain = within_image.conditional_logit(
        rows["success"],
        rows["distance"][:, None],
        strata,
        tol=RESAMPLE_TOL,
        start=start[:1],
    )
    both = within_image.conditional_logit(
        rows["success"],
        np.stack([rows["distance"], rows["colour"]], axis=1),
        strata,
        tol=RESAMPLE_TOL,
        start=start[1:],
    )
    return np.array([plain["coef"][0], both["coef"][0], both["coef"][1]])


def distance_effects(
    rows: dict[str, np.ndarray], seed: int, num_resamples: int = FIT_RESAMPLES
) -> dict[str, Any]:
    """The within-image distance coefficient, alone and adjusted for the colour
    difference, each with a 95% interval from a bootstrap over images (a resampled
    image drawn twice is two strata: `within_image.resampled_strata`).

    Returns {"distance": {...}, "colour_adjusted_distance": {...}, "colour": {...}}
    (estimate, lo, hi, se_cluster: the sandwich SE clustered by image), the images
    and rows that inform the fits, and whether both fits converged. Not fitted
    (None estimates) when fewer than 20 images have both outcomes among their rings.
    """
    strata = rows["attack"]
    plain = within_image.conditional_logit(
        rows["success"], rows["distance"][:, None], strata
    )
    both = within_image.conditional_logit(
        rows["success"], np.stack([rows["distance"], rows["colour"]], axis=1), strata
    )
    out: dict[str, Any] = {
        "images_informative": int(plain["n_groups_used"]),
        "rows_informative": int(plain["n_rows_used"]),
        "converged": bool(plain["converged"] and both["converged"]),
        "num_resamples": num_resamples,
    }
    names = ("distance", "colour_adjusted_distance", "colour")
    if not out["converged"] or plain["n_groups_used"] < MIN_INFORMATIVE_IMAGES:
        for name in names:
            out[name] = {"estimate": None, "lo": None, "hi": None, "se_cluster": None}
        out["not_fitted"] = (
            f"{plain['n_groups_used']} informative images (< {MIN_INFORMATIVE_IMAGES})"
            if out["converged"]
            else "the fit did not converge"
        )
        return out

    full = np.array([plain["coef"][0], both["coef"][0], both["coef"][1]])

    def statistic(sample: np.ndarray) -> np.ndarray:
        if len(sample) == len(strata) and np.array_equal(
            sample, np.arange(len(sample))
        ):
            return full  # the full sample: the fits above
        resampled = {k: v[sample] for k, v in rows.items()}
        return _fit_both(resampled, within_image.resampled_strata(sample, strata), full)

    boot = within_image.cluster_bootstrap(statistic, strata, num_resamples, seed)
    se = [plain["se_cluster"][0], both["se_cluster"][0], both["se_cluster"][1]]
    for i, name in enumerate(names):
        out[name] = {
            "estimate": float(boot["estimate"][i]),
            "lo": float(boot["lo"][i]),
            "hi": float(boot["hi"][i]),
            "se_cluster": float(se[i]),
        }
    out["failed_resamples"] = int(boot["failed"])
    return out


MIN_INFORMATIVE_IMAGES = 20


def ring_rates(
    rows: dict[str, np.ndarray], max_distance: int, seed: int
) -> list[dict[str, Any]]:
    """Per Chebyshev distance: the pooled success rate over (image, position) pairs
    with a 95% interval from a bootstrap over images."""
    out = []
    for d in range(1, max_distance + 1):
        at_d = rows["distance"] == d
        if not at_d.any():
            out.append({"distance": d, "rate": None, "lo": None, "hi": None, "n": 0})
            continue
        r = within_image.rate(
            rows["success"][at_d], rows["attack"][at_d], RATE_RESAMPLES, seed
        )
        out.append(
            {
                "distance": d,
                "rate": float(r["estimate"]),
                "lo": float(r["lo"]),
                "hi": float(r["hi"]),
                "n": int(at_d.sum()),
            }
        )
    return out


def move_rates(
    moves: dict[str, np.ndarray], clusters: np.ndarray, seed: int
) -> dict[str, Any]:
    """Each move's rate ({name: success (N,)}; "random" among them), each other
    move minus random and network_nearby minus nearby, with 95% intervals from a
    bootstrap over images (one attack per image, paired moves)."""
    names = list(moves)
    out: dict[str, Any] = {"rates": {}, "differences": {}}
    for name in names:
        r = within_image.rate(moves[name], clusters, RATE_RESAMPLES, seed)
        out["rates"][name] = interval_dict(r)
    pairs = [(m, "random") for m in names if m != "random"]
    if "network_nearby" in moves:
        pairs.append(("network_nearby", "nearby"))
    for first, second in pairs:
        r = within_image.rate_difference(
            moves[first], moves[second], clusters, RATE_RESAMPLES, seed
        )
        out["differences"][f"{first} - {second}"] = interval_dict(r)
    return out


def interval_dict(r: dict[str, Any]) -> dict[str, Any]:
    """{"estimate", "lo", "hi"} of a bootstrap result, None for what is not finite."""

    def number(v):
        return None if v is None or not np.isfinite(v) else float(v)

    return {
        "estimate": number(r["estimate"]),
        "lo": number(r["lo"]),
        "hi": number(r["hi"]),
    }


def clean_margin_logit(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) log p(true) - log p(runner-up) of clean softmax outputs (N, C)."""
    probs = np.asarray(probs)
    rows = np.arange(len(probs))
    p_true = probs[rows, labels]
    others = probs.copy()
    others[rows, labels] = -1.0
    return within_image.margin_logit(p_true, others.max(axis=1))


def controls_summary(
    moves: dict[str, np.ndarray],
    other_own: np.ndarray,
    other_nearby: np.ndarray,
    matched_success: np.ndarray,
    draws: content_controls.ContentControls,
    index: np.ndarray,
    margin_logit: np.ndarray,
    in_attacked: np.ndarray,
    generation0: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """The image-content controls of one model's successful attacks, with intervals
    from a bootstrap over images.

    Args:
      moves: {"nearby", "random"} successes (N,) of the protocol's moves.
      other_own, other_nearby: success (N,) of another attack's colour at the
        attack's own and at the nearby position (`content_controls` draws).
      matched_success: success (N,) of the attack's colour at the context- and
        centre-matched position (meaningful where `draws.matched_found`).
      index: (N,) test image of each attack (the bootstrap's clusters).
      margin_logit: (M,) clean margin logit of every attacked image; its quartiles
        are the strata; `in_attacked` (N,) places the attacks among them.
      generation0: (N,) found in DE's initial population.
    """
    found = draws.matched_found

    def rate(success, mask=None):
        mask = np.ones(len(success), bool) if mask is None else mask
        return interval_dict(
            within_image.rate(success[mask], index[mask], RATE_RESAMPLES, seed)
        )

    def diff(first, second, mask=None):
        mask = np.ones(len(first), bool) if mask is None else mask
        return interval_dict(
            within_image.rate_difference(
                first[mask], second[mask], index[mask], RATE_RESAMPLES, seed
            )
        )

    quartile, edges = within_image.logit_margin_strata(margin_logit)
    labels = np.array([f"margin logit Q{q + 1}" for q in quartile[in_attacked]], object)
    by_margin = content_controls.stratum_differences(
        moves["nearby"],
        moves["random"],
        labels,
        [f"margin logit Q{q}" for q in range(1, 5)],
        index,
        RATE_RESAMPLES,
        seed,
    )
    by_generation = content_controls.stratum_differences(
        moves["nearby"],
        moves["random"],
        np.where(generation0, "generation 0", "search"),
        ["generation 0", "search"],
        index,
        RATE_RESAMPLES,
        seed,
    )
    return {
        "other_attack_colour_at_attack": rate(other_own),
        "other_attack_colour_at_nearby": rate(other_nearby),
        "nearby_minus_other_colour_at_nearby": diff(moves["nearby"], other_nearby),
        "centre_matched": {
            "found": int(found.sum()),
            "drop_rate": draws.drop_rate,
            "median_candidates": float(np.median(draws.matched_candidates))
            if len(index)
            else None,
            "rate": rate(matched_success, found),
            "minus_random": diff(matched_success, moves["random"], found),
            "nearby_minus": diff(moves["nearby"], matched_success, found),
        },
        "margin_logit_edges": [float(e) for e in edges],
        "nearby_minus_random_by_stratum": by_margin + by_generation[1:],
    }
