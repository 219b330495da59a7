"""Applying pixel perturbations: the one operation shared by attack, maps and locality.

A perturbation of k pixels is an int array (..., k, 5) of (row, col, r, g, b): the
pixel at (row, col) is *replaced* by the colour (r, g, b). Rows/cols must lie inside
the image and colours in 0..255; the result keeps the image's dtype. The functions
are jitted: called outside a jit, each shape compiles once, not op by op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from propmaps_jax.types import Images, Perturbation


@jax.jit
def apply_pixels(image: jax.Array, pixels: Perturbation) -> jax.Array:
    """Replace k pixels of one image (H, W, C) by the (row, col, r, g, b) rows (k, 5).

    When two of the k pixels share a position, the later one wins.
    """
    pixels = jnp.asarray(pixels)
    rows = pixels[:, 0].astype(jnp.int32)
    cols = pixels[:, 1].astype(jnp.int32)
    colours = pixels[:, 2:5].astype(image.dtype)

    # A sequential scan keeps "the later pixel wins" well defined for duplicates.
    def put(img, p):
        r, c, colour = p
        return img.at[r, c].set(colour), None

    image, _ = jax.lax.scan(put, image, (rows, cols, colours))
    return image


@jax.jit
def apply_pixels_batch(images: Images, pixels: Perturbation) -> jax.Array:
    """`apply_pixels` over a batch: images (N, H, W, C), pixels (N, k, 5)."""
    return jax.vmap(apply_pixels)(images, pixels)


def move_pixels(pixels: Perturbation, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """The same colours elsewhere: pixels (..., k, 5), new rows and cols (..., k)."""
    pixels = jnp.asarray(pixels)
    return pixels.at[..., 0].set(rows).at[..., 1].set(cols)
