"""propmaps_jax.batching: the one padded fixed-shape batch loop, against unbatched
references (ragged last batch included), and the callers' results."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from propmaps_jax import batching, evaluation, models
from propmaps_jax.errors import PropmapsError


def test_batches_cover_every_item_once_with_one_shape():
    got = list(batching.batches(7, 3))
    assert [(b.start, b.count, b.end) for b in got] == [(0, 3, 3), (3, 3, 6), (6, 1, 7)]
    assert all(b.take.shape == (3,) for b in got)
    # The last batch is padded with its first item, and masked as padding.
    np.testing.assert_array_equal(got[-1].take, [6, 6, 6])
    np.testing.assert_array_equal(got[-1].valid, [True, False, False])
    assert list(batching.batches(0, 3)) == []
    with pytest.raises(PropmapsError, match="batch_size must be at least 1"):
        list(batching.batches(3, 0))


def test_map_batches_equals_the_unbatched_function():
    calls = []

    @jax.jit
    def fn(x, y):
        return {"sum": x * 2 + y[:, None], "rows": (x.sum(-1), y - 1)}

    def counted(x, y):
        calls.append(x.shape)
        return fn(x, y)

    x = np.arange(20 * 3, dtype=np.int32).reshape(20, 3)
    y = np.arange(20, dtype=np.int32) * 7
    done = []
    got = batching.map_batches(counted, [x, y], 6, on_batch=done.append)
    expected = jax.device_get(fn(x, y))
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    for g, e in zip(
        jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected), strict=True
    ):
        assert isinstance(g, np.ndarray) and g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)
    assert calls == [(6, 3)] * 4  # 6, 6, 6 and a ragged 2 padded to 6
    assert done == [6, 12, 18, 20]


def test_map_batches_of_nothing_has_the_output_structure():
    fn = jax.jit(
        lambda x, k: (x.astype(jnp.float32) / 2, jax.vmap(jax.random.uniform)(k))
    )
    keys = jax.random.split(jax.random.key(0), 0)
    half, u = batching.map_batches(fn, [np.zeros((0, 4), np.uint8), keys], 5)
    assert half.shape == (0, 4) and half.dtype == np.float32 and u.shape == (0,)
    with pytest.raises(PropmapsError, match="same number of rows"):
        batching.map_batches(fn, [np.zeros((3, 4)), keys], 5)


def test_a_model_batched_gives_each_batch_its_own_results():
    # The padding never changes a real row: every batch, the ragged last one
    # included, equals the model run on that batch's real rows padded alike.
    module = models.create_model("lenet_tiny")
    variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    images = np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3), np.uint8)
    apply_fn = jax.jit(models.make_apply_fn(module))
    got = batching.map_batches(functools.partial(apply_fn, variables), [images], 4)
    for start in range(0, 11, 4):
        part = images[start : start + 4]
        padded = np.concatenate([part, np.repeat(part[:1], 4 - len(part), 0)])
        np.testing.assert_array_equal(
            got[start : start + 4], np.asarray(apply_fn(variables, padded))[: len(part)]
        )
    # ... and agrees with one unbatched call to float32 rounding.
    np.testing.assert_allclose(got, apply_fn(variables, images), rtol=1e-5, atol=1e-5)


def test_predict_labels_is_the_model_verdict():
    module = models.create_model("lenet_tiny")
    variables = module.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    apply_fn = models.make_apply_fn(module)
    images = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3), np.uint8)
    labels = np.arange(9) % 10
    pred, prob = evaluation.predict_labels(apply_fn, variables, images, labels, 4)
    probs = evaluation.predict(apply_fn, variables, images, batch_size=4)
    assert pred.dtype == np.int64 and prob.dtype == np.float32
    np.testing.assert_array_equal(pred, np.argmax(apply_fn(variables, images), -1))
    np.testing.assert_allclose(prob, probs[np.arange(9), labels], rtol=1e-6)
    with pytest.raises(PropmapsError, match="no images"):
        evaluation.predict_labels(apply_fn, variables, images[:0], labels[:0])
