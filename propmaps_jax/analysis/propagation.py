"""Propagation maps (paper sections 4-6): how a perturbation spreads through layers.

For a layer with feature maps FM (N, H, W, K) of the natural images and FM_adv of
the perturbed ones, the propagation maps reduce the difference over the K channels:

- PM_max = max_k |FM - FM_adv|  (paper equation 6)
- PM_avg = mean_k |FM - FM_adv| (paper equation 7)

The paper's text speaks of *absolute* differences ("how strong is the maximum
difference") while its equations are signed; we default to the absolute difference,
and `signed=True` gives the equations literally (max_k / mean_k of FM - FM_adv).
The per-layer scalar summaries (`layer_summaries`) use absolute differences unless
asked for the signed ones.

Every function takes the model as `features_fn(variables, images) -> (logits,
layers)`, the contract of `propmaps_jax.models.contract`: any JAX model whose layers
are feature maps (N, H, W, K) in forward order. Which tensors are "the feature
maps" is the model's choice; for a linen module `models.linen_features(module,
kind)` takes a `models.LAYER_KINDS` name: by default the raw convolution outputs;
"conv_relu" ReLU of them (LeNet's activations, as its ReLU follows each
convolution) and "bn_relu" ReLU of every BatchNorm output (the activations of the
pre-activation ResNet, whose every ReLU follows a BatchNorm).

Everything here is pure: arrays in, arrays out; `jax.jit` is applied by callers
(close over the model, or pass it as a static argument; pass the variables as an
argument). Per-layer results are `OrderedDict`s in forward order, also through
`jax.jit`.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax import batching
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import call_features, check_model
from propmaps_jax.types import FeatureMaps, FeaturesFn, Images, LayerMaps, Variables

REDUCTIONS = ("max", "avg")
# A position "is reached" when PM_max exceeds this fraction of the layer's original max.
SPREAD_THRESHOLD = 0.1
# ... and "strongly" reached above this one (the paper's "influence strongly").
STRONG_THRESHOLD = 0.5
SUMMARY_NAMES = (
    "fm_max",  # max of the original feature maps over (H, W, K)
    "max_abs_diff",  # max |FM - FM_adv| over (H, W, K)
    "max_ratio",  # max_abs_diff / fm_max (NaN where fm_max <= 0)
    "spread",  # fraction of (H, W) positions where PM_max > 10% of fm_max
    "spread_strong",  # fraction of (H, W) positions where PM_max > 50% of fm_max
    "mean_abs_diff",  # mean |FM - FM_adv| over (H, W, K)
    "mean_fm",  # mean of the original feature maps over (H, W, K)
    "mean_abs_fm",  # mean |FM| of the original feature maps over (H, W, K)
    "pm_avg_peak",  # max over (H, W) of PM_avg (the brightest point of figure 3)
)


def _check_reduce(reduce: str) -> None:
    if reduce not in REDUCTIONS:
        raise PropmapsError(f"unknown reduction {reduce!r}; use 'max' or 'avg'")


def _per_layer(fn: Callable[[str], Any], names) -> LayerMaps:
    """{name: fn(name)} in the order of `names`, as an OrderedDict (jit keeps it)."""
    return collections.OrderedDict((name, fn(name)) for name in names)


def difference_map(
    fm: FeatureMaps, fm_adv: FeatureMaps, reduce: str = "max", signed: bool = False
) -> jax.Array:
    """One layer's propagation map (N, H, W) from FM and FM_adv (N, H, W, K)."""
    _check_reduce(reduce)
    diff = fm.astype(jnp.float32) - fm_adv.astype(jnp.float32)
    if not signed:
        diff = jnp.abs(diff)
    return jnp.max(diff, axis=-1) if reduce == "max" else jnp.mean(diff, axis=-1)


def feature_maps(
    features_fn: FeaturesFn, variables: Variables, images: Images
) -> LayerMaps:
    """{layer: feature maps (N, H, W, K)} of `images` in forward order."""
    return call_features(features_fn, variables, images)[1]


def paired_feature_maps(
    features_fn: FeaturesFn,
    variables: Variables,
    images: Images,
    perturbed_images: Images,
) -> tuple[jax.Array, jax.Array, LayerMaps, LayerMaps]:
    """(logits, logits_adv, FM, FM_adv) of natural and perturbed images, one pass."""
    images = jnp.asarray(images, jnp.float32)
    perturbed_images = jnp.asarray(perturbed_images, jnp.float32)
    if images.shape != perturbed_images.shape:
        raise PropmapsError(
            f"images {images.shape} and perturbed images {perturbed_images.shape} "
            "must have the same shape"
        )
    n = images.shape[0]
    # Inference mode (BatchNorm running averages): examples are independent, so one
    # forward pass over the concatenation gives both sets of feature maps.
    both = jnp.concatenate([images, perturbed_images], axis=0)
    logits, layers = call_features(features_fn, variables, both)
    fm = _per_layer(lambda name: layers[name][:n], layers)
    fm_adv = _per_layer(lambda name: layers[name][n:], layers)
    return logits[:n], logits[n:], fm, fm_adv


