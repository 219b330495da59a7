"""DIR/<model>/locality.csv: one row per successful attack, written and read here.

Columns: the attacked image (index, label) and the attack's pixel (row, col, r,
g, b); the same colour moved to a nearby and to a random pixel (position, the
model's prediction there, success); then per Chebyshev distance d = 1..D the
number of pixels at that distance inside the image (`ring<d>_n`) and how many of
them fool the model with the attack's colour (`ring<d>_success`). A pixel-permuted
model's file adds the same moves in the network's coordinates (`netnearby_*`,
`netring<d>_*`, in image positions: see `locality.network_protocol_moves`). Every
value is an integer. Written by the locality experiment (whose later steps take
the same moves in memory, `locality_study.moves_table`); read back by its rerun
when the study is reused (every column, the rings of its --max_distance), by the
readings experiment and by the salience study (the positions only).
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from propmaps_jax.analysis.locality_study import MOVE_COLUMNS as BASE_COLUMNS
from propmaps_jax.errors import PropmapsError
from propmaps_jax.results import _io

NAME = "locality.csv"
# What the salience study reads: the attack's pixel and where it was moved to.
POSITION_COLUMNS = tuple(
    c for c in BASE_COLUMNS if c != "label" and not c.endswith(("_pred", "_success"))
)


# A pixel-permuted model's network-space moves (after the rings): the nearby
# position in the network's coordinates, and the rings taken there.
NETWORK_COLUMNS = (
    "netnearby_row",
    "netnearby_col",
    "netnearby_pred",
    "netnearby_success",
)


def ring_columns(max_distance: int, prefix: str = "ring") -> list[str]:
    """`ring<d>_n`, `ring<d>_success` for d = 1..max_distance."""
    return [
        f"{prefix}{d}_{what}"
        for d in range(1, max_distance + 1)
        for what in ("n", "success")
    ]


def _ring_counts(study: dict, i: int, max_d: int, prefix: str) -> list[int]:
    distances = study["distances"]
    counts = []
    for d in range(1, max_d + 1):
        at_d = distances == d
        counts += [
            int(study[f"{prefix}_inside"][i, at_d].sum()),
            int(study[f"{prefix}_success"][i, at_d].sum()),
        ]
    return counts


def text(table: dict, succ_rows: np.ndarray, study: dict) -> str:
    """The file's text: one row per successful attack (`succ_rows` of attack.csv's
    `table`), with the locality `study` of those attacks."""
    distances = study["distances"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    max_d = int(distances.max())
    network = "netnearby_rc" in study
    header = list(BASE_COLUMNS) + ring_columns(max_d)
    if network:
        header += list(NETWORK_COLUMNS) + ring_columns(max_d, "netring")
    writer.writerow(header)
    for i, row in enumerate(succ_rows):
        ring = _ring_counts(study, i, max_d, "ring")
        if network:
            ring += [int(v) for v in study["netnearby_rc"][i]]
            ring += [
                int(study["netnearby_pred"][i]),
                int(study["netnearby_success"][i]),
            ]
            ring += _ring_counts(study, i, max_d, "netring")
        writer.writerow(
            [int(table["index"][row]), int(table["label"][row])]
            + [int(v) for v in table["pixels"][row, 0]]
            + [int(v) for v in study["nearby_rc"][i]]
            + [int(study["nearby_pred"][i]), int(study["nearby_success"][i])]
            + [int(v) for v in study["random_rc"][i]]
            + [int(study["random_pred"][i]), int(study["random_success"][i])]
            + ring
        )
    return buffer.getvalue()


def rerun_locality(path: str) -> str:
    """What to do about a locality.csv that cannot be used."""
    return (
        f"delete {os.path.join(os.path.dirname(path), 'locality.json')} and run the "
        "locality experiment again on this --workdir (it reuses attack.csv)"
    )


def read(
    path: str,
    columns: tuple[str, ...] = BASE_COLUMNS,
    max_distance: int | None = None,
    remedy: str | None = None,
    network: bool = False,
) -> dict[str, np.ndarray]:
    """`columns` of a locality.csv as int arrays (N,), and with `max_distance`
    "ring_n" and "ring_success" (N, max_distance).

    A file that cannot be read, lacks a column (an older version, or another
    --max_distance), holds a value that is not an integer or inconsistent counts
    is refused with one line ending in `remedy` (default: how to remake it).
    """
    try:
        content = _io.read_text(path)
    except OSError as e:
        remedy = remedy or rerun_locality(path)
        raise PropmapsError(f"cannot read {path} ({e.strerror}): {remedy}") from None
    return parse(path, content, columns, max_distance, remedy, network)


def parse(
    path: str,
    content: str,
    columns: tuple[str, ...] = BASE_COLUMNS,
    max_distance: int | None = None,
    remedy: str | None = None,
    network: bool = False,
) -> dict[str, np.ndarray]:
    """`read` of the locality.csv text `content` (`path` names it in messages)."""
    remedy = remedy or rerun_locality(path)
    if network:
        columns = (*columns, *NETWORK_COLUMNS)
    prefixes = ("ring", "netring") if network else ("ring",)
    rings = [c for p in prefixes for c in ring_columns(max_distance or 0, p)]
    reader = csv.reader(io.StringIO(content, newline=""))
    header = next(reader, [])
    rows = list(reader)
    missing = [c for c in (*columns, *rings) if c not in header]
    if missing:
        raise PropmapsError(
            f"{path} lacks the column(s) {', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''} (an older version or another "
            f"--max_distance): {remedy}"
        )
    try:
        table = np.array(rows, dtype=np.int64).reshape(len(rows), len(header))
    except ValueError:
        raise PropmapsError(
            f"{path} holds a value that is not an integer: {remedy}"
        ) from None
    out = {c: table[:, header.index(c)] for c in columns}
    if max_distance is not None:
        for prefix in prefixes:
            for what in ("n", "success"):
                out[f"{prefix}_{what}"] = np.stack(
                    [
                        table[:, header.index(f"{prefix}{d}_{what}")]
                        for d in range(1, max_distance + 1)
                    ],
                    axis=1,
                ).reshape(len(rows), max_distance)
            if np.any(out[f"{prefix}_success"] > out[f"{prefix}_n"]):
                raise PropmapsError(f"{path} holds inconsistent counts: {remedy}")
    for flag in ("nearby_success", "random_success", "netnearby_success"):
        if flag in out and np.any(~np.isin(out[flag], (0, 1))):
            raise PropmapsError(f"{path} holds inconsistent counts: {remedy}")
    return out
