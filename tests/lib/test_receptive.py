"""The windowed candidate forward equals the full forward of the perturbed images."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from propmaps_jax import models
from propmaps_jax.attack import de as attack_de
from propmaps_jax.errors import PropmapsError
from propmaps_jax.models import checkpoint, receptive

TOLERANCE = 1e-5


def edge_and_random_pixels(
    rng: np.random.Generator, slots: int, population: int, shape=(32, 32)
) -> np.ndarray:
    """(S, P, 1, 5) candidates: every border position (corners included) of the
    image, then random positions; random colours (black and white included)."""
    height, width = shape
    border = [(r, c) for r in (0, height - 1) for c in range(width)]
    border += [(r, c) for r in range(1, height - 1) for c in (0, width - 1)]
    border += [(1, 1), (height - 2, width - 2), (height // 2, width // 2)]
    total = slots * population
    positions = np.array(border * (1 + total // len(border)))[:total]
    random_count = max(0, total - 2 * len(border))
    positions[total - random_count :] = np.stack(
        [rng.integers(0, height, random_count), rng.integers(0, width, random_count)],
        -1,
    )
    colours = rng.integers(0, 256, (total, 3))
    colours[::7] = 0
    colours[1::7] = 255
    pixels = np.concatenate([positions, colours], -1).astype(np.int32)
    return pixels.reshape(slots, population, 1, 5)


@functools.cache
def full_forward(module: nn.Module):
    apply_fn = models.make_apply_fn(module)
    return jax.jit(lambda v, i, p: apply_fn(v, attack_de.perturbed_batch(i, p)))


@functools.cache
def clean_forward(module: nn.Module):
    return jax.jit(models.make_apply_fn(module))


def assert_exact(
    module, variables, images, pixels, densify_fractions=(receptive.DENSIFY_FRACTION,)
):
    """The windowed forward at each densify fraction equals the full forward of the
    perturbed images (computed once: it does not depend on the fraction)."""
    expected = np.asarray(full_forward(module)(variables, images, pixels))
    assert expected.shape == (pixels.shape[0] * pixels.shape[1], 10)
    # The candidates change the logits: the test compares something.
    clean = np.asarray(clean_forward(module)(variables, images))
    assert np.max(np.abs(expected - np.repeat(clean, pixels.shape[1], 0))) > 1e-3
    for fraction in densify_fractions:
        forward = receptive.make_candidate_forward(module, 1, fraction)
        assert forward is not None
        logits = np.asarray(jax.jit(forward)(variables, images, pixels))
        assert logits.shape == expected.shape
        difference = np.max(np.abs(logits - expected))
        assert difference <= TOLERANCE, (fraction, difference)


@pytest.fixture(scope="module")
def lenet():
    config, variables, _ = checkpoint.load_weights("lenet")
    return models.create_model(config), variables


def test_bundled_lenet_is_exact_on_thousands_of_candidates_edges_included(lenet):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    pixels = edge_and_random_pixels(rng, 4, 1000)
    assert_exact(*lenet, images, pixels)


def test_bundled_resnet32_is_exact_edges_included():
    config, variables, _ = checkpoint.load_weights("resnet")
    module = models.create_model(config)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    # 128 candidates: the four corners and the border, then random positions.
    assert_exact(module, variables, images, edge_and_random_pixels(rng, 2, 64))


def test_tiny_resnet_is_exact_at_every_pixel_position(tiny_resnet):
    # Every one of the 1,024 positions, at each densify fraction: the windowed
    # layers, the stride-2 layers (incl. the 1x1 shortcut, whose window sticks out
    # of what it reads) and the switch to whole maps at different layers.
    module, variables = tiny_resnet
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    positions = np.stack([rows.ravel(), cols.ravel()], -1)
    colours = rng.integers(0, 256, (1024, 3))
    pixels = np.concatenate([positions, colours], -1).astype(np.int32)
    pixels = np.stack([pixels[:512], pixels[512:]])[:, :, None]
    assert_exact(module, variables, images, pixels, (1.0, 0.3))


def test_tiny_lenet_is_exact_at_every_pixel_position(tiny_lenet):
    module, variables = tiny_lenet
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    colours = rng.integers(0, 256, (1024, 3))
    pixels = np.concatenate([rows.reshape(-1, 1), cols.reshape(-1, 1), colours], -1)
    assert_exact(module, variables, images, pixels.astype(np.int32)[None, :, None])


def test_non_square_images_are_exact(tiny_resnet):
    # Rows are covered after fewer layers than columns: one axis goes whole first.
    module, variables = tiny_resnet
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 12, 20, 3), dtype=np.uint8)
    pixels = edge_and_random_pixels(rng, 2, 40, shape=(12, 20))
    assert_exact(module, variables, images, pixels)


def test_under_vmap_and_with_traced_weights(lenet):
    # vmap over groups of images (e.g. a user's own batching), new weights as data
    # (no recompilation: the compiled program is cached on the forward).
    module, variables = lenet
    forward = receptive.make_candidate_forward(module, 1)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 2, 32, 32, 3), dtype=np.uint8)
    pixels = edge_and_random_pixels(rng, 6, 50).reshape(3, 2, 50, 1, 5)
    grouped = jax.jit(jax.vmap(forward, in_axes=(None, 0, 0)))
    logits = np.asarray(grouped(variables, images, pixels))
    for g in range(3):
        expected = full_forward(module)(variables, images[g], pixels[g])
        assert np.max(np.abs(logits[g] - expected)) <= TOLERANCE
    scaled = jax.tree_util.tree_map(lambda x: x * 1.01, variables)
    expected = full_forward(module)(scaled, images[0], pixels[0])
    assert np.max(np.abs(grouped(scaled, images, pixels)[0] - expected)) <= TOLERANCE
    assert grouped._cache_size() == 1


def test_forwards_of_equal_modules_are_equal_and_hashable(lenet):
    module, _ = lenet
    first = receptive.make_candidate_forward(module, 1)
    second = receptive.make_candidate_forward(models.create_model("lenet"), 1)
    assert first == second and hash(first) == hash(second)


def test_lenet_multiply_adds_are_the_hand_counted_ones(lenet):
    module, variables = lenet
    counts = receptive.make_candidate_forward(module, 1).multiply_adds(variables)
    conv1, conv2 = 28 * 28 * 6 * 5 * 5 * 3, 10 * 10 * 16 * 5 * 5 * 6
    dense = 400 * 120 + 120 * 84 + 84 * 10
    assert counts["full"] == conv1 + conv2 + dense
    # A pixel reaches a 5x5 window of conv1; after pooling 3x3, then 7x7 of conv2.
    windowed = 5 * 5 * 6 * 5 * 5 * 3 + 7 * 7 * 16 * 5 * 5 * 6
    assert counts["candidate_windowed"] == windowed
    assert counts["candidate"] == windowed + dense


def test_more_than_one_pixel_per_candidate_is_refused(lenet):
    module, variables = lenet
    forward = receptive.make_candidate_forward(module, 1)
    images = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(PropmapsError, match="one pixel per candidate"):
        forward(variables, images, np.zeros((1, 4, 2, 5), np.int32))


class Custom(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class LeNetVariant(models.LeNet):
    pass


@pytest.mark.parametrize(
    "module, pixels",
    [
        (Custom(), 1),
        (LeNetVariant(), 1),  # a subclass may change the layers
        (models.create_model("lenet", dtype=jnp.bfloat16), 1),
        (models.create_model("resnet_tiny"), 2),
        (models.create_model("lenet"), 3),
    ],
)
def test_unsupported_models_and_pixel_counts_get_none(module, pixels):
    assert receptive.make_candidate_forward(module, pixels) is None
