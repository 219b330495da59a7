"""What loaded weights must satisfy before any work: a model that cannot compute
is refused at once, in one line, instead of giving NaN probabilities later.

- every variable finite (`check_finite_variables`, run by `checkpoint.load_weights`
  on every checkpoint and Keras file);
- as many classes as the data has (`check_num_classes`);
- finite logits on a few real images (`check_outputs_finite`): weights that are
  finite can still overflow, or hold a negative BatchNorm variance.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from propmaps_jax.errors import WeightsError
from propmaps_jax.types import ApplyFn, Images, Variables

# Images the output check runs: enough to meet real data, few enough to be cheap.
CHECK_IMAGES = 4


def first_non_finite(variables: Variables) -> tuple[str, str] | None:
    """(path, what) of the first variable holding NaN or inf, in the order of the
    tree's leaves ("params/conv1/kernel", "NaN" / "inf" / "NaN and inf");
    None when every floating-point value is finite."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        values = np.asarray(leaf)
        if not np.issubdtype(values.dtype, np.inexact) or np.isfinite(values).all():
            continue
        nan, inf = bool(np.isnan(values).any()), bool(np.isinf(values).any())
        what = " and ".join(name for name, bad in (("NaN", nan), ("inf", inf)) if bad)
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        return name, what
    return None


def check_finite_variables(variables: Variables, where: str) -> None:
    """WeightsError naming `where` and the first variable that is not finite."""
    bad = first_non_finite(variables)
    if bad is not None:
        name, what = bad
        raise WeightsError(
            f"{where}: variable {name} holds {what}, so the model cannot compute "
            "(a diverged training or a damaged file); pass other `weights`"
        )


def check_num_classes(num_classes: int, data_classes: int, where: str) -> None:
    """WeightsError unless the model's `num_classes` is the data's class count."""
    if num_classes != data_classes:
        raise WeightsError(
            f"{where} has {num_classes} output classes, the data has "
            f"{data_classes}: its probabilities of labels would be missing or "
            f"wrong; pass `weights` of a {data_classes}-class model"
        )


@functools.cache
def _forward(apply_fn: ApplyFn):
    # Cached on the function (modules compare equal), never on the weights.
    return jax.jit(apply_fn)


def check_outputs_finite(
    apply_fn: ApplyFn, variables: Variables, images: Images, where: str
) -> None:
    """WeightsError unless the logits of the first `CHECK_IMAGES` of `images` are
    all finite (a cheap forward before the real work)."""
    batch = np.asarray(images[:CHECK_IMAGES])
    if len(batch) == 0:
        return
    logits = np.asarray(_forward(apply_fn)(variables, batch))
    if not np.isfinite(logits).all():
        rows = np.flatnonzero(
            ~np.isfinite(logits).all(axis=tuple(range(1, logits.ndim)))
        )
        what = "NaN" if np.isnan(logits).any() else "inf"
        raise WeightsError(
            f"{where} gives non-finite logits ({what}) "
            f"on {len(rows)} of the first {len(batch)} images, so it cannot compute "
            "(weights too large, or a negative BatchNorm variance); pass other "
            "`weights`"
        )
