"""The attack results file `attack.csv`: its columns, and reading it back as arrays.

One row per sampled image, in sampling order:
`index, label, pred_before, prob_true_before, attacked, success, pred_after,
prob_true_after, generations, evaluations`, then per pixel i (1-based)
`row_i, col_i, r_i, g_i, b_i`. For images that were not attacked (misclassified
before the attack) attacked = success = 0 and the pixel columns are -1.
A failed attack still reports its best candidate in the pixel columns.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from propmaps_jax.errors import PropmapsError

BASE_COLUMNS = (
    "index",
    "label",
    "pred_before",
    "prob_true_before",
    "attacked",
    "success",
    "pred_after",
    "prob_true_after",
    "generations",
    "evaluations",
)
FLOAT_COLUMNS = ("prob_true_before", "prob_true_after")
PIXEL_FIELDS = ("row", "col", "r", "g", "b")


def attack_columns(pixels: int) -> list[str]:
    """All column names for an attack of `pixels` pixels."""
    return list(BASE_COLUMNS) + [
        f"{field}_{i}" for i in range(1, pixels + 1) for field in PIXEL_FIELDS
    ]


def num_pixels(columns: list[str]) -> int:
    """Number of attacked pixels k from the header."""
    return sum(1 for c in columns if c.startswith("row_"))


def read_attack_csv(path: str) -> dict[str, np.ndarray]:
    """attack.csv as arrays, plus "pixels": int (N, k, 5) (row, col, r, g, b)."""
    if not os.path.isfile(path):
        raise PropmapsError(
            f"{path} does not exist: run the attack first "
            "(python launch.py --experiment=attack --workdir=...)"
        )
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise PropmapsError(f"{path} is empty: run the attack again") from None
        rows = list(reader)
    k = num_pixels(header)
    if header != attack_columns(k) or k < 1:
        raise PropmapsError(f"{path} does not have the columns of an attack.csv")
    try:
        table = np.array(rows, dtype=np.float64).reshape(len(rows), len(header))
    except ValueError:
        raise PropmapsError(
            f"{path} has malformed rows: run the attack again"
        ) from None
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        column = table[:, j]
        out[name] = column if name in FLOAT_COLUMNS else column.astype(np.int64)
    out["attacked"] = out["attacked"].astype(bool)
    out["success"] = out["success"].astype(bool)
    pixel_cols = [attack_columns(k).index(f"row_{i}") for i in range(1, k + 1)]
    out["pixels"] = np.stack([table[:, c : c + 5] for c in pixel_cols], axis=1).astype(
        np.int64
    )
    return out
