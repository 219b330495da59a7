"""The receptive-field study's models: permutation, kernels, MLP, network moves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax import models
from propmaps_jax.analysis import locality
from propmaps_jax.attack import de as attack_de
from propmaps_jax.errors import PropmapsError, WeightsError
from propmaps_jax.models import checkpoint, receptive


def test_permutation_round_trip():
    perm = models.pixel_permutation(0, 4, 5)
    assert sorted(perm.tolist()) == list(range(20))
    assert not np.array_equal(perm, np.arange(20))
    inverse = models.inverse_permutation(perm)
    np.testing.assert_array_equal(perm[inverse], np.arange(20))
    x = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    y = np.asarray(models.permute_pixels(jnp.asarray(x), perm))
    # Network position j holds image pixel perm[j], its three channels together.
    flat_x, flat_y = x.reshape(2, 20, 3), y.reshape(2, 20, 3)
    np.testing.assert_array_equal(flat_y[:, 3], flat_x[:, perm[3]])
    back = np.asarray(models.permute_pixels(jnp.asarray(y), inverse))
    np.testing.assert_array_equal(back, x)


def test_permuted_lenet_is_lenet_on_permuted_images():
    config = models.default_config("lenet_perm_tiny")
    module = models.create_model(config)
    plain = models.create_model("lenet_tiny")
    variables = models.init_variables(module, jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3))
    images = images.astype(np.float32)
    got = models.make_apply_fn(module)(variables, images)
    # Permuting the raw pixels first is the same: normalisation is per channel.
    permuted = models.permute_pixels(jnp.asarray(images), config.permutation)
    want = models.make_apply_fn(plain)(variables, permuted)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_permutation_survives_a_checkpoint(tmp_path):
    config = models.default_config("lenet_perm_tiny")
    module = models.create_model(config)
    variables = models.init_variables(module, jax.random.key(1))
    path = str(tmp_path / "perm.msgpack")
    checkpoint.save_checkpoint(path, config, variables)
    loaded, _, _ = checkpoint.load_weights("lenet_perm_tiny", path)
    assert loaded.permutation == config.permutation
    # Other models' configs do not change (no permutation key).
    assert "permutation" not in models.ModelConfig("lenet").to_dict()


@pytest.mark.parametrize(
    "bad", [[0] * 1024, list(range(1023)), list(range(1, 1025)), [0.5] * 1024]
)
def test_a_permutation_that_is_not_one_is_refused(bad):
    data = models.ModelConfig("lenet_perm").to_dict()
    data["permutation"] = bad
    with pytest.raises(WeightsError, match="permutation"):
        models.ModelConfig.from_dict(data)


def test_permuted_model_needs_its_permutation_and_others_refuse_one():
    with pytest.raises(PropmapsError, match="needs its pixel permutation"):
        models.create_model(models.ModelConfig("lenet_perm"))
    perm = tuple(int(v) for v in models.pixel_permutation(0))
    with pytest.raises(PropmapsError, match="takes no pixel permutation"):
        models.create_model(models.ModelConfig("lenet", permutation=perm))


@pytest.mark.parametrize("name", ["lenet_k3", "lenet_k7", "lenet_perm", "mlp_tiny"])
def test_candidate_forward_equals_plain_forward(name):
    module = models.create_model(name)
    variables = models.init_variables(module, jax.random.key(3))
    forward = receptive.make_candidate_forward(module, 1)
    assert forward is not None
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    pos = rng.integers(0, 32, (2, 6, 1, 2))
    colour = rng.integers(0, 256, (2, 6, 1, 3))
    pixels = np.concatenate([pos, colour], -1).astype(np.int32)
    # Both jitted: one program each, not op by op.
    want = jax.jit(models.make_apply_fn(module))(
        variables, attack_de.perturbed_batch(jnp.asarray(images), jnp.asarray(pixels))
    )
    got = jax.jit(forward)(variables, images, pixels)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_kernel_sizes_change_only_the_first_convolution():
    for name, k in (("lenet_k3", 3), ("lenet_k7", 7), ("lenet", 5)):
        variables = models.variables_template(models.default_config(name))
        assert variables["params"]["conv1"]["kernel"].shape == (k, k, 3, 6)
        assert variables["params"]["conv2"]["kernel"].shape == (5, 5, 6, 16)


def test_mlp_has_no_convolution():
    variables = models.variables_template(models.default_config("mlp"))
    assert set(variables["params"]) == {"fc1", "fc2", "logits"}
    assert variables["params"]["fc1"]["kernel"].shape == (3072, 1024)


def _network_distance(perm, a, b, width):
    inverse = models.inverse_permutation(perm)
    qa, qb = inverse[a], inverse[b]
    return np.maximum(
        np.abs(qa // width - qb // width), np.abs(qa % width - qb % width)
    )


def test_network_rings_are_neighbours_in_the_network_not_the_image():
    h = w = 8
    perm = models.pixel_permutation(5, h, w)
    rows, cols = np.array([0, 3, 7]), np.array([0, 4, 2])
    offsets, distances = locality.chebyshev_offsets(2)
    img_rows, img_cols, inside = locality.network_offset_positions(
        rows, cols, offsets, perm, h, w
    )
    img_rows, img_cols, inside = map(np.asarray, (img_rows, img_cols, inside))
    for i in range(3):
        for p in np.flatnonzero(inside[i]):
            d = _network_distance(
                perm, rows[i] * w + cols[i], img_rows[i, p] * w + img_cols[i, p], w
            )
            assert d == distances[p]
    # The attacked pixel's network position in a corner has fewer neighbours inside.
    inverse = models.inverse_permutation(perm)
    for i in range(3):
        q = inverse[rows[i] * w + cols[i]]
        r, c = q // w, q % w
        expected = sum(
            0 <= r + dr < h and 0 <= c + dc < w for dr, dc in offsets[distances == 1]
        )
        assert inside[i, distances == 1].sum() == expected


def test_network_nearby_draw_is_a_network_neighbour_and_per_image():
    h = w = 8
    perm = models.pixel_permutation(2, h, w)
    rows, cols = np.array([1, 5, 6, 0]), np.array([2, 2, 7, 0])
    indices = np.array([10, 11, 12, 13])
    moves = locality.network_protocol_moves(0, indices, rows, cols, perm, h, w)
    for i in range(4):
        d = _network_distance(
            perm, rows[i] * w + cols[i], moves[i, 0] * w + moves[i, 1], w
        )
        assert d == 1
    # One key per image: the same image draws the same move in any batch.
    alone = locality.network_protocol_moves(
        0, indices[2:3], rows[2:3], cols[2:3], perm, h, w
    )
    np.testing.assert_array_equal(alone[0], moves[2])


def test_network_moves_need_a_permutation():
    with pytest.raises(PropmapsError, match="permutation"):
        locality.network_protocol_moves(
            0, np.array([0]), np.array([1]), np.array([1]), np.zeros(64, int), 8, 8
        )
