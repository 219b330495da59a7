"""Saliency maps of any classifier, and measures that compare two maps (section 8).

The paper's section 8 raises the *conflicting salience hypothesis*: a one-pixel
attack succeeds when the pixel disturbs the model's saliency map enough, pulling
the attention away from the object. To test it we need saliency maps of a class
score f_c(x) with respect to the input pixels x (float NHWC, 0..255; normalisation
is inside the models), for any `apply_fn(variables, images) -> logits`:

- gradient (Simonyan et al. 2014): g = d f_c / d x, reduced over the colour
  channels by max_c |g| (the paper's convention);
- gradient x input (Shrikumar et al. 2016): a = x * g, a signed attribution per
  channel; the map is |sum_c a| (sum over channels first, so that a linear model's
  map is the magnitude of each pixel's exact contribution to the score);
- integrated gradients (Sundararajan et al. 2017): a = (x - x0) * mean over the
  path x0 + alpha (x - x0) of g, with a black baseline x0 = 0 and `steps` midpoint
  values of alpha evaluated in one batched forward/backward pass; completeness:
  sum a = f_c(x) - f_c(x0) up to the O(1 / steps^2) error of the midpoint rule;
  the map is |sum_c a|;
- SmoothGrad (Smilkov et al. 2017): the mean gradient over `samples` noisy copies
  x + N(0, sigma^2) (pixel units, not clipped), reduced like the gradient,
  max_c |mean g|; the noise comes from a PRNG key (one per image for results that
  do not depend on batching).

The class score is the logit by default, or the softmax probability
(`score="probability"`). All functions are pure and jittable; they work on a batch
(N, H, W, C) with one class per image (N,) and are vmappable over extra leading
axes. In inference mode the images of a batch are independent, so the gradient of
the summed class scores is every image's own gradient.

The comparison measures (`window_share`, `rank_correlation`, `top_overlap`) take
non-negative maps (N, H, W) and are pure, jittable functions too.

The salience study (`experiments/salience.py`) changes each attacked image three
ways (`change_positions`: the attack's pixel, its colour at the locality
protocol's nearby and random positions) and measures, in one jittable device
computation (`analyse_changes`), the capture of saliency mass around the change,
the disturbance of the maps and the last convolution's propagation map.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from propmaps_jax import models, stats
from propmaps_jax.analysis import locality, propagation
from propmaps_jax.attack.perturb import apply_pixels_batch
from propmaps_jax.errors import SaliencyError
from propmaps_jax.types import ApplyFn, FeaturesFn, Images, Labels, PRNGKey, Variables

METHODS = ("gradient", "gradient_x_input", "integrated_gradients", "smoothgrad")
SCORES = ("logit", "probability")
# Smilkov et al. recommend noise of 10-20% of the input range.
DEFAULT_SIGMA = 0.15 * 255.0


@dataclasses.dataclass(frozen=True)
class SaliencyConfig:
    """What decides a saliency program: method and its settings (hashable, static).

    `steps`: integrated gradients' path points; `samples` and `sigma` (pixel units,
    0..255 scale): SmoothGrad's noisy copies; `score`: "logit" or "probability".
    """

    method: str = "gradient"
    steps: int = 32
    samples: int = 16
    sigma: float = DEFAULT_SIGMA
    score: str = "logit"

    def __post_init__(self) -> None:
        check_method(self.method)
        check_score(self.score)
        _check_count(self.steps, "steps")
        _check_count(self.samples, "samples")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise SaliencyError(f"sigma must be finite and >= 0, got {self.sigma!r}")

    @property
    def passes(self) -> int:
        """Forward/backward passes per map (the cost of one map in gradients)."""
        if self.method == "integrated_gradients":
            return self.steps
        if self.method == "smoothgrad":
            return self.samples
        return 1

    @property
    def uses_key(self) -> bool:
        return self.method == "smoothgrad"


def _check_choice(value: str, what: str, argument: str, choices) -> str:
    """`value`, or a SaliencyError naming the argument and the choices."""
    if value not in choices:
        raise SaliencyError(
            f"unknown {what} {value!r} (argument {argument}); choose one of "
            + ", ".join(choices)
        )
    return value


def _check_count(value: int, argument: str) -> None:
    """A SaliencyError naming the argument unless `value` is an integer >= 1."""
    if not isinstance(value, int) or value < 1:
        raise SaliencyError(f"{argument} must be an integer >= 1, got {value!r}")


def check_method(method: str) -> str:
    """`method`, or a SaliencyError naming the argument and the choices."""
    return _check_choice(method, "saliency method", "method", METHODS)


def check_score(score: str) -> str:
    """`score`, or a SaliencyError naming the argument and the choices."""
    return _check_choice(score, "class score", "score", SCORES)


def class_scores(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    classes: Labels,
    score: str = "logit",
) -> jax.Array:
    """The score (N,) of class `classes[i]` for image i: its logit or probability."""
    check_score(score)
    logits = apply_fn(variables, jnp.asarray(images, jnp.float32))
    if score == "probability":
        logits = jax.nn.softmax(logits, axis=-1)
    classes = jnp.asarray(classes, jnp.int32)
    return jnp.take_along_axis(logits, classes[..., None], axis=-1)[..., 0]


def input_gradients(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    classes: Labels,
    score: str = "logit",
) -> jax.Array:
    """d score_c / d x (N, H, W, C), each image's gradient of its own class score."""
    images = jnp.asarray(images, jnp.float32)
    classes = jnp.asarray(classes, jnp.int32)
    if classes.shape != images.shape[:1]:
        raise SaliencyError(
            f"classes (argument classes) must have shape {images.shape[:1]}, one per "
            f"image, got {classes.shape}"
        )

    def total(x: jax.Array) -> jax.Array:
        return jnp.sum(class_scores(apply_fn, variables, x, classes, score))

    return jax.grad(total)(images)


