"""The model contract (`propmaps_jax.models.contract`): a plain JAX function and an
nnx module are attacked and mapped like the project's linen models; the linen
adapter gives today's maps bit for bit; `check_model` refuses each broken model in
one line."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import propmaps_jax as pj
from propmaps_jax import models
from propmaps_jax.analysis import propagation
from propmaps_jax.errors import PropmapsError
from tests.keras_reference import conv2d

SHAPE = (8, 8, 3)


def _conv(x, w, b, stride):
    out = jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return out + b


def plain_features(params, images):
    """A CNN written as a function: conv 3x3, ReLU, conv 3x3 stride 2, ReLU, mean,
    dense; its layers are the two convolutions' outputs."""
    conv1 = _conv(images / 255.0, params["w1"], params["b1"], 1)
    conv2 = _conv(jax.nn.relu(conv1), params["w2"], params["b2"], 2)
    pooled = jax.nn.relu(conv2).mean(axis=(1, 2))
    logits = pooled @ params["wd"] + params["bd"]
    return logits, collections.OrderedDict(conv1=conv1, conv2=conv2)


def _plain_params():
    rng = np.random.default_rng(0)
    shapes = {
        "w1": (3, 3, 3, 4),
        "b1": (4,),
        "w2": (3, 3, 4, 6),
        "b2": (6,),
        "wd": (6, 10),
        "bd": (10,),
    }
    return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def _numpy_layers(params, images):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    conv1 = conv2d(images.astype(np.float64) / 255.0, p["w1"], p["b1"], (1, 1), "same")
    conv2 = conv2d(np.maximum(conv1, 0), p["w2"], p["b2"], (2, 2), "same")
    return {"conv1": conv1, "conv2": conv2}


def _images(n):
    return np.random.default_rng(1).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def _attack(apply_fn, variables, images):
    labels = np.asarray(jnp.argmax(apply_fn(variables, images), -1), np.int32)
    config = pj.attack.AttackConfig(population=8, generations=2)
    indices, key = np.arange(len(images)), jax.random.key(2)
    return pj.attack.attack(apply_fn, variables, images, labels, indices, key, config)


def test_a_plain_function_is_attacked_and_mapped():
    params, images = _plain_params(), _images(3)
    assert models.check_model(plain_features, params, SHAPE) == {
        "conv1": (8, 8, 4),
        "conv2": (4, 4, 6),
    }
    result = _attack(models.logits_of(plain_features), params, images)
    maps = propagation.maps_of_result(plain_features, params, images, result.pixels)
    assert list(maps["order"]) == ["conv1", "conv2"]
    # The maps against an independent float64 NumPy forward pass.
    perturbed = np.asarray(pj.attack.apply_pixels_batch(images, result.pixels))
    clean, adversarial = _numpy_layers(params, images), _numpy_layers(params, perturbed)
    for name in ("conv1", "conv2"):
        diff = np.abs(clean[name] - adversarial[name])
        for reduce, want in (("max", diff.max(-1)), ("avg", diff.mean(-1))):
            np.testing.assert_allclose(
                maps["pm"][reduce][name], want, rtol=1e-4, atol=1e-5
            )
    logits = np.asarray(plain_features(params, images / 1.0)[0])
    np.testing.assert_allclose(
        maps["probs"], jax.nn.softmax(logits), rtol=1e-5, atol=1e-7
    )


class NnxCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4, 10, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class NnxFeatures:
    """The contract's nnx recipe: merge the module inside, its state the variables."""

    graphdef: nnx.GraphDef

    def __call__(self, state, images):
        net = nnx.merge(self.graphdef, state)
        conv1 = net.conv1(images / 255.0)
        logits = net.head(jax.nn.relu(conv1).mean(axis=(1, 2)))
        return logits, collections.OrderedDict(conv1=conv1)


