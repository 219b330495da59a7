"""Array type aliases used across the library (documentation only)."""

from typing import Any, Callable

import jax

Array = jax.Array
PRNGKey = jax.Array
# uint8 or float images, NHWC, pixel values in 0..255.
Images = jax.Array
# int32 class indices, shape (N,).
Labels = jax.Array
# A perturbation of k pixels, shape (..., k, 5): (row, col, r, g, b) each.
Perturbation = jax.Array
# One layer's feature maps, (N, H, W, K).
FeatureMaps = jax.Array
# {layer_name: feature maps} in forward order: an OrderedDict, whose order (unlike
# a dict's) survives jax.jit.
LayerMaps = dict[str, jax.Array]
# Flax variables ({"params": ..., "batch_stats": ...}).
Variables = Any
# logits_fn(images float32 (N, H, W, 3) in 0..255) -> logits (N, classes).
LogitsFn = Callable[[jax.Array], jax.Array]
# apply_fn(variables, images float32 (N, H, W, 3) in 0..255) -> logits (N, classes),
# e.g. models.make_apply_fn(module): a model is this function plus its variables.
ApplyFn = Callable[[Variables, jax.Array], jax.Array]
# features_fn(variables, images as ApplyFn's) -> (logits (N, classes), {layer: (N,
# H, W, K)} an OrderedDict in forward order): the model contract of
# propmaps_jax.models.contract, e.g. models.linen_features(module).
FeaturesFn = Callable[[Variables, jax.Array], tuple[jax.Array, LayerMaps]]
