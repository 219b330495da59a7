"""Locality of the one-pixel attack (paper, section 7): same colour, other position.

For a successful one-pixel attack (row, col, r, g, b) on a clean image, the colour
is kept and put at another position of the *clean* image:
- nearby: one of the 8 adjacent pixels, uniformly among those inside the image;
- random: one pixel uniformly over the image, the original position excluded
  (H*W - 1 candidates);
- rings: every position at Chebyshev distance exactly d (d = 1 is "all
  neighbours"), as fixed-size offset arrays with an "inside the image" mask, so
  shapes never depend on where the pixel is;
- vulnerability map: the colour at every one of the H*W positions;
- for a pixel-permuted model (`models.LeNet` with a permutation), the same nearby
  and rings taken in the *network's* coordinates (`network_protocol_moves`): image
  positions that the permutation puts next to the attacked pixel.
Success means the predicted class differs from the label (untargeted).

Locality is defined here for one-pixel attacks only (k = 1): functions that take
perturbations raise a PropmapsError for k > 1. Random choices use one key per image,
`fold_in(key, dataset_index)`, so results never depend on batching. Everything is
pure and jittable (heights, widths, distances and chunk sizes are static); the
model is `apply_fn(variables, images)` with the variables an ordinary argument.
`moves_program` and `vulnerability_program` are the jitted programs the
experiments run, cached on what decides the program (the variables are their first
argument).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax.attack.perturb import apply_pixels_batch, move_pixels
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models.nets import check_permutation, inverse_permutation
from propmaps_jax.types import (
    ApplyFn,
    Images,
    Labels,
    Perturbation,
    PRNGKey,
    Variables,
)


class Outcome(NamedTuple):
    """Model outcome on moved perturbations: predicted class, p(true class), success."""

    pred: jax.Array
    prob_true: jax.Array
    success: jax.Array


def check_one_pixel(pixels: Perturbation) -> None:
    """Raise a PropmapsError unless `pixels` (..., k, 5) is a one-pixel perturbation."""
    shape = tuple(np.shape(pixels))
    if len(shape) < 2 or shape[-1] != 5:
        raise PropmapsError(
            f"perturbations must have shape (..., k, 5) (row, col, r, g, b), "
            f"got {shape}"
        )
    if shape[-2] != 1:
        raise PropmapsError(
            f"locality is defined for one-pixel attacks (k = 1), got k = {shape[-2]}; "
            "pass perturbations of one pixel (an attack with pixels=1)"
        )


def chebyshev_offsets(max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (P, 2) (drow, dcol) at Chebyshev distance 1..D and their distances (P,).

    P = 4 D (D + 1); ordered by distance, then row-major inside each ring.
    """
    if max_distance < 1:
        raise PropmapsError(f"the maximum distance must be >= 1, got {max_distance}")
    offsets, distances = [], []
    for d in range(1, max_distance + 1):
        for dr in range(-d, d + 1):
            for dc in range(-d, d + 1):
                if max(abs(dr), abs(dc)) == d:
                    offsets.append((dr, dc))
                    distances.append(d)
    return np.asarray(offsets, np.int32), np.asarray(distances, np.int32)


def ring_offsets(distance: int) -> np.ndarray:
    """Offsets (8 d, 2) of all positions at Chebyshev distance exactly `distance`."""
    offsets, distances = chebyshev_offsets(distance)
    return offsets[distances == distance]