def gradient_x_input(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    classes: Labels,
    score: str = "logit",
) -> jax.Array:
    """Signed attributions x * d score_c / d x (N, H, W, C)."""
    images = jnp.asarray(images, jnp.float32)
    return images * input_gradients(apply_fn, variables, images, classes, score)


def integrated_gradients(
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    classes: Labels,
    steps: int = 32,
    score: str = "logit",
) -> jax.Array:
    """Signed integrated-gradients attributions (N, H, W, C), black baseline.

    All `steps` points of every image's path go through one batched pass of
    N * steps images (midpoint rule, alpha = (k + 1/2) / steps).
    """
    _check_count(steps, "steps")
    images = jnp.asarray(images, jnp.float32)
    classes = jnp.asarray(classes, jnp.int32)
    n = images.shape[0]
    alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
    # Baseline 0: the path points are alpha * x, stacked step-major (steps * N).
    path = (alphas[:, None, None, None, None] * images[None]).reshape(
        (steps * n, *images.shape[1:])
    )
    grads = input_gradients(
        apply_fn, variables, path, jnp.tile(classes, steps), score
    ).reshape((steps, *images.shape))
    return images * jnp.mean(grads, axis=0)


def _image_keys(key: PRNGKey, n: int) -> jax.Array:
    """(N,) keys: `key` itself when it is already one key per image, else split."""
    if jnp.ndim(key) == 0:
        return jax.random.split(key, n)
    if key.shape != (n,):
        raise SaliencyError(
            f"key (argument key) must be one key or one key per image ({n},), got "
            f"shape {key.shape}"
        )
    return key


def smoothgrad(
    key: PRNGKey,
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    classes: Labels,
    samples: int = 16,
    sigma: float = DEFAULT_SIGMA,
    score: str = "logit",
) -> jax.Array:
    """Mean gradient (N, H, W, C) over `samples` copies x + N(0, sigma^2) per image.

    `key`: one key per image (N,) (results then never depend on batching), or one
    key that is split into N. All N * samples copies go through one batched pass.
    """
    _check_count(samples, "samples")
    images = jnp.asarray(images, jnp.float32)
    classes = jnp.asarray(classes, jnp.int32)
    n = images.shape[0]
    keys = _image_keys(key, n)
    noise = jax.vmap(
        lambda k: jax.random.normal(k, (samples, *images.shape[1:]), jnp.float32)
    )(keys)  # (N, samples, H, W, C)
    noisy = (images[:, None] + sigma * noise).reshape((n * samples, *images.shape[1:]))
    grads = input_gradients(
        apply_fn, variables, noisy, jnp.repeat(classes, samples), score
    ).reshape((n, samples, *images.shape[1:]))
    return jnp.mean(grads, axis=1)


def attributions(
    key: PRNGKey | None,
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    classes: Labels,
    config: SaliencyConfig = SaliencyConfig(),
) -> jax.Array:
    """Per-channel attributions (N, H, W, C) of `config.method` (before reduction).

    gradient and smoothgrad: gradients; gradient_x_input and integrated_gradients:
    signed attributions. `key` is used by smoothgrad only (None is fine otherwise).
    """
    if config.method == "gradient":
        return input_gradients(apply_fn, variables, images, classes, config.score)
    if config.method == "gradient_x_input":
        return gradient_x_input(apply_fn, variables, images, classes, config.score)
    if config.method == "integrated_gradients":
        return integrated_gradients(
            apply_fn, variables, images, classes, config.steps, config.score
        )
    if key is None:
        raise SaliencyError("smoothgrad needs a PRNG key (argument key), got None")
    return smoothgrad(
        key,
        apply_fn,
        variables,
        images,
        classes,
        config.samples,
        config.sigma,
        config.score,
    )


