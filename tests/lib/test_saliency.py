"""Saliency maps against independent checks: finite differences, completeness of
integrated gradients, a linear model in closed form; the map comparison measures
against SciPy and hand-made cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from propmaps_jax.analysis import saliency
from propmaps_jax.analysis.saliency import SaliencyConfig
from propmaps_jax.errors import PropmapsError

H, W, C, K = 6, 5, 3, 4


def _apply_fn(module):
    return functools.partial(module.apply, train=False)


@pytest.fixture(scope="module")
def linear():
    """logits = sum_hwc x W[h, w, c, :] + b: every saliency map in closed form."""
    rng = np.random.default_rng(1)
    variables = {
        "w": rng.normal(size=(H, W, C, K)).astype(np.float32) / 100,
        "b": rng.normal(size=(K,)).astype(np.float32),
    }

    def apply_fn(v, x):
        return jnp.einsum("nhwc,hwck->nk", x, v["w"]) + v["b"]

    images = rng.uniform(0, 255, (3, H, W, C)).astype(np.float32)
    classes = np.array([0, 3, 1], np.int32)
    return apply_fn, variables, images, classes


def test_linear_model_in_closed_form(linear, key):
    apply_fn, variables, images, classes = linear
    weights = np.moveaxis(variables["w"], -1, 0)[classes]  # (N, H, W, C)
    expected = {
        "gradient": np.abs(weights).max(-1),
        "gradient_x_input": np.abs((images * weights).sum(-1)),
        # Integrated gradients of a linear model from a black baseline: x * W exactly.
        "integrated_gradients": np.abs((images * weights).sum(-1)),
        # Noise does not change a constant gradient.
        "smoothgrad": np.abs(weights).max(-1),
    }
    for method, reference in expected.items():
        config = SaliencyConfig(method=method, steps=3, samples=4)
        maps = jax.jit(
            lambda k, x, c, cfg=config: saliency.saliency_map(
                k, apply_fn, variables, x, c, cfg
            )
        )(key, images, classes)
        np.testing.assert_allclose(maps, reference, rtol=1e-4, atol=1e-6)


def test_linear_model_probability_score(linear):
    apply_fn, variables, images, classes = linear
    logits = np.einsum("nhwc,hwck->nk", images, variables["w"]) + variables["b"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    # d p_c / d x = p_c (W_c - sum_k p_k W_k).
    mean_w = np.einsum("nk,hwck->nhwc", p, variables["w"])
    w_c = np.moveaxis(variables["w"], -1, 0)[classes]
    p_c = p[np.arange(len(classes)), classes]
    expected = p_c[:, None, None, None] * (w_c - mean_w)
    grads = saliency.input_gradients(
        apply_fn, variables, images, classes, score="probability"
    )
    np.testing.assert_allclose(grads, expected, rtol=1e-3, atol=1e-8)


def test_gradient_matches_finite_differences(tiny_lenet, random_images):
    module, variables = tiny_lenet
    apply_fn = _apply_fn(module)
    images = random_images[:2].astype(np.float32)
    classes = np.array([3, 7], np.int32)
    # Jitted: one program per shape, not op by op (the same numbers).
    gradients = jax.jit(
        lambda x, c: saliency.input_gradients(apply_fn, variables, x, c)
    )
    grads = np.asarray(gradients(images, classes))
    scores = jax.jit(lambda x: saliency.class_scores(apply_fn, variables, x, classes))
    rng = np.random.default_rng(0)
    eps = 0.5  # pixel units (0..255): a float32 logit resolves this change well
    for _ in range(8):
        r, c, ch = rng.integers(6, 26), rng.integers(6, 26), rng.integers(3)
        plus, minus = images.copy(), images.copy()
        plus[:, r, c, ch] += eps
        minus[:, r, c, ch] -= eps
        numeric = (np.asarray(scores(plus)) - np.asarray(scores(minus))) / (2 * eps)
        np.testing.assert_allclose(grads[:, r, c, ch], numeric, rtol=2e-2, atol=2e-5)
    # Each image's gradient is its own: computing it alone gives the same.
    alone = gradients(images[1:], classes[1:])
    np.testing.assert_allclose(grads[1:], alone, rtol=1e-5, atol=1e-7)


def test_integrated_gradients_completeness(tiny_resnet, random_images):
    module, variables = tiny_resnet
    apply_fn = _apply_fn(module)
    images = random_images[:3].astype(np.float32)
    classes = np.array([0, 5, 9], np.int32)
    gap = saliency.class_scores(
        apply_fn, variables, images, classes
    ) - saliency.class_scores(apply_fn, variables, np.zeros_like(images), classes)
    gap = np.asarray(gap, np.float64)
    errors = {}
    for steps in (2, 16, 128):
        attr = jax.jit(
            lambda x, c, s=steps: saliency.integrated_gradients(
                apply_fn, variables, x, c, s
            )
        )(images, classes)
        errors[steps] = np.abs(np.asarray(attr, np.float64).sum((1, 2, 3)) - gap)
    # The stated tolerance: with 128 steps the sum is within 1% of f(x) - f(0).
    assert np.all(errors[128] <= 0.01 * np.abs(gap) + 1e-4), (errors, gap)
    assert errors[128].sum() < errors[2].sum()


def test_integrated_gradients_batches_the_steps_in_one_pass(linear):
    apply_fn, variables, images, classes = linear
    calls = []

    def counting_apply(v, x):
        calls.append(x.shape)
        return apply_fn(v, x)

    jax.make_jaxpr(
        lambda x: saliency.integrated_gradients(
            counting_apply, variables, x, classes, steps=7
        )
    )(images)
    assert calls == [(7 * len(images), H, W, C)]


def test_smoothgrad_keys_per_image_and_sigma_zero(tiny_lenet, random_images, key):
    module, variables = tiny_lenet
    apply_fn = _apply_fn(module)
    images = random_images[:4].astype(np.float32)
    classes = np.array([1, 2, 3, 4], np.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(4))
    config = SaliencyConfig(method="smoothgrad", samples=5, sigma=20.0)
    run = jax.jit(
        lambda k, x, c: saliency.saliency_map(k, apply_fn, variables, x, c, config)
    )
    batch = run(keys, images, classes)
    alone = run(keys[2:3], images[2:3], classes[2:3])
    np.testing.assert_allclose(batch[2:3], alone, rtol=1e-5, atol=1e-8)
    gradient = jax.jit(
        lambda x, c: saliency.saliency_map(
            None, apply_fn, variables, x, c, SaliencyConfig()
        )
    )(images, classes)
    assert not np.allclose(batch, gradient)
    noiseless = jax.jit(
        lambda k, x, c: saliency.saliency_map(
            k,
            apply_fn,
            variables,
            x,
            c,
            SaliencyConfig(method="smoothgrad", samples=2, sigma=0.0),
        )
    )(keys, images, classes)
    np.testing.assert_allclose(noiseless, gradient, rtol=1e-5, atol=1e-8)


def test_jit_and_vmap_over_classes(tiny_lenet, random_images):
    module, variables = tiny_lenet
    apply_fn = _apply_fn(module)
    images = random_images[:2].astype(np.float32)
    config = SaliencyConfig(method="gradient_x_input")
    per_class = jax.jit(
        jax.vmap(
            lambda c: saliency.saliency_map(
                None, apply_fn, variables, images, c, config
            )
        )
    )(jnp.array([[0, 1], [2, 3], [4, 5]], jnp.int32))
    for i, classes in enumerate(([0, 1], [2, 3], [4, 5])):
        eager = saliency.saliency_map(
            None, apply_fn, variables, images, np.array(classes), config
        )
        np.testing.assert_allclose(per_class[i], eager, rtol=1e-5, atol=1e-7)
    assert per_class.shape == (3, 2, 32, 32) and np.all(per_class >= 0)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"method": "occlusion"}, "method"),
        ({"steps": 0}, "steps"),
        ({"samples": 0}, "samples"),
        ({"sigma": -1.0}, "sigma"),
        ({"score": "softmax"}, "score"),
    ],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(PropmapsError, match=argument) as info:
        SaliencyConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_bad_arguments_of_the_functions(linear):
    apply_fn, variables, images, classes = linear
    with pytest.raises(ValueError, match="steps"):
        saliency.integrated_gradients(apply_fn, variables, images, classes, steps=0)
    with pytest.raises(PropmapsError, match="classes"):
        saliency.input_gradients(apply_fn, variables, images, classes[:2])
    with pytest.raises(PropmapsError, match="key"):
        saliency.saliency_map(
            None, apply_fn, variables, images, classes, SaliencyConfig("smoothgrad")
        )


def test_window_share_by_hand():
    maps = np.zeros((3, 6, 6), np.float32)
    maps[0, 2, 2] = 1.0  # all mass at the pixel
    maps[0, 5, 5] = 3.0
    maps[1] = 1.0  # uniform: 9 of 36 pixels inside a 3x3 window
    maps[2, 0, 0] = 2.0  # window clipped at the corner: 4 pixels
    maps[2, 1, 1] = 2.0
    maps[2, 3, 3] = 4.0
    rows, cols = np.array([2, 3, 0]), np.array([2, 3, 0])
    share3 = saliency.window_share(maps, rows, cols, 3)
    np.testing.assert_allclose(share3, [0.25, 9 / 36, 0.5], rtol=1e-6)
    share5 = saliency.window_share(maps, rows, cols, 5)
    np.testing.assert_allclose(share5, [0.25, 25 / 36, 0.5], rtol=1e-6)
    zero = saliency.window_share(np.zeros((1, 4, 4)), [1], [1], 3)
    assert float(zero[0]) == 0.0
    with pytest.raises(PropmapsError, match="odd"):
        saliency.window_share(maps, rows, cols, 4)


def test_rank_correlation_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (4, 8, 8)).astype(np.float32)  # many ties
    b = a + rng.normal(size=a.shape).astype(np.float32) * 2
    ours = np.asarray(jax.jit(saliency.rank_correlation)(a, b))
    for i in range(4):
        expected = scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic
        np.testing.assert_allclose(ours[i], expected, rtol=1e-5, atol=1e-6)
    assert np.isnan(saliency.rank_correlation(np.ones((1, 3, 3)), a[:1, :3, :3])[0])


def test_top_overlap_by_hand():
    a = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    np.testing.assert_allclose(saliency.top_overlap(a, a), [1.0])
    np.testing.assert_allclose(saliency.top_overlap(a, -a), [0.0])
    b = a.copy()
    b[0, 9, 9] = -1.0  # the largest pixel leaves the top 5 (of 100)
    np.testing.assert_allclose(saliency.top_overlap(a, b, 0.05), [0.8])
    assert saliency.top_count(1024, 0.05) == 52


def test_change_positions_are_the_protocol_moves_unless_stored():
    from propmaps_jax.analysis import locality

    indices = np.array([4, 9, 20])
    pixels = np.array([[[3, 5, 10, 20, 30]], [[0, 0, 1, 2, 3]], [[31, 31, 9, 9, 9]]])
    nearby, random = locality.protocol_moves(
        7, indices, pixels[:, 0, 0], pixels[:, 0, 1], 32, 32
    )
    changes, stored = saliency.change_positions(7, indices, pixels, 32, 32)
    assert changes.shape == (3, 3, 5) and changes.dtype == np.int32 and not stored.any()
    np.testing.assert_array_equal(changes[:, 0], pixels[:, 0])
    np.testing.assert_array_equal(changes[:, 1, :2], nearby)
    np.testing.assert_array_equal(changes[:, 2, :2], random)
    # Every change keeps the attack's colour.
    np.testing.assert_array_equal(changes[:, :, 2:], np.repeat(pixels[:, :, 2:], 3, 1))
    changes, stored = saliency.change_positions(
        7, indices, pixels, 32, 32, {9: (1, 0, 30, 2)}
    )
    np.testing.assert_array_equal(stored, [False, True, False])
    np.testing.assert_array_equal(changes[1, 1:, :2], [[1, 0], [30, 2]])
    np.testing.assert_array_equal(changes[[0, 2], 1, :2], nearby[[0, 2]])