def propagation_maps(
    features_fn: FeaturesFn,
    variables: Variables,
    images: Images,
    perturbed_images: Images,
    reduce: str = "max",
    signed: bool = False,
) -> LayerMaps:
    """Propagation maps {layer: (N, H, W)} for reduce "max" or "avg".

    Layers are the model's, in forward order (an OrderedDict, also through
    `jax.jit`). `analyze` gives both reductions and per-layer scalars in one pass.
    """
    _check_reduce(reduce)
    _, _, fm, fm_adv = paired_feature_maps(
        features_fn, variables, images, perturbed_images
    )
    return _per_layer(
        lambda name: difference_map(fm[name], fm_adv[name], reduce, signed), fm
    )


def layer_summaries(
    fm: FeatureMaps,
    fm_adv: FeatureMaps,
    threshold: float = SPREAD_THRESHOLD,
    signed: bool = False,
) -> dict[str, jax.Array]:
    """Per-image scalars (N,) of one layer, named as in `SUMMARY_NAMES`.

    `max_ratio` >= 1 means the perturbation changed some activation by as much as the
    strongest original activation of that layer; `spread` is the fraction of spatial
    positions where PM_max exceeds `threshold` times the layer's original maximum
    (`spread_strong`: `STRONG_THRESHOLD` times). With `signed` the differences are
    FM - FM_adv as in the paper's equations (the names keep "abs"): the maxima are
    of the signed difference, the means signed means.
    """
    fm = fm.astype(jnp.float32)
    abs_diff = fm - fm_adv.astype(jnp.float32)
    if not signed:
        abs_diff = jnp.abs(abs_diff)
    fm_max = jnp.max(fm, axis=(1, 2, 3))
    max_abs_diff = jnp.max(abs_diff, axis=(1, 2, 3))
    positive = fm_max > 0
    max_ratio = jnp.where(
        positive, max_abs_diff / jnp.where(positive, fm_max, 1.0), jnp.nan
    )
    pm_max = jnp.max(abs_diff, axis=-1)
    reached = pm_max > threshold * fm_max[:, None, None]
    spread = jnp.where(positive, jnp.mean(reached, axis=(1, 2)), jnp.nan)
    strong = pm_max > STRONG_THRESHOLD * fm_max[:, None, None]
    spread_strong = jnp.where(positive, jnp.mean(strong, axis=(1, 2)), jnp.nan)
    return {
        "fm_max": fm_max,
        "max_abs_diff": max_abs_diff,
        "max_ratio": max_ratio,
        "spread": spread,
        "spread_strong": spread_strong,
        "mean_abs_diff": jnp.mean(abs_diff, axis=(1, 2, 3)),
        "mean_fm": jnp.mean(fm, axis=(1, 2, 3)),
        "mean_abs_fm": jnp.mean(jnp.abs(fm), axis=(1, 2, 3)),
        "pm_avg_peak": jnp.max(jnp.mean(abs_diff, axis=-1), axis=(1, 2)),
    }


def analyze(
    features_fn: FeaturesFn,
    variables: Variables,
    images: Images,
    perturbed_images: Images,
    signed: bool = False,
) -> dict[str, Any]:
    """Everything a single-attack figure needs, from one forward pass.

    Returns {"logits", "logits_adv": (N, classes), "pm_max", "pm_avg":
    {layer: (N, H, W)}, "summaries": {layer: {name: (N,)}}}.
    """
    logits, logits_adv, fm, fm_adv = paired_feature_maps(
        features_fn, variables, images, perturbed_images
    )
    return {
        "logits": logits,
        "logits_adv": logits_adv,
        "pm_max": _per_layer(
            lambda n: difference_map(fm[n], fm_adv[n], "max", signed), fm
        ),
        "pm_avg": _per_layer(
            lambda n: difference_map(fm[n], fm_adv[n], "avg", signed), fm
        ),
        "summaries": _per_layer(
            lambda n: layer_summaries(fm[n], fm_adv[n], signed=signed), fm
        ),
    }


# Compiled once per model and `signed` (the model is hashable by the contract).
_analyze = jax.jit(analyze, static_argnums=0, static_argnames="signed")


def maps_of_result(
    features_fn: FeaturesFn,
    variables: Variables,
    images: Images,
    result_pixels: np.ndarray,
    signed: bool = False,
) -> dict[str, Any]:
    """The propagation maps of an attack result, on the host.

    `features_fn` is the model (e.g. `models.linen_features(module, "conv")`),
    `images` (N, H, W, C) the clean images (0..255), `result_pixels` (N, k, 5)
    the perturbations the attack found (`AttackResult.pixels`, or attack.csv's
    `pixels` column: a failed attack's best candidate). Returns {"order": {layer:
    (H, W, K)} in forward order, "probs", "probs_adv": (N, classes), "pm": {"max",
    "avg": {layer: (N, H, W)}}, "summaries": {name: (N, layers)} (`SUMMARY_NAMES`)}.
    """
    images = jnp.asarray(images)
    order = check_model(features_fn, variables, tuple(images.shape[1:]))
    perturbed = apply_pixels_batch(images, jnp.asarray(result_pixels))
    out = jax.device_get(
        _analyze(features_fn, variables, images, perturbed, signed=signed)
    )
    return {
        "order": order,
        "probs": np.asarray(jax.nn.softmax(out["logits"])),
        "probs_adv": np.asarray(jax.nn.softmax(out["logits_adv"])),
        "pm": {
            r: {n: np.asarray(out[f"pm_{r}"][n]) for n in order} for r in REDUCTIONS
        },
        "summaries": {
            key: np.stack(
                [np.asarray(out["summaries"][n][key], np.float64) for n in order],
                axis=-1,
            )
            for key in SUMMARY_NAMES
        },
    }


