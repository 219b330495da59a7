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

Which tensors are "the feature maps" is a choice too (`LAYER_KINDS`): by default
the raw convolution outputs (`is_conv`); "conv_relu" takes ReLU of them (LeNet's
activations, as its ReLU follows each convolution) and "bn_relu" ReLU of every
BatchNorm output (the activations of the pre-activation ResNet, whose every ReLU
follows a BatchNorm). `layer_selection(kind)` gives the filter and whether to apply
ReLU; every function below takes them as `filter_fn` and `relu`.

Everything here is pure: arrays in, arrays out; `jax.jit` is applied by callers
(close over the module, or pass it as a static argument; pass the variables as an
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
from flax import linen as nn

from propmaps_jax import batching
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import inference_kwargs, is_conv, layer_outputs
from propmaps_jax.types import FeatureMaps, Images, LayerMaps, Variables

REDUCTIONS = ("max", "avg")
# A position "is reached" when PM_max exceeds this fraction of the layer's original max.
SPREAD_THRESHOLD = 0.1
# ... and "strongly" reached above this one (the paper's "influence strongly").
STRONG_THRESHOLD = 0.5
LAYER_KINDS = ("conv", "conv_relu", "bn_relu")
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

FilterFn = Callable[[nn.Module, str], bool] | bool


def is_batch_norm(module: nn.Module, method_name: str) -> bool:
    """Filter of `layer_outputs`: the output of every BatchNorm."""
    return isinstance(module, nn.BatchNorm) and method_name == "__call__"


def layer_selection(kind: str) -> tuple[FilterFn, bool]:
    """(filter_fn, relu) of a layer kind: "conv" raw convolution outputs,
    "conv_relu" ReLU of them, "bn_relu" ReLU of every BatchNorm output."""
    if kind == "conv":
        return is_conv, False
    if kind == "conv_relu":
        return is_conv, True
    if kind == "bn_relu":
        return is_batch_norm, True
    raise PropmapsError(
        f"unknown layer kind {kind!r}; choose one of: {', '.join(LAYER_KINDS)}"
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
    module: nn.Module,
    variables: Variables,
    images: Images,
    filter_fn: FilterFn = is_conv,
) -> LayerMaps:
    """{layer: feature maps (N, H, W, K)} of `images` in forward order (inference)."""
    _, layers = layer_outputs(
        module,
        variables,
        jnp.asarray(images, jnp.float32),
        filter_fn,
        **inference_kwargs(module),
    )
    return layers


def layer_shapes(
    module: nn.Module,
    variables: Variables,
    image_shape: Sequence[int] = (32, 32, 3),
    filter_fn: FilterFn = is_conv,
) -> dict[str, tuple[int, ...]]:
    """{layer: (H, W, K)} in forward order, computed abstractly (no FLOPs)."""

    def layers_of(v: Variables, x: jax.Array) -> LayerMaps:
        return layer_outputs(module, v, x, filter_fn, **inference_kwargs(module))[1]

    dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    shapes = jax.eval_shape(layers_of, variables, dummy)
    return collections.OrderedDict(
        (name, tuple(shape.shape[1:])) for name, shape in shapes.items()
    )


def paired_feature_maps(
    module: nn.Module,
    variables: Variables,
    images: Images,
    perturbed_images: Images,
    filter_fn: FilterFn = is_conv,
    relu: bool = False,
) -> tuple[jax.Array, jax.Array, LayerMaps, LayerMaps]:
    """(logits, logits_adv, FM, FM_adv) of natural and perturbed images, one pass
    (ReLU applied to every recorded output when `relu`)."""
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
    logits, layers = layer_outputs(
        module, variables, both, filter_fn, **inference_kwargs(module)
    )
    if not layers:
        raise PropmapsError(
            "the layer filter selects no layer of this model (e.g. bn_relu on a "
            "model without BatchNorm): choose another layer kind"
        )
    if relu:
        layers = _per_layer(lambda name: jax.nn.relu(layers[name]), layers)
    fm = _per_layer(lambda name: layers[name][:n], layers)
    fm_adv = _per_layer(lambda name: layers[name][n:], layers)
    return logits[:n], logits[n:], fm, fm_adv


def propagation_maps(
    module: nn.Module,
    variables: Variables,
    images: Images,
    perturbed_images: Images,
    reduce: str = "max",
    signed: bool = False,
    filter_fn: FilterFn = is_conv,
    relu: bool = False,
) -> LayerMaps:
    """Propagation maps {layer: (N, H, W)} for reduce "max" or "avg".

    Layers are those recorded by `models.layer_outputs` with `filter_fn` (by default
    every convolution output), in forward order (an OrderedDict, also through
    `jax.jit`). `analyze` gives both reductions and per-layer scalars in one pass.
    """
    _check_reduce(reduce)
    _, _, fm, fm_adv = paired_feature_maps(
        module, variables, images, perturbed_images, filter_fn, relu
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
    module: nn.Module,
    variables: Variables,
    images: Images,
    perturbed_images: Images,
    signed: bool = False,
    filter_fn: FilterFn = is_conv,
    relu: bool = False,
) -> dict[str, Any]:
    """Everything a single-attack figure needs, from one forward pass.

    Returns {"logits", "logits_adv": (N, classes), "pm_max", "pm_avg":
    {layer: (N, H, W)}, "summaries": {layer: {name: (N,)}}}.
    """
    logits, logits_adv, fm, fm_adv = paired_feature_maps(
        module, variables, images, perturbed_images, filter_fn, relu
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


def maps_of_result(
    module: nn.Module,
    variables: Variables,
    images: Images,
    result_pixels: np.ndarray,
    signed: bool = False,
    layers: str = "conv",
) -> dict[str, Any]:
    """The propagation maps of an attack result, on the host.

    `images` (N, H, W, C) are the clean images (0..255), `result_pixels` (N, k, 5)
    the perturbations the attack found (`AttackResult.pixels`, or attack.csv's
    `pixels` column: a failed attack's best candidate); `layers` a `LAYER_KINDS`
    name. Returns {"order": {layer: (H, W, K)} in forward order, "probs",
    "probs_adv": (N, classes), "pm": {"max", "avg": {layer: (N, H, W)}},
    "summaries": {name: (N, layers)} (`SUMMARY_NAMES`)}.
    """
    filter_fn, relu = layer_selection(layers)
    images = jnp.asarray(images)
    order = layer_shapes(module, variables, tuple(images.shape[1:]), filter_fn)
    perturbed = apply_pixels_batch(images, jnp.asarray(result_pixels))
    run = jax.jit(
        lambda v, x, x_adv: analyze(
            module, v, x, x_adv, signed=signed, filter_fn=filter_fn, relu=relu
        )
    )
    out = jax.device_get(run(variables, images, perturbed))
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
    module: nn.Module,
    variables: Variables,
    images: np.ndarray,
    result_pixels: np.ndarray,
    batch_size: int = 64,
) -> np.ndarray:
    """Last-layer max|dFM| / max FM (N,) of the default maps (raw convolution
    outputs, absolute differences) of clean `images` (N, H, W, C) perturbed by
    `result_pixels` (N, k, 5), in batches: `claims.figure_examples`' input."""

    def ratio(v, x, p):
        _, _, fm, fm_adv = paired_feature_maps(module, v, x, apply_pixels_batch(x, p))
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
    module: nn.Module,
    variables: Variables,
    images: Images,
    perturbed_images: Images,
    success: jax.Array,
    valid: jax.Array,
    signed: bool = False,
    filter_fn: FilterFn = is_conv,
    relu: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Add one batch to the running sums; also return its per-image scalars.

    `success` (N,) bool is the outcome of each attack; rows with `valid` False
    (padding of the last batch) are ignored. Returns (new state, {"logits_adv":
    (N, classes), "summaries": {layer: {name: (N,)}}}); the per-image scalars are
    small (N x layers) and let callers compute percentiles on the host.
    """
    _, logits_adv, fm, fm_adv = paired_feature_maps(
        module, variables, images, perturbed_images, filter_fn, relu
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
