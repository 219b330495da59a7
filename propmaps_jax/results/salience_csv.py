"""DIR/salience/: the salience study's tables, written here, and the moves it reads
from a locality run's locality.csv.

table.csv holds the verdict table's rows (`analysis.salience`'s P1, P2, P3: id,
prediction, class, measure, n, estimate, interval, rule values, verdict);
per_image.csv one row per attacked image and change (the attack's pixel, nearby,
random): the image, the outcome, where the position came from, the change, the
predictions, the last-layer propagation map's max and mean, and per class
(true, new) the 3x3 and 5x5 capture before and after, the Spearman correlation
and the top-5% overlap of the maps. Numbers are written with 6 significant
digits. `read_table` and `read_per_image` read them back; `locality_positions`
reads the nearby and random positions of the locality study's successful
attacks, checked against the attack run.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from propmaps_jax.analysis.salience import CLASSES, SalienceStudy
from propmaps_jax.analysis.saliency import CHANGES, WINDOWS
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import _io, locality_csv

# Per class, after the class's name: the measures of each change.
PER_CLASS = [f"capture{s}_{w}" for s in WINDOWS for w in ("before", "after")] + [
    "spearman",
    "top5",
]
PER_IMAGE_COLUMNS = (
    ["index", "label", "outcome", "change", "positions_from"]
    + ["row", "col", "r", "g", "b", "pred_before", "pred_after"]
    + ["class_changed", "prob_true_after", "pm_last_max", "pm_last_mean"]
    + [f"{t}_{name}" for t in CLASSES for name in PER_CLASS]
)
# per_image.csv's columns of text; every other column holds a number.
PER_IMAGE_TEXT = ("outcome", "change", "positions_from")
TABLE_TEXT = ("id", "prediction", "class", "measure", "verdict")
LOCALITY_COLUMNS = locality_csv.POSITION_COLUMNS
REMEDY = "run the locality experiment again or delete it"


def table_csv(rows: list[dict]) -> str:
    """table.csv: the verdict table's rows, one column per key."""
    header = list(rows[0])
    return _io.csv_text(header, [[r[h] for h in header] for r in rows])


def per_image_csv(study: SalienceStudy, from_locality: np.ndarray) -> str:
    """per_image.csv: one row per (attacked image, change) of `study`;
    `from_locality` (N,): whether the image's nearby and random positions came
    from a locality.csv (else they were drawn)."""
    results = study.results
    out = []
    for i, label in enumerate(study.labels):
        label = int(label)
        for j, change in enumerate(CHANGES):
            drawn = j == 0 or not from_locality[i]
            out.append(
                [int(study.indices[i]), label]
                + ["successful" if study.success[i] else "failed", change]
                + ["attack" if j == 0 else ("drawn" if drawn else "locality")]
                + [int(v) for v in study.changes[i, j]]
                + [int(results["pred_before"][i]), int(results["pred_after"][i, j])]
                + [int(results["pred_after"][i, j] != label)]
                + [f"{results[k][i, j]:.6g}" for k in ("prob_true_after",)]
                + [f"{results[k][i, j]:.6g}" for k in ("pm_last_max", "pm_last_mean")]
                + [
                    f"{results[f'{t}_{name}'][i, j]:.6g}"
                    for t in CLASSES
                    for name in PER_CLASS
                ]
            )
    return _io.csv_text(PER_IMAGE_COLUMNS, out)


def _read(path: str, columns: list[str] | None) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(_io.read_text(path), newline="")))
    if columns is not None and rows and list(rows[0]) != list(columns):
        raise PropmapsError(
            f"{path} does not have the columns of this version: run the salience "
            "experiment again"
        )
    return rows


def read_table(path: str) -> list[dict]:
    """table.csv's rows as `table_csv` was given them (numbers as floats, n as
    an int)."""
    return [
        {
            k: v if k in TABLE_TEXT else int(v) if k == "n" else float(v)
            for k, v in row.items()
        }
        for row in _read(path, None)
    ]


def read_per_image(path: str) -> dict[str, np.ndarray]:
    """per_image.csv as {column: array (N * 3,)}: text columns as str, the others
    as int64 or float64."""
    rows = _read(path, PER_IMAGE_COLUMNS)
    out = {}
    for column in PER_IMAGE_COLUMNS:
        values = [row[column] for row in rows]
        if column in PER_IMAGE_TEXT:
            out[column] = np.array(values, str)
        elif column.startswith(("true_", "new_", "pm_", "prob_")):
            out[column] = np.array(values, np.float64)
        else:
            out[column] = np.array(values, np.int64)
    return out


def read_locality_positions(
    path: str, indices: np.ndarray, pixels: np.ndarray
) -> dict[int, tuple[int, int, int, int]]:
    """{dataset index: (nearby row, col, random row, col)} from a locality.csv
    whose attack pixels must be those of the attacks `indices` (N,) with `pixels`
    (N, 1, 5)."""
    read = locality_csv.read(path, LOCALITY_COLUMNS, remedy=REMEDY)
    rows = [
        {c: int(read[c][k]) for c in LOCALITY_COLUMNS}
        for k in range(len(read["index"]))
    ]
    where = {int(i): j for j, i in enumerate(indices)}
    out = {}
    for r in rows:
        j = where.get(r["index"])
        stored = [r["row"], r["col"], r["r"], r["g"], r["b"]]
        if j is None or stored != [int(v) for v in pixels[j, 0]]:
            raise PropmapsError(
                f"{path} does not match attack.csv (test image {r['index']}): " + REMEDY
            )
        out[r["index"]] = (
            r["nearby_row"],
            r["nearby_col"],
            r["random_row"],
            r["random_col"],
        )
    return out


def locality_positions(
    path: str,
    indices: np.ndarray,
    pixels: np.ndarray,
    success: np.ndarray,
    height: int,
    width: int,
) -> dict[int, tuple[int, int, int, int]]:
    """The moves of the locality.csv at `path` (`read_locality_positions`): one
    per successful attack (`success` (N,)), inside the `height` x `width` image."""
    stored = read_locality_positions(path, indices, pixels)
    if len(stored) != int(success.sum()):
        raise PropmapsError(
            f"{path} has {len(stored)} rows but attack.csv {int(success.sum())} "
            f"successful attacks: {REMEDY}"
        )
    moved = np.array(list(stored.values()), np.int64).reshape(-1, 2, 2)
    if np.any((moved < 0) | (moved >= np.array([height, width]))):
        raise PropmapsError(
            f"{path} has a position outside the {height}x{width} image: {REMEDY}"
        )
    return stored