def last_layer_max_ratio(
    features_fn: FeaturesFn,
    variables: Variables,
    images: np.ndarray,
    result_pixels: np.ndarray,
    batch_size: int = 64,
) -> np.ndarray:
    """Last-layer max|dFM| / max FM (N,) of the model's maps (absolute differences)
    of clean `images` (N, H, W, C) perturbed by `result_pixels` (N, k, 5), in
    batches: `claims.figure_examples`' input (of the raw convolution outputs)."""

    def ratio(v, x, p):
        _, _, fm, fm_adv = paired_feature_maps(
            features_fn, v, x, apply_pixels_batch(x, p)
        )
        last = list(fm)[-1]
        return layer_summaries(fm[last], fm_adv[last])["max_ratio"]

    ratio = functools.partial(jax.jit(ratio), variables)
    out = batching.map_batches(ratio, [images, result_pixels], batch_size)
    return out.astype(np.float64)


def init_statistics(layer_shapes: dict[str, Sequence[int]]) -> dict[str, Any]:
    """Zero running sums for `accumulate_statistics`, from {layer: (H, W, K)}.

    Sums are kept per outcome (index 0: failed attacks, 1: successful attacks).
    """

    def zeros(name: str) -> jax.Array:
        height, width = layer_shapes[name][:2]
        return jnp.zeros((2, height, width), jnp.float32)

    return {
        "count": jnp.zeros((2,), jnp.float32),
        "pm_avg_sum": _per_layer(zeros, layer_shapes),
        "pm_max_sum": _per_layer(zeros, layer_shapes),
    }


def accumulate_statistics(
    state: dict[str, Any],
    features_fn: FeaturesFn,
    variables: Variables,
    images: Images,
    perturbed_images: Images,
    success: jax.Array,
    valid: jax.Array,
    signed: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Add one batch to the running sums; also return its per-image scalars.

    `success` (N,) bool is the outcome of each attack; rows with `valid` False
    (padding of the last batch) are ignored. Returns (new state, {"logits_adv":
    (N, classes), "summaries": {layer: {name: (N,)}}}); the per-image scalars are
    small (N x layers) and let callers compute percentiles on the host.
    """
    _, logits_adv, fm, fm_adv = paired_feature_maps(
        features_fn, variables, images, perturbed_images
    )
    valid = jnp.asarray(valid, bool)
    success = jnp.asarray(success, bool)
    # weights (2, N): row 0 failed, row 1 successful, padding rows all zero.
    weights = jnp.stack([valid & ~success, valid & success]).astype(jnp.float32)
    new_state = {
        "count": state["count"] + weights.sum(axis=1),
        "pm_avg_sum": collections.OrderedDict(),
        "pm_max_sum": collections.OrderedDict(),
    }
    for name in fm:
        for reduce in REDUCTIONS:
            pm = difference_map(fm[name], fm_adv[name], reduce, signed)
            key = f"pm_{reduce}_sum"
            new_state[key][name] = state[key][name] + jnp.einsum(
                "on,nhw->ohw", weights, pm
            )
    summaries = _per_layer(
        lambda n: layer_summaries(fm[n], fm_adv[n], signed=signed), fm
    )
    return new_state, {"logits_adv": logits_adv, "summaries": summaries}


# ----- per-layer statistics over many attacks (host, NumPy) --------------------


def _nan_stat(fn, values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(fn(values)) if values.size else float("nan")


def per_outcome_layer_stats(
    scalars: dict[str, np.ndarray], mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-layer statistics (L,) over the attacks selected by `mask` (N,).

    `scalars[name]` are per-image values (N, L) from `propagation.layer_summaries`.
    """
    num_layers = scalars["max_ratio"].shape[1]
    out: dict[str, np.ndarray] = {}
    for stat, source, fn in (
        ("max_ratio_mean", "max_ratio", np.mean),
        ("max_ratio_p95", "max_ratio", lambda v: np.percentile(v, 95)),
        ("reaches_max_fraction", "max_ratio", lambda v: np.mean(v >= 1.0)),
        ("spread_mean", "spread", np.mean),
        ("spread_p95", "spread", lambda v: np.percentile(v, 95)),
        ("mean_abs_diff", "mean_abs_diff", np.mean),
        ("mean_fm", "mean_fm", np.mean),
        ("mean_abs_fm", "mean_abs_fm", np.mean),
    ):
        values = scalars[source][mask]
        out[stat] = np.array(
            [_nan_stat(fn, values[:, j]) for j in range(num_layers)], np.float64
        )
    return out