def reduce_channels(attribution: jax.Array, method: str) -> jax.Array:
    """A non-negative map (N, H, W) from per-channel attributions (N, H, W, C).

    Gradients (gradient, smoothgrad): max_c |g|. Signed attributions
    (gradient_x_input, integrated_gradients): |sum_c a|, which keeps completeness
    per pixel before the magnitude is taken.
    """
    check_method(method)
    if method in ("gradient", "smoothgrad"):
        return jnp.max(jnp.abs(attribution), axis=-1)
    return jnp.abs(jnp.sum(attribution, axis=-1))


def saliency_map(
    key: PRNGKey | None,
    apply_fn: ApplyFn,
    variables: Variables,
    images: Images,
    classes: Labels,
    config: SaliencyConfig = SaliencyConfig(),
) -> jax.Array:
    """The saliency map (N, H, W) >= 0 of class `classes[i]` for each image i."""
    attribution = attributions(key, apply_fn, variables, images, classes, config)
    return reduce_channels(attribution, config.method)


# ----- comparing maps ---------------------------------------------------------


def window_share(
    maps: jax.Array, rows: jax.Array, cols: jax.Array, size: int
) -> jax.Array:
    """Share (N,) of each map's total mass inside the size x size window at (r, c).

    Maps (N, H, W) >= 0; the window is clipped at the image border; an all-zero map
    has share 0. `size` is odd (3: the pixel and its 8 neighbours).
    """
    if size < 1 or size % 2 == 0:
        raise SaliencyError(f"the window size must be odd and >= 1, got {size}")
    half = size // 2
    height, width = maps.shape[-2], maps.shape[-1]
    r = jnp.asarray(rows, jnp.int32)[..., None, None]
    c = jnp.asarray(cols, jnp.int32)[..., None, None]
    grid_r = jnp.arange(height)[:, None]
    grid_c = jnp.arange(width)[None, :]
    inside = (jnp.abs(grid_r - r) <= half) & (jnp.abs(grid_c - c) <= half)
    total = jnp.sum(maps, axis=(-2, -1))
    part = jnp.sum(jnp.where(inside, maps, 0.0), axis=(-2, -1))
    return jnp.where(total > 0, part / jnp.where(total > 0, total, 1.0), 0.0)


def rank_correlation(a: jax.Array, b: jax.Array) -> jax.Array:
    """Spearman correlation (N,) between maps a[i] and b[i] (N, H, W), ties averaged.

    `stats.spearman` over the pixels, in float32 (jittable); NaN where a map is
    constant (its ranks have no spread).
    """
    n = a.shape[0]
    return stats.spearman(
        jnp.asarray(a, jnp.float32).reshape(n, -1),
        jnp.asarray(b, jnp.float32).reshape(n, -1),
    )


def top_count(pixels: int, fraction: float) -> int:
    """How many pixels the top `fraction` of a map holds: ceil(fraction * P) >= 1."""
    if not 0.0 < fraction <= 1.0:
        raise SaliencyError(f"fraction must lie in (0, 1], got {fraction}")
    return max(1, math.ceil(fraction * pixels - 1e-9))


def top_overlap(a: jax.Array, b: jax.Array, fraction: float = 0.05) -> jax.Array:
    """Share (N,) of a[i]'s top-`fraction` pixels that are also in b[i]'s top.

    Both sets have k = ceil(fraction * H * W) pixels (ties broken by position, as
    `jax.lax.top_k` does).
    """
    n = a.shape[0]
    flat_a, flat_b = a.reshape(n, -1), b.reshape(n, -1)
    k = top_count(flat_a.shape[-1], fraction)
    _, top_a = jax.lax.top_k(flat_a, k)
    _, top_b = jax.lax.top_k(flat_b, k)
    in_b = jnp.zeros(flat_b.shape, bool).at[jnp.arange(n)[:, None], top_b].set(True)
    return jnp.mean(jnp.take_along_axis(in_b, top_a, axis=-1), axis=-1)


# ----- the salience study (paper, section 8): its device computation ------------

# The changes of each attacked image: the attack's pixel, the same colour at an
# adjacent pixel and at a random other pixel (the locality protocol's moves).
CHANGES = ("original", "nearby", "random")
# Capture windows (odd sizes) around the changed pixel, and the top fraction of
# pixels whose overlap measures the disturbance of a map.
WINDOWS = (3, 5)
TOP_FRACTION = 0.05


