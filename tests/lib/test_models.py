"""Models: layer_outputs names/shapes/order/values, parameter counts, normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from propmaps_jax import models
from propmaps_jax.errors import PropmapsError
from tests.keras_reference import conv2d, max_pool


def _resnet_conv_names(blocks_per_stage: int, stages: int = 3) -> list[str]:
    """Convolutions in forward (= Keras) order: stem, then conv1, conv2, shortcut."""
    names = ["stem"]
    for stage in range(1, stages + 1):
        for block in range(1, blocks_per_stage + 1):
            prefix = f"stage{stage}_block{block}"
            names += [f"{prefix}/conv1", f"{prefix}/conv2"]
            if stage > 1 and block == 1:
                names.append(f"{prefix}/shortcut")
    return names


def _abstract_layer_outputs(module, batch: int = 2, **kwargs):
    """Names (in order) and shapes of layer_outputs without running the model."""
    names = []

    def run(images):
        variables = module.init(jax.random.key(0), images, train=False)
        _, layers = models.layer_outputs(
            module, variables, images, train=False, **kwargs
        )
        names.extend(layers)
        return list(layers.values())

    shapes = jax.eval_shape(run, jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32))
    return names, [tuple(s.shape) for s in shapes]


def test_resnet32_conv_outputs_names_shapes_order():
    names, shapes = _abstract_layer_outputs(models.create_model("resnet"))
    assert names == _resnet_conv_names(5)
    assert len(names) == 33
    width = {1: (32, 16), 2: (16, 32), 3: (8, 64)}
    for name, shape in zip(names, shapes, strict=True):
        size, channels = (32, 16) if name == "stem" else width[int(name[5])]
        assert shape == (2, size, size, channels), name


def test_resnet32_parameter_counts_match_keras():
    module = models.create_model("resnet")
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    assert count(variables["params"]) == 467946
    assert count(variables["batch_stats"]) == 2272
    assert count(variables) == 470218  # Keras' model.count_params() of resnet.h5


def test_lenet_parameter_count_and_conv_outputs():
    module = models.create_model("lenet")
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert sum(x.size for x in jax.tree_util.tree_leaves(variables)) == 62006
    assert "batch_stats" not in variables
    names, shapes = _abstract_layer_outputs(module)
    assert names == ["conv1", "conv2"]
    assert shapes == [(2, 28, 28, 6), (2, 10, 10, 16)]


def test_lenet_tiny_conv_outputs_match_float64_numpy(tiny_lenet, random_images):
    module, variables = tiny_lenet
    _, layers = models.layer_outputs(module, variables, random_images)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), variables)
    x = (random_images - np.array(models.CIFAR10_MEAN)) / np.array(models.CIFAR10_STD)
    conv1 = conv2d(x, **params["params"]["conv1"], strides=(1, 1), padding="valid")
    np.testing.assert_allclose(layers["conv1"], conv1, atol=1e-4)
    pooled = max_pool(np.maximum(conv1, 0), (2, 2), (2, 2), "valid")
    conv2 = conv2d(pooled, **params["params"]["conv2"], strides=(1, 1), padding="valid")
    np.testing.assert_allclose(layers["conv2"], conv2, atol=1e-4)
    assert list(layers) == ["conv1", "conv2"]
    assert layers["conv1"].shape == (8, 28, 28, 3)
    assert layers["conv2"].shape == (8, 10, 10, 4)


def test_tiny_resnet_residual_structure(tiny_resnet, random_images):
    module, variables = tiny_resnet
    logits, layers = models.layer_outputs(
        module, variables, random_images, filter_fn=True, train=False
    )
    convs = [
        n for n in layers if n.split("/")[-1] in ("stem", "conv1", "conv2", "shortcut")
    ]
    assert convs == _resnet_conv_names(1)
    assert layers["stage1_block1/conv1"].shape == (8, 32, 32, 4)
    assert layers["stage2_block1/shortcut"].shape == (8, 16, 16, 8)
    assert layers["stage3_block1/conv2"].shape == (8, 8, 8, 8)
    # A block's output is its shortcut (identity or projection) plus conv2.
    np.testing.assert_allclose(
        layers["stage1_block1"],
        layers["stem"] + layers["stage1_block1/conv2"],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        layers["stage2_block1"],
        layers["stage2_block1/shortcut"] + layers["stage2_block1/conv2"],
        atol=1e-5,
    )
    # The head: final BN, ReLU, global average pooling, Dense.
    pooled = np.maximum(np.asarray(layers["bn_final"], np.float64), 0).mean(axis=(1, 2))
    dense = jax.tree_util.tree_map(np.asarray, variables["params"]["logits"])
    np.testing.assert_allclose(
        logits, pooled @ dense["kernel"] + dense["bias"], atol=1e-4
    )
    np.testing.assert_allclose(layers["logits"], logits, atol=0)


def test_filter_true_records_every_module_in_forward_order(tiny_lenet, random_images):
    module, variables = tiny_lenet
    logits, layers = models.layer_outputs(module, variables, random_images, True)
    assert list(layers) == ["conv1", "conv2", "fc1", "logits"]
    np.testing.assert_array_equal(logits, module.apply(variables, random_images))


def test_custom_filter_selects_batch_norms(tiny_resnet, random_images):
    module, variables = tiny_resnet
    _, layers = models.layer_outputs(
        module,
        variables,
        random_images,
        filter_fn=lambda m, method: isinstance(m, nn.BatchNorm),
        train=False,
    )
    assert list(layers) == [
        "stage1_block1/bn1",
        "stage1_block1/bn2",
        "stage2_block1/bn1",
        "stage2_block1/bn2",
        "stage3_block1/bn1",
        "stage3_block1/bn2",
        "bn_final",
    ]


class UserModel(nn.Module):
    """A module of someone else: a shared Dense called twice, a nested submodule."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(3, name="shared")
        x = shared(x)
        x = shared(nn.relu(x))
        return Head(name="head")(x)


