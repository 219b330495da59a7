"""Propagation maps against a float64 NumPy conv stack and receptive fields."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from propmaps_jax import models
from propmaps_jax.analysis import propagation
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import layer_outputs
from tests.keras_reference import conv2d


class ConvStack(nn.Module):
    """Conv 3x3, ReLU, Conv 3x3 stride 2, ReLU, Conv 1x1 (SAME), no normalisation."""

    features: tuple = (3, 4, 2)
    strides: tuple = (1, 2, 1)
    kernels: tuple = (3, 3, 1)
    use_bias: bool = True
    relu: bool = True

    @nn.compact
    def __call__(self, x, train=False):
        for i, (f, s, k) in enumerate(
            zip(self.features, self.strides, self.kernels, strict=True)
        ):
            x = nn.Conv(
                f,
                (k, k),
                strides=s,
                padding="SAME",
                use_bias=self.use_bias,
                name=f"conv{i + 1}",
            )(x)
            if self.relu and i < len(self.features) - 1:
                x = nn.relu(x)
        return x.reshape((x.shape[0], -1)).sum(axis=-1, keepdims=True)


def numpy_stack_maps(module, params, images):
    """Feature maps {convN: (N, H, W, K)} of ConvStack, in float64 NumPy."""
    x = np.asarray(images, np.float64)
    out = {}
    for i, s in enumerate(module.strides):
        p = params[f"conv{i + 1}"]
        bias = np.asarray(p["bias"], np.float64) if "bias" in p else 0.0
        x = conv2d(x, np.asarray(p["kernel"], np.float64), bias, (s, s), "same")
        out[f"conv{i + 1}"] = x
        if module.relu and i < len(module.strides) - 1:
            x = np.maximum(x, 0.0)
    return out


def numpy_reduce(fm, fm_adv, reduce, signed):
    d = fm - fm_adv
    d = d if signed else np.abs(d)
    return d.max(axis=-1) if reduce == "max" else d.mean(axis=-1)


def stack_variables(module, in_channels, rng, weight=None):
    """ConvStack parameters built directly (no init tracing): random or all `weight`."""
    params = {}
    for i, (f, k) in enumerate(zip(module.features, module.kernels, strict=True)):
        shape = (k, k, in_channels, f)
        kernel = (
            rng.normal(scale=0.5, size=shape)
            if weight is None
            else np.full(shape, weight)
        )
        params[f"conv{i + 1}"] = {"kernel": jnp.asarray(kernel, jnp.float32)}
        if module.use_bias:
            # Non-zero biases so that ReLU cuts some activations and others not.
            params[f"conv{i + 1}"]["bias"] = jnp.asarray(
                rng.normal(size=f) + 0.1, jnp.float32
            )
        in_channels = f
    return {"params": params}


@pytest.fixture(scope="module")
def stack():
    module = ConvStack()
    return module, stack_variables(module, 3, np.random.default_rng(3))


@pytest.mark.parametrize("reduce", ["max", "avg"])
@pytest.mark.parametrize("signed", [False, True])
def test_maps_match_float64_numpy_conv_stack(stack, reduce, signed):
    module, variables = stack
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 9, 10, 3)).astype(np.float32)
    perturbed = images + rng.normal(scale=0.5, size=images.shape).astype(np.float32)
    maps = propagation.propagation_maps(
        models.linen_features(module),
        variables,
        images,
        perturbed,
        reduce=reduce,
        signed=signed,
    )
    ref = numpy_stack_maps(module, variables["params"], images)
    ref_adv = numpy_stack_maps(module, variables["params"], perturbed)
    assert list(maps) == ["conv1", "conv2", "conv3"]
    for name in ref:
        expected = numpy_reduce(ref[name], ref_adv[name], reduce, signed)
        assert maps[name].shape == expected.shape
        np.testing.assert_allclose(maps[name], expected, rtol=1e-4, atol=1e-5)
    if signed:  # the signed maps are not just |.| of the absolute ones
        assert any(float(np.min(maps[n])) < 0 for n in maps)


def test_both_reductions_and_jit(stack):
    module, variables = stack
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 9, 10, 3)).astype(np.float32)
    perturbed = images.copy()
    perturbed[:, 4, 5] += 3.0
    model = models.linen_features(module)
    both = {
        r: propagation.propagation_maps(model, variables, images, perturbed, r)
        for r in ("max", "avg")
    }

    @jax.jit
    @chex.assert_max_traces(n=1)
    def jitted(v, x, x_adv):
        return {
            r: propagation.propagation_maps(model, v, x, x_adv, r)
            for r in ("max", "avg")
        }

    for _ in range(2):
        out = jitted(variables, images, perturbed)
    for r in ("max", "avg"):
        # Forward order survives jit (the maps are an OrderedDict).
        assert list(out[r]) == list(both[r]) == ["conv1", "conv2", "conv3"]
        for name in both[r]:
            np.testing.assert_allclose(out[r][name], both[r][name], rtol=1e-6)
    with pytest.raises(PropmapsError, match="unknown reduction"):
        propagation.propagation_maps(model, variables, images, perturbed, "median")
    with pytest.raises(PropmapsError, match="unknown reduction"):
        propagation.propagation_maps(model, variables, images, perturbed, "both")


def _expected_mask(height, width, rows, cols):
    mask = np.zeros((height, width), bool)
    mask[np.ix_(rows, cols)] = True
    return mask


def test_one_pixel_reaches_exactly_its_receptive_field():
    # Two 3x3 SAME convs then a 3x3 stride-2 SAME conv, kernels all ones, no bias,
    # no ReLU, on a positive image: a change at (r, c) reaches exactly the 3x3,
    # then 5x5 window (clipped at borders), and in the strided layer the outputs
    # i whose inputs 2i..2i+2 (TensorFlow SAME pads 0 before, 1 after) meet r-2..r+2.
    module = ConvStack(
        features=(2, 3, 2),
        strides=(1, 1, 2),
        kernels=(3, 3, 3),
        use_bias=False,
        relu=False,
    )
    size = 12
    variables = stack_variables(module, 1, None, weight=1.0)
    pixels = [(5, 6), (0, 11), (11, 0)]  # centre, and two corners (clipped windows)
    images = np.ones((len(pixels), size, size, 1), np.float32)
    perturbed = images.copy()
    for n, (r, c) in enumerate(pixels):
        perturbed[n, r, c, 0] = 5.0
    maps_fn = jax.jit(
        lambda x, x_adv: {
            signed: {
                reduce: propagation.propagation_maps(
                    models.linen_features(module), variables, x, x_adv, reduce, signed
                )
                for reduce in ("max", "avg")
            }
            for signed in (False, True)
        }
    )
    out = maps_fn(images, perturbed)
    maps, signed = out[False], out[True]

    def window(centre, radius):
        return np.arange(max(centre - radius, 0), min(centre + radius, size - 1) + 1)

    def strided(centre):
        lo, hi = max(centre - 2, 0), min(centre + 2, size - 1)
        return np.array(
            [i for i in range(size // 2) if 2 * i <= hi and 2 * i + 2 >= lo]
        )

    for n, (r, c) in enumerate(pixels):
        expected = {
            "conv1": _expected_mask(size, size, window(r, 1), window(c, 1)),
            "conv2": _expected_mask(size, size, window(r, 2), window(c, 2)),
            "conv3": _expected_mask(size // 2, size // 2, strided(r), strided(c)),
        }
        for name, mask in expected.items():
            for reduce in ("max", "avg"):
                np.testing.assert_array_equal(
                    np.asarray(maps[reduce][name][n]) > 0, mask
                )
        # conv1 with all-ones 3x3 kernels: every reached output changes by exactly 4.
        np.testing.assert_allclose(
            np.asarray(maps["max"]["conv1"][n])[expected["conv1"]], 4
        )

    # Activations only grow, so the signed equations are the negated absolute maps.
    for name in ("conv1", "conv2", "conv3"):
        np.testing.assert_allclose(signed["avg"][name], -maps["avg"][name], atol=1e-6)
        # max_k of (FM - FM_adv) <= 0 picks the *smallest* change, -min_k |dFM|.
        assert float(np.max(signed["max"][name])) <= 1e-6


def test_layer_summaries_against_numpy():
    rng = np.random.default_rng(4)
    fm = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    fm_adv = fm + rng.normal(scale=0.3, size=fm.shape).astype(np.float32)
    fm[2] = -np.abs(fm[2])  # an image whose layer max is <= 0
    out = jax.device_get(
        propagation.layer_summaries(jnp.asarray(fm), jnp.asarray(fm_adv))
    )
    f, fa = fm.astype(np.float64), fm_adv.astype(np.float64)
    d = np.abs(f - fa)
    fm_max = f.max(axis=(1, 2, 3))
    np.testing.assert_allclose(out["fm_max"], fm_max, rtol=1e-6)
    np.testing.assert_allclose(out["max_abs_diff"], d.max(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(
        out["max_ratio"][:2], d.max(axis=(1, 2, 3))[:2] / fm_max[:2], rtol=1e-5
    )
    spread = (d.max(axis=-1) > 0.1 * fm_max[:, None, None]).mean(axis=(1, 2))
    np.testing.assert_allclose(out["spread"][:2], spread[:2])
    assert np.isnan(out["max_ratio"][2]) and np.isnan(out["spread"][2])
    np.testing.assert_allclose(out["mean_abs_diff"], d.mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(
        out["mean_fm"], f.mean(axis=(1, 2, 3)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        out["mean_abs_fm"], np.abs(f).mean(axis=(1, 2, 3)), rtol=1e-5
    )
    # The peak of PM_avg: the brightest position of the channel-mean map.
    np.testing.assert_allclose(
        out["pm_avg_peak"], d.mean(axis=-1).max(axis=(1, 2)), rtol=1e-5
    )


def test_resnet_layers_in_forward_order_and_maps_of_layer_outputs(tiny_resnet):
    module, variables = tiny_resnet
    model = models.linen_features(module)
    shapes = models.check_model(model, variables)
    assert list(shapes)[:3] == ["stem", "stage1_block1/conv1", "stage1_block1/conv2"]
    assert shapes["stage3_block1/conv1"] == (8, 8, 8)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    perturbed = images.copy()
    perturbed[:, 16, 16] = (255, 0, 0)
    maps = propagation.propagation_maps(model, variables, images, perturbed, "max")
    assert list(maps) == list(shapes)
    # Independent of the paired forward pass: two separate layer_outputs calls.
    _, fm = layer_outputs(module, variables, jnp.asarray(images, jnp.float32))
    _, fm_adv = layer_outputs(module, variables, jnp.asarray(perturbed, jnp.float32))
    for name in shapes:
        expected = np.abs(np.asarray(fm[name]) - np.asarray(fm_adv[name])).max(-1)
        np.testing.assert_allclose(maps[name], expected, rtol=1e-5, atol=1e-5)


def test_streamed_statistics_equal_direct_sums(tiny_resnet):
    module, variables = tiny_resnet
    model = models.linen_features(module)
    shapes = models.check_model(model, variables)
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    perturbed = images.copy()
    for i in range(5):
        perturbed[i, rng.integers(32), rng.integers(32)] = rng.integers(0, 256, 3)
    success = np.array([True, False, True, True, False])
    step = jax.jit(
        lambda s, v, x, xa, ok, valid: propagation.accumulate_statistics(
            s, model, v, x, xa, ok, valid
        )
    )
    state = propagation.init_statistics(shapes)
    for begin in (0, 3):  # batches of 3, the last padded with a masked copy
        take = (
            np.array([begin, begin + 1, begin + 2])
            if begin == 0
            else np.array([3, 4, 0])
        )
        valid = (
            np.array([True, True, True])
            if begin == 0
            else np.array([True, True, False])
        )
        state, _ = step(
            state, variables, images[take], perturbed[take], success[take], valid
        )
    # The direct computation, compiled as one program (not op by op).
    direct = jax.jit(propagation.analyze, static_argnums=0)(
        model, variables, images, perturbed
    )
    np.testing.assert_allclose(state["count"], [2, 3])
    for name in shapes:
        pm = np.asarray(direct["pm_avg"][name], np.float64)
        np.testing.assert_allclose(
            state["pm_avg_sum"][name][1], pm[success].sum(0), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            state["pm_avg_sum"][name][0], pm[~success].sum(0), rtol=1e-5, atol=1e-6
        )


def test_maps_with_x64_enabled(stack):
    """With jax_enable_x64 on, maps, summaries and block outputs keep their forward
    order and float32 values equal to those computed with x64 off."""
    module, variables = stack
    rng = np.random.default_rng(5)
    images = rng.normal(size=(2, 9, 10, 3)).astype(np.float32)
    perturbed = images + 1.0

    def analyze(v, x, x_adv):
        return propagation.analyze(models.linen_features(module), v, x, x_adv)

    expected = jax.jit(analyze)(variables, images, perturbed)
    with jax.enable_x64(True):
        out = jax.jit(analyze)(variables, images, perturbed)
    assert (
        list(out["pm_max"]) == list(expected["pm_max"]) == ["conv1", "conv2", "conv3"]
    )
    for name in expected["pm_max"]:
        assert out["pm_max"][name].dtype == np.float32
        np.testing.assert_allclose(out["pm_max"][name], expected["pm_max"][name])
        np.testing.assert_allclose(out["pm_avg"][name], expected["pm_avg"][name])


def test_block_outputs_in_forward_order_through_jit(tiny_resnet, random_images):
    """is_conv_or_block records the residual stream after each block, and the
    layers come back from jit in forward order ("stem" first)."""
    module, variables = tiny_resnet

    @jax.jit
    def layers_of(v, x):
        _, layers = models.layer_outputs(
            module, v, x, models.is_conv_or_block, train=False
        )
        return layers

    layers = layers_of(variables, random_images[:2].astype(np.float32))
    names = list(layers)
    assert names[0] == "stem"
    assert names[1:5] == [
        "stage1_block1/conv1",
        "stage1_block1/conv2",
        "stage1_block1",
        "stage2_block1/conv1",
    ]
    assert names == list(
        models.check_model(
            models.linen_features(module, models.is_conv_or_block), variables
        )
    )
    # A block's output is its shortcut plus its branch: same shape as its conv2.
    assert layers["stage2_block1"].shape == layers["stage2_block1/conv2"].shape


def test_per_outcome_layer_stats_by_hand():
    # Two layers, four attacks; the mask keeps attacks 0, 1 and 3; NaN is ignored.
    scalars = {
        name: np.array([[0.5, 1.0], [1.0, np.nan], [9.0, 9.0], [0.0, 0.5]])
        for name in ("max_ratio", "spread", "mean_abs_diff", "mean_fm", "mean_abs_fm")
    }
    out = propagation.per_outcome_layer_stats(
        scalars, np.array([True, True, False, True])
    )
    np.testing.assert_allclose(out["max_ratio_mean"], [0.5, 0.75])
    np.testing.assert_allclose(out["reaches_max_fraction"], [1 / 3, 0.5])
    np.testing.assert_allclose(out["spread_p95"], [0.95, 0.975])
    none = propagation.per_outcome_layer_stats(scalars, np.zeros(4, bool))
    assert np.all(np.isnan(none["mean_fm"]))


@pytest.mark.parametrize("signed, layers", [(False, "conv"), (True, "conv_relu")])
def test_maps_of_result_equal_analyze_of_the_perturbed_images(
    tiny_lenet, random_images, signed, layers
):
    """One call gives the maps of an attack result: the same numbers as
    `analyze` on the images perturbed one by one with `apply_pixels`."""
    from propmaps_jax.attack.perturb import apply_pixels

    module, variables = tiny_lenet
    images = random_images[:3]
    pixels = np.array(
        [[[5, 7, 255, 0, 0]], [[0, 31, 0, 255, 0]], [[16, 16, 10, 20, 30]]]
    )
    model = models.linen_features(module, layers)
    maps = propagation.maps_of_result(model, variables, images, pixels, signed=signed)
    order = models.check_model(model, variables, (32, 32, 3))
    assert maps["order"] == order
    for i in range(images.shape[0]):
        perturbed = apply_pixels(jnp.asarray(images[i]), jnp.asarray(pixels[i]))
        out = propagation.analyze(
            model, variables, images[i][None], perturbed[None], signed=signed
        )
        np.testing.assert_allclose(
            maps["probs_adv"][i], jax.nn.softmax(out["logits_adv"][0]), rtol=1e-5
        )
        for j, layer in enumerate(order):
            for reduce in ("max", "avg"):
                np.testing.assert_allclose(
                    maps["pm"][reduce][layer][i],
                    out[f"pm_{reduce}"][layer][0],
                    rtol=1e-5,
                    atol=1e-6,
                )
            for name in propagation.SUMMARY_NAMES:
                np.testing.assert_allclose(
                    maps["summaries"][name][i, j],
                    out["summaries"][layer][name][0],
                    rtol=1e-5,
                    atol=1e-6,
                )


def test_last_layer_max_ratio_is_the_last_summary_of_the_maps(
    tiny_lenet, random_images
):
    module, variables = tiny_lenet
    model = models.linen_features(module)
    pixels = np.tile(np.array([[[9, 9, 255, 255, 255]]]), (5, 1, 1))
    ratio = propagation.last_layer_max_ratio(
        model, variables, random_images[:5], pixels, batch_size=2
    )
    maps = propagation.maps_of_result(model, variables, random_images[:5], pixels)
    np.testing.assert_allclose(ratio, maps["summaries"]["max_ratio"][:, -1], rtol=1e-5)