def change_positions(
    seed: int,
    indices: np.ndarray,
    pixels: np.ndarray,
    height: int,
    width: int,
    stored: dict[int, tuple[int, int, int, int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(changes (N, 3, 5) original/nearby/random pixels, from_stored (N,) bool).

    The nearby and random positions of each image are the locality protocol's
    (`locality.protocol_moves`, the same key streams), except for the images in
    `stored` ({dataset index: (nearby row, col, random row, col)}, e.g. the ones a
    locality study recorded), which keep theirs. The colour is the attack's.
    """
    rows, cols = pixels[:, 0, 0], pixels[:, 0, 1]
    nearby, random = locality.protocol_moves(seed, indices, rows, cols, height, width)
    from_stored = np.zeros(len(indices), bool)
    for j, index in enumerate(indices):
        if stored and int(index) in stored:
            nearby[j], random[j] = np.split(np.array(stored[int(index)]), 2)
            from_stored[j] = True
    changes = np.repeat(pixels[:, :1, :], 3, axis=1).copy()
    changes[:, 1, :2] = nearby
    changes[:, 2, :2] = random
    return changes.astype(np.int32), from_stored


def analyse_changes(
    config: SaliencyConfig,
    features_fn: FeaturesFn,
    last_layer: str,
    variables: Variables,
    images: Images,
    labels: Labels,
    changes: jax.Array,
    keys: jax.Array,
    return_maps: bool = False,
) -> dict[str, jax.Array]:
    """Saliency and propagation measures of M changes per image (pure, jittable).

    `features_fn` is the model (`models.contract`; its layer `last_layer` gives
    the propagation maps, its logits the saliency maps);
    images (N, H, W, C) 0..255, labels (N,), changes (N, M, 5) one pixel each,
    keys (N,) one per image (SmoothGrad: the same noise before and after). Returns
    per change (N, M): pred_after, prob_true_after, pm_last_max, pm_last_mean and
    per class t in ("true", "new"): {t}_capture{3,5}_{before,after},
    {t}_spearman (rank correlation before/after), {t}_top5 (top-5% overlap); and
    pred_before (N,). With `return_maps` also the maps (N, M, H, W) / PM (N, M, h, w).
    """
    n, m = changes.shape[:2]
    x = jnp.asarray(images, jnp.float32)
    image_of = jnp.repeat(jnp.arange(n), m)  # change -> its image, image-major
    flat = jnp.asarray(changes, jnp.int32).reshape(n * m, 1, 5)
    changed = apply_pixels_batch(x[image_of], flat)
    logits, layers = models.call_features(
        features_fn, variables, jnp.concatenate([x, changed])
    )
    fm = layers[last_layer]
    pm = propagation.difference_map(fm[:n][image_of], fm[n:], "max")
    pred_after = jnp.argmax(logits[n:], axis=-1).astype(jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    probs_after = jax.nn.softmax(logits[n:], axis=-1)

    # One batched saliency pass: clean (true class), clean (new class), changed
    # (true class), changed (new class).
    apply_fn = models.logits_of(features_fn)
    which = jnp.concatenate([jnp.arange(n), image_of, image_of, image_of])
    maps = saliency_map(
        keys[which] if config.uses_key else None,
        apply_fn,
        variables,
        jnp.concatenate([x, x[image_of], changed, changed]),
        jnp.concatenate([labels, pred_after, labels[image_of], pred_after]),
        config,
    )
    nm = n * m
    pairs = {
        "true": (maps[:n][image_of], maps[n + nm : n + 2 * nm]),
        "new": (maps[n : n + nm], maps[n + 2 * nm :]),
    }
    rows, cols = flat[:, 0, 0], flat[:, 0, 1]
    out = {
        "pred_after": pred_after,
        "prob_true_after": jnp.take_along_axis(
            probs_after, labels[image_of][:, None], axis=-1
        )[:, 0],
        "pm_last_max": jnp.max(pm, axis=(1, 2)),
        "pm_last_mean": jnp.mean(pm, axis=(1, 2)),
    }
    for t, (before, after) in pairs.items():
        for size in WINDOWS:
            for when, sal in (("before", before), ("after", after)):
                out[f"{t}_capture{size}_{when}"] = window_share(sal, rows, cols, size)
        out[f"{t}_spearman"] = rank_correlation(before, after)
        out[f"{t}_top5"] = top_overlap(before, after, TOP_FRACTION)
    out = {k: v.reshape(n, m) for k, v in out.items()}
    out["pred_before"] = jnp.argmax(logits[:n], axis=-1).astype(jnp.int32)
    if return_maps:
        shape = (n, m, *maps.shape[1:])
        out["maps_before_true"] = pairs["true"][0].reshape(shape)
        out["maps_after_true"] = pairs["true"][1].reshape(shape)
        out["maps_after_new"] = pairs["new"][1].reshape(shape)
        out["pm_last"] = pm.reshape((n, m, *pm.shape[1:]))
        out["changed"] = changed.reshape((n, m, *changed.shape[1:]))
    return out