class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="out")(x)


def test_works_for_any_linen_module(key):
    module = UserModel()
    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    variables = module.init(key, x)
    output, layers = models.layer_outputs(module, variables, x, filter_fn=True)
    assert list(layers) == ["shared#0", "shared#1", "head/out", "head"]
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    first = x @ p["shared"]["kernel"] + p["shared"]["bias"]
    second = np.maximum(first, 0) @ p["shared"]["kernel"] + p["shared"]["bias"]
    final = second @ p["head"]["out"]["kernel"] + p["head"]["out"]["bias"]
    np.testing.assert_allclose(layers["shared#0"], first, atol=1e-6)
    np.testing.assert_allclose(layers["shared#1"], second, atol=1e-6)
    np.testing.assert_allclose(output, final, atol=1e-6)
    # The default filter (convolutions) finds nothing in a model without any.
    assert models.layer_outputs(module, variables, x)[1] == {}


class ListWidths(nn.Module):
    """A user's module with a list attribute: it cannot be hashed."""

    widths: list

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for width in self.widths:
            x = nn.Dense(width)(x)
        return x


def test_a_module_that_cannot_be_hashed_is_initialised_and_applied(key):
    # init_variables and make_logits_fn compile one program per hashable module;
    # this one takes their op-by-op paths, with the same numbers.
    module = ListWidths([4, 3])
    with pytest.raises(TypeError):
        hash(module)
    variables = models.init_variables(module, key, (2, 2, 3))
    assert variables["params"]["Dense_1"]["kernel"].shape == (4, 3)
    x = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    logits = models.make_logits_fn(module, variables)(x)
    np.testing.assert_allclose(logits, module.apply(variables, x.astype(np.float32)))


@pytest.mark.parametrize("fixture", ["tiny_lenet", "tiny_resnet"])
def test_normalisation_inside_the_model(fixture, request, random_images):
    module, variables = request.getfixturevalue(fixture)
    mean, std = (100.0, 120.0, 140.0), (50.0, 60.0, 70.0)
    normalising = module.clone(mean=mean, std=std)
    identity = module.clone(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    manual = (random_images[:2].astype(np.float32) - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(
        jax.jit(models.make_logits_fn(normalising, variables))(random_images[:2]),
        jax.jit(models.make_logits_fn(identity, variables))(manual.astype(np.float32)),
        atol=1e-5,
    )


def test_model_config_round_trip_and_unknown_model():
    config = models.ModelConfig("lenet", mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0))
    assert models.ModelConfig.from_dict(config.to_dict()) == config
    module = models.create_model(config)
    assert module.mean == (1.0, 2.0, 3.0) and module.std == (4.0, 5.0, 6.0)
    with pytest.raises(PropmapsError, match="unknown model 'vgg'; choose one of lenet"):
        models.create_model("vgg")


@pytest.mark.parametrize("width,kernel", [(32, 5), (31, 5), (30, 3), (9, 5), (6, 5)])
def test_column_pair_conv_equals_the_plain_convolution(width, kernel):
    rng = np.random.default_rng(width)
    x = jnp.asarray(rng.normal(size=(3, 11, width, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 4, 7)), jnp.float32)
    expected = jax.lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    got = models.column_pair_conv(x, k)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    # Gradients too (training uses it).
    loss = lambda f: lambda k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
    plain = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(
        jax.grad(loss(models.column_pair_conv))(k),
        jax.grad(loss(plain))(k),
        atol=1e-4,
        rtol=1e-4,
    )


def test_lenet_first_layer_is_a_conv_with_the_usual_parameters():
    module = models.create_model("lenet")
    variables = models.init_variables(module, jax.random.key(0))
    conv1 = variables["params"]["conv1"]
    assert conv1["kernel"].shape == (5, 5, 3, 6) and conv1["bias"].shape == (6,)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    _, maps = models.layer_outputs(module, variables, images)
    assert list(maps) == ["conv1", "conv2"]
    assert maps["conv1"].shape == (2, 28, 28, 6)
