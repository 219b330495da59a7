"""Which attacks the paper's figures 2-6 show, chosen by rule from an attack table.

`claims.figure_examples` holds the rules over an attack table's columns (median
p(true) for figure 2, the largest last-layer max|dFM| / max FM for figures 5 and
6) and `claims.moved_by_one` figure 4's move; here are the model computations
they need (the last-layer ratio of the failed attacks, p(true) at each
neighbour), so that one call gives the attacks of the figures. Kept apart from
claims.py, whose git date is the date of the verdict rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax.analysis import propagation
from propmaps_jax.analysis.claims import figure_examples, moved_by_one, neighbours
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.models import logits_of
from propmaps_jax.types import ApplyFn, FeaturesFn, Variables


def neighbour_prob_true(
    apply_fn: ApplyFn,
    variables: Variables,
    image: np.ndarray,
    label: int,
    pixel: np.ndarray,
) -> dict[tuple[int, int], float]:
    """{neighbour position: p(label)} of the clean `image` with the colour of the
    one-pixel perturbation `pixel` (1, 5) put at each neighbour (Chebyshev
    distance 1) of its position: `moved_by_one`'s input (figure 4)."""
    height, width = image.shape[:2]
    moves = neighbours(int(pixel[0, 0]), int(pixel[0, 1]), height, width)
    candidates = np.repeat(pixel[None], len(moves), axis=0)
    candidates[:, 0, :2] = moves
    batch = np.broadcast_to(image, (candidates.shape[0], *image.shape))
    logits = jax.jit(apply_fn)(
        variables,
        apply_pixels_batch(jnp.asarray(batch, jnp.float32), jnp.asarray(candidates)),
    )
    p_true = np.asarray(jax.nn.softmax(logits)[:, label], np.float64)
    return dict(zip(moves, p_true, strict=True))


def paper_figure_examples(
    features_fn: FeaturesFn,
    variables: Variables,
    images: np.ndarray,
    labels: np.ndarray,
    table: dict[str, np.ndarray],
) -> list[tuple[str, int, np.ndarray, str]]:
    """The attacks of the paper's figures 2-6, chosen by rule from an attack table
    on the clean test `images`/`labels`: (figure, table row, pixels (k, 5), rule),
    ordered by figure ("2" and "3" are one attack; "4" is figure 2's colour moved
    by `moved_by_one`). Empty when nothing was attacked. The ratios are of
    `features_fn`'s layers (the paper's: `models.linen_features(module)`)."""
    failed = np.flatnonzero(table["attacked"] & ~table["success"])
    ratio = np.full(table["index"].shape, np.nan)
    ratio[failed] = propagation.last_layer_max_ratio(
        features_fn,
        variables,
        images[table["index"][failed]],
        table["pixels"][failed],
    )
    examples = []
    for figure, pick in figure_examples(table, ratio).items():
        row = pick["row"]
        examples.append((figure, row, table["pixels"][row], pick["rule"]))
        if figure == "2":
            index, pixel = int(table["index"][row]), table["pixels"][row]
            to = moved_by_one(
                neighbour_prob_true(
                    logits_of(features_fn),
                    variables,
                    images[index],
                    int(labels[index]),
                    pixel,
                )
            )
            moved = pixel.copy()
            moved[0, :2] = to
            examples.append(
                (
                    "4",
                    row,
                    moved,
                    "figure 2's colour moved to the neighbouring position (Chebyshev "
                    "distance 1) where p(true) stays highest",
                )
            )
    return sorted(examples, key=lambda e: e[0])
