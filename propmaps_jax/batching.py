"""The one fixed-shape batch loop of the project.

A jitted function compiles once per input shape. To run one over N items in
batches of B with a single compilation, every batch has B rows: the last one is
padded by repeating its first item, and the padded rows' results are dropped (or
masked, `Batch.valid`). In inference every item's result depends on its own row
only, so the padding never changes a result: a batched run gives, bit for bit, the
results of calling the function on each batch of real rows (tested).

    probs = batching.map_batches(jitted_fn, [images, labels], batch_size=256)

`map_batches` maps a function and gathers its outputs on the host; `batches` is the
loop itself, for callers that carry a state from batch to batch (running sums).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from propmaps_jax.errors import PropmapsError


class Batch(NamedTuple):
    """One batch: rows `take` (B,) of the data, the first `count` of them real."""

    take: np.ndarray  # indices into the data; padding repeats the batch's first
    start: int  # the first real row's index
    count: int  # how many rows are real

    @property
    def end(self) -> int:
        """One past the last real row: the items done after this batch."""
        return self.start + self.count

    @property
    def valid(self) -> np.ndarray:
        """(B,) bool: True for the real rows, False for the padding."""
        return np.arange(len(self.take)) < self.count


def batches(n: int, batch_size: int) -> Iterator[Batch]:
    """The batches of `batch_size` rows that cover items 0..n-1 in order."""
    if batch_size < 1:
        raise PropmapsError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        take = np.concatenate(
            [np.arange(start, start + count), np.full(batch_size - count, start)]
        )
        yield Batch(take, start, count)


def map_batches(
    fn: Callable[..., Any],
    arrays: Sequence[Any],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> Any:
    """fn over fixed-size batches of `arrays` (rows along axis 0), on the host.

    Args:
      fn: a jitted (or jittable) function of one batch of each array; it returns
        a pytree of arrays with the batch along axis 0.
      arrays: the inputs, each with the same number of rows N (NumPy or JAX
        arrays, e.g. one PRNG key per item).
      batch_size: rows per call; the last batch is padded to it.
      on_batch: called as on_batch(items done) after each batch (progress lines).
    Returns:
      fn's pytree with NumPy arrays of N rows. With N = 0, fn is traced once for
      the shapes (`jax.eval_shape`, nothing runs) and every array has 0 rows.
    """
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise PropmapsError(
            "map_batches needs arrays with the same number of rows, got "
            + ", ".join(str(len(a)) for a in arrays)
        )
    out = None
    for batch in batches(n, batch_size):
        part = jax.device_get(fn(*(a[batch.take] for a in arrays)))
        if out is None:
            out = jax.tree_util.tree_map(
                lambda v: np.empty((n, *np.shape(v)[1:]), np.asarray(v).dtype), part
            )
        for target, value in zip(
            jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(part), strict=True
        ):
            target[batch.start : batch.end] = np.asarray(value)[: batch.count]
        if on_batch is not None:
            on_batch(batch.end)
    if out is None:  # no rows: the output's structure from fn's shapes
        shapes = jax.eval_shape(
            fn,
            *(
                jax.ShapeDtypeStruct((batch_size, *np.shape(a)[1:]), a.dtype)
                for a in arrays
            ),
        )
        out = jax.tree_util.tree_map(
            lambda s: np.empty((0, *s.shape[1:]), s.dtype), shapes
        )
    return out