def offset_positions(
    rows: jax.Array, cols: jax.Array, offsets: np.ndarray, height: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Positions (..., P) at `offsets` (P, 2) from (rows, cols) (...), and inside mask.

    Positions outside the image are clipped to the border (harmless to evaluate) and
    marked False in the mask: ignore their results.
    """
    rows = jnp.asarray(rows, jnp.int32)[..., None] + jnp.asarray(offsets[:, 0])
    cols = jnp.asarray(cols, jnp.int32)[..., None] + jnp.asarray(offsets[:, 1])
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    return jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1), inside


def ring_positions(
    rows: jax.Array, cols: jax.Array, distance: int, height: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(rows, cols, inside) (..., 8 d) of the ring at Chebyshev distance `distance`."""
    return offset_positions(rows, cols, ring_offsets(distance), height, width)


def neighbour_positions(
    rows: jax.Array, cols: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(rows, cols, inside) (..., 8) of the 8 adjacent pixels (ring at distance 1)."""
    return ring_positions(rows, cols, 1, height, width)


def image_keys(key: PRNGKey, indices: jax.Array) -> jax.Array:
    """One key per image: fold_in(key, dataset_index), for indices (N,)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices))


@functools.partial(jax.jit, static_argnums=(4, 5))
def sample_nearby(
    key: PRNGKey,
    indices: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    height: int,
    width: int,
) -> tuple[jax.Array, jax.Array]:
    """One adjacent pixel per image (N,), uniform among the neighbours in the image."""
    near_rows, near_cols, inside = neighbour_positions(rows, cols, height, width)
    logits = jnp.where(inside, 0.0, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(image_keys(key, indices), logits)[:, None]
    return (
        jnp.take_along_axis(near_rows, choice, axis=1)[:, 0],
        jnp.take_along_axis(near_cols, choice, axis=1)[:, 0],
    )


@functools.partial(jax.jit, static_argnums=(4, 5))
def sample_random(
    key: PRNGKey,
    indices: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    height: int,
    width: int,
) -> tuple[jax.Array, jax.Array]:
    """One pixel per image (N,), uniform over the H*W - 1 positions but (row, col)."""
    original = jnp.asarray(rows, jnp.int32) * width + jnp.asarray(cols, jnp.int32)
    draw = jax.vmap(
        lambda k: jax.random.randint(k, (), 0, height * width - 1, jnp.int32)
    )(image_keys(key, indices))
    # Skip over the original position: a uniform draw over the other H*W - 1.
    flat = draw + (draw >= original).astype(draw.dtype)
    return flat // width, flat % width


# The locality protocol's stream, separate from the attack's fold_in(key(seed), index).
LOCALITY_STREAM = 0x10CA1
NEARBY_STREAM, RANDOM_STREAM, NETWORK_NEARBY_STREAM = 0, 1, 2


def network_offset_positions(
    rows: jax.Array,
    cols: jax.Array,
    offsets: np.ndarray,
    permutation: np.ndarray,
    height: int,
    width: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Image positions (..., P) at `offsets` (P, 2) from (rows, cols) *in the
    network's coordinates* of a pixel-permuted model, and the inside mask.

    The network's input position j holds the image's pixel `permutation[j]`
    (`models.permute_pixels`): the attacked image pixel p sits at network position
    q = inv[p]; its network neighbour q + offset holds image pixel
    permutation[q + offset], which is where the colour must go in the image to land
    next to the attacked pixel in the network. Outside the network's input: masked
    False (the position returned is harmless to evaluate).
    """
    perm = jnp.asarray(np.asarray(permutation, np.int32))
    inverse = jnp.asarray(_inverse(permutation))
    flat = inverse[jnp.asarray(rows, jnp.int32) * width + jnp.asarray(cols, jnp.int32)]
    net_rows, net_cols, inside = offset_positions(
        flat // width, flat % width, offsets, height, width
    )
    image_flat = perm[net_rows * width + net_cols]
    return image_flat // width, image_flat % width, inside


def _inverse(permutation: np.ndarray) -> np.ndarray:
    check_permutation(permutation, np.size(permutation), "the network-space moves")
    return inverse_permutation(permutation)


def network_protocol_moves(
    seed: int,
    indices: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    permutation: np.ndarray,
    height: int,
    width: int,
) -> np.ndarray:
    """The network-space nearby positions (N, 2), in image coordinates, of pixels
    (rows, cols) of a pixel-permuted model: one of the attacked pixel's 8
    neighbours *in the network's input*, uniformly among those inside it, drawn as
    `protocol_moves` draws the image-space nearby (own stream, one key per image).
    """
    if height * width != np.size(permutation):
        raise PropmapsError(
            f"the pixel permutation has {np.size(permutation)} positions, the images "
            f"{height}x{width}"
        )
    base = jax.random.fold_in(jax.random.key(seed), LOCALITY_STREAM)
    key = jax.random.fold_in(base, NETWORK_NEARBY_STREAM)
    img_rows, img_cols, inside = network_offset_positions(
        rows, cols, ring_offsets(1), permutation, height, width
    )
    logits = jnp.where(inside, 0.0, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(image_keys(key, indices), logits)[:, None]
    return np.stack(
        [
            np.asarray(jnp.take_along_axis(img_rows, choice, axis=1)[:, 0]),
            np.asarray(jnp.take_along_axis(img_cols, choice, axis=1)[:, 0]),
        ],
        axis=1,
    )


def protocol_moves(
    seed: int,
    indices: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    height: int,
    width: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The locality protocol's (nearby, random) positions (N, 2) of pixels (rows, cols).

    Per image from fold_in(key, dataset_index) of the protocol's own streams of
    `seed`, so they depend on neither batching nor on which study draws them (the
    locality and the salience experiments draw the same positions).
    """
    base = jax.random.fold_in(jax.random.key(seed), LOCALITY_STREAM)
    nearby = sample_nearby(
        jax.random.fold_in(base, NEARBY_STREAM), indices, rows, cols, height, width
    )
    random = sample_random(
        jax.random.fold_in(base, RANDOM_STREAM), indices, rows, cols, height, width
    )
    return np.stack(nearby, axis=1), np.stack(random, axis=1)


def _outcome(logits: jax.Array, labels: jax.Array) -> Outcome:
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    prob_true = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    return Outcome(pred, prob_true, pred != labels)


def evaluate_moved(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    labels: Labels,
    pixels: Perturbation,
    rows: jax.Array,
    cols: jax.Array,
) -> Outcome:
    """The model on clean images (N, H, W, C) with the pixel (N, 1, 5) at (rows, cols).

    rows/cols have shape (N,) or (N, P) (P positions per image, one forward pass
    each, all in one batch); every field of the Outcome has that shape.
    """
    check_one_pixel(pixels)
    rows, cols = jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)
    n, positions_shape = rows.shape[0], rows.shape[1:]
    per_image = int(np.prod(positions_shape, dtype=np.int64))
    flat_rows = rows.reshape(n * per_image, 1)
    flat_cols = cols.reshape(n * per_image, 1)
    flat_pixels = jnp.repeat(jnp.asarray(pixels), per_image, axis=0)
    flat_images = jnp.repeat(jnp.asarray(images), per_image, axis=0)
    flat_labels = jnp.repeat(jnp.asarray(labels, jnp.int32), per_image, axis=0)
    moved = move_pixels(flat_pixels, flat_rows, flat_cols)
    logits = apply_fn(
        variables, apply_pixels_batch(flat_images, moved).astype(jnp.float32)
    )
    out = _outcome(logits, flat_labels)
    return Outcome(*(x.reshape((n, *positions_shape)) for x in out))


def evaluate_offsets(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    labels: Labels,
    pixels: Perturbation,
    offsets: np.ndarray,
) -> tuple[Outcome, jax.Array]:
    """(Outcome (N, P), inside (N, P)): each pixel moved by each of `offsets` (P, 2)."""
    check_one_pixel(pixels)
    height, width = images.shape[1], images.shape[2]
    pixels = jnp.asarray(pixels)
    rows, cols, inside = offset_positions(
        pixels[:, 0, 0], pixels[:, 0, 1], offsets, height, width
    )
    outcome = evaluate_moved(apply_fn, variables, images, labels, pixels, rows, cols)
    return outcome, inside


def vulnerability_map(
    apply_fn: ApplyFn,
    variables: Variables,
    image: jax.Array,
    label: jax.Array,
    colour: jax.Array,
    chunk_size: int = 256,
) -> Outcome:
    """The colour (3,) at every position of one clean image (H, W, C): Outcome (H, W).

    One forward pass per position, `chunk_size` positions per batch.
    """
    height, width = image.shape[0], image.shape[1]
    total = height * width
    chunks = -(-total // chunk_size)
    flat = jnp.arange(chunks * chunk_size, dtype=jnp.int32) % total  # padded, wraps
    colour = jnp.asarray(colour, jnp.int32).reshape(1, 3)
    label = jnp.asarray(label, jnp.int32)

    def one_chunk(positions: jax.Array) -> Outcome:
        pixels = jnp.concatenate(
            [
                (positions // width)[:, None],
                (positions % width)[:, None],
                jnp.broadcast_to(colour, (chunk_size, 3)),
            ],
            axis=1,
        )[:, None, :]
        images = jnp.broadcast_to(image, (chunk_size, *image.shape))
        adversarial = apply_pixels_batch(images, pixels).astype(jnp.float32)
        logits = apply_fn(variables, adversarial)
        return _outcome(logits, jnp.full((chunk_size,), label))

    out = jax.lax.map(one_chunk, flat.reshape(chunks, chunk_size))
    return Outcome(*(x.reshape(-1)[:total].reshape(height, width) for x in out))


@functools.cache
def moves_program(apply_fn: ApplyFn, max_distance: int):
    """Jitted: nearby, random and ring outcomes of a fixed-size batch of images.

    `(variables, images, labels, pixels, nearby_rc, random_rc) -> (nearby Outcome,
    random Outcome, ring Outcome (N, P), inside (N, P))` for the offsets of
    `chebyshev_offsets(max_distance)`. Cached on what decides the program; the
    variables are its first argument.
    """
    offsets, _ = chebyshev_offsets(max_distance)

    @jax.jit
    def evaluate(variables, images, labels, pixels, nearby_rc, random_rc):
        def moved_to(rc):
            return evaluate_moved(
                apply_fn, variables, images, labels, pixels, rc[:, 0], rc[:, 1]
            )

        rings, inside = evaluate_offsets(
            apply_fn, variables, images, labels, pixels, offsets
        )
        return moved_to(nearby_rc), moved_to(random_rc), rings, inside

    return evaluate


@functools.cache
def network_moves_program(
    apply_fn: ApplyFn, max_distance: int, permutation: tuple[int, ...]
):
    """Jitted: the network-space nearby and ring outcomes of a pixel-permuted model.

    `(variables, images, labels, pixels, netnearby_rc) -> (nearby Outcome, ring
    Outcome (N, P), inside (N, P))`, the rings at the offsets of
    `chebyshev_offsets(max_distance)` taken in the network's coordinates
    (`network_offset_positions`).
    """
    offsets, _ = chebyshev_offsets(max_distance)
    perm = np.asarray(permutation, np.int32)

    @jax.jit
    def evaluate(variables, images, labels, pixels, netnearby_rc):
        height, width = images.shape[1], images.shape[2]
        pixels = jnp.asarray(pixels)
        rows, cols, inside = network_offset_positions(
            pixels[:, 0, 0], pixels[:, 0, 1], offsets, perm, height, width
        )
        rings = evaluate_moved(apply_fn, variables, images, labels, pixels, rows, cols)
        nearby = evaluate_moved(
            apply_fn,
            variables,
            images,
            labels,
            pixels,
            netnearby_rc[:, 0],
            netnearby_rc[:, 1],
        )
        return nearby, rings, inside

    return evaluate


@functools.cache
def vulnerability_program(apply_fn: ApplyFn, chunk_size: int):
    """Jitted `vulnerability_map` of one image, `(variables, image, label, colour)`,
    cached on what decides the program."""
    return jax.jit(
        lambda variables, image, label, colour: vulnerability_map(
            apply_fn, variables, image, label, colour, chunk_size
        )
    )
