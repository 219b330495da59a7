"""Locality library: neighbour/ring/random positions, moved evaluation, maps; Wilson."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

from propmaps_jax import models, stats
from propmaps_jax.analysis import locality
from propmaps_jax.errors import PropmapsError

H = W = 32


def brute_ring(row, col, distance, height=H, width=W):
    """All positions at Chebyshev distance exactly `distance`, inside the image."""
    return {
        (r, c)
        for r in range(height)
        for c in range(width)
        if max(abs(r - row), abs(c - col)) == distance
    }


def valid_set(rows, cols, inside):
    rows, cols, inside = map(np.asarray, (rows, cols, inside))
    return {(int(r), int(c)) for r, c, ok in zip(rows, cols, inside, strict=True) if ok}


def test_chebyshev_offsets_counts_and_order():
    offsets, distances = locality.chebyshev_offsets(4)
    assert offsets.shape == (4 * 4 * 5, 2)
    for d in range(1, 5):
        ring = offsets[distances == d]
        assert len(ring) == 8 * d
        assert np.all(np.max(np.abs(ring), axis=1) == d)
        assert len({tuple(o) for o in ring}) == 8 * d
    assert np.all(np.diff(distances) >= 0)
    with pytest.raises(PropmapsError, match="distance"):
        locality.chebyshev_offsets(0)


@pytest.mark.parametrize(
    "row, col, expected",
    [
        (0, 0, {(0, 1), (1, 0), (1, 1)}),  # corner
        (31, 31, {(30, 30), (30, 31), (31, 30)}),  # opposite corner
        (0, 5, {(0, 4), (0, 6), (1, 4), (1, 5), (1, 6)}),  # top edge
        (17, 31, {(16, 30), (16, 31), (17, 30), (18, 30), (18, 31)}),  # right edge
        (
            10,
            10,
            {(9, 9), (9, 10), (9, 11), (10, 9), (10, 11), (11, 9), (11, 10), (11, 11)},
        ),  # centre
    ],
)
def test_neighbours_exact_sets(row, col, expected):
    rows, cols, inside = locality.neighbour_positions(
        jnp.array(row), jnp.array(col), H, W
    )
    assert rows.shape == cols.shape == inside.shape == (8,)
    got = valid_set(rows, cols, inside)
    assert got == expected
    assert (row, col) not in got
    # Outside positions are clipped into the image, so evaluating them is safe.
    assert np.all((np.asarray(rows) >= 0) & (np.asarray(rows) < H))
    assert np.all((np.asarray(cols) >= 0) & (np.asarray(cols) < W))


@pytest.mark.parametrize("row, col", [(0, 0), (0, 13), (2, 31), (16, 16), (31, 3)])
@pytest.mark.parametrize("distance", [1, 2, 3, 4])
def test_rings_match_brute_force(row, col, distance):
    rows, cols, inside = locality.ring_positions(
        jnp.array([row]), jnp.array([col]), distance, H, W
    )
    assert rows.shape == (1, 8 * distance)
    assert valid_set(rows[0], cols[0], inside[0]) == brute_ring(row, col, distance)


def test_corner_ring_two_exact():
    rows, cols, inside = locality.ring_positions(jnp.array(0), jnp.array(0), 2, H, W)
    assert valid_set(rows, cols, inside) == {(0, 2), (1, 2), (2, 2), (2, 1), (2, 0)}


def test_sample_nearby_only_valid_neighbours_and_uniform(key):
    n = 3000
    indices = jnp.arange(n)
    for row, col in [(0, 0), (0, 7), (12, 20)]:
        rows, cols = locality.sample_nearby(
            key, indices, jnp.full(n, row), jnp.full(n, col), H, W
        )
        picked = list(
            zip(np.asarray(rows).tolist(), np.asarray(cols).tolist(), strict=True)
        )
        allowed = brute_ring(row, col, 1)
        assert set(picked) == allowed  # every neighbour is drawn, nothing else
        counts = np.array([picked.count(p) for p in sorted(allowed)])
        expected = n / len(allowed)
        chi2 = np.sum((counts - expected) ** 2 / expected)
        # 99.9% quantile of chi-square with 7 degrees of freedom is 24.3.
        assert chi2 < 24.3, counts


def test_sample_random_excludes_original_and_is_uniform(key):
    height, width = 4, 5
    n = 6000
    row, col = 1, 2
    rows, cols = locality.sample_random(
        key, jnp.arange(n), jnp.full(n, row), jnp.full(n, col), height, width
    )
    flat = np.asarray(rows) * width + np.asarray(cols)
    assert np.all((np.asarray(rows) >= 0) & (np.asarray(rows) < height))
    assert np.all((np.asarray(cols) >= 0) & (np.asarray(cols) < width))
    assert not np.any(flat == row * width + col)
    counts = np.bincount(flat, minlength=height * width)
    others = np.delete(counts, row * width + col)
    expected = n / (height * width - 1)
    chi2 = np.sum((others - expected) ** 2 / expected)
    # 99.9% quantile of chi-square with 18 degrees of freedom is 42.3.
    assert chi2 < 42.3, others


@pytest.mark.parametrize("sampler", [locality.sample_nearby, locality.sample_random])
def test_sampling_depends_only_on_key_and_dataset_index(key, sampler):
    rng = np.random.default_rng(0)
    indices = np.arange(100, 164)
    rows = rng.integers(0, H, 64)
    cols = rng.integers(0, W, 64)
    full = sampler(key, indices, rows, cols, H, W)
    again = sampler(key, indices, rows, cols, H, W)
    chex.assert_trees_all_equal(full, again)
    # Any order and any batch split give the same position for the same image.
    perm = rng.permutation(64)
    permuted = sampler(key, indices[perm], rows[perm], cols[perm], H, W)
    chex.assert_trees_all_equal(tuple(np.asarray(x)[perm] for x in full), permuted)
    head = sampler(key, indices[:10], rows[:10], cols[:10], H, W)
    chex.assert_trees_all_equal(tuple(np.asarray(x)[:10] for x in full), head)
    other = sampler(jax.random.key(7), indices, rows, cols, H, W)
    assert not np.array_equal(np.asarray(full[0]), np.asarray(other[0])) or not (
        np.array_equal(np.asarray(full[1]), np.asarray(other[1]))
    )


def _reference_outcome(logits_fn, image, label, row, col, colour):
    """Plain NumPy: copy the image, set one pixel, run the model on a batch of one."""
    moved = np.array(image, copy=True)
    moved[row, col] = colour
    logits = np.asarray(logits_fn(jnp.asarray(moved[None], jnp.float32)))[0]
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    pred = int(np.argmax(logits))
    return pred, probs[label], pred != label


def test_evaluate_moved_matches_plain_loop(tiny_lenet, random_images):
    module, variables = tiny_lenet
    logits_fn = models.make_logits_fn(module, variables)
    rng = np.random.default_rng(1)
    n = random_images.shape[0]
    labels = rng.integers(0, 10, n)
    pixels = np.concatenate(
        [rng.integers(0, 32, (n, 1, 2)), rng.integers(0, 256, (n, 1, 3))], axis=-1
    )
    rows, cols = rng.integers(0, 32, (n, 3)), rng.integers(0, 32, (n, 3))
    out = jax.jit(locality.evaluate_moved, static_argnums=0)(
        models.make_apply_fn(module),
        variables,
        random_images,
        labels,
        pixels,
        rows,
        cols,
    )
    assert out.pred.shape == out.prob_true.shape == out.success.shape == (n, 3)
    for i in range(n):
        for j in range(3):
            pred, prob, success = _reference_outcome(
                logits_fn,
                random_images[i],
                labels[i],
                rows[i, j],
                cols[i, j],
                pixels[i, 0, 2:],
            )
            assert int(out.pred[i, j]) == pred
            assert bool(out.success[i, j]) == success
            np.testing.assert_allclose(float(out.prob_true[i, j]), prob, atol=1e-5)


def test_evaluate_offsets_compiles_once_for_any_position(tiny_lenet, random_images):
    module, variables = tiny_lenet
    offsets, _ = locality.chebyshev_offsets(2)
    labels = np.zeros(8, np.int32)

    apply_fn = models.make_apply_fn(module)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(pixels):
        return locality.evaluate_offsets(
            apply_fn, variables, random_images, labels, pixels, offsets
        )

    for row, col in [(0, 0), (16, 16), (31, 5)]:
        pixels = np.tile(np.array([[[row, col, 255, 0, 0]]]), (8, 1, 1))
        out, inside = run(pixels)
        assert out.success.shape == inside.shape == (8, len(offsets))
        expected = sum(len(brute_ring(row, col, d)) for d in (1, 2))
        assert int(inside[0].sum()) == expected


def test_multi_pixel_perturbations_are_rejected(random_images):
    pixels = np.zeros((8, 3, 5), np.int32)
    with pytest.raises(PropmapsError, match="k = 3"):
        locality.evaluate_moved(
            lambda v, x: x,
            None,
            random_images,
            np.zeros(8),
            pixels,
            np.zeros(8),
            np.zeros(8),
        )


def test_vulnerability_map_matches_plain_loop(tiny_lenet, random_images):
    module, variables = tiny_lenet
    logits_fn = models.make_logits_fn(module, variables)
    image, label, colour = random_images[0], 3, np.array([250, 5, 120])
    # A chunk size that does not divide 32*32 exercises the padding.
    out = jax.jit(locality.vulnerability_map, static_argnums=(0, 5))(
        models.make_apply_fn(module), variables, image, label, colour, 300
    )
    assert out.pred.shape == out.prob_true.shape == out.success.shape == (H, W)
    # Plain loop: build every moved image one by one, then one model call.
    moved = []
    for r in range(H):
        for c in range(W):
            m = np.array(image, copy=True)
            m[r, c] = colour
            moved.append(m)
    logits = np.asarray(
        logits_fn(jnp.asarray(np.stack(moved), jnp.float32)), np.float64
    )
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(
        np.asarray(out.pred), np.argmax(logits, axis=1).reshape(H, W)
    )
    np.testing.assert_allclose(
        np.asarray(out.prob_true), probs[:, label].reshape(H, W), atol=1e-5
    )
    np.testing.assert_array_equal(
        np.asarray(out.success), np.argmax(logits, axis=1).reshape(H, W) != label
    )
    # The map is not trivially constant: the colour changes p(true) with position.
    assert np.ptp(np.asarray(out.prob_true)) > 0


def test_wilson_hand_computed():
    # 5/10: the textbook Wilson interval (0.2366, 0.7634).
    low, high = stats.wilson_interval(5, 10)
    assert low == pytest.approx(0.23659, abs=1e-4)
    assert high == pytest.approx(0.76341, abs=1e-4)
    # 0/n: low is 0 and high is z^2 / (n + z^2).
    z2 = 1.959963984540054**2
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
    assert stats.wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    # 1638/5000 (the paper's ResNet count), float64 formula written out here.
    n, p = 5000, 1638 / 5000
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = np.sqrt(z2) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    assert stats.wilson_interval(1638, 5000) == pytest.approx(
        (centre - half, centre + half), abs=1e-12
    )
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n, conf in [
        (1638, 5000, 0.95),
        (2934, 5000, 0.95),
        (3, 97, 0.9),
        (1, 2, 0.99),
    ]:
        ci = scipy_stats.binomtest(k, n).proportion_ci(conf, method="wilson")
        assert stats.wilson_interval(k, n, conf) == pytest.approx(
            (ci.low, ci.high), abs=1e-10
        )


def test_wilson_bad_input():
    with pytest.raises(PropmapsError):
        stats.wilson_interval(6, 5)
    with pytest.raises(PropmapsError):
        stats.wilson_interval(1, 5, confidence=1.5)


def test_proportion_and_format():
    prop = stats.proportion(1638, 5000)
    assert prop["rate"] == pytest.approx(0.3276)
    text = stats.format_proportion(prop)
    assert text.startswith("32.8% (1638/5000; 95% CI 31.")
    assert stats.proportion(0, 0)["rate"] is None


def test_protocol_moves_reproduce_a_committed_run():
    """The protocol's draws are stable: they give the nearby/random positions that
    the ResNet-32 run of RESULTS.md stored (made before the functional-core split)."""
    path = os.path.join(
        ROOT,
        "docs",
        "results",
        "resnet_100_cpu",
        "locality.csv",
    )
    rows = np.genfromtxt(path, delimiter=",", names=True, dtype=np.int64)
    nearby, random = locality.protocol_moves(
        0, rows["index"], rows["row"], rows["col"], 32, 32
    )
    np.testing.assert_array_equal(nearby[:, 0], rows["nearby_row"])
    np.testing.assert_array_equal(nearby[:, 1], rows["nearby_col"])
    np.testing.assert_array_equal(random[:, 0], rows["random_row"])
    np.testing.assert_array_equal(random[:, 1], rows["random_col"])
    # the streams are the protocol's own: another seed moves elsewhere
    other, _ = locality.protocol_moves(
        1, rows["index"], rows["row"], rows["col"], 32, 32
    )
    assert (other != nearby).any()


def test_programs_are_the_tested_functions_compiled_once(tiny_lenet, random_images):
    """moves_program / vulnerability_program (the locality experiment's and
    export_bench's programs) give what evaluate_moved, evaluate_offsets and
    vulnerability_map give (each checked above against a plain loop), and are
    cached on what decides the program: the same object on a second request."""
    module, variables = tiny_lenet
    apply_fn = models.make_apply_fn(module)
    rng = np.random.default_rng(4)
    n = random_images.shape[0]
    labels = rng.integers(0, 10, n).astype(np.int32)
    pixels = np.concatenate(
        [rng.integers(0, 32, (n, 1, 2)), rng.integers(0, 256, (n, 1, 3))], axis=-1
    )
    nearby, far = rng.integers(0, 32, (n, 2)), rng.integers(0, 32, (n, 2))
    program = locality.moves_program(apply_fn, 2)
    assert locality.moves_program(apply_fn, 2) is program
    got = program(variables, random_images, labels, pixels, nearby, far)
    offsets, _ = locality.chebyshev_offsets(2)
    # The tested functions, each compiled on its own (op by op they would compile
    # a program per operation).
    evaluate_moved = jax.jit(locality.evaluate_moved, static_argnums=0)
    expected = (
        evaluate_moved(apply_fn, variables, random_images, labels, pixels, *nearby.T),
        evaluate_moved(apply_fn, variables, random_images, labels, pixels, *far.T),
        *jax.jit(locality.evaluate_offsets, static_argnums=0)(
            apply_fn, variables, random_images, labels, pixels, offsets
        ),
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert a.shape == b.shape
        if a.dtype == np.float32:
            np.testing.assert_allclose(a, b, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)

    vulnerability = locality.vulnerability_program(apply_fn, 300)
    assert locality.vulnerability_program(apply_fn, 300) is vulnerability
    colour = np.array([250, 5, 120])
    got = vulnerability(variables, random_images[0], 3, colour)
    expected = jax.jit(locality.vulnerability_map, static_argnums=(0, 5))(
        apply_fn, variables, random_images[0], 3, colour, 300
    )
    np.testing.assert_array_equal(got.pred, expected.pred)
    np.testing.assert_array_equal(got.success, expected.success)
    np.testing.assert_allclose(got.prob_true, expected.prob_true, atol=1e-6)