def test_an_nnx_module_is_attacked_and_mapped():
    net = NnxCNN(nnx.Rngs(0))
    graphdef, state = nnx.split(net)
    features = NnxFeatures(graphdef)
    images = _images(2)
    assert models.check_model(features, state, SHAPE) == {"conv1": (8, 8, 4)}
    result = _attack(models.logits_of(features), state, images)
    maps = propagation.maps_of_result(features, state, images, result.pixels)
    perturbed = pj.attack.apply_pixels_batch(images, result.pixels)
    # The maps of the module called directly, eagerly.
    clean = np.asarray(net.conv1(jnp.asarray(images, jnp.float32) / 255.0))
    adversarial = np.asarray(net.conv1(jnp.asarray(perturbed, jnp.float32) / 255.0))
    np.testing.assert_allclose(
        maps["pm"]["max"]["conv1"],
        np.abs(clean - adversarial).max(-1),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("kind", ["conv", "conv_relu"])
def test_the_linen_adapter_gives_the_maps_of_layer_outputs_bit_for_bit(kind):
    """The maps through `linen_features` are today's: one `layer_outputs` pass over
    natural and perturbed images, ReLU for conv_relu, |FM - FM_adv| reduced."""
    module = models.create_model("lenet")
    variables = models.init_variables(module, jax.random.key(0))
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), np.uint8)
    pixels = np.array([[[i, 2 * i, 255, 0, 9 * i]] for i in range(4)], np.int32)
    perturbed = pj.attack.apply_pixels_batch(images, pixels)

    @jax.jit
    def reference(v, x, x_adv):
        both = jnp.concatenate([x, x_adv]).astype(jnp.float32)
        _, layers = models.layer_outputs(module, v, both, models.is_conv, train=False)
        out = {}
        for name, fm in layers.items():
            fm = jax.nn.relu(fm) if kind == "conv_relu" else fm
            diff = jnp.abs(fm[: len(x)] - fm[len(x) :])
            out[name] = (jnp.max(diff, axis=-1), jnp.mean(diff, axis=-1))
        return out

    want = jax.device_get(reference(variables, images, perturbed))
    model = models.linen_features(module, kind)
    maps = propagation.maps_of_result(model, variables, images, pixels)
    assert list(maps["order"]) == list(want) == ["conv1", "conv2"]
    for name, (pm_max, pm_avg) in want.items():
        assert np.array_equal(maps["pm"]["max"][name], pm_max)
        assert np.array_equal(maps["pm"]["avg"][name], pm_avg)
    # Hashable and equal for equal modules; its logits half is make_apply_fn's.
    assert model == models.linen_features(module, kind)
    assert hash(model) == hash(models.linen_features(module, kind))
    assert models.logits_of(model) == models.make_apply_fn(module)


def _broken(out_of):
    """A model whose output is `out_of(logits, conv1, conv2)`."""

    def features(params, images):
        logits, layers = plain_features(params, images)
        return out_of(logits, layers["conv1"], layers["conv2"])

    return features


class Unhashable:
    __hash__ = None

    def __call__(self, params, images):
        return plain_features(params, images)


@pytest.mark.parametrize(
    "model, words",
    [
        (_broken(lambda y, a, b: y), "returns (logits, layers), got"),
        (_broken(lambda y, a, b: (y[0], {"a": a})), "logits must be (N, classes)"),
        (
            _broken(lambda y, a, b: (y, collections.OrderedDict(a=a[..., 0]))),
            "layer 'a' has shape (2, 8, 8) for N=2",
        ),
        (
            _broken(lambda y, a, b: (y, collections.OrderedDict(a=a[:1]))),
            "layer 'a' has shape (1, 8, 8, 4) for N=2",
        ),
        (_broken(lambda y, a, b: (y, collections.OrderedDict())), "gives no layer"),
        (
            _broken(lambda y, a, b: (y, {"conv2": b, "conv1": a})),
            "must be a collections.OrderedDict in forward order, got dict",
        ),
        (Unhashable(), "must be hashable"),
        (
            _broken(lambda y, a, b: (y @ jnp.ones((3, 3)), None)),
            "the model fails on float32 images (2, 8, 8, 3)",
        ),
    ],
)
def test_check_model_refuses_each_broken_model_in_one_line(model, words):
    with pytest.raises(PropmapsError) as error:
        models.check_model(model, _plain_params(), SHAPE)
    message = str(error.value)
    assert words in message and "\n" not in message, message
    assert "propmaps_jax.models.contract" in message


def test_the_map_functions_check_the_model_too():
    """Under jit, a plain dict of layers would come back sorted: refused."""
    model = _broken(lambda y, a, b: (y, {"conv2": b, "conv1": a}))
    images = _images(2).astype(np.float32)
    with pytest.raises(PropmapsError, match="OrderedDict"):
        jax.jit(lambda v, x: propagation.propagation_maps(model, v, x, x + 1.0, "max"))(
            _plain_params(), images
        )
